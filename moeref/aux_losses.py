r"""Auxiliary losses of sparse token-choice MoE: load balancing and router z-loss, with their VJPs.

A token-choice router sends each of $T$ tokens to $k$ of $E$ experts. Left alone, a learned
router tends to favour a few experts, which then get more gradient and win still more tokens; the
losses here are added to the task loss to counter that (load balancing) or to keep the router
logits small (z-loss). Every loss takes the router **logits** (T, E) and, where it needs one, the
routing **selection** (the chosen experts, an int64 array (T, k) or a
[`Routes`][moeref.routes.Routes] record), never the hidden states; each returns a scalar (0-d
array), and its `_vjp` returns the cotangent of the logits.

* [`importance_loss`][moeref.aux_losses.importance_loss] and
  [`load_loss`][moeref.aux_losses.load_loss]: Shazeer et al. (2017), Appendix A, the squared
  coefficient of variation of the per-expert gate sums and of a smooth estimate of the per-expert
  token counts under noisy top-k gating.
* [`vmoe_importance_loss`][moeref.aux_losses.vmoe_importance_loss] and
  [`vmoe_load_loss`][moeref.aux_losses.vmoe_load_loss]: Riquelme et al. (2021), Appendix A, the
  same two ideas for a softmax router with fixed-std Gaussian logit noise (V-MoE), per routing
  group.
* [`load_balancing_loss`][moeref.aux_losses.load_balancing_loss]: the Switch Transformer / GShard
  loss $\propto \sum_i f_i P_i$, with every convention that real systems differ on (which routes
  count in $f$, the overall scale, routing groups, padding masks) as an explicit option; and
  [`multilayer_load_balancing_loss`][moeref.aux_losses.multilayer_load_balancing_loss] for the
  aggregation over layers ("pooled" vs "averaged").
* [`sequence_balance_loss`][moeref.aux_losses.sequence_balance_loss]: DeepSeek-V3's complementary
  sequence-wise balance loss $\sum_i f_i P_i$ on normalised sigmoid affinities, per sequence.
* [`router_z_loss`][moeref.aux_losses.router_z_loss]: ST-MoE's $\frac1T\sum_t \operatorname{lse}(z_t)^2$.

The balance losses and the z-loss accept $-\infty$ logits (an expert switched off by a $-\infty$
router bias): its probability is 0, the log-sum-exp ignores it, and its cotangent is 0.

The selection is piecewise constant in the logits: its derivative is 0 almost everywhere (and does
not exist at a tie), so every VJP here treats it as a constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

from .core import (
    array_namespace,
    device_of,
    logsumexp,
    normal_cdf,
    normal_logpdf,
    one_hot,
    sigmoid,
    softmax,
    softmax_vjp,
    softplus,
    _take_along_axis,
    top_k,
)
from .router import _check_scalar_cotangent
from .routes import Routes
from .validation import (
    check_array,
    check_arrays,
    check_choice,
    check_float_array,
    check_positive_float,
    check_positive_int,
    check_record_type,
    check_same_dtype,
    check_shape,
    concrete_bool,
)

__all__ = [
    # Shazeer et al. (2017)
    "ShazeerLossOptions",
    "SHAZEER_TENSOR2TENSOR",
    "SHAZEER_RAU",
    "SHAZEER_PAPER",
    "NoisyTopKDraws",
    "NoisyTopKLossGrads",
    "cv_squared",
    "cv_squared_vjp",
    "noisy_top_k_gates",
    "smooth_load",
    "importance_loss",
    "importance_loss_vjp",
    "load_loss",
    "load_loss_vjp",
    # V-MoE (Riquelme et al. 2021)
    "VMoELossGrads",
    "vmoe_importance_loss",
    "vmoe_importance_loss_vjp",
    "vmoe_load_loss",
    "vmoe_load_loss_vjp",
    # Switch / GShard
    "LoadBalancingLossOptions",
    "SWITCH_TRANSFORMER",
    "HF_SWITCH_TRANSFORMERS",
    "T5X_FLAXFORMER",
    "HF_MIXTRAL",
    "GSHARD",
    "GSHARD_PAPER",
    "DEEPSPEED_TOPK",
    "MEGABLOCKS",
    "LoadBalancingLossGrads",
    "expert_fractions",
    "load_balancing_loss",
    "load_balancing_loss_vjp",
    "multilayer_load_balancing_loss",
    "multilayer_load_balancing_loss_vjp",
    # DeepSeek-V3
    "SequenceBalanceLossOptions",
    "DEEPSEEK_V3_SEQUENCE_BALANCE",
    "DEEPSEEK_V2_SEQUENCE_BALANCE",
    "SequenceBalanceLossGrads",
    "sequence_balance_loss",
    "sequence_balance_loss_vjp",
    # ST-MoE
    "RouterZLossGrads",
    "router_z_loss",
    "router_z_loss_vjp",
]


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def _check_logits(logits: Any, name: str = "logits") -> Any:
    # -inf is a logit of an expert switched off (a -inf router bias): softmax gives it probability
    # 0 and logsumexp ignores it; NaN and +inf are rejected
    xp = check_arrays({name: logits}, neg_inf_ok=(name,))
    check_float_array(logits, name, ndim=2)
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert (column), got shape {tuple(logits.shape)}")
    return xp


def _scalar_cotangent(cotangent: Any, like: Any, like_name: str) -> Any:
    """A loss's cotangent: a finite Python number or a finite 0-d array of ``like``'s library and dtype."""
    return _check_scalar_cotangent(cotangent, like, like_name)


def _check_k(k: Any, num_experts: int, *, strict: bool = False) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    upper = num_experts - 1 if strict else num_experts
    if not 1 <= k <= upper:
        why = " (the smooth load estimator needs the (k+1)-th largest noisy logit, so k < E)" if strict else ""
        raise ValueError(f"k must be between 1 and {upper} for E={num_experts} experts{why}, got {k}")
    return k


def _check_mask(mask: Any, like: Any, like_name: str = "logits") -> Any:
    if mask is None:
        return None
    xp = array_namespace(like, mask, names=(like_name, "mask"))
    if mask.dtype != xp.bool:
        raise TypeError(f"mask must be a boolean array (True = a real token, False = padding), got dtype {mask.dtype}")
    T = like.shape[0]
    check_shape(mask, "mask", (T,), what=f"one entry per token, T={T}")
    return mask


def _selection_arrays(
    selection: Any, logits: Any, xp: Any, *, name: str = "selection", logits_name: str = "logits", experts: str | None = None
) -> tuple[Any, Any]:
    """``(expert_index, kept)`` from an int array (T, k) or a Routes record (``kept`` None for an array).

    ``name`` is the argument's name in messages (``selections[1]`` for a layer), ``logits_name``
    the array the rows and experts are counted in, ``experts`` how $E$ was given (default: the
    columns of ``logits_name``).
    """
    T, E = logits.shape
    experts = experts or f"E={E} experts in {logits_name}"
    if isinstance(selection, Routes):
        index, kept = selection.expert_index, selection.kept
        index_name = f"{name}.expert_index"
        check_array(kept, f"{name}.kept")
    else:
        index, kept, index_name = selection, None, name
        if selection is None:
            raise TypeError(f"{name} must be an integer array of expert indices, shape (T, k), or a Routes record; got None")
    check_array(index, index_name)
    array_namespace(logits, index, names=(logits_name, index_name))
    if not xp.isdtype(index.dtype, "integral"):
        raise TypeError(f"{index_name} must be an integer array of expert indices (int64), got dtype {index.dtype}")
    if index.ndim != 2:
        raise ValueError(f"{index_name} must be 2-dimensional (T, k), got shape {tuple(index.shape)}")
    check_shape(index, index_name, (T, None), what=f"{logits_name} has T={T} rows")
    if not 1 <= index.shape[1] <= E:
        raise ValueError(f"{index_name} has k={index.shape[1]} routes per token but must have between 1 and E={E} ({experts})")
    if concrete_bool(xp.all((index >= 0) & (index < E))) is False:
        raise ValueError(f"{index_name} holds expert indices outside [0, {E}) ({experts})")
    if kept is not None:
        array_namespace(logits, kept, names=(logits_name, f"{name}.kept"))
        if kept.dtype != xp.bool:
            raise TypeError(f"{name}.kept must be a boolean array, got dtype {kept.dtype}")
        check_shape(kept, f"{name}.kept", tuple(index.shape), what="one flag per route")
    return xp.astype(index, xp.int64), kept


# --------------------------------------------------------------------------------------------
# Shazeer et al. (2017): importance and load losses of noisy top-k gating
# --------------------------------------------------------------------------------------------

_VARIANCES = ("population", "unbiased")


@dataclass(frozen=True)
class ShazeerLossOptions:
    r"""Conventions of the importance and load losses (Shazeer et al. 2017, Appendix A).

    The paper defines $\mathrm{CV}$, the coefficient of variation, without saying which variance
    or which safeguards; its two public implementations differ.

    Attributes
    ----------
    variance : {"population", "unbiased"}
        $\mathrm{Var}(v) = \frac1{n}\sum_i (v_i - \bar v)^2$ ("population": tensorflow/tensor2tensor
        `tensor2tensor/utils/expert_utils.py`, `cv_squared`, the authors' code) or
        $\frac1{n-1}\sum_i (v_i - \bar v)^2$ ("unbiased": davidmrau/mixture-of-experts `moe.py`,
        `cv_squared`, which calls `torch.var` with its default `unbiased=True`; with $n = 1$ it
        returns 0, and so does moeref).
    epsilon : float
        $\epsilon$ added to $\bar v^2$ in the denominator of $\mathrm{CV}^2$: ``1e-10`` in both
        implementations, 0 in the paper.
    size_epsilon : float
        Added to the count $n$ where the mean and the population variance divide by it:
        tensor2tensor uses $n + 10^{-10}$; Rau's code and the paper use $n$ (0).
    noise_epsilon : float
        Added to the noise standard deviation, $s = \operatorname{softplus}(x W_\text{noise}) +
        \epsilon_\text{noise}$: ``1e-2`` in tensor2tensor (`noisy_top_k_gating(...,
        noise_epsilon=1e-2)`) and in Rau's `noisy_top_k_gating`; 0 in the paper's Eq. (4).

    Presets: [`SHAZEER_TENSOR2TENSOR`][moeref.aux_losses.SHAZEER_TENSOR2TENSOR] (the default),
    [`SHAZEER_RAU`][moeref.aux_losses.SHAZEER_RAU], [`SHAZEER_PAPER`][moeref.aux_losses.SHAZEER_PAPER].
    """

    variance: str = "population"
    epsilon: float = 1e-10
    size_epsilon: float = 1e-10
    noise_epsilon: float = 1e-2

    def __post_init__(self) -> None:
        check_choice(self.variance, "variance", _VARIANCES)
        for name in ("epsilon", "size_epsilon", "noise_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


SHAZEER_TENSOR2TENSOR = ShazeerLossOptions("population", 1e-10, 1e-10, 1e-2)
r"""tensorflow/tensor2tensor `utils/expert_utils.py` (`cv_squared`, `noisy_top_k_gating`): population
variance, $n + 10^{-10}$, $\bar v^2 + 10^{-10}$, noise floor $10^{-2}$."""

SHAZEER_RAU = ShazeerLossOptions("unbiased", 1e-10, 0.0, 1e-2)
r"""davidmrau/mixture-of-experts `moe.py` (commit 0b67cc0): `torch.var` (unbiased), $\bar v^2 + 10^{-10}$,
noise floor $10^{-2}$."""

SHAZEER_PAPER = ShazeerLossOptions("population", 0.0, 0.0, 0.0)
"""The paper's equations as printed: population variance and no epsilons."""


class NoisyTopKDraws(NamedTuple):
    """The random draws of noisy top-k gating, passed in explicitly (moeref draws nothing).

    Attributes
    ----------
    normal : array, shape (T, E)
        Independent standard-normal draws $\\varepsilon_{ti}$, one per token and expert.
    """

    normal: Any


class NoisyTopKLossGrads(NamedTuple):
    """Cotangents of the inputs of [`importance_loss`][moeref.aux_losses.importance_loss] and
    [`load_loss`][moeref.aux_losses.load_loss] (the draws and ``k`` are constants: ``None``)."""

    clean_logits: Any
    noise_logits: Any
    draws: Any = None
    k: Any = None


def _cv_parts(v: Any, options: ShazeerLossOptions) -> tuple[Any, Any, Any, float, float]:
    """``(mean, variance, denominator, n_plus, d)`` of CV^2 for a vector ``v`` of length n."""
    xp = array_namespace(v)
    n = v.shape[0]
    n_plus = n + options.size_epsilon  # the count in the mean (and the population variance)
    d = n_plus if options.variance == "population" else n - 1.0
    mean = xp.sum(v) / n_plus
    dev = v - mean  # (n,)
    var = xp.sum(dev * dev) / d
    return mean, var, mean * mean + options.epsilon, n_plus, d


def cv_squared(v: Any, /, *, options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR) -> Any:
    r"""Squared coefficient of variation of a vector, with the epsilons of ``options``.

    $$\mathrm{CV}^2(v) = \frac{\mathrm{Var}(v)}{\bar v^2 + \epsilon}, \qquad
    \bar v = \frac{1}{n + \epsilon_n}\sum_i v_i, \qquad
    \mathrm{Var}(v) = \frac{1}{d}\sum_i (v_i - \bar v)^2,$$

    with $d = n + \epsilon_n$ ("population") or $d = n - 1$ ("unbiased"), see
    [`ShazeerLossOptions`][moeref.aux_losses.ShazeerLossOptions].

    Parameters
    ----------
    v : array, shape (n,)
    options : ShazeerLossOptions

    Returns
    -------
    array, shape ()
        0 for equal entries (and, for the unbiased variance, for $n = 1$).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import cv_squared, SHAZEER_PAPER
    >>> float(cv_squared(np.array([1.0, 3.0]), options=SHAZEER_PAPER))  # var 1, mean 2
    0.25
    """
    check_record_type(options, "options", ShazeerLossOptions)
    xp = check_arrays({"v": v})
    check_float_array(v, "v", ndim=1)
    if v.shape[0] == 1 and options.variance == "unbiased":
        return xp.zeros((), dtype=v.dtype, device=device_of(v))
    _, var, denom, _, _ = _cv_parts(v, options)
    return var / denom


def cv_squared_vjp(v: Any, cotangent: Any, /, *, options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR) -> Any:
    r"""VJP of [`cv_squared`][moeref.aux_losses.cv_squared] with respect to ``v``.

    With $m = \bar v^2 + \epsilon$ and $\delta_i = v_i - \bar v$,

    $$\frac{\partial\,\mathrm{CV}^2}{\partial v_i} = \frac{2}{m\,d}\Big(\delta_i - \frac{1}{n+\epsilon_n}\sum_j \delta_j\Big)
    - \frac{2\,\mathrm{Var}(v)\,\bar v}{m^2\,(n + \epsilon_n)} .$$

    ($\sum_j \delta_j = \epsilon_n \bar v$ is 0 unless a size epsilon is used.)

    Returns
    -------
    array, shape (n,)
    """
    check_record_type(options, "options", ShazeerLossOptions)
    xp = check_arrays({"v": v})
    check_float_array(v, "v", ndim=1)
    ct = _scalar_cotangent(cotangent, v, "v")
    if v.shape[0] == 1 and options.variance == "unbiased":
        return xp.zeros_like(v)
    mean, var, denom, n_plus, d = _cv_parts(v, options)
    dev = v - mean  # (n,)
    d_var = (2.0 / d) * (dev - xp.sum(dev) / n_plus)  # (n,)
    d_mean = 1.0 / n_plus
    return ct * (d_var / denom - var * 2.0 * mean * d_mean / (denom * denom))


def _check_noisy(clean_logits: Any, noise_logits: Any, draws: Any, k: Any, options: Any, *, strict_k: bool) -> tuple[Any, int]:
    check_record_type(options, "options", ShazeerLossOptions)
    if not isinstance(draws, NoisyTopKDraws):
        raise TypeError(f"draws must be a NoisyTopKDraws record, got {type(draws).__name__}")
    xp = check_arrays({"clean_logits": clean_logits, "noise_logits": noise_logits, "draws.normal": draws.normal})
    check_float_array(clean_logits, "clean_logits", ndim=2)
    T, E = clean_logits.shape
    check_shape(noise_logits, "noise_logits", (T, E), what=f"clean_logits has shape ({T}, {E})")
    check_shape(draws.normal, "draws.normal", (T, E), what=f"one standard-normal draw per token and expert, clean_logits has shape ({T}, {E})")
    return xp, _check_k(k, E, strict=strict_k)


class _Noisy(NamedTuple):
    stddev: Any  # (T, E)  s = softplus(noise_logits) + noise_epsilon
    noisy: Any  # (T, E)  H = clean + eps * s
    top_values: Any  # (T, m)  the m = min(k+1, E) largest H, descending
    top_index: Any  # (T, m)
    selected: Any  # (T, E)  1.0 where the expert is in the top k of H


def _noisy_forward(clean_logits: Any, noise_logits: Any, draws: NoisyTopKDraws, k: int, options: ShazeerLossOptions) -> _Noisy:
    xp = array_namespace(clean_logits)
    E = clean_logits.shape[1]
    stddev = softplus(noise_logits) + options.noise_epsilon  # (T, E)
    noisy = clean_logits + draws.normal * stddev  # (T, E)
    top_values, top_index = top_k(noisy, min(k + 1, E), axis=-1)  # (T, m)
    selected = xp.zeros_like(noisy)
    for j in range(k):  # loop over ranks
        selected = selected + one_hot(top_index[:, j], E, dtype=noisy.dtype)  # (T, E)
    return _Noisy(stddev, noisy, top_values, top_index, selected)


def _top_k_softmax(noisy: Any, selected: Any) -> Any:
    """Softmax over the selected entries of each row, 0 elsewhere: $G = \\operatorname{softmax}(\\mathrm{KeepTopK}(H, k))$."""
    xp = array_namespace(noisy)
    masked = xp.where(selected > 0, noisy, xp.full_like(noisy, -math.inf))  # (T, E)
    return softmax(masked, axis=-1)


def noisy_top_k_gates(
    clean_logits: Any, noise_logits: Any, draws: NoisyTopKDraws, k: int, *, options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR
) -> Any:
    r"""Noisy top-k gating of Shazeer et al. (2017), Eqs. (3)-(5), with explicit noise draws.

    $$H(x)_i = (x W_g)_i + \varepsilon_i \cdot \big(\operatorname{softplus}((x W_\text{noise})_i) + \epsilon_\text{noise}\big),$$

    $$G(x) = \operatorname{softmax}\big(\mathrm{KeepTopK}(H(x), k)\big), \qquad
    \mathrm{KeepTopK}(v, k)_i = v_i \text{ if } v_i \text{ is among the top } k \text{ of } v, \text{ else } -\infty .$$

    Parameters
    ----------
    clean_logits : array, shape (T, E)
        $x W_g$, the clean gate logits.
    noise_logits : array, shape (T, E)
        $x W_\text{noise}$, the pre-softplus noise scale.
    draws : NoisyTopKDraws
        The standard-normal draws $\varepsilon$ (shape (T, E)).
    k : int
        Experts per token, $1 \le k \le E$.
    options : ShazeerLossOptions
        Only ``noise_epsilon`` is used here.

    Returns
    -------
    array, shape (T, E)
        $G$, with exactly $k$ nonzero entries per row summing to 1.

    Notes
    -----
    Ties in $H$ go to the lower expert index ([`top_k`][moeref.core.top_k]).
    """
    _check_noisy(clean_logits, noise_logits, draws, k, options, strict_k=False)
    fw = _noisy_forward(clean_logits, noise_logits, draws, k, options)
    return _top_k_softmax(fw.noisy, fw.selected)


def _chain_noisy(h_bar: Any, noise_logits: Any, draws: NoisyTopKDraws) -> tuple[Any, Any]:
    """Cotangents of clean and noise logits from that of ``H = clean + eps * (softplus(noise) + c)``."""
    return h_bar, h_bar * draws.normal * sigmoid(noise_logits)


def importance_loss(
    clean_logits: Any,
    noise_logits: Any,
    draws: NoisyTopKDraws,
    k: int,
    *,
    w_importance: float = 1.0,
    options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR,
) -> Any:
    r"""Importance loss of Shazeer et al. (2017), Appendix A, Eqs. (6)-(7).

    $$\mathrm{Importance}(X)_i = \sum_{x \in X} G(x)_i, \qquad
    L_\text{importance}(X) = w_\text{importance} \cdot \mathrm{CV}\big(\mathrm{Importance}(X)\big)^2,$$

    with $G$ the noisy top-k gates of [`noisy_top_k_gates`][moeref.aux_losses.noisy_top_k_gates]
    and $\mathrm{CV}^2$ of [`cv_squared`][moeref.aux_losses.cv_squared]. Shazeer, Mirhoseini,
    Maziarz, Davis, Le, Hinton & Dean (2017), "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017, arXiv:1701.06538.

    Parameters
    ----------
    clean_logits, noise_logits : array, shape (T, E)
        $x W_g$ and $x W_\text{noise}$ for the $T$ tokens of the batch $X$.
    draws : NoisyTopKDraws
        The standard-normal draws used for $H$.
    k : int
    w_importance : float
        The paper's hand-tuned weight $w_\text{importance}$ (1 returns $\mathrm{CV}^2$ itself).
    options : ShazeerLossOptions
        Variance, epsilons and noise floor (tensor2tensor's by default).

    Returns
    -------
    array, shape ()

    Notes
    -----
    Both the paper's implementations compute it on the *noisy* gates (in training); with all draws
    0 the gates are the clean top-k softmax. The top-k selection is piecewise constant: the loss is
    differentiable through the gate values of the selected experts only.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import NoisyTopKDraws, importance_loss
    >>> z = np.zeros((4, 2))
    >>> clean = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    >>> float(importance_loss(clean, z, NoisyTopKDraws(z), 1)) < 1e-20  # each expert gets 2 tokens
    True
    >>> round(float(importance_loss(clean[:3], z[:3], NoisyTopKDraws(z[:3]), 1)), 6)  # importance (2, 1)
    0.111111
    """
    xp, k = _check_noisy(clean_logits, noise_logits, draws, k, options, strict_k=False)
    fw = _noisy_forward(clean_logits, noise_logits, draws, k, options)
    importance = xp.sum(_top_k_softmax(fw.noisy, fw.selected), axis=0)  # (E,)
    return w_importance * cv_squared(importance, options=options)


def importance_loss_vjp(
    clean_logits: Any,
    noise_logits: Any,
    draws: NoisyTopKDraws,
    k: int,
    cotangent: Any,
    *,
    w_importance: float = 1.0,
    options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR,
) -> NoisyTopKLossGrads:
    r"""VJP of [`importance_loss`][moeref.aux_losses.importance_loss].

    With $\bar I = w\,\partial\mathrm{CV}^2/\partial I$ (the same for every token), the gates'
    cotangent is $\bar G_{ti} = \bar I_i$; through the softmax over the selected set $S_t$,
    $\bar H_{ti} = G_{ti}\big(\bar I_i - \sum_{j \in S_t} G_{tj} \bar I_j\big)$ (0 outside $S_t$); and
    through $H = z + \varepsilon\,(\operatorname{softplus}(u) + \epsilon_\text{noise})$,

    $$\bar z = \bar H, \qquad \bar u = \bar H\,\varepsilon\,\operatorname{sigmoid}(u) .$$

    Returns
    -------
    NoisyTopKLossGrads
        ``clean_logits`` and ``noise_logits``, shape (T, E); ``draws`` and ``k`` are ``None``.
    """
    xp, k = _check_noisy(clean_logits, noise_logits, draws, k, options, strict_k=False)
    ct = _scalar_cotangent(cotangent, clean_logits, "clean_logits")
    fw = _noisy_forward(clean_logits, noise_logits, draws, k, options)
    gates = _top_k_softmax(fw.noisy, fw.selected)  # (T, E)
    imp_bar = w_importance * cv_squared_vjp(xp.sum(gates, axis=0), ct, options=options)  # (E,)
    h_bar = softmax_vjp(gates, xp.broadcast_to(imp_bar[None, :], gates.shape))  # (T, E)
    clean_bar, noise_bar = _chain_noisy(h_bar, noise_logits, draws)
    return NoisyTopKLossGrads(clean_bar, noise_bar)


class _Load(NamedTuple):
    z: Any  # (T, E)  (clean - threshold) / s
    prob: Any  # (T, E)  P(x, i) = Phi(z)
    is_in: Any  # (T, E)  bool, expert in the top k of H
    index_if_in: Any  # (T,)  expert holding the (k+1)-th largest H
    index_if_out: Any  # (T,)  expert holding the k-th largest H


def _load_forward(clean_logits: Any, fw: _Noisy, k: int) -> _Load:
    xp = array_namespace(clean_logits)
    threshold_if_in = fw.top_values[:, k : k + 1]  # (T, 1)  kth_excluding when i is in the top k
    threshold_if_out = fw.top_values[:, k - 1 : k]  # (T, 1)  kth_excluding when i is not
    is_in = fw.selected > 0  # (T, E)
    threshold = xp.where(is_in, threshold_if_in, threshold_if_out)  # (T, E)
    z = (clean_logits - threshold) / fw.stddev  # (T, E)
    return _Load(z, normal_cdf(z), is_in, fw.top_index[:, k], fw.top_index[:, k - 1])


def smooth_load(
    clean_logits: Any, noise_logits: Any, draws: NoisyTopKDraws, k: int, *, options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR
) -> Any:
    r"""Smooth load estimator of Shazeer et al. (2017), Appendix A, Eqs. (8)-(10).

    $$P(x, i) = \Phi\!\left(\frac{(x W_g)_i - \mathrm{kth\_excluding}(H(x), k, i)}{\operatorname{softplus}((x W_\text{noise})_i) + \epsilon_\text{noise}}\right),
    \qquad \mathrm{Load}(X)_i = \sum_{x \in X} P(x, i),$$

    the probability, over a fresh draw of expert $i$'s noise only, that $H(x)_i$ is among the top
    $k$ of $H(x)$; $\mathrm{kth\_excluding}(v, k, i)$ is the $k$-th largest entry of $v$ leaving out
    $v_i$, i.e. the $(k+1)$-th largest of $v$ if $i$ is in the top $k$, else the $k$-th.

    Parameters
    ----------
    clean_logits, noise_logits : array, shape (T, E)
    draws : NoisyTopKDraws
    k : int
        $1 \le k < E$.
    options : ShazeerLossOptions

    Returns
    -------
    array, shape (E,)

    Notes
    -----
    "Is $i$ in the top $k$" is read from moeref's top-k selection of $H$ (ties: lower index).
    tensor2tensor tests whether $H_i$ exceeds the $(k+1)$-th largest value instead; the two agree unless
    $H$ has ties at the $k$-th place. tensor2tensor also divides by $\sqrt2\,s + 10^{-20}$ inside
    $\operatorname{erf}$; the $10^{-20}$ is below float64 resolution for $s \ge 10^{-2}$ and is
    left out.
    """
    xp, k = _check_noisy(clean_logits, noise_logits, draws, k, options, strict_k=True)
    fw = _noisy_forward(clean_logits, noise_logits, draws, k, options)
    return xp.sum(_load_forward(clean_logits, fw, k).prob, axis=0)  # (E,)


def load_loss(
    clean_logits: Any,
    noise_logits: Any,
    draws: NoisyTopKDraws,
    k: int,
    *,
    w_load: float = 1.0,
    options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR,
) -> Any:
    r"""Load loss of Shazeer et al. (2017), Appendix A, Eq. (11).

    $$L_\text{load}(X) = w_\text{load} \cdot \mathrm{CV}\big(\mathrm{Load}(X)\big)^2,$$

    with the smooth $\mathrm{Load}$ of [`smooth_load`][moeref.aux_losses.smooth_load]. Unlike the
    true token count, $\mathrm{Load}$ is differentiable in both the clean and the noise logits.

    Parameters
    ----------
    clean_logits, noise_logits : array, shape (T, E)
    draws : NoisyTopKDraws
    k : int
        $1 \le k < E$ (with $k = E$ every expert is always chosen and both implementations fall
        back to the non-differentiable count).
    w_load : float
        The paper's $w_\text{load}$.
    options : ShazeerLossOptions

    Returns
    -------
    array, shape ()

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import NoisyTopKDraws, load_loss
    >>> z = np.zeros((2, 2))
    >>> clean = np.array([[1.0, -1.0], [-1.0, 1.0]])  # symmetric: equal loads
    >>> float(load_loss(clean, z, NoisyTopKDraws(z), 1)) < 1e-20
    True
    """
    xp, k = _check_noisy(clean_logits, noise_logits, draws, k, options, strict_k=True)
    fw = _noisy_forward(clean_logits, noise_logits, draws, k, options)
    load = xp.sum(_load_forward(clean_logits, fw, k).prob, axis=0)  # (E,)
    return w_load * cv_squared(load, options=options)


def load_loss_vjp(
    clean_logits: Any,
    noise_logits: Any,
    draws: NoisyTopKDraws,
    k: int,
    cotangent: Any,
    *,
    w_load: float = 1.0,
    options: ShazeerLossOptions = SHAZEER_TENSOR2TENSOR,
) -> NoisyTopKLossGrads:
    r"""VJP of [`load_loss`][moeref.aux_losses.load_loss].

    With $\bar L_i = w\,\partial\mathrm{CV}^2/\partial\mathrm{Load}_i$, $z_{ti} = (z^\text{clean}_{ti} -
    \tau_{ti})/s_{ti}$ and $\phi$ the standard normal density, $P_{ti} = \Phi(z_{ti})$ gives

    $$\bar z^\text{clean}_{ti} \mathrel{+}= \bar L_i \frac{\phi(z_{ti})}{s_{ti}}, \qquad
    \bar s_{ti} = -\bar L_i \frac{\phi(z_{ti})\, z_{ti}}{s_{ti}}, \qquad
    \bar\tau_{ti} = -\bar L_i \frac{\phi(z_{ti})}{s_{ti}} .$$

    The threshold $\tau_{ti}$ is the noisy logit $H_{tj}$ of another expert $j$ (the $(k+1)$-th
    for selected $i$, the $k$-th otherwise), so $\bar H_{tj} = \sum_i [\tau_{ti} = H_{tj}]\,\bar\tau_{ti}$,
    which then flows to $z^\text{clean}_{tj}$ and, through $\varepsilon_{tj} s_{tj}$, to the noise
    logits; $\bar u = \bar s\,\operatorname{sigmoid}(u)$. Which expert holds the threshold is
    piecewise constant (gradient 0).

    Returns
    -------
    NoisyTopKLossGrads
        ``clean_logits`` and ``noise_logits``, shape (T, E); ``draws`` and ``k`` are ``None``.
    """
    xp, k = _check_noisy(clean_logits, noise_logits, draws, k, options, strict_k=True)
    ct = _scalar_cotangent(cotangent, clean_logits, "clean_logits")
    E = clean_logits.shape[1]
    fw = _noisy_forward(clean_logits, noise_logits, draws, k, options)
    ld = _load_forward(clean_logits, fw, k)
    load_bar = w_load * cv_squared_vjp(xp.sum(ld.prob, axis=0), ct, options=options)  # (E,)
    dz = load_bar[None, :] * xp.exp(normal_logpdf(ld.z)) / fw.stddev  # (T, E)  dLoss/dclean through z
    s_bar = -dz * ld.z  # (T, E)
    zeros = xp.zeros_like(dz)
    tau_in = xp.sum(xp.where(ld.is_in, -dz, zeros), axis=1)  # (T,)  to the (k+1)-th expert
    tau_out = xp.sum(xp.where(ld.is_in, zeros, -dz), axis=1)  # (T,)  to the k-th expert
    h_bar = (
        one_hot(ld.index_if_in, E, dtype=dz.dtype) * tau_in[:, None] + one_hot(ld.index_if_out, E, dtype=dz.dtype) * tau_out[:, None]
    )  # (T, E)
    clean_bar, noise_bar = _chain_noisy(h_bar, noise_logits, draws)
    return NoisyTopKLossGrads(clean_bar + dz, noise_bar + s_bar * sigmoid(noise_logits))


# --------------------------------------------------------------------------------------------
# V-MoE (Riquelme et al. 2021): importance and load losses of a router with fixed-std noise
# --------------------------------------------------------------------------------------------


class VMoELossGrads(NamedTuple):
    """Cotangents of the inputs of the V-MoE losses (the draws and ``k`` are constants: ``None``)."""

    logits: Any
    draws: Any = None
    k: Any = None


def _check_group_size(T: int, group_size: Any) -> int:
    if group_size is None:
        return max(T, 1)
    check_positive_int(group_size, "group_size")
    if T % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the number of tokens T={T} (one loss per routing group)")
    return group_size


def _cv2_rows(v: Any) -> tuple[Any, Any, Any]:
    r"""Population $\mathrm{CV}^2$ of each row of ``v`` (G, E), no epsilons: ``(cv2 (G,), mean, var)`` (V-MoE's ``jnp.var / jnp.mean**2``)."""
    xp = array_namespace(v)
    n = v.shape[-1]
    mean = xp.sum(v, axis=-1, keepdims=True) / n  # (G, 1)
    dev = v - mean  # (G, E)
    var = xp.sum(dev * dev, axis=-1, keepdims=True) / n  # (G, 1)
    return xp.squeeze(var / (mean * mean), axis=-1), mean, var


def _cv2_rows_vjp(v: Any, cotangent: Any) -> Any:
    """VJP of ``_cv2_rows`` w.r.t. ``v`` for a cotangent of shape (G,)."""
    xp = array_namespace(v)
    n = v.shape[-1]
    _, mean, var = _cv2_rows(v)
    dev = v - mean  # (G, E)
    d_var = (2.0 / n) * (dev - xp.sum(dev, axis=-1, keepdims=True) / n)  # (G, E)
    m2 = mean * mean
    return cotangent[:, None] * (d_var / m2 - 2.0 * var * mean / (m2 * m2 * n))


def _per_group_sum(values: Any, group_size: int) -> Any:
    """Sum the rows of ``values`` (T, E) within consecutive groups: (G, E)."""
    xp = array_namespace(values)
    T, E = values.shape
    return xp.sum(xp.reshape(values, (T // group_size, group_size, E)), axis=1)


def _spread_groups(g_bar: Any, group_size: int) -> Any:
    """Cotangent (G, E) of a per-group sum, back to the rows: (T, E)."""
    xp = array_namespace(g_bar)
    G, E = g_bar.shape
    return xp.reshape(xp.broadcast_to(g_bar[:, None, :], (G, group_size, E)), (G * group_size, E))


def _check_vmoe_logits(logits: Any, group_size: Any, *, allow_neg_inf: bool) -> tuple[Any, int]:
    if allow_neg_inf:
        xp = _check_logits(logits)
    else:
        xp = check_arrays({"logits": logits})
        check_float_array(logits, "logits", ndim=2)
    return xp, _check_group_size(logits.shape[0], group_size)


def vmoe_importance_loss(logits: Any, *, group_size: int | None = None) -> Any:
    r"""Importance loss of V-MoE: $\mathrm{CV}^2$ of the per-expert sums of the clean router probabilities, per group.

    $$\mathrm{Imp}_g(i) = \sum_{t \in g} \operatorname{softmax}(z_t)_i, \qquad
    L_\text{imp} = \frac{1}{G}\sum_{g=1}^{G} \frac{\mathrm{Var}_i\,\mathrm{Imp}_g(i)}{\big(\mathrm{mean}_i\,\mathrm{Imp}_g(i)\big)^2},$$

    with the population variance over the $E$ experts and no epsilons. Riquelme et al. (2021),
    "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021, arXiv:2106.05974, Appendix A
    (importance loss, after Shazeer et al. 2017); google-research/vmoe ``vmoe/nn/routing.py``
    ``NoisyTopExpertsPerItemRouter._importance_auxiliary_loss`` (commit ``fc7b61a6``), which is
    ``vmap``-ed over the routing groups, and the trainer averages the groups
    (``jnp.mean(metrics["auxiliary_loss"])``).

    Unlike Shazeer's [`importance_loss`][moeref.aux_losses.importance_loss], the sums are over the
    **clean** softmax over all $E$ experts (no noise, no top-$k$), so every expert gets a gradient.

    Parameters
    ----------
    logits : array, shape (T, E)
        Router logits $z$ before the noise ($-\infty$ switches an expert off: probability 0).
    group_size : int, optional
        Tokens per routing group (consecutive rows); must divide $T$. ``None``: one group.

    Returns
    -------
    array, shape ()

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import vmoe_importance_loss
    >>> z = np.log(np.array([[0.75, 0.25], [0.75, 0.25]]))  # importance (1.5, 0.5): var 0.25, mean 1
    >>> round(float(vmoe_importance_loss(z)), 12)
    0.25
    """
    xp, Tg = _check_vmoe_logits(logits, group_size, allow_neg_inf=True)
    cv2, _, _ = _cv2_rows(_per_group_sum(softmax(logits, axis=-1), Tg))  # (G,)
    return xp.mean(cv2)


def vmoe_importance_loss_vjp(logits: Any, cotangent: Any, *, group_size: int | None = None) -> VMoELossGrads:
    r"""VJP of [`vmoe_importance_loss`][moeref.aux_losses.vmoe_importance_loss].

    With $P = \operatorname{softmax}(z)$, $\bar{\mathrm{Imp}}_g = \frac{\bar L}{G}\,
    \partial\mathrm{CV}^2/\partial\mathrm{Imp}_g$ (see
    [`cv_squared_vjp`][moeref.aux_losses.cv_squared_vjp] with no epsilons), every token of group
    $g$ gets $\bar P_t = \bar{\mathrm{Imp}}_g$ and $\bar z_t = P_t \odot (\bar P_t - \langle P_t, \bar P_t\rangle)$.

    Returns
    -------
    VMoELossGrads
        ``logits`` shape (T, E).
    """
    xp, Tg = _check_vmoe_logits(logits, group_size, allow_neg_inf=True)
    ct = _scalar_cotangent(cotangent, logits, "logits")
    probs = softmax(logits, axis=-1)  # (T, E)
    importance = _per_group_sum(probs, Tg)  # (G, E)
    G = importance.shape[0]
    imp_bar = _cv2_rows_vjp(importance, xp.broadcast_to(ct / G, (G,)))  # (G, E)
    return VMoELossGrads(softmax_vjp(probs, _spread_groups(imp_bar, Tg), axis=-1))


class _VMoELoad(NamedTuple):
    w: Any  # (T, E)  (z - threshold) / noise_std
    threshold_index: Any  # (T, 1)  expert holding the k-th largest noisy logit
    load: Any  # (G, E)  per-group mean of P(t, i)


def _check_vmoe_load(logits: Any, draws: Any, k: Any, noise_std: Any, group_size: Any) -> tuple[Any, int, int, float]:
    xp, Tg = _check_vmoe_logits(logits, group_size, allow_neg_inf=False)
    if not isinstance(draws, NoisyTopKDraws):
        raise TypeError(f"draws must be a NoisyTopKDraws record (the standard-normal logit noise), got {type(draws).__name__}")
    check_arrays({"logits": logits, "draws.normal": draws.normal})
    T, E = logits.shape
    check_shape(draws.normal, "draws.normal", (T, E), what=f"one standard-normal draw per token and expert, logits has shape ({T}, {E})")
    k = _check_k(k, E)
    noise_std = check_positive_float(noise_std, "noise_std")
    return xp, Tg, k, noise_std


def _vmoe_load_forward(logits: Any, draws: NoisyTopKDraws, k: int, noise_std: float, Tg: int) -> _VMoELoad:
    noisy = logits + noise_std * draws.normal  # (T, E)  the router's noisy logits
    _, index = top_k(noisy, k, axis=-1)  # (T, k)
    j = index[:, k - 1 : k]  # (T, 1)
    threshold = _take_along_axis(noisy, j, axis=-1)  # (T, 1)  k-th largest noisy logit
    w = (logits - threshold) / noise_std  # (T, E)
    return _VMoELoad(w, j, _per_group_sum(normal_cdf(w), Tg) / Tg)


def vmoe_load_loss(
    logits: Any, draws: NoisyTopKDraws, k: int, *, noise_std: float, group_size: int | None = None
) -> Any:
    r"""Load loss of V-MoE: $\mathrm{CV}^2$ of a smooth per-expert load under fixed-std Gaussian logit noise, per group.

    With noisy logits $\tilde z_t = z_t + \sigma\,\varepsilon_t$ and $\tau_t$ the $k$-th largest
    entry of $\tilde z_t$ (the threshold an expert must beat to be selected),

    $$p_{ti} = 1 - \Phi\Big(\frac{\tau_t - z_{ti}}{\sigma}\Big) = \Phi\Big(\frac{z_{ti} - \tau_t}{\sigma}\Big),
    \qquad \mathrm{Load}_g(i) = \frac{1}{T_g}\sum_{t \in g} p_{ti},
    \qquad L_\text{load} = \frac{1}{G}\sum_g \mathrm{CV}^2\big(\mathrm{Load}_g\big)$$

    (population variance, no epsilons): $p_{ti}$ is the probability that expert $i$ beats the
    current threshold if its noise were drawn again. Riquelme et al. (2021), "Scaling Vision with
    Sparse Mixture of Experts", NeurIPS 2021, arXiv:2106.05974, Appendix A (load loss);
    google-research/vmoe ``vmoe/nn/routing.py``
    ``NoisyTopExpertsPerItemRouter._load_auxiliary_loss`` (commit ``fc7b61a6``), ``vmap``-ed over
    groups and averaged.

    Differences from Shazeer et al.'s smooth load ([`load_loss`][moeref.aux_losses.load_loss]):
    the noise has a fixed standard deviation $\sigma$ (V-MoE: ``noise_std / num_experts``, no
    noise network); the threshold is the $k$-th largest noisy logit for every expert (Shazeer:
    the $k$-th largest *excluding* expert $i$); the load is a mean over tokens instead of a sum
    ($\mathrm{CV}^2$ is scale free, so the loss is the same).

    Parameters
    ----------
    logits : array, shape (T, E)
        The clean router logits $z$ (finite).
    draws : NoisyTopKDraws
        The standard-normal draws $\varepsilon$ of the router's logit noise, shape (T, E) (the
        router's ``RouterDraws.logit_noise``).
    k : int
        Experts per token, $1 \le k \le E$.
    noise_std : float
        $\sigma > 0$, the noise's standard deviation itself (moeref's router adds
        $(\sigma_\text{opt}/E)\,\varepsilon$: pass ``logit_noise_std / E``).
    group_size : int, optional
        Tokens per routing group; must divide $T$. ``None``: one group.

    Returns
    -------
    array, shape ()

    Notes
    -----
    The threshold's expert is chosen by moeref's stable top-$k$ (ties: lower index); V-MoE uses
    JAX's top-$k$, whose tie order is unspecified. The threshold is a noisy logit, so the loss is differentiable through it
    ($\partial \tau_t / \partial z_{tj} = 1$ for its expert $j$); the expert's own $p_{tj}$ is then
    constant in $z_{tj}$. The loss is NaN if every expert of a group has load 0 (underflow).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import NoisyTopKDraws, vmoe_load_loss
    >>> z = np.array([[1.0, -1.0], [-1.0, 1.0]])  # symmetric: equal loads
    >>> float(vmoe_load_loss(z, NoisyTopKDraws(np.zeros((2, 2))), 1, noise_std=0.5)) < 1e-20
    True
    """
    xp, Tg, k, noise_std = _check_vmoe_load(logits, draws, k, noise_std, group_size)
    cv2, _, _ = _cv2_rows(_vmoe_load_forward(logits, draws, k, noise_std, Tg).load)  # (G,)
    return xp.mean(cv2)


def vmoe_load_loss_vjp(
    logits: Any, draws: NoisyTopKDraws, k: int, cotangent: Any, *, noise_std: float, group_size: int | None = None
) -> VMoELossGrads:
    r"""VJP of [`vmoe_load_loss`][moeref.aux_losses.vmoe_load_loss].

    With $\bar{\mathrm{Load}}_g = \frac{\bar L}{G}\,\partial\mathrm{CV}^2/\partial\mathrm{Load}_g$,
    $w_{ti} = (z_{ti} - \tau_t)/\sigma$ and $\phi$ the standard normal density:

    $$\bar z_{ti} = \frac{\bar{\mathrm{Load}}_{g(t), i}}{T_g}\,\frac{\phi(w_{ti})}{\sigma}
    + [i = j_t]\,\bar\tau_t, \qquad
    \bar\tau_t = -\sum_i \frac{\bar{\mathrm{Load}}_{g(t), i}}{T_g}\,\frac{\phi(w_{ti})}{\sigma},$$

    where $j_t$ holds the threshold ($\tau_t = z_{tj_t} + \sigma\varepsilon_{tj_t}$; which expert
    holds it is piecewise constant, gradient 0). The draws are constants.

    Returns
    -------
    VMoELossGrads
        ``logits`` shape (T, E); ``draws`` and ``k`` are ``None``.
    """
    xp, Tg, k, noise_std = _check_vmoe_load(logits, draws, k, noise_std, group_size)
    ct = _scalar_cotangent(cotangent, logits, "logits")
    fw = _vmoe_load_forward(logits, draws, k, noise_std, Tg)
    G, E = fw.load.shape
    load_bar = _cv2_rows_vjp(fw.load, xp.broadcast_to(ct / G, (G,)))  # (G, E)
    p_bar = _spread_groups(load_bar, Tg) / Tg  # (T, E)
    dz = p_bar * xp.exp(normal_logpdf(fw.w)) / noise_std  # (T, E)  through w directly
    tau_bar = -xp.sum(dz, axis=-1, keepdims=True)  # (T, 1)
    experts = xp.arange(E, dtype=fw.threshold_index.dtype, device=device_of(fw.threshold_index))
    return VMoELossGrads(dz + xp.where(fw.threshold_index == experts, tau_bar, xp.zeros_like(dz)))


# --------------------------------------------------------------------------------------------
# Switch Transformer / GShard load-balancing loss
# --------------------------------------------------------------------------------------------

_FRACTIONS = ("top1", "all_routes", "all_routes_over_k")
_SCALES = ("num_experts", "mean")
_MASK_MODES = ("exclude", "counts_only", "probs_only", "zero")
_LAYERS = ("pooled", "averaged")


@dataclass(frozen=True)
class LoadBalancingLossOptions:
    r"""Conventions of the Switch / GShard load-balancing loss $s \sum_i f_i P_i$.

    Attributes
    ----------
    fraction : {"top1", "all_routes", "all_routes_over_k"}
        Which routes count in $f_i$, the fraction of tokens dispatched to expert $i$:

        * ``"top1"``: only each token's first choice (rank 0), so $\sum_i f_i = 1$. Switch
          Transformer (k = 1), GShard's $c_e$ for top-2 gating (counts of first choices only), as
          in microsoft/DeepSpeed `deepspeed/moe/sharded_moe.py` `top1gating` and `top2gating`
          (`ce = mean(mask1)`; v0.19.8), facebookresearch/fairseq `fairseq/modules/moe/top2gate.py`,
          facebookresearch/fairscale `fairscale/nn/moe/top2gate.py`, tensorflow/mesh
          `mesh_tensorflow/transformer/moe.py` `_top_2_gating` (`density_1`).
        * ``"all_routes"``: each of the $k$ routes counts 1, so $\sum_i f_i = k$. huggingface/transformers
          `load_balancing_loss_func` of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DBRX, GPT-OSS, Jamba,
          PhiMoE (identical code, v5.24.0), and of SwitchTransformers (one-hot max over the k
          columns); google/flaxformer `flaxformer/architectures/moe/routing.py` `_load_balancing_loss`.
        * ``"all_routes_over_k"``: each route counts $1/k$, so $\sum_i f_i = 1$. DeepSpeed
          `topkgating` (`mean(me * ce) * E * E / k`), databricks/megablocks
          `megablocks/layers/moe.py` `batched_load_balancing_loss` (scale `E / (tokens * top_k)`).

        With $k = 1$ the three coincide.
    scale : {"num_experts", "mean"}
        $s = E$, i.e. $E \sum_i f_i P_i = E^2 \operatorname{mean}_i f_i P_i$ (Fedus et al. 2021,
        Eq. (4); every implementation above except fairscale), or $s = 1/E$, i.e.
        $\operatorname{mean}_i f_i P_i$ (GShard, Lepikhin et al. 2020, arXiv:2006.16668,
        Algorithm 1, `l_aux = mean(c_e/S * m_e)`; fairscale `top2gate.py`, `l_aux = torch.mean(me * ce)`).
        The two differ by the constant factor $E^2$, which the loss weight absorbs.
    group_size : int or None
        Routing groups of this many consecutive tokens: $f$ and $P$ are computed within each group
        and the per-group losses averaged (GShard, Switch / T5X / flaxformer and HF
        SwitchTransformers with one group per batch row, fairscale's first version with (G, S, E)
        logits). ``None``: one group of all $T$ tokens (DeepSpeed, Megablocks, HF Mixtral).
        Must divide $T$.
    mask_mode : {"exclude", "counts_only", "probs_only", "zero"}
        How a token mask (False = padding) enters, when one is passed:

        * ``"exclude"``: padding is removed from $f$ and $P$ and from their denominators (HF
          Mixtral family, `attention_mask`).
        * ``"counts_only"``: padding is removed from the counts in $f$ only; $P$ averages every
          token, and both divide by all $T$ tokens (fairseq `top2gating(input_mask=...)`,
          DeepSpeed `top1gating(used_token=...)`).
        * ``"probs_only"``: padding is removed from $P$ only; its routes still count in $f$, and both
          divide by all tokens (flaxformer `TokensChooseScatterRouter`, which zeroes the padding
          probabilities before its top-k and so still routes padding, to the lowest-index experts).
        * ``"zero"``: padding is removed from the sums in both $f$ and $P$ but both still divide by
          all tokens (tensorflow/mesh `_top_2_gating(importance=...)`, flaxformer
          `TokensChooseMaskedRouter`).
    count_dropped_routes : bool
        With a [`Routes`][moeref.routes.Routes] selection: count routes dropped by the capacity
        limit in $f$ (True: every implementation above computes $f$ from the selection before
        capacity is applied) or only the kept ones (False).
    layers : {"pooled", "averaged"}
        For [`multilayer_load_balancing_loss`][moeref.aux_losses.multilayer_load_balancing_loss]:
        one loss over the tokens of all layers together ("pooled": HF Mixtral family, which
        accumulates counts and probabilities over layers; HF SwitchTransformers, which
        concatenates the layers' logits along the sequence before the loss), or the mean of the
        per-layer losses ("averaged": T5X `t5x/contrib/moe/models.py` `_expert_losses`, Megablocks
        `batched_load_balancing_loss`).

    Presets: [`SWITCH_TRANSFORMER`][moeref.aux_losses.SWITCH_TRANSFORMER],
    [`HF_SWITCH_TRANSFORMERS`][moeref.aux_losses.HF_SWITCH_TRANSFORMERS],
    [`T5X_FLAXFORMER`][moeref.aux_losses.T5X_FLAXFORMER], [`HF_MIXTRAL`][moeref.aux_losses.HF_MIXTRAL],
    [`GSHARD`][moeref.aux_losses.GSHARD], [`GSHARD_PAPER`][moeref.aux_losses.GSHARD_PAPER],
    [`DEEPSPEED_TOPK`][moeref.aux_losses.DEEPSPEED_TOPK], [`MEGABLOCKS`][moeref.aux_losses.MEGABLOCKS];
    set a group size with `dataclasses.replace(preset, group_size=S)`.
    """

    fraction: str = "top1"
    scale: str = "num_experts"
    group_size: int | None = None
    mask_mode: str = "exclude"
    count_dropped_routes: bool = True
    layers: str = "averaged"

    def __post_init__(self) -> None:
        check_choice(self.fraction, "fraction", _FRACTIONS)
        check_choice(self.scale, "scale", _SCALES)
        check_choice(self.mask_mode, "mask_mode", _MASK_MODES)
        check_choice(self.layers, "layers", _LAYERS)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be None or a positive int, got {self.group_size!r}")
        if not isinstance(self.count_dropped_routes, bool):
            raise TypeError(f"count_dropped_routes must be a bool, got {self.count_dropped_routes!r}")


SWITCH_TRANSFORMER = LoadBalancingLossOptions(fraction="top1", scale="num_experts")
r"""Fedus, Zoph & Shazeer (2021), Eq. (4): top-1 fractions, $E \sum_i f_i P_i$; DeepSpeed `top1gating`."""

HF_SWITCH_TRANSFORMERS = LoadBalancingLossOptions(fraction="all_routes", scale="num_experts", layers="pooled")
"""huggingface/transformers SwitchTransformers `load_balancing_loss_func` (v5.24.0): every route counts,
per group (one per batch row: set `group_size` to the sequence length), layers pooled."""

T5X_FLAXFORMER = LoadBalancingLossOptions(fraction="all_routes", scale="num_experts", mask_mode="zero", layers="averaged")
"""google/flaxformer `_load_balancing_loss` per group (set `group_size`), padding as in
`TokensChooseMaskedRouter`, and T5X's mean over layers."""

HF_MIXTRAL = LoadBalancingLossOptions(fraction="all_routes", scale="num_experts", mask_mode="exclude", layers="pooled")
"""huggingface/transformers `load_balancing_loss_func` of Mixtral, Qwen2/3-MoE, OLMoE, DBRX, GPT-OSS, Jamba,
PhiMoE (v5.24.0)."""

GSHARD = LoadBalancingLossOptions(fraction="top1", scale="num_experts", mask_mode="counts_only")
"""GShard top-2 as implemented, with the $E^2$ mean: DeepSpeed `top2gating`, fairseq `top2gate.py` (its
padding mask), Mesh-TensorFlow `_top_2_gating` (whose padding is `mask_mode="zero"`)."""

GSHARD_PAPER = LoadBalancingLossOptions(fraction="top1", scale="mean")
r"""GShard's Algorithm 1 as printed, and fairscale `top2gate.py`: $\operatorname{mean}_e(c_e/S \cdot m_e)$."""

DEEPSPEED_TOPK = LoadBalancingLossOptions(fraction="all_routes_over_k", scale="num_experts", mask_mode="counts_only")
"""DeepSpeed `topkgating` (v0.19.8): every route counts $1/k$."""

MEGABLOCKS = LoadBalancingLossOptions(fraction="all_routes_over_k", scale="num_experts", layers="averaged")
"""databricks/megablocks `batched_load_balancing_loss`: routes count $1/k$, mean over layers."""


class LoadBalancingLossGrads(NamedTuple):
    """Cotangents of [`load_balancing_loss`][moeref.aux_losses.load_balancing_loss]'s inputs
    (the selection is piecewise constant: ``None``)."""

    logits: Any
    selection: Any = None


def _check_options(options: Any) -> LoadBalancingLossOptions:
    if not isinstance(options, LoadBalancingLossOptions):
        raise TypeError(f"options must be a LoadBalancingLossOptions, got {type(options).__name__}")
    return options


def _weighted_route_counts(index: Any, kept: Any, num_experts: int, options: LoadBalancingLossOptions, token_weight: Any) -> Any:
    r"""$\sum_s \omega_{gs}\, c_{gsi}$ (G, E): the per-token counts $c_{ti}$ (how much token $t$
    counts towards expert $i$) summed over each group's tokens with weights ``token_weight``
    $\omega$ (G, S, 1).

    One batched product per call, $(1 \times S r)(S r \times E)$ per group with the one-hot rows of
    the $r$ counted routes of its tokens (gathered from the identity: one copy per route instead of a
    comparison and a conversion per route and expert), instead of one $(T, E)$ one-hot array per rank.
    ``index`` must lie in $[0, E)$ (checked by the callers).
    """
    xp = array_namespace(index)
    G, S, _ = token_weight.shape
    T, k = index.shape
    ranks = 1 if options.fraction == "top1" else k
    per_route = 1.0 / k if options.fraction == "all_routes_over_k" else 1.0
    value = xp.broadcast_to(per_route * token_weight, (G, S, ranks))  # (G, S, r)
    if kept is not None and not options.count_dropped_routes:
        value = value * xp.reshape(xp.astype(kept[:, :ranks], token_weight.dtype), (G, S, ranks))
    eye = xp.eye(num_experts, dtype=token_weight.dtype, device=device_of(token_weight))  # (E, E)
    hot = xp.reshape(xp.take(eye, xp.reshape(index[:, :ranks], (G * S * ranks,)), axis=0), (G, S * ranks, num_experts))  # (G, S r, E) one-hot rows, gathered
    return xp.matmul(xp.reshape(value, (G, 1, S * ranks)), hot)[:, 0, :]  # (G, E)


class _Balance(NamedTuple):
    probs: Any  # (T, E)
    fraction: Any  # (G, E)  f
    mean_prob: Any  # (G, E)  P
    prob_weight: Any  # (G, S, 1)  weight of each token in P, divided by its denominator
    scale: float


def _balance_forward(logits: Any, index: Any, kept: Any, mask: Any, options: LoadBalancingLossOptions) -> _Balance:
    xp = array_namespace(logits)
    T, E = logits.shape
    S = T if options.group_size is None else options.group_size
    G = T // S
    probs = softmax(logits, axis=-1)  # (T, E)
    if mask is None:
        m = xp.ones((G, S, 1), dtype=logits.dtype, device=device_of(logits))
    else:
        m = xp.reshape(xp.astype(mask, logits.dtype), (G, S, 1))  # (G, S, 1)
    all_tokens = xp.full((G, 1, 1), float(S), dtype=logits.dtype, device=device_of(logits))
    if mask is None or options.mask_mode != "exclude":
        denom = all_tokens
    else:
        valid = xp.sum(m, axis=1, keepdims=True)  # (G, 1, 1)
        denom = xp.where(valid > 0, valid, xp.ones_like(valid))  # an all-padding group contributes 0
    ones = xp.ones_like(m)
    count_weight = (ones if mask is not None and options.mask_mode == "probs_only" else m) / denom  # (G, S, 1)
    prob_weight = (ones if mask is not None and options.mask_mode == "counts_only" else m) / denom  # (G, S, 1)
    fraction = _weighted_route_counts(index, kept, E, options, count_weight)  # (G, E)
    mean_prob = xp.sum(xp.reshape(probs, (G, S, E)) * prob_weight, axis=1)  # (G, E)
    scale = float(E) if options.scale == "num_experts" else 1.0 / E
    return _Balance(probs, fraction, mean_prob, prob_weight, scale)


def _check_balance(
    logits: Any, selection: Any, mask: Any, options: Any, *, logits_name: str = "logits", selection_name: str = "selection",
    experts: str | None = None,
) -> tuple[Any, Any, Any, Any, LoadBalancingLossOptions]:
    options = _check_options(options)
    xp = _check_logits(logits, logits_name)
    T = logits.shape[0]
    index, kept = _selection_arrays(selection, logits, xp, name=selection_name, logits_name=logits_name, experts=experts)
    mask = _check_mask(mask, logits, logits_name)
    if options.group_size is not None and T % options.group_size != 0:
        raise ValueError(f"group_size={options.group_size} does not divide the number of tokens T={T}")
    return xp, index, kept, mask, options


def expert_fractions(
    selection: Any, num_experts: int, *, options: LoadBalancingLossOptions = SWITCH_TRANSFORMER, mask: Any = None
) -> Any:
    r"""$f_i$, the (weighted) fraction of tokens dispatched to each expert, per routing group.

    $$f_{gi} = \frac{1}{D_g} \sum_{t \in g} m_t\, c_{ti}, \qquad
    c_{ti} = \sum_{j \in R} w_j\,[e_{tj} = i],$$

    with $R = \{0\}$ and $w = 1$ ("top1"), $R$ = all $k$ ranks and $w = 1$ ("all_routes") or
    $w = 1/k$ ("all_routes_over_k"); $m_t$ the mask (1 without one) and $D_g$ the group's token
    count (valid tokens only with ``mask_mode="exclude"``).

    Parameters
    ----------
    selection : int64 array, shape (T, k), or Routes
    num_experts : int
    options : LoadBalancingLossOptions
    mask : bool array, shape (T,), optional

    Returns
    -------
    array, shape (G, E), float64
        One row per routing group ($G = 1$ without groups).
    """
    E = num_experts
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    is_routes = isinstance(selection, Routes)
    index = selection.expert_index if is_routes else selection
    if index is None:
        raise TypeError("selection must be an integer array of expert indices, shape (T, k), or a Routes record; got None")
    index_name = "selection.expert_index" if is_routes else "selection"
    xp = check_array(index, index_name)
    if index.ndim != 2:
        raise ValueError(f"{index_name} must be 2-dimensional (T, k), got shape {tuple(index.shape)}")
    # the fractions need E only: a zero (T, E) stand-in for the logits carries T, E and the library
    like = xp.zeros((index.shape[0], E), dtype=xp.float64, device=device_of(index))
    xp, index, kept, mask, options = _check_balance(
        like, selection, mask, options, logits_name=index_name, experts=f"num_experts={E}"
    )
    return _balance_forward(like, index, kept, mask, options).fraction


def load_balancing_loss(
    logits: Any, selection: Any, *, options: LoadBalancingLossOptions = SWITCH_TRANSFORMER, mask: Any = None
) -> Any:
    r"""Load-balancing loss of the Switch Transformer and GShard, with explicit conventions.

    For each routing group $g$ of $S$ tokens (the whole batch by default), with router
    probabilities $p_t = \operatorname{softmax}(z_t)$,

    $$f_{gi} = \frac{1}{D_g}\sum_{t \in g} m_t\, c_{ti}, \qquad
    P_{gi} = \frac{1}{D_g}\sum_{t \in g} a_t\, p_{ti}, \qquad
    \mathcal L = \frac{1}{G}\sum_{g=1}^{G} s \sum_{i=1}^{E} f_{gi}\, P_{gi},$$

    Fedus, Zoph & Shazeer (2021), "Switch Transformers: Scaling to Trillion Parameter Models with
    Simple and Efficient Sparsity", JMLR 23(120), arXiv:2101.03961, Eqs. (4)-(6) ($s = E$, top-1
    counts $c$); Lepikhin et al. (2020), "GShard: Scaling Giant Models with Conditional Computation
    and Automatic Sharding", arXiv:2006.16668, Algorithm 1 ($s = 1/E$, first-choice counts, per
    group). $c_{ti}$ (which routes count), $s$, the groups, the mask weights $m_t, a_t$ and the
    denominators $D_g$ are set by ``options``
    ([`LoadBalancingLossOptions`][moeref.aux_losses.LoadBalancingLossOptions], which lists the
    systems using each).

    Parameters
    ----------
    logits : array, shape (T, E)
        Router logits $z$.
    selection : int64 array, shape (T, k), or Routes
        The chosen experts in rank order (rank 0 = first choice), e.g. from
        [`top_k`][moeref.core.top_k] of the logits.
    options : LoadBalancingLossOptions
        Default: [`SWITCH_TRANSFORMER`][moeref.aux_losses.SWITCH_TRANSFORMER].
    mask : bool array, shape (T,), optional
        False for padding tokens (see ``options.mask_mode``).

    Returns
    -------
    array, shape ()

    Notes
    -----
    Minimum: by the rearrangement inequality the loss is smallest when routing is uniform; with
    uniform $f_i = \sum_i f_i / E$ and $P_i = 1/E$ it equals $\sum_i f_i$ for $s = E$ (1 for
    "top1" and "all_routes_over_k", $k$ for "all_routes") and $\sum_i f_i/E^2$ for $s = 1/E$.
    Only $P$ depends differentiably on the logits; $f$ is piecewise constant.
    A route listed twice for one token counts twice (HF SwitchTransformers would count it once;
    top-k selections never repeat an expert). A $-\infty$ logit (an expert switched off) has
    probability 0 and cotangent 0 in the VJP; a row of all $-\infty$ contributes $p_t = 0$.
    NaN and $+\infty$ are rejected.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import load_balancing_loss
    >>> logits = np.zeros((4, 2))  # P uniform
    >>> float(load_balancing_loss(logits, np.array([[0], [1], [0], [1]])))  # f uniform: the minimum
    1.0
    >>> float(load_balancing_loss(logits, np.array([[0], [0], [0], [0]])))  # all tokens on expert 0
    1.0
    >>> float(load_balancing_loss(np.array([[1.0, 0.0]] * 4), np.array([[0]] * 4)))  # doctest: +ELLIPSIS
    1.46211715726...
    """
    xp, index, kept, mask, options = _check_balance(logits, selection, mask, options)
    fw = _balance_forward(logits, index, kept, mask, options)
    per_group = fw.scale * xp.sum(fw.fraction * fw.mean_prob, axis=1)  # (G,)
    return xp.mean(per_group)


def load_balancing_loss_vjp(
    logits: Any, selection: Any, cotangent: Any, *, options: LoadBalancingLossOptions = SWITCH_TRANSFORMER, mask: Any = None
) -> LoadBalancingLossGrads:
    r"""VJP of [`load_balancing_loss`][moeref.aux_losses.load_balancing_loss].

    $f$ is constant; $\partial\mathcal L/\partial p_{ti} = \frac{s}{G}\, f_{gi}\, \frac{a_t}{D_g}$ for
    token $t$ in group $g$, then through the softmax,

    $$\bar z_{ti} = p_{ti}\Big(\bar p_{ti} - \sum_j p_{tj}\, \bar p_{tj}\Big) .$$

    Returns
    -------
    LoadBalancingLossGrads
        ``logits``, shape (T, E); ``selection`` is ``None``.
    """
    xp, index, kept, mask, options = _check_balance(logits, selection, mask, options)
    ct = _scalar_cotangent(cotangent, logits, "logits")
    fw = _balance_forward(logits, index, kept, mask, options)
    G, E = fw.fraction.shape
    p_bar = (ct * fw.scale / G) * fw.fraction[:, None, :] * fw.prob_weight  # (G, S, E)
    return LoadBalancingLossGrads(softmax_vjp(fw.probs, xp.reshape(p_bar, logits.shape)))


def _check_layers(logits_per_layer: Any, selections: Any, mask: Any) -> tuple[list, list]:
    """Every layer's logits and selection, checked under its own name (``logits_per_layer[l]``, ``selections[l]``)."""
    for seq, name in ((logits_per_layer, "logits_per_layer"), (selections, "selections")):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple with one entry per layer, got {type(seq).__name__}")
    logits_per_layer, selections = list(logits_per_layer), list(selections)
    if not logits_per_layer:
        raise ValueError("logits_per_layer must hold at least one layer's logits")
    if len(selections) != len(logits_per_layer):
        raise ValueError(f"selections has {len(selections)} entries but logits_per_layer has {len(logits_per_layer)} layers")
    names = [f"logits_per_layer[{l}]" for l in range(len(logits_per_layer))]
    for z, name in zip(logits_per_layer, names):
        _check_logits(z, name)
    check_same_dtype(dict(zip(names, logits_per_layer)))  # one library and one dtype for every layer
    shape = tuple(logits_per_layer[0].shape)
    for l, z in enumerate(logits_per_layer):
        check_shape(z, names[l], shape, what="every layer routes the same tokens to the same experts, like logits_per_layer[0]")
        _selection_arrays(selections[l], z, array_namespace(z), name=f"selections[{l}]", logits_name=names[l])
    _check_mask(mask, logits_per_layer[0], names[0])
    return logits_per_layer, selections


def _pool_layers(logits_per_layer: list, selections: list, mask: Any, options: LoadBalancingLossOptions) -> tuple[Any, Any, Any, LoadBalancingLossOptions]:
    """One (L*T, E) problem whose group g holds group g of every layer (HF SwitchTransformers' concatenation)."""
    xp = array_namespace(*logits_per_layer)
    L = len(logits_per_layer)
    T, E = logits_per_layer[0].shape
    S = T if options.group_size is None else options.group_size
    if T % S != 0:
        raise ValueError(f"group_size={S} does not divide the number of tokens T={T}")
    G = T // S

    def stack(arrays: list, trailing: tuple) -> Any:
        grouped = [xp.reshape(a, (G, S) + trailing) for a in arrays]  # L x (G, S, ...)
        return xp.reshape(xp.concat(grouped, axis=1), (G * L * S,) + trailing)  # (L*T, ...)

    logits = stack(logits_per_layer, (E,))
    routes = [s if isinstance(s, Routes) else Routes(s, None, None, None) for s in selections]
    k = routes[0].expert_index.shape[1]
    for l, r in enumerate(routes):
        if tuple(r.expert_index.shape) != (T, k):
            raise ValueError(f"selections[{l}] has shape {tuple(r.expert_index.shape)} but ({T}, {k}) was expected (the shape of selections[0])")
    index = stack([r.expert_index for r in routes], (k,))
    kept = None
    if all(r.kept is not None for r in routes):
        kept = stack([r.kept for r in routes], (k,))
    selection = Routes(index, None, kept, None) if kept is not None else index
    pooled_mask = None if mask is None else stack([mask] * L, ())
    return logits, selection, pooled_mask, replace(options, group_size=None if options.group_size is None else L * S)


def multilayer_load_balancing_loss(
    logits_per_layer: Sequence[Any],
    selections: Sequence[Any],
    *,
    options: LoadBalancingLossOptions = MEGABLOCKS,
    mask: Any = None,
) -> Any:
    r"""The load-balancing loss of a model with $L$ MoE layers, aggregated as ``options.layers`` says.

    $$\text{averaged:}\quad \frac1L \sum_{l=1}^{L} \mathcal L(z^{(l)}, e^{(l)}), \qquad
    \text{pooled:}\quad \mathcal L\big([z^{(1)}; \dots; z^{(L)}],\ [e^{(1)}; \dots; e^{(L)}]\big),$$

    where pooling stacks the layers' tokens, group by group (group $g$ of the pooled problem holds
    group $g$ of every layer, as HF SwitchTransformers' concatenation along the sequence does).
    The two differ because $\sum_i f_i P_i$ is not linear: pooling multiplies fractions and
    probabilities from different layers.

    Parameters
    ----------
    logits_per_layer : sequence of arrays, each shape (T, E)
    selections : sequence of int64 arrays (T, k) or Routes, one per layer
    options : LoadBalancingLossOptions
        ``options.layers`` picks the aggregation; default [`MEGABLOCKS`][moeref.aux_losses.MEGABLOCKS].
    mask : bool array, shape (T,), optional
        The same token mask for every layer.

    Returns
    -------
    array, shape ()
    """
    options = _check_options(options)
    logits_per_layer, selections = _check_layers(logits_per_layer, selections, mask)
    if options.layers == "averaged":
        losses = [load_balancing_loss(z, e, options=options, mask=mask) for z, e in zip(logits_per_layer, selections)]
        return sum(losses[1:], losses[0]) / len(losses)
    logits, selection, pooled_mask, pooled_options = _pool_layers(logits_per_layer, selections, mask, options)
    return load_balancing_loss(logits, selection, options=pooled_options, mask=pooled_mask)


def multilayer_load_balancing_loss_vjp(
    logits_per_layer: Sequence[Any],
    selections: Sequence[Any],
    cotangent: Any,
    *,
    options: LoadBalancingLossOptions = MEGABLOCKS,
    mask: Any = None,
) -> LoadBalancingLossGrads:
    r"""VJP of [`multilayer_load_balancing_loss`][moeref.aux_losses.multilayer_load_balancing_loss].

    Returns
    -------
    LoadBalancingLossGrads
        ``logits``: a tuple of $L$ arrays of shape (T, E), one per layer; ``selection`` is ``None``.
    """
    options = _check_options(options)
    logits_per_layer, selections = _check_layers(logits_per_layer, selections, mask)
    L = len(logits_per_layer)
    ct = _scalar_cotangent(cotangent, logits_per_layer[0], "logits_per_layer[0]")
    if options.layers == "averaged":
        ct = ct / L
        return LoadBalancingLossGrads(
            tuple(load_balancing_loss_vjp(z, e, ct, options=options, mask=mask).logits for z, e in zip(logits_per_layer, selections))
        )
    logits, selection, pooled_mask, pooled_options = _pool_layers(logits_per_layer, selections, mask, options)
    xp = array_namespace(logits)
    grad = load_balancing_loss_vjp(logits, selection, ct, options=pooled_options, mask=pooled_mask).logits  # (L*T, E)
    T, E = logits_per_layer[0].shape
    S = T if options.group_size is None else options.group_size
    G = T // S
    grad = xp.reshape(grad, (G, L, S, E))  # group g holds layer 0's S tokens, then layer 1's, ...
    return LoadBalancingLossGrads(tuple(xp.reshape(grad[:, l, :, :], (T, E)) for l in range(L)))


# --------------------------------------------------------------------------------------------
# DeepSeek-V3 complementary sequence-wise balance loss
# --------------------------------------------------------------------------------------------

_SEQUENCE_SCORES = ("sigmoid", "softmax")


@dataclass(frozen=True)
class SequenceBalanceLossOptions:
    r"""Conventions of the sequence-wise balance loss $\sum_i f_i P_i$ (per sequence, then averaged).

    Attributes
    ----------
    score : {"sigmoid", "softmax"}
        The affinities $s_{ti}$ and their normalisation $s'_{ti}$:

        * ``"sigmoid"``: $s_{ti} = \sigma(z_{ti})$, $s'_{ti} = s_{ti} / \sum_j s_{tj}$
          (DeepSeek-AI 2024, DeepSeek-V3 Technical Report, arXiv:2412.19437, eqs. (19)-(20);
          NVIDIA Megatron-LM `megatron/core/transformer/moe/moe_utils.py`,
          ``compute_routing_scores_for_aux_loss`` with ``score_function="sigmoid"``, divides by
          the sum plus $10^{-20}$).
        * ``"softmax"``: $s'_{ti} = s_{ti} = \operatorname{softmax}(z_t)_i$ (DeepSeek-V2 and
          DeepSeekMoE, ``MoEGate`` with ``seq_aux=True`` in the ``modeling_deepseek.py`` of
          the deepseek-ai/DeepSeek-V2 Hugging Face repositories).
    sequence_length : int or None
        $T$ of the equations, the tokens of one sequence; the $B$ sequences of a batch are the
        consecutive blocks of ``sequence_length`` rows (a ``(B, T, d)`` batch flattened row-major).
        ``None``: all rows are one sequence. Must divide the number of rows.

    Presets: [`DEEPSEEK_V3_SEQUENCE_BALANCE`][moeref.aux_losses.DEEPSEEK_V3_SEQUENCE_BALANCE],
    [`DEEPSEEK_V2_SEQUENCE_BALANCE`][moeref.aux_losses.DEEPSEEK_V2_SEQUENCE_BALANCE]; set the
    sequence length with `dataclasses.replace(preset, sequence_length=T)`.
    """

    score: str = "sigmoid"
    sequence_length: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.score, "score", _SEQUENCE_SCORES)
        S = self.sequence_length
        if S is not None and (isinstance(S, bool) or not isinstance(S, int) or S < 1):
            raise ValueError(f"sequence_length must be None or a positive int, got {S!r}")


DEEPSEEK_V3_SEQUENCE_BALANCE = SequenceBalanceLossOptions(score="sigmoid")
"""DeepSeek-V3 eqs. (17)-(20): normalised sigmoid affinities (set `sequence_length`)."""

DEEPSEEK_V2_SEQUENCE_BALANCE = SequenceBalanceLossOptions(score="softmax")
"""DeepSeek-V2 / DeepSeekMoE ``seq_aux``: softmax affinities (set `sequence_length`)."""


class SequenceBalanceLossGrads(NamedTuple):
    """Cotangents of [`sequence_balance_loss`][moeref.aux_losses.sequence_balance_loss]'s inputs
    (the selection is piecewise constant: ``None``)."""

    logits: Any
    selection: Any = None


class _Sequence(NamedTuple):
    scores: Any  # (T, E)  s
    total: Any  # (T, 1)   sum_j s_tj (sigmoid; None for softmax)
    normalized: Any  # (T, E)  s'
    fraction: Any  # (B, E)  f
    mean_score: Any  # (B, E)  P


def _check_sequence(logits: Any, selection: Any, options: Any) -> tuple[Any, Any, SequenceBalanceLossOptions]:
    if not isinstance(options, SequenceBalanceLossOptions):
        raise TypeError(f"options must be a SequenceBalanceLossOptions, got {type(options).__name__}")
    xp = _check_logits(logits)
    T, E = logits.shape
    if isinstance(selection, int) and not isinstance(selection, bool):
        k = _check_k(selection, E)
        # eq. (18) as printed: the top-K of the affinities (their order is that of the logits)
        _, index = top_k(logits, k, axis=-1)  # (T, K)
    else:
        index, _ = _selection_arrays(selection, logits, xp)
    if options.sequence_length is not None and T % options.sequence_length != 0:
        raise ValueError(f"sequence_length={options.sequence_length} does not divide the number of tokens T={T}")
    return xp, index, options


def _sequence_forward(logits: Any, index: Any, options: SequenceBalanceLossOptions) -> _Sequence:
    xp = array_namespace(logits)
    T, E = logits.shape
    k = index.shape[1]
    S = T if options.sequence_length is None else options.sequence_length
    B = T // S
    if options.score == "softmax":
        scores, total = softmax(logits, axis=-1), None
        normalized = scores
    else:
        scores = sigmoid(logits)  # (T, E)  0 where a logit is -inf
        total = xp.sum(scores, axis=-1, keepdims=True)  # (T, 1)
        normalized = scores / xp.where(total > 0, total, xp.ones_like(total))  # (T, E)
    ones = xp.ones((B, S, 1), dtype=logits.dtype, device=device_of(logits))
    fraction = (E / (k * S)) * _weighted_route_counts(index, None, E, LoadBalancingLossOptions(fraction="all_routes"), ones)  # (B, E)
    mean_score = xp.sum(xp.reshape(normalized, (B, S, E)), axis=1) / S  # (B, E)
    return _Sequence(scores, total, normalized, fraction, mean_score)


def sequence_balance_loss(logits: Any, selection: Any, *, options: SequenceBalanceLossOptions = DEEPSEEK_V3_SEQUENCE_BALANCE) -> Any:
    r"""Complementary sequence-wise balance loss of DeepSeek-V3, averaged over the sequences of a batch.

    For one sequence of $T$ tokens, $N_r$ routed experts and $K_r$ routes per token,

    $$\mathcal L_\text{Bal} = \alpha \sum_{i=1}^{N_r} f_i P_i, \qquad
    f_i = \frac{N_r}{K_r T} \sum_{t=1}^{T} \mathbb 1\big(i \in \mathcal E_t\big),$$

    $$s'_{i,t} = \frac{s_{i,t}}{\sum_{j=1}^{N_r} s_{j,t}}, \qquad
    P_i = \frac1T \sum_{t=1}^{T} s'_{i,t},$$

    DeepSeek-AI (2024), "DeepSeek-V3 Technical Report", arXiv:2412.19437, eqs. (17)-(20), with
    $s_{i,t} = \sigma(z_{ti})$ the token-to-expert affinity and $\mathcal E_t$ the experts token
    $t$ selects (the top-$K_r$ of $s_{\cdot,t}$ in eq. (18)). This function returns $\frac1B \sum_b \sum_i f_{bi} P_{bi}$ over the $B$
    sequences (without $\alpha$: the coefficient is the caller's, e.g.
    ``SparseMoEOptions.sequence_balance_coef``).

    Parameters
    ----------
    logits : array, shape (B*T, E)
        Router logits $z$ (the affinities are computed from them; ``-inf`` switches an expert off).
    selection : int, or int64 array, shape (B*T, K), or Routes
        The experts each token selects. An int $K$: the top-$K$ of the affinities, as eq. (18)
        is printed (ties: the lower expert index); this is what
        [`sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] passes, and what NVIDIA
        Megatron-LM's ``compute_routing_scores_for_aux_loss`` (`megatron/core/transformer/moe/moe_utils.py`)
        recomputes for its ``seq_aux_loss``. An array or Routes: those routes count, every one
        (a Routes record's ``kept`` flags are ignored).
    options : SequenceBalanceLossOptions
        The affinity (sigmoid as in DeepSeek-V3, softmax as in DeepSeek-V2) and the sequence length.

    Returns
    -------
    array, shape ()

    Notes
    -----
    Eq. (18) writes $\mathcal E_t$ as the top-$K_r$ of the raw affinities $s_{\cdot,t}$, while
    the routing itself selects on $s + b$ (the auxiliary-loss-free bias) within the best node
    groups; the two coincide without bias and without group limits. Pass the routes as
    ``selection`` to count the experts actually used (as the ``seq_aux`` branch of DeepSeek-V2's
    ``MoEGate`` does with its ``topk_idx``).
    At perfect balance within a sequence ($f_i = 1$) the loss is $\sum_i P_i = 1$.
    A $-\infty$ logit has affinity 0 (and cotangent 0); a row of all $-\infty$ contributes 0.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import sequence_balance_loss
    >>> logits = np.log(np.array([[1.0, 3.0], [1.0, 3.0]]))  # sigmoid: s = (0.5, 0.75), s' = (0.4, 0.6)
    >>> round(float(sequence_balance_loss(logits, np.array([[1], [1]]))), 12)  # f = (0, 2)
    1.2
    >>> round(float(sequence_balance_loss(logits, 1)), 12)  # K = 1: the top-1 affinity is expert 1
    1.2
    """
    xp, index, options = _check_sequence(logits, selection, options)
    fw = _sequence_forward(logits, index, options)
    return xp.mean(xp.sum(fw.fraction * fw.mean_score, axis=1))


def sequence_balance_loss_vjp(
    logits: Any, selection: Any, cotangent: Any, *, options: SequenceBalanceLossOptions = DEEPSEEK_V3_SEQUENCE_BALANCE
) -> SequenceBalanceLossGrads:
    r"""VJP of [`sequence_balance_loss`][moeref.aux_losses.sequence_balance_loss] w.r.t. the logits.

    $f$ is constant; for token $t$ of sequence $b$, $\bar s'_{ti} = \bar L\, f_{bi} / (B T)$.
    Sigmoid affinities, with $\Sigma_t = \sum_j s_{tj}$:

    $$\bar s_{tj} = \frac{\bar s'_{tj} - \sum_i \bar s'_{ti}\, s'_{ti}}{\Sigma_t}, \qquad
    \bar z_{tj} = \bar s_{tj}\, s_{tj} (1 - s_{tj});$$

    softmax affinities: $\bar z_t = s_t \odot (\bar s'_t - \langle s_t, \bar s'_t\rangle)$.

    Returns
    -------
    SequenceBalanceLossGrads
        ``logits``, shape (B*T, E); ``selection`` is ``None``.
    """
    xp, index, options = _check_sequence(logits, selection, options)
    ct = _scalar_cotangent(cotangent, logits, "logits")
    fw = _sequence_forward(logits, index, options)
    T, E = logits.shape
    B = fw.fraction.shape[0]
    S = T // B
    p_bar = xp.reshape(xp.broadcast_to((ct / (B * S)) * fw.fraction[:, None, :], (B, S, E)), (T, E))  # (T, E)
    if options.score == "softmax":
        return SequenceBalanceLossGrads(softmax_vjp(fw.scores, p_bar))
    total = xp.where(fw.total > 0, fw.total, xp.ones_like(fw.total))  # (T, 1)
    s_bar = (p_bar - xp.sum(p_bar * fw.normalized, axis=-1, keepdims=True)) / total  # (T, E)
    return SequenceBalanceLossGrads(s_bar * fw.scores * (1.0 - fw.scores))


# --------------------------------------------------------------------------------------------
# ST-MoE router z-loss
# --------------------------------------------------------------------------------------------


class RouterZLossGrads(NamedTuple):
    """Cotangent of [`router_z_loss`][moeref.aux_losses.router_z_loss]'s logits."""

    logits: Any


_Z_MASK_MODES = ("exclude", "zero_logits")


def _z_parts(logits: Any, mask: Any, mask_mode: str, xp: Any) -> tuple[Any, Any]:
    """``(effective logits, per-token weight of the mean)``."""
    T = logits.shape[0]
    if mask is None:
        return logits, xp.full((T,), 1.0 / T, dtype=logits.dtype, device=device_of(logits))
    m = xp.astype(mask, logits.dtype)
    if mask_mode == "zero_logits":
        zeroed = xp.where(mask[:, None], logits, xp.zeros_like(logits))  # (T, E)  padding rows become 0: lse = log E
        return zeroed, xp.full((T,), 1.0 / T, dtype=logits.dtype, device=device_of(logits))
    total = xp.sum(m)
    return logits, m / xp.where(total > 0, total, xp.ones_like(total))


def _finite_lse(z: Any, weight: Any, xp: Any) -> Any:
    """``logsumexp(z)`` per row; a row of weight > 0 whose logits are all -inf has no finite z-loss."""
    lse = logsumexp(z, axis=-1)  # (T,)  -inf entries add nothing
    dead = (lse == -math.inf) & (weight > 0)
    if concrete_bool(xp.any(dead)) is True:
        t = int(xp.argmax(xp.astype(dead, xp.int32)))
        raise ValueError(
            f"logits row {t} is -inf for every expert (all experts switched off), where the z-loss (log sum exp)^2 is +inf"
        )
    # padding rows (weight 0) and, under tracing, dead rows: 0 instead of 0 * inf = NaN
    return xp.where(lse == -math.inf, xp.zeros_like(lse), lse)


def router_z_loss(logits: Any, *, mask: Any = None, mask_mode: str = "exclude") -> Any:
    r"""Router z-loss of ST-MoE, Zoph et al. (2022), Eq. (5).

    $$L_z(x) = \frac{1}{B} \sum_{t=1}^{B} \Big(\log \sum_{i=1}^{E} e^{z_{ti}}\Big)^2,$$

    Zoph, Bello, Kumar, Du, Huang, Dean, Shazeer & Fedus (2022), "ST-MoE: Designing Stable and
    Transferable Sparse Expert Models", arXiv:2202.08906. It penalises large router logits, which
    round badly in low precision, without changing the softmax much.

    Parameters
    ----------
    logits : array, shape (T, E)
    mask : bool array, shape (T,), optional
        False for padding tokens. HF SwitchTransformers has no mask and averages over all $T$
        tokens (groups and tokens alike).
    mask_mode : {"exclude", "zero_logits"}
        ``"exclude"``: the mean runs over the tokens marked True only. ``"zero_logits"``: the
        padding rows' logits are multiplied by 0 and the mean still runs over all $T$ tokens, so
        each padding token adds the constant $(\log E)^2$ and scales the real tokens' weight by
        $T_\text{real}/T$ (google/flaxformer `Router.__call__` with `ignore_padding_tokens`).

    Returns
    -------
    array, shape ()

    Notes
    -----
    Over several layers, the mean of per-layer z-losses and the z-loss of the pooled tokens are
    equal (every layer has the same $T$ and mask), so there is no layer option.

    A $-\infty$ logit (an expert switched off by a $-\infty$ router bias) adds nothing to the
    log-sum-exp and gets cotangent 0 in the VJP. A counted row whose logits are all $-\infty$ has
    no finite loss and raises a `ValueError`; NaN and $+\infty$ are rejected.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.aux_losses import router_z_loss
    >>> float(router_z_loss(np.zeros((3, 4))))  # (log 4)^2
    1.9218120556728056
    """
    xp = _check_logits(logits)
    mask = _check_mask(mask, logits)
    check_choice(mask_mode, "mask_mode", _Z_MASK_MODES)
    z, weight = _z_parts(logits, mask, mask_mode, xp)
    lse = _finite_lse(z, weight, xp)  # (T,)
    return xp.sum(weight * lse * lse)


def router_z_loss_vjp(logits: Any, cotangent: Any, *, mask: Any = None, mask_mode: str = "exclude") -> RouterZLossGrads:
    r"""VJP of [`router_z_loss`][moeref.aux_losses.router_z_loss].

    $$\bar z_{ti} = \bar L\, 2\, w_t\, \operatorname{lse}(z_t)\, \operatorname{softmax}(z_t)_i,$$

    with $w_t = m_t / \sum_s m_s$ ("exclude") or $w_t = m_t / T$ ("zero_logits": a padding row's
    logits are multiplied by 0, so their cotangent is 0).
    """
    xp = _check_logits(logits)
    mask = _check_mask(mask, logits)
    check_choice(mask_mode, "mask_mode", _Z_MASK_MODES)
    ct = _scalar_cotangent(cotangent, logits, "logits")
    z, weight = _z_parts(logits, mask, mask_mode, xp)
    lse = _finite_lse(z, weight, xp)  # (T,)
    scale = 2.0 * ct * weight * lse  # (T,)
    grad = scale[:, None] * softmax(z, axis=-1)  # (T, E)
    if mask is not None and mask_mode == "zero_logits":
        grad = grad * xp.astype(mask, logits.dtype)[:, None]
    return RouterZLossGrads(grad)
