r"""A small generic EM driver: stopping rules, a monotonicity check that never hides a decrease,
and information criteria.

A model supplies two functions and a starting point:

* ``e_step(params) -> EStep(loglik, log_responsibilities)``: the observed-data log-likelihood
  $L(\theta) = \sum_i \log p(y_i \mid x_i; \theta)$ (a 0-d array) and the log-posteriors
  $\log \tau_{ik}$ of the latent labels, shape ``(N, K)``, both at ``params``;
* ``m_step(params, responsibilities) -> params``: the maximiser of the expected complete-data
  log-likelihood $Q(\theta \mid \theta^{(t)})$ given $\tau^{(t)}$.

[`run_em`][moeref.em.run_em] alternates them,

$$\tau^{(t)} = \text{E-step}(\theta^{(t)}), \qquad \theta^{(t+1)} = \text{M-step}(\theta^{(t)}, \tau^{(t)}),$$

records $L^{(0)}, L^{(1)}, \dots$ and stops by one of the rules in
[`stopping_rule_met`][moeref.em.stopping_rule_met]. By Theorem 1 of Dempster, Laird & Rubin (1977),
"Maximum likelihood from incomplete data via the EM algorithm", JRSS B 39(1):1-38,
doi:10.1111/j.2517-6161.1977.tb01600.x, an exact EM step never lowers $L$; a decrease beyond round-off
therefore signals a bug or a numerical failure, and is reported with a
[`LikelihoodDecreaseWarning`][moeref.em.LikelihoodDecreaseWarning] (or raised as a
[`LikelihoodDecreaseError`][moeref.em.LikelihoodDecreaseError] on request), never silently absorbed.

The loop over iterations runs on the host (the stopping decision needs a Python ``float``); the
E- and M-steps are pure array-API math on whatever library the parameters live in.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

from .core import array_namespace
from .validation import check_choice, check_finite, check_float_array, check_positive_int, concrete_bool

__all__ = [
    "CRITERIA",
    "EStep",
    "EMOptions",
    "MIXTOOLS",
    "EMResult",
    "RestartRecord",
    "PenalisedRun",
    "run_em",
    "run_restarts",
    "stopping_rule_met",
    "aitken_limit",
    "find_loglik_decreases",
    "check_loglik_trace",
    "entropy",
    "information_criteria",
    "InformationCriteria",
    "EMWarning",
    "LikelihoodDecreaseWarning",
    "SeparationWarning",
    "ConvergenceWarning",
    "EMError",
    "LikelihoodDecreaseError",
    "NonFiniteLogLikelihoodError",
    "EmptyComponentError",
    "check_nonempty_components",
    "check_nonnegative_float",
    "first_true",
    "CollapsedVarianceError",
    "SingularWeightedLeastSquaresError",
]

CRITERIA: tuple[str, ...] = ("absolute", "increase", "relative", "aitken")
"""Names of the stopping rules understood by [`stopping_rule_met`][moeref.em.stopping_rule_met]."""

# --------------------------------------------------------------------------------------------
# Warnings and errors
# --------------------------------------------------------------------------------------------


class EMWarning(RuntimeWarning):
    """Base class of the warnings issued by the EM driver and the EM-fitted models."""


class LikelihoodDecreaseWarning(EMWarning):
    """The log-likelihood went down between two EM iterations by more than round-off."""


class SeparationWarning(EMWarning):
    r"""A weighted logistic-type fit is separated: its maximum-likelihood coefficients do not exist.

    Issued by the softmax gate's M-step ([`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial],
    also under the name ``moeref.softmax_gate.GateSeparationWarning``) and by the GLM experts'
    M-steps (also ``moeref.glm_experts.SeparationWarning``). The weighted targets are
    (quasi-)completely separated by a hyperplane (Albert & Anderson 1984, "On the existence of
    maximum likelihood estimates in logistic regression models", Biometrika 71(1):1-10,
    doi:10.1093/biomet/71.1.1), a class has no target mass, or, for Poisson experts, the counts are
    all 0 on one side of a hyperplane: the weighted log-likelihood increases towards its supremum
    only as the coefficients diverge. The fit stops when the objective has converged and returns
    large finite coefficients; a ridge $\rho > 0$ makes the maximiser exist.
    """


class ConvergenceWarning(EMWarning):
    """``max_iter`` iterations ran without meeting the stopping rule (``converged`` is False)."""


class EMError(RuntimeError):
    """Base class of the errors that stop an EM fit (degenerate or non-finite states)."""


class LikelihoodDecreaseError(EMError):
    """A log-likelihood decrease beyond round-off, raised when ``on_decrease="raise"``."""


class NonFiniteLogLikelihoodError(EMError):
    """The log-likelihood became NaN or infinite (e.g. a variance collapsed to 0)."""


class EmptyComponentError(EMError):
    """A component's mixing weight $\\frac1N\\sum_i \\tau_{ik}$ fell below ``min_weight``."""


class CollapsedVarianceError(EMError):
    """A component's standard deviation fell below ``min_sigma`` (the likelihood is unbounded there)."""


class SingularWeightedLeastSquaresError(EMError):
    """A component's weighted Gram matrix $X^\\top W_k X$ is singular to working precision."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class EStep(NamedTuple):
    """What an E-step returns.

    Attributes
    ----------
    loglik : 0-d array
        Observed-data log-likelihood $L(\\theta) = \\sum_i \\log p(y_i \\mid x_i;\\theta)$.
    log_responsibilities : array, shape (N, K)
        $\\log \\tau_{ik}$, the log-posterior probability of component $k$ for sample $i$.
    """

    loglik: Any
    log_responsibilities: Any


class EMOptions(NamedTuple):
    """Stopping and checking options of [`run_em`][moeref.em.run_em].

    Attributes
    ----------
    criterion : {"absolute", "increase", "relative", "aitken"}
        Stopping rule; see [`stopping_rule_met`][moeref.em.stopping_rule_met].
    tol : float
        Its tolerance.
    max_iter : int
        Maximum number of EM iterations (M-step + E-step pairs). Reaching it without meeting the
        rule leaves ``converged=False`` and issues a [`ConvergenceWarning`][moeref.em.ConvergenceWarning].
    on_decrease : {"warn", "raise"}
        What a log-likelihood decrease beyond ``decrease_rtol`` does.
    decrease_rtol : float or None
        A step counts as a decrease when $L^{(t)} < L^{(t-1)} - r\\,(|L^{(t-1)}| + 1)$. ``None``
        means $r = 10^4\\,\\varepsilon$ of the log-likelihood's dtype ($2.2\\times10^{-12}$ in
        float64, $1.2\\times10^{-3}$ in float32): room for the round-off of a sum over samples.
    warn_not_converged : bool
        Issue the [`ConvergenceWarning`][moeref.em.ConvergenceWarning] when ``max_iter`` is hit.
    """

    criterion: str = "absolute"
    tol: float = 1e-8
    max_iter: int = 1000
    on_decrease: str = "warn"
    decrease_rtol: float | None = None
    warn_not_converged: bool = True


MIXTOOLS = EMOptions(criterion="increase", tol=1e-8, max_iter=10000)
"""The stopping rule of mixtools' ``regmixEM`` / ``normalmixEM`` (``epsilon = 1e-08``, ``maxit = 10000``
for ``regmixEM``): iterate while $L^{(t)} - L^{(t-1)} > \\epsilon$. mixtools restarts from random
values on any decrease; moeref warns instead (see [`EMOptions`][moeref.em.EMOptions])."""


class EMResult(NamedTuple):
    """The outcome of an EM fit.

    Attributes
    ----------
    params
        The model's parameter record after the last M-step, $\\hat\\theta = \\theta^{(T)}$.
    loglik : float
        $L(\\hat\\theta)$.
    loglik_trace : tuple of float
        $L^{(0)}, \\dots, L^{(T)}$: at the starting values, then after each iteration
        (``len == n_iter + 1``, like mixtools' ``all.loglik``).
    responsibilities : array, shape (N, K)
        $\\tau_{ik}$ from an E-step at $\\hat\\theta$ (mixtools' ``posterior`` is one E-step older: it
        is the one used by the last M-step).
    n_iter : int
        Number of EM iterations run, $T$.
    converged : bool
        True only if the stopping rule was met within ``max_iter`` iterations.
    stop_reason : str
        A sentence saying which rule stopped the loop.
    criterion : str
    tol : float
    n_samples : int
        $N$.
    n_free_parameters : int
        $p$ in the information criteria.
    entropy : float
        $\\mathrm{EN}(\\tau) = -\\sum_{i,k}\\tau_{ik}\\log\\tau_{ik}$ (with $0\\log 0 = 0$).
    aic, bic, icl : float
        On the deviance scale, **smaller is better**; see
        [`information_criteria`][moeref.em.information_criteria].
    decreases : tuple of int
        Iterations $t$ at which $L^{(t)}$ fell below $L^{(t-1)}$ beyond round-off (empty for a
        healthy EM run).
    restarts : tuple of RestartRecord
        One record per EM run when the fit ran several (``init`` first, see
        [`run_restarts`][moeref.em.run_restarts]); empty for a single [`run_em`][moeref.em.run_em] run.
    best_restart : int
        Index of the run returned (0 for a single run).
    """

    params: Any
    loglik: float
    loglik_trace: tuple[float, ...]
    responsibilities: Any
    n_iter: int
    converged: bool
    stop_reason: str
    criterion: str
    tol: float
    n_samples: int
    n_free_parameters: int
    entropy: float
    aic: float
    bic: float
    icl: float
    decreases: tuple[int, ...]
    restarts: tuple = ()
    best_restart: int = 0


class RestartRecord(NamedTuple):
    """Summary of one EM run of a fit with restarts (index 0 is ``init``).

    Attributes
    ----------
    index : int
        0 for ``init``, then the explicit restarts in the order given, then the random starts in
        the order they were drawn.
    loglik : float or None
        Final (unpenalised) log-likelihood EM maximised; ``None`` if the run failed.
    objective : float or None
        Final penalised log-likelihood (the value the best run is chosen by; ``loglik`` without a
        penalty).
    n_iter : int
    converged : bool
    loglik_trace : tuple of float
        The run's trace of the objective (empty if it failed).
    error : str or None
        ``"ErrorClass: message"`` of the [`EMError`][moeref.em.EMError] that stopped the run.
    start
        The starting parameters of the run (the model's record), so that any run can be replayed.
    draws : array or None
        For a random start, the uniforms it was built from (see [`moeref.em_init`][moeref.em_init]);
        ``None`` for ``init`` and the explicit restarts.
    """

    index: int
    loglik: float | None
    objective: float | None
    n_iter: int
    converged: bool
    loglik_trace: tuple[float, ...]
    error: str | None
    start: Any = None
    draws: Any = None


def first_true(flags: Any, /) -> int | None:
    """Index of the first true entry of a 1-D boolean array, ``None`` if none is (one host read per entry
    up to the first true one): names the component in a degeneracy error."""
    xp = array_namespace(flags, names=("flags",))
    if flags.dtype != xp.bool or flags.ndim != 1:
        raise TypeError(f"flags must be a 1-D boolean array, got dtype {flags.dtype} and shape {tuple(flags.shape)}")
    if not concrete_bool(xp.any(flags)):
        return None
    return next(k for k in range(flags.shape[0]) if concrete_bool(flags[k]))


def check_nonnegative_float(value: Any, name: str) -> float:
    """``value`` as a float, if it is a finite non-negative Python number (a degeneracy threshold
    such as ``min_weight`` or ``min_sigma``, a ridge); else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite non-negative float, got {value!r}")
    return float(value)


def check_nonempty_components(weights: Any, min_weight: float) -> Any:
    r"""$n_k = \sum_i w_{ik}$, shape (K,); raise `EmptyComponentError` if some $n_k = 0$ or $n_k / N$ < ``min_weight``.

    ``weights``: a real floating (N, K) array; a NaN or infinity shows in its column's sum, so it is
    refused at no extra cost (this runs inside every M-step).
    """
    xp = array_namespace(weights, names=("weights",))
    check_float_array(weights, "weights", ndim=2, xp=xp)
    min_weight = check_nonnegative_float(min_weight, "min_weight")
    N, K = weights.shape
    n_k = xp.sum(weights, axis=0)  # (K,)
    k = first_true(~xp.isfinite(n_k))
    if k is not None:
        raise ValueError(f"weights contains NaN or infinite values (column {k} sums to {float(n_k[k])})")
    k = first_true((n_k <= 0) | (n_k < min_weight * N))
    if k is not None:
        raise EmptyComponentError(
            f"expert {k} has total weight {float(n_k[k]):.3e} (fraction {float(n_k[k]) / N:.3e} of N={N}) "
            f"< min_weight={min_weight:g}: it is empty and has nothing to fit"
        )
    return n_k


class InformationCriteria(NamedTuple):
    """AIC, BIC and ICL on the deviance scale (smaller is better), and the entropy used by ICL."""

    aic: float
    bic: float
    icl: float
    entropy: float


# --------------------------------------------------------------------------------------------
# Stopping rules and the monotonicity check (host-side, on Python floats)
# --------------------------------------------------------------------------------------------


def aitken_limit(l0: float, l1: float, l2: float) -> float | None:
    r"""Aitken $\delta^2$ extrapolation of the log-likelihood sequence.

    With $a = \dfrac{L^{(t)} - L^{(t-1)}}{L^{(t-1)} - L^{(t-2)}}$ the estimated linear rate,

    $$L_\infty^{(t)} = L^{(t-1)} + \frac{L^{(t)} - L^{(t-1)}}{1 - a}.$$

    Böhning, Dietz, Schaub, Schlattmann & Lindsay (1994), "The distribution of the likelihood ratio
    for mixtures of densities from the one-parameter exponential family", Annals of the Institute of
    Statistical Mathematics 46(2):373-388, doi:10.1007/BF01720593; McLachlan & Krishnan (2008),
    "The EM Algorithm and Extensions", 2nd ed., Wiley, doi:10.1002/9780470191613 (Aitken acceleration).

    Parameters
    ----------
    l0, l1, l2 : float
        $L^{(t-2)}, L^{(t-1)}, L^{(t)}$.

    Returns
    -------
    float or None
        ``None`` where the extrapolation is undefined: a zero previous increment, or a rate outside
        $[0, 1)$ (not in the linear-convergence regime).
    """
    d0, d1 = l1 - l0, l2 - l1
    if d0 == 0.0:
        return None
    a = d1 / d0
    if not 0.0 <= a < 1.0:
        return None
    return l1 + d1 / (1.0 - a)


def stopping_rule_met(trace: Any, criterion: str, tol: float) -> bool:
    r"""Whether the log-likelihood trace $L^{(0)}, \dots, L^{(t)}$ meets a stopping rule.

    With $\Delta^{(t)} = L^{(t)} - L^{(t-1)}$:

    * ``"absolute"``: $|\Delta^{(t)}| \le \mathrm{tol}$.
    * ``"increase"``: $\Delta^{(t)} \le \mathrm{tol}$ (signed). This is mixtools' rule: ``regmixEM``
      iterates ``while (diff > epsilon)`` with ``diff = newobsloglik - obsloglik``, ``epsilon = 1e-08``.
    * ``"relative"``: $|\Delta^{(t)}| / (|L^{(t)}| + 0.1) < \mathrm{tol}$, the form of flexmix's
      ``FLXcontrol(tolerance=)`` test.
    * ``"aitken"``: $0 \le L_\infty^{(t)} - L^{(t-1)} < \mathrm{tol}$ with $L_\infty^{(t)}$ from
      [`aitken_limit`][moeref.em.aitken_limit] (the stopping rule of McNicholas, Murphy, McDaid &
      Frost (2010), "Serial and parallel implementations of model-based clustering via parsimonious
      Gaussian mixture models", Computational Statistics & Data Analysis 54(3):711-723,
      doi:10.1016/j.csda.2009.02.011). It needs three values; an exactly zero $\Delta^{(t)}$ also stops.
      Unlike the plain difference, it does not stop early during a slow, linear crawl.

    Parameters
    ----------
    trace : sequence of float
    criterion : str
        One of [`CRITERIA`][moeref.em.CRITERIA].
    tol : float
        Non-negative tolerance.

    Returns
    -------
    bool
        False while the trace is too short for the rule.
    """
    check_choice(criterion, "criterion", CRITERIA)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0 or math.isinf(tol):
        raise ValueError(f"tol must be a finite non-negative float, got {tol!r}")
    t = [float(v) for v in trace]
    if len(t) < 2:
        return False
    delta = t[-1] - t[-2]
    if criterion == "absolute":
        return abs(delta) <= tol
    if criterion == "increase":
        return delta <= tol
    if criterion == "relative":
        return abs(delta) / (abs(t[-1]) + 0.1) < tol
    # aitken
    if delta == 0.0:
        return True
    if len(t) < 3:
        return False
    limit = aitken_limit(t[-3], t[-2], t[-1])
    return limit is not None and 0.0 <= limit - t[-2] < tol


def _is_decrease(prev: float, new: float, rtol: float) -> bool:
    return new < prev - rtol * (abs(prev) + 1.0)


def find_loglik_decreases(trace: Any, *, rtol: float = 2.220446049250313e-12) -> tuple[int, ...]:
    r"""Indices $t \ge 1$ where $L^{(t)} < L^{(t-1)} - r\,(|L^{(t-1)}| + 1)$."""
    t = [float(v) for v in trace]
    return tuple(i for i in range(1, len(t)) if _is_decrease(t[i - 1], t[i], rtol))


def _report_decrease(t: int, prev: float, new: float, on_decrease: str) -> None:
    msg = (
        f"EM log-likelihood decreased at iteration {t}: {prev!r} -> {new!r} (change {new - prev:.3e}); "
        "an exact EM step cannot lower the likelihood (Dempster, Laird & Rubin 1977, Theorem 1), so this "
        "is a numerical failure or an inexact M-step"
    )
    if on_decrease == "raise":
        raise LikelihoodDecreaseError(msg)
    warnings.warn(msg, LikelihoodDecreaseWarning, stacklevel=3)


def check_loglik_trace(trace: Any, *, rtol: float = 2.220446049250313e-12, on_decrease: str = "warn") -> tuple[int, ...]:
    r"""Check that an EM log-likelihood trace is non-decreasing up to round-off.

    A step is a decrease when $L^{(t)} < L^{(t-1)} - r\,(|L^{(t-1)}| + 1)$.

    Parameters
    ----------
    trace : sequence of float
    rtol : float
        $r$ above (default $10^4$ float64 epsilons).
    on_decrease : {"warn", "raise"}
        Issue one [`LikelihoodDecreaseWarning`][moeref.em.LikelihoodDecreaseWarning] per decrease, or
        raise [`LikelihoodDecreaseError`][moeref.em.LikelihoodDecreaseError] at the first one.

    Returns
    -------
    tuple of int
        The iterations $t$ at which the trace decreased.

    Raises
    ------
    NonFiniteLogLikelihoodError
        If an entry is NaN or infinite.
    """
    check_choice(on_decrease, "on_decrease", ("warn", "raise"))
    t = [float(v) for v in trace]
    for i, v in enumerate(t):
        if not math.isfinite(v):
            raise NonFiniteLogLikelihoodError(f"log-likelihood trace entry {i} is {v}")
    found = find_loglik_decreases(t, rtol=rtol)
    for i in found:
        _report_decrease(i, t[i - 1], t[i], on_decrease)
    return found


# --------------------------------------------------------------------------------------------
# Information criteria
# --------------------------------------------------------------------------------------------


def entropy(responsibilities: Any, /) -> float:
    r"""Classification entropy $\mathrm{EN}(\tau) = -\sum_{i}\sum_{k} \tau_{ik} \log \tau_{ik}$, $0 \log 0 = 0$."""
    xp = array_namespace(responsibilities, names=("responsibilities",))
    check_float_array(responsibilities, "responsibilities", ndim=2, xp=xp)
    check_finite(responsibilities, "responsibilities")
    tau = responsibilities
    positive = tau > 0
    safe = xp.where(positive, tau, xp.ones_like(tau))
    return float(-xp.sum(xp.where(positive, tau * xp.log(safe), xp.zeros_like(tau))))


def information_criteria(
    loglik: float, n_free_parameters: int, n_samples: int, *, entropy_value: float = 0.0
) -> InformationCriteria:
    r"""AIC, BIC and ICL on the deviance scale (**smaller is better**).

    $$\mathrm{AIC} = -2L + 2p, \qquad \mathrm{BIC} = -2L + p \log N, \qquad
    \mathrm{ICL} = \mathrm{BIC} + 2\,\mathrm{EN}(\tau),$$

    with $L$ the maximised log-likelihood, $p$ the number of free parameters, $N$ the number of
    samples and $\mathrm{EN}(\tau) = -\sum_{i,k}\tau_{ik}\log\tau_{ik}$ the entropy of the soft
    responsibilities.

    References: Akaike (1974), "A new look at the statistical model identification", IEEE Trans.
    Automatic Control 19(6):716-723, doi:10.1109/TAC.1974.1100705; Schwarz (1978), "Estimating the
    dimension of a model", Annals of Statistics 6(2):461-464, doi:10.1214/aos/1176344136; Biernacki,
    Celeux & Govaert (2000), "Assessing a mixture model for clustering with the integrated completed
    likelihood", IEEE TPAMI 22(7):719-725, doi:10.1109/34.865189; the soft-entropy form of ICL is
    the "ICL-BIC" of McLachlan & Peel (2000), "Finite Mixture Models", Wiley,
    doi:10.1002/0471721182, chapter 6.

    Notes
    -----
    Packages print these criteria in different conventions; compare like with like:

    * flexmix: ``AIC()``/``BIC()`` are on this deviance scale ($-2L + 2p$, $-2L + p\log N$).
    * mixtools' ``regmixmodel.sel`` is on the log-likelihood scale, **larger is better**:
      $\mathrm{AIC} = L - (p-1)$, $\mathrm{BIC} = L - (p-1)\log(N)/2$ and
      $\mathrm{ICL} = \mathrm{BIC} - \sum_k\lambda_k\log\lambda_k$ (entropy of the mixing weights,
      not of the posteriors), with its own count $p$.
    * mclust reports $\mathrm{BIC} = 2L - p\log N$ (larger is better); several ICL
      implementations use the hard MAP labels, $-\sum_i \log \tau_{i\hat z_i}$, in place of
      $\mathrm{EN}(\tau)$.
    """
    check_positive_int(n_samples, "n_samples")
    check_positive_int(n_free_parameters, "n_free_parameters", minimum=0)
    if isinstance(loglik, bool) or not isinstance(loglik, (int, float)) or not math.isfinite(loglik):
        raise ValueError(f"loglik must be a finite Python float (the maximised log-likelihood), got {loglik!r}")
    entropy_value = check_nonnegative_float(entropy_value, "entropy_value")
    aic = -2.0 * loglik + 2.0 * n_free_parameters
    bic = -2.0 * loglik + n_free_parameters * math.log(n_samples)
    return InformationCriteria(aic=aic, bic=bic, icl=bic + 2.0 * entropy_value, entropy=entropy_value)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _check_options(options: EMOptions) -> EMOptions:
    if not isinstance(options, EMOptions):
        raise TypeError(f"options must be an EMOptions record, got {type(options).__name__}")
    check_choice(options.criterion, "options.criterion", CRITERIA)
    check_choice(options.on_decrease, "options.on_decrease", ("warn", "raise"))
    check_positive_int(options.max_iter, "options.max_iter")
    tol = options.tol
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0 <= tol < math.inf:
        raise ValueError(f"options.tol must be a finite non-negative float, got {tol!r}")
    r = options.decrease_rtol
    if r is not None and (not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < math.inf):
        raise ValueError(f"options.decrease_rtol must be None or a finite non-negative float, got {r!r}")
    return options


def _loglik_float(e: EStep, t: int) -> tuple[float, float]:
    """``(float(L), eps of L's dtype)``; raises on a non-finite value."""
    value = e.loglik
    try:
        xp = array_namespace(value, names=("e_step(...).loglik",))
        eps = float(xp.finfo(value.dtype).eps)
    except TypeError:
        eps = 2.220446049250313e-16
    L = float(value)
    if not math.isfinite(L):
        where = "at the starting values" if t == 0 else f"after EM iteration {t}"
        raise NonFiniteLogLikelihoodError(f"the log-likelihood is {L} {where}")
    return L, eps


def run_em(
    e_step: Callable[[Any], EStep],
    m_step: Callable[[Any, Any], Any],
    init: Any,
    *,
    n_samples: int,
    n_free_parameters: int,
    options: EMOptions = EMOptions(),
) -> EMResult:
    r"""Run EM from ``init`` until a stopping rule holds or ``max_iter`` iterations have run.

    Iteration $t = 1, 2, \dots$ is one M-step followed by one E-step:

    $$\theta^{(t)} = \text{M-step}\big(\theta^{(t-1)}, \tau^{(t-1)}\big), \qquad
    \big(L^{(t)}, \log\tau^{(t)}\big) = \text{E-step}\big(\theta^{(t)}\big),$$

    after an initial E-step at $\theta^{(0)}$ = ``init``. After each iteration the driver

    1. raises [`NonFiniteLogLikelihoodError`][moeref.em.NonFiniteLogLikelihoodError] if $L^{(t)}$
       is NaN or infinite;
    2. checks $L^{(t)} \ge L^{(t-1)}$ up to ``decrease_rtol`` (Dempster, Laird & Rubin 1977,
       Theorem 1) and warns or raises otherwise;
    3. stops when [`stopping_rule_met`][moeref.em.stopping_rule_met] holds (``converged=True``).

    Iterations are counted like mixtools counts them: ``n_iter`` is the number of parameter updates,
    including the last one (whose log-likelihood change met the rule).

    Parameters
    ----------
    e_step : callable
        ``e_step(params) -> EStep``.
    m_step : callable
        ``m_step(params, responsibilities) -> params``; may raise an [`EMError`][moeref.em.EMError]
        subclass for a degenerate state (the driver adds the iteration number to its message).
    init
        Starting parameters $\theta^{(0)}$ (the model's record); no hidden randomness.
    n_samples, n_free_parameters : int
        $N$ and $p$ for the information criteria.
    options : EMOptions
        Stopping rule, tolerance, ``max_iter`` and the decrease policy.

    Returns
    -------
    EMResult
    """
    options = _check_options(options)
    check_positive_int(n_samples, "n_samples")
    check_positive_int(n_free_parameters, "n_free_parameters", minimum=0)

    params = init
    e = e_step(params)
    L, eps = _loglik_float(e, 0)
    rtol = 1e4 * eps if options.decrease_rtol is None else float(options.decrease_rtol)
    trace = [L]
    decreases: list[int] = []
    converged = False
    t = 0
    while t < options.max_iter:
        t += 1
        xp = array_namespace(e.log_responsibilities, names=("e_step(...).log_responsibilities",))
        tau = xp.exp(e.log_responsibilities)  # (N, K)
        try:
            params = m_step(params, tau)
        except EMError as err:
            raise type(err)(f"EM iteration {t} (M-step): {err}") from err
        e = e_step(params)
        L, _ = _loglik_float(e, t)
        if _is_decrease(trace[-1], L, rtol):
            decreases.append(t)
            _report_decrease(t, trace[-1], L, options.on_decrease)
        trace.append(L)
        if stopping_rule_met(trace, options.criterion, options.tol):
            converged = True
            break

    if converged:
        reason = f"converged: the {options.criterion!r} rule with tol={options.tol:g} held after iteration {t}"
    else:
        reason = f"not converged: max_iter={options.max_iter} iterations ran without meeting the {options.criterion!r} rule"
        if options.warn_not_converged:
            warnings.warn(
                f"EM did not converge in {options.max_iter} iterations (last change "
                f"{trace[-1] - trace[-2]:.3e}, rule {options.criterion!r}, tol={options.tol:g})",
                ConvergenceWarning,
                stacklevel=2,
            )
    xp = array_namespace(e.log_responsibilities, names=("e_step(...).log_responsibilities",))
    tau = xp.exp(e.log_responsibilities)
    crit = information_criteria(L, n_free_parameters, n_samples, entropy_value=entropy(tau))
    return EMResult(
        params=params,
        loglik=L,
        loglik_trace=tuple(trace),
        responsibilities=tau,
        n_iter=t,
        converged=converged,
        stop_reason=reason,
        criterion=options.criterion,
        tol=float(options.tol),
        n_samples=n_samples,
        n_free_parameters=n_free_parameters,
        entropy=crit.entropy,
        aic=crit.aic,
        bic=crit.bic,
        icl=crit.icl,
        decreases=tuple(decreases),
    )


class PenalisedRun(NamedTuple):
    r"""One EM run of a penalised fit: the driver's result and the penalty at each trace entry.

    The fit functions with a ridge ([`fit_moe`][moeref.moe_em.fit_moe],
    [`fit_hme`][moeref.hme_em.fit_hme]) run EM on $L - \text{penalty}$ and pass these to
    [`run_restarts`][moeref.em.run_restarts]; ``n_iter``, ``converged`` and ``loglik_trace`` are those
    of ``em``.

    Attributes
    ----------
    em : EMResult
        The driver's result (its ``loglik`` and ``loglik_trace`` are the penalised objective).
    penalty_trace : tuple of float
        The penalty at $\theta^{(0)}, \dots, \theta^{(T)}$.
    """

    em: EMResult
    penalty_trace: tuple

    @property
    def n_iter(self) -> int:
        return self.em.n_iter

    @property
    def converged(self) -> bool:
        return self.em.converged

    @property
    def loglik_trace(self) -> tuple:
        return self.em.loglik_trace


def run_restarts(
    fit_one: Callable[[Any], tuple[Any, float, float]],
    starts: Sequence[Any],
    draws: Sequence[Any] | None = None,
) -> tuple[int, list[Any], tuple[RestartRecord, ...]]:
    r"""Run one EM fit per starting point and pick the best: the explicit restarts of the fit functions.

    Every start is run (there is no early exit and no hidden extra start); the run with the highest
    final objective wins, the **first** one on ties. A run stopped by an
    [`EMError`][moeref.em.EMError] (an empty component, a collapsed variance, ...) is recorded with
    its error and skipped; if every run fails, the first error is raised, and with a single start
    it propagates unchanged.

    Parameters
    ----------
    fit_one : callable
        ``fit_one(start) -> (result, objective, loglik)``; ``result`` has ``n_iter``, ``converged``
        and ``loglik_trace`` (an [`EMResult`][moeref.em.EMResult] or a
        [`PenalisedRun`][moeref.em.PenalisedRun]), ``objective`` is the final penalised
        log-likelihood, ``loglik`` the unpenalised one.
    starts : sequence
        The starting points, ``init`` first.
    draws : sequence, optional
        Per start, the random draws it was built from (``None`` for an explicit start); copied
        into the records.

    Returns
    -------
    best : int
        Index of the best run.
    results : list
        ``result`` of every run (``None`` for a failed one).
    records : tuple of RestartRecord
    """
    starts = list(starts)
    if not starts:
        raise ValueError("run_restarts needs at least one start")
    draws = [None] * len(starts) if draws is None else list(draws)
    if len(draws) != len(starts):
        raise ValueError(f"draws has {len(draws)} entries but there are {len(starts)} starts")
    results: list[Any] = []
    records: list[RestartRecord] = []
    first_error: EMError | None = None
    for idx, (start, drawn) in enumerate(zip(starts, draws)):
        try:
            res, objective, loglik = fit_one(start)
        except EMError as err:
            if len(starts) == 1:
                raise
            first_error = first_error or err
            results.append(None)
            records.append(RestartRecord(idx, None, None, 0, False, (), f"{type(err).__name__}: {err}", start, drawn))
            continue
        results.append(res)
        records.append(
            RestartRecord(idx, float(loglik), float(objective), res.n_iter, res.converged, res.loglik_trace, None, start, drawn)
        )
    ok = [i for i, r in enumerate(results) if r is not None]
    if not ok:
        assert first_error is not None
        raise first_error
    best = max(ok, key=lambda i: (records[i].objective, -i))
    return best, results, tuple(records)
