r"""Random starting values for EM, from explicit draws of a caller's seeded generator.

moeref never draws random numbers itself. An EM fit starts from explicit parameters; for random
starts and restarts, the caller passes a **generator object** (any object with a
``random(shape)`` method returning uniforms in $[0, 1)$, e.g. ``numpy.random.default_rng(seed)``),
and this module documents exactly which draws are taken, so that the same seed gives the same
starts, and a start can be rebuilt from the draws recorded with it.

**The draws.** One random start takes **one** call ``generator.random((N,))``: one uniform
$u_i \in [0, 1)$ per sample, in row order, and nothing else. Start $j$ of a fit with
``n_restarts`` random starts takes the $j$-th such call (restarts are drawn one after the other,
$j = 1, 2, \dots$, before any EM iteration runs). No other method of the generator is called.

**From draws to a start.** The uniforms give random responsibilities $\tau^{(0)}$
([`random_responsibilities`][moeref.em_init.random_responsibilities]), and one M-step from them
gives the starting parameters $\theta^{(0)} = \text{M-step}(\theta_{\text{template}}, \tau^{(0)})$:
the "random partition" start. Two schemes:

* ``"partition"`` (default): a **balanced** random partition. With $r_i$ the rank of $u_i$ among
  $u_1, \dots, u_N$ (0-based, ties by row order), sample $i$ goes to component
  $z_i = \lfloor r_i K / N \rfloor$, $\tau_{ik} = [z_i = k]$. Each component gets $\lfloor N/K\rfloor$
  or $\lceil N/K\rceil$ samples, so none is empty when $N \ge K$. This is the random split into $K$
  equal blocks that mixtools' ``regmix.init`` fits one regression to each of.
* ``"flexmix"``: $z_i = \min(\lfloor K u_i\rfloor, K - 1)$ (uniform over the components,
  independently), and $\tau_{ik} \propto 0.9$ for $k = z_i$, $0.1$ otherwise, rows renormalised:
  flexmix's ``initPosteriors`` (``FLXcontrol`` default). flexmix draws $z_i$ with R's ``sample``,
  so a seed does not give flexmix's labels; the scheme is the same.

The template $\theta_{\text{template}}$ fixes the shapes and is the starting point of iterative
M-steps (Newton for a softmax gate or a GLM expert); families with closed-form M-steps ignore
its values. Random parameters drawn any other way are just explicit starts: pass them as
``init`` or ``restarts``.

Functions that build starts for each model: [`moe_random_starts`][moeref.moe_em.moe_random_starts],
[`regression_mixture_random_starts`][moeref.regression_mixture.regression_mixture_random_starts],
[`hme_random_starts`][moeref.hme_em.hme_random_starts]; the fit functions take
``generator=, n_restarts=`` and run them as explicit restarts
([`run_restarts`][moeref.em.run_restarts]), reporting every run.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from .core import array_namespace, device_of, one_hot
from .validation import check_choice, check_float_array, check_positive_int, concrete_bool

__all__ = [
    "INIT_SCHEMES",
    "RandomStart",
    "draw_uniforms",
    "random_responsibilities",
    "random_starts",
]

INIT_SCHEMES: tuple[str, ...] = ("partition", "flexmix")
"""``"partition"``: balanced random hard partition (mixtools ``regmix.init``); ``"flexmix"``: 0.9/0.1
posteriors on a uniformly drawn component (flexmix ``initPosteriors``)."""


class RandomStart(NamedTuple):
    """One random starting point and the draws it was built from.

    Attributes
    ----------
    params
        The starting parameters (the model's record).
    draws : array, shape (N,)
        The uniforms $u_i$, in the namespace and dtype of the data.
    responsibilities : array, shape (N, K)
        $\\tau^{(0)}$, the random responsibilities the start is the M-step of.
    """

    params: Any
    draws: Any
    responsibilities: Any


def draw_uniforms(generator: Any, n_samples: int, *, like: Any) -> Any:
    r"""One start's draws: ``generator.random((n_samples,))``, as an array like ``like``.

    Parameters
    ----------
    generator
        Any object with a ``random(shape)`` method returning uniforms in $[0, 1)$ of that shape
        (``numpy.random.Generator``); only that method is called, once.
    n_samples : int
        $N$.
    like : array
        The draws are converted with ``xp.asarray`` to its namespace, dtype and device.

    Returns
    -------
    array, shape (N,)

    Raises
    ------
    TypeError
        If ``generator`` has no callable ``random``.
    ValueError
        If it returns a wrong shape or values outside $[0, 1)$.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.em_init import draw_uniforms
    >>> u = draw_uniforms(np.random.default_rng(0), 3, like=np.zeros(1))
    >>> bool(np.all(u == np.random.default_rng(0).random(3)))
    True
    """
    random = getattr(generator, "random", None)
    if not callable(random):
        raise TypeError(
            "generator must have a random(shape) method returning uniforms in [0, 1) (e.g. "
            f"numpy.random.default_rng(seed)), got {type(generator).__name__}"
        )
    check_positive_int(n_samples, "n_samples")
    xp = array_namespace(like, names=("like",))
    check_float_array(like, "like")
    raw = random((n_samples,))
    shape = tuple(getattr(raw, "shape", ()))
    if shape != (n_samples,):
        raise ValueError(f"generator.random(({n_samples},)) returned shape {shape}, expected ({n_samples},)")
    u = xp.asarray(raw, dtype=like.dtype, device=device_of(like))  # (N,)
    if concrete_bool(xp.all((u >= 0) & (u < 1))) is False:
        raise ValueError("generator.random returned values outside [0, 1); it must draw standard uniforms")
    return u


def random_responsibilities(draws: Any, n_components: int, /, *, scheme: str = "partition") -> Any:
    r"""Random responsibilities $\tau^{(0)}$ (N, K) from uniforms $u$ (N,); see the module notes.

    $$\text{partition: } \tau_{ik} = \big[\lfloor r_i K / N\rfloor = k\big], \qquad
    \text{flexmix: } \tau_{ik} = \frac{0.1 + 0.8\,[\lfloor K u_i\rfloor = k]}{0.9 + 0.1\,(K - 1)},$$

    with $r_i$ the 0-based rank of $u_i$ (ties broken by row order: a stable sort).

    Parameters
    ----------
    draws : array, shape (N,)
        Uniforms in $[0, 1)$, floating.
    n_components : int
        $K \ge 1$.
    scheme : {"partition", "flexmix"}

    Returns
    -------
    array, shape (N, K)
        Rows sum to 1; the dtype of ``draws``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.em_init import random_responsibilities
    >>> u = np.array([0.9, 0.1, 0.5, 0.3])
    >>> random_responsibilities(u, 2).argmax(axis=1).tolist()  # the two smallest draws form block 0
    [1, 0, 1, 0]
    >>> np.round(random_responsibilities(u, 2, scheme="flexmix")[0], 2).tolist()  # floor(2 * 0.9) = 1
    [0.1, 0.9]
    """
    xp = array_namespace(draws, names=("draws",))
    check_float_array(draws, "draws", ndim=1)
    check_positive_int(n_components, "n_components")
    check_choice(scheme, "scheme", INIT_SCHEMES)
    if concrete_bool(xp.all((draws >= 0) & (draws < 1))) is False:  # also refuses NaN and infinities
        raise ValueError("draws must hold uniforms in [0, 1), got values outside (or NaN)")
    N, K = draws.shape[0], n_components
    if scheme == "partition":
        order = xp.argsort(draws, stable=True)  # (N,) sample at each rank
        rank = xp.argsort(order, stable=True)  # (N,) inverse permutation: rank of each sample
        z = (xp.astype(rank, xp.int64) * K) // N  # (N,)
        return one_hot(z, K, dtype=draws.dtype)  # (N, K)
    z = xp.minimum(xp.astype(xp.floor(draws * K), xp.int64), xp.asarray(K - 1, dtype=xp.int64, device=device_of(draws)))
    hot = one_hot(z, K, dtype=draws.dtype)  # (N, K)
    return (0.1 + 0.8 * hot) / (0.9 + 0.1 * (K - 1))


def random_starts(
    generator: Any,
    n_starts: int,
    m_step: Callable[[Any], Any],
    *,
    n_components: int,
    like: Any,
    scheme: str = "partition",
) -> tuple[RandomStart, ...]:
    r"""``n_starts`` random starts, each the M-step of random responsibilities from fresh draws.

    For $j = 1, \dots, n$: $u^{(j)}$ = [`draw_uniforms`][moeref.em_init.draw_uniforms]``(generator, N)``,
    $\tau^{(j)}$ = [`random_responsibilities`][moeref.em_init.random_responsibilities]``(u, K, scheme)``,
    $\theta^{(j)} = $ ``m_step(tau)``. The model-specific wrappers supply ``m_step``.

    Parameters
    ----------
    generator
        See [`draw_uniforms`][moeref.em_init.draw_uniforms].
    n_starts : int
        $n \ge 0$.
    m_step : callable
        ``m_step(responsibilities (N, K)) -> params``.
    n_components : int
        $K$.
    like : array, shape (N, ...)
        Gives $N$ (its first axis) and the namespace, dtype and device of the draws.
    scheme : {"partition", "flexmix"}

    Returns
    -------
    tuple of RandomStart
        In the order drawn.

    Raises
    ------
    EMError
        From ``m_step`` when random responsibilities give a degenerate M-step (e.g. a block whose
        regression fits its points exactly); no start is silently redrawn.
    """
    check_positive_int(n_starts, "n_starts", minimum=0)
    check_choice(scheme, "scheme", INIT_SCHEMES)
    check_positive_int(n_components, "n_components")
    array_namespace(like, names=("like",))
    check_float_array(like, "like")
    if like.ndim == 0:
        raise ValueError("like must be at least 1-dimensional (its first axis gives N), got shape ()")
    if not callable(m_step):
        raise TypeError(f"m_step must be callable (responsibilities (N, K) -> params), got {type(m_step).__name__}")
    out = []
    for _ in range(n_starts):  # a loop over starts: each takes one generator call, in order
        u = draw_uniforms(generator, int(like.shape[0]), like=like)  # (N,)
        tau = random_responsibilities(u, n_components, scheme=scheme)  # (N, K)
        out.append(RandomStart(params=m_step(tau), draws=u, responsibilities=tau))
    return tuple(out)
