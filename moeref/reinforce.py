r"""Learned routing by reinforcement learning: the router as a policy, and the REINFORCE gradient estimator.

The router maps token $x_t$ to logits $z_t = x_t W_r + b_r$ and a policy over the $E$ experts,
$\pi_t = \operatorname{softmax}(z_t)$. A route $a_t \sim \pi_t$ is sampled, the token is
processed by expert $a_t$, and a reward $R$ comes back (e.g. minus the loss). The routing
decision is discrete, so the router is trained with the score-function (REINFORCE) estimator
of Williams (1992), "Simple statistical gradient-following algorithms for connectionist
reinforcement learning", Machine Learning 8, 229-256:

$$\nabla_{z_t}\, \mathbb E_{a \sim \pi}[R] = \mathbb E_{a \sim \pi}\big[(R - b_t)\, \nabla_{z_t} \log \pi_t(a_t)\big],
\qquad \nabla_{z_t} \log \pi_t(a_t) = \mathbf e_{a_t} - \pi_t ,$$

unbiased for any baseline $b_t$ that does not depend on $a_t$. Conditional computation trained
as a policy in this way is the approach of Bengio, Bacon, Pineau & Precup (2015), "Conditional
Computation in Neural Networks for faster models", arXiv:1511.06297 (Bernoulli policies over
blocks of units there, a categorical policy over experts here); Clark et al. (2022), "Unified
Scaling Laws for Routed Language Models", ICML, arXiv:2202.01169, compare such RL routing
with BASE and hash routing for MoE layers.

Every random draw is explicit: routes come from uniform draws $u_t \in [0, 1)$ by inverse-CDF
sampling ([`sample_policy`][moeref.reinforce.sample_policy]). The estimator
([`reinforce_gradient`][moeref.reinforce.reinforce_gradient]) is a function users can check their
own estimator against; [`expected_reward`][moeref.reinforce.expected_reward] and its VJP give the
exact gradient for per-token reward tables.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .balanced_assignment import _positions_in_expert
from .core import _softmax_vjp, _take_along_axis, array_namespace, device_of, log_softmax, one_hot, softmax
from .router import RouterParams
from .routes import Routes
from .validation import (
    check_array,
    check_arrays,
    check_scalar_cotangent,
    check_float_array,
    check_index_range,
    check_int_array,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "PolicySample",
    "ReinforceGrads",
    "ExpectedRewardGrads",
    "policy_logits",
    "sample_policy",
    "reinforce_logits_gradient",
    "reinforce_gradient",
    "expected_reward",
    "expected_reward_vjp",
]


class PolicySample(NamedTuple):
    r"""Routes sampled from the policy $\pi_t = \operatorname{softmax}(z_t)$.

    Attributes
    ----------
    probs : array, shape (T, E)
        $\pi_t$.
    action : int64 array, shape (T,)
        $a_t$, the sampled expert.
    log_prob : array, shape (T,)
        $\log \pi_t(a_t)$.
    routes : Routes
        ``expert_index (T, 1)`` $= a_t$, ``weight (T, 1)`` all 1 (a hard route: the expert
        output is not scaled by a probability, so the router learns only from the estimator),
        ``kept`` all True, ``position`` the rank among the expert's tokens. Ready for
        [`dispatch_combine`][moeref.dispatch.dispatch_combine].
    """

    probs: Any
    action: Any
    log_prob: Any
    routes: Routes


class ReinforceGrads(NamedTuple):
    """The REINFORCE estimate w.r.t. the logits ``(T, E)``, the router input ``x (T, d)`` and the router ``params``."""

    logits: Any
    x: Any
    params: RouterParams


class ExpectedRewardGrads(NamedTuple):
    """Cotangents of [`expected_reward`][moeref.reinforce.expected_reward]: ``logits (T, E)`` and ``rewards (T, E)``."""

    logits: Any
    rewards: Any


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_logits(logits: Any) -> tuple[Any, int, int]:
    xp = check_arrays({"logits": logits}, neg_inf_ok=("logits",))
    check_float_array(logits, "logits", ndim=2)
    T, E = logits.shape
    if concrete_bool(xp.any(xp.max(logits, axis=1) == -float("inf"))) is True:
        raise ValueError("logits has a row of all -inf: every token needs at least one expert with positive probability")
    return xp, T, E


def _check_action(action: Any, logits: Any, xp: Any) -> Any:
    T, E = logits.shape
    array_namespace(logits, action, names=("logits", "action"), allow_none=False)
    check_int_array(action, "action", ndim=1)
    check_shape(action, "action", (T,), what=f"one expert per token, T={T}")
    check_index_range(action, "action", E, what=f"logits has E={E} experts")
    return xp.astype(action, xp.int64)


def _per_token(value: Any, name: str, T: int, like: Any, xp: Any) -> Any:
    """A reward or baseline given as a scalar () or per token (T,), broadcast to (T,); ``None``: 0 (a baseline only)."""
    if value is None and name == "baseline":
        return xp.zeros((T,), dtype=like.dtype, device=device_of(like))
    check_array(value, name)
    check_arrays({name: value, "logits": like}, neg_inf_ok=("logits",))
    if value.ndim == 0:
        return value * xp.ones((T,), dtype=like.dtype, device=device_of(like))
    check_shape(value, name, (T,), what=f"a scalar () or one value per token (T={T},)")
    return value


# --------------------------------------------------------------------------------------------
# Policy and sampling
# --------------------------------------------------------------------------------------------


def policy_logits(x: Any, params: RouterParams) -> Any:
    r"""Router logits $z = x W_r + b_r$, shape (T, E) (``noise_weight`` / ``selection_bias`` must be None)."""
    check_record_type(params, "params", RouterParams)
    if params.noise_weight is not None or params.selection_bias is not None:
        raise ValueError("params.noise_weight and params.selection_bias are not used by the REINFORCE policy; pass None")
    xp = check_arrays({"x": x, "params.weight": params.weight, "params.bias": params.bias}, neg_inf_ok=("params.bias",))
    check_float_array(x, "x", ndim=2)
    check_float_array(params.weight, "params.weight", ndim=2)
    d = x.shape[1]
    check_shape(params.weight, "params.weight", (d, None), what=f"x has d={d} features")
    E = params.weight.shape[1]
    z = xp.matmul(x, params.weight)  # (T, E)
    if params.bias is not None:
        check_shape(params.bias, "params.bias", (E,), what=f"params.weight has E={E} columns")
        z = z + params.bias
    return z


def sample_policy(logits: Any, uniform: Any) -> PolicySample:
    r"""Sample one expert per token from $\pi_t = \operatorname{softmax}(z_t)$ by inverse-CDF sampling of explicit uniforms.

    $$a_t = \min\{e : u_t < F_{te}\}, \qquad F_{te} = \frac{\sum_{e' \le e} \pi_{te'}}{\sum_{e'} \pi_{te'}},$$

    so $P(a_t = e) = \pi_{te}$ when $u_t \sim U[0, 1)$.

    Parameters
    ----------
    logits : array, shape (T, E)
        $z_t$ (``-inf`` switches an expert off; a row needs one finite entry).
    uniform : array, shape (T,)
        $u_t \in [0, 1)$, one draw per token (e.g. ``rng.random(T)``).

    Returns
    -------
    PolicySample

    Notes
    -----
    **Boundaries.** A draw exactly on a CDF step, $u_t = F_{te}$, goes to the next expert
    ($a_t = e + 1$), as ``searchsorted(F, u, side="right")``. The CDF is divided by its last
    entry, so $F_{t,E-1} = 1$ exactly and every $u < 1$ lands on an expert; experts with
    probability 0 (underflow, ``-inf`` logits) are never drawn.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.reinforce import sample_policy
    >>> logits = np.log(np.array([[0.25, 0.25, 0.5]]))
    >>> [int(sample_policy(logits, np.array([u])).action[0]) for u in (0.0, 0.25, 0.49, 0.5, 0.99)]
    [0, 1, 1, 2, 2]
    """
    xp, T, E = _check_logits(logits)
    check_arrays({"uniform": uniform, "logits": logits}, neg_inf_ok=("logits",))
    check_shape(uniform, "uniform", (T,), what=f"one draw per token, logits has T={T} rows")
    if concrete_bool(xp.any((uniform < 0) | (uniform >= 1))) is True:
        lo, hi = float(xp.min(uniform)), float(xp.max(uniform))
        raise ValueError(f"uniform must lie in [0, 1); found values in [{lo}, {hi}]")
    probs = softmax(logits, axis=1)  # (T, E)
    cdf = xp.cumulative_sum(probs, axis=1)  # (T, E)
    cdf = cdf / cdf[:, E - 1 :]  # (T, E), last column exactly 1
    action = xp.sum(xp.astype(cdf <= uniform[:, None], xp.int64), axis=1)  # (T,) number of steps passed
    action = xp.minimum(action, xp.full_like(action, E - 1))  # only reachable if rounding left F < 1
    log_prob = _take_along_axis(log_softmax(logits, axis=1), action[:, None], axis=1)[:, 0]  # (T,)
    routes = Routes(
        expert_index=action[:, None],
        weight=xp.ones((T, 1), dtype=logits.dtype, device=device_of(logits)),
        kept=xp.ones((T, 1), dtype=xp.bool, device=device_of(logits)),
        position=_positions_in_expert(action, E, xp)[:, None],
    )
    return PolicySample(probs, action, log_prob, routes)


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


def reinforce_logits_gradient(logits: Any, action: Any, reward: Any, baseline: Any = None) -> Any:
    r"""The REINFORCE estimate of $\nabla_z \mathbb E[R]$ from one sampled route per token.

    $$\hat g_t = (R_t - b_t)\, \nabla_{z_t} \log \pi_t(a_t) = (R_t - b_t)\,(\mathbf e_{a_t} - \pi_t),$$

    Williams (1992), Machine Learning 8, 229-256 (the REINFORCE rule with a reinforcement
    baseline). Its expectation over $a \sim \pi$ is the exact gradient of $\mathbb E[R]$ for any
    baseline that does not depend on the action; a good baseline only lowers the variance.

    Parameters
    ----------
    logits : array, shape (T, E)
    action : int array, shape (T,)
        The sampled experts $a_t$.
    reward : array, shape () or (T,)
        $R_t$: one reward shared by all tokens (e.g. minus the sequence loss), or one per token.
        The estimate is an *ascent* direction: to minimise a loss $L$ pass $R = -L$.
    baseline : array, shape () or (T,), optional
        $b_t$ (default 0), e.g. a running mean of past rewards.

    Returns
    -------
    array, shape (T, E)

    Notes
    -----
    The rows of $\hat g$ sum to 0 (the softmax is shift invariant). A ``-inf`` logit has
    $\pi = 0$ and gets 0.
    """
    xp, T, E = _check_logits(logits)
    a = _check_action(action, logits, xp)
    advantage = _per_token(reward, "reward", T, logits, xp) - _per_token(baseline, "baseline", T, logits, xp)  # (T,)
    return advantage[:, None] * (one_hot(a, E, dtype=logits.dtype) - softmax(logits, axis=1))  # (T, E)


def reinforce_gradient(x: Any, params: RouterParams, action: Any, reward: Any, baseline: Any = None) -> ReinforceGrads:
    r"""The REINFORCE estimate chained through the linear router $z = x W_r + b_r$.

    $$\hat g^{z} = (R - b) \odot (\mathbf e_{a} - \pi), \qquad
    \hat g^{W_r} = x^\top \hat g^{z}, \qquad \hat g^{b_r} = \sum_t \hat g^{z}_t, \qquad
    \hat g^{x} = \hat g^{z} W_r^\top .$$

    ``x`` here is only the router's input: the estimate of $\nabla_x$ is the score-function
    part, to be added to whatever gradient reaches $x$ through the experts' computation.

    Parameters
    ----------
    x : array, shape (T, d)
    params : RouterParams
        ``weight (d, E)``, optional ``bias (E,)``.
    action, reward, baseline
        As in [`reinforce_logits_gradient`][moeref.reinforce.reinforce_logits_gradient].

    Returns
    -------
    ReinforceGrads
        ``logits (T, E)``, ``x (T, d)``, ``params`` (``weight``, ``bias`` or None; the other
        fields None).
    """
    z = policy_logits(x, params)
    xp = array_namespace(x, z)
    g = reinforce_logits_gradient(z, action, reward, baseline)  # (T, E)
    W_bar = xp.matmul(xp.matrix_transpose(x), g)  # (d, E)
    b_bar = None if params.bias is None else xp.sum(g, axis=0)  # (E,)
    x_bar = xp.matmul(g, xp.matrix_transpose(params.weight))  # (T, d)
    return ReinforceGrads(logits=g, x=x_bar, params=RouterParams(weight=W_bar, bias=b_bar))


# --------------------------------------------------------------------------------------------
# The exact objective for per-token reward tables
# --------------------------------------------------------------------------------------------


def _check_table(logits: Any, rewards: Any) -> tuple[Any, int, int]:
    xp, T, E = _check_logits(logits)
    check_arrays({"rewards": rewards, "logits": logits}, neg_inf_ok=("logits",))
    check_shape(rewards, "rewards", (T, E), what=f"the reward R_t(e) of each token and expert, logits has shape ({T}, {E})")
    return xp, T, E


def expected_reward(logits: Any, rewards: Any) -> Any:
    r"""The exact expected reward $\mathbb E_{a\sim\pi}\big[\sum_t R_t(a_t)\big] = \sum_t \sum_e \pi_{te} R_{te}$ (0-d array).

    For rewards that depend on each token's own route only (a table $R_{te}$), the objective
    that [`reinforce_gradient`][moeref.reinforce.reinforce_gradient] estimates, in closed form.

    Parameters
    ----------
    logits : array, shape (T, E)
    rewards : array, shape (T, E)
        $R_{te}$.

    Returns
    -------
    array, shape ()

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.reinforce import expected_reward
    >>> float(expected_reward(np.log(np.array([[0.25, 0.75]])), np.array([[4.0, 0.0]])))
    1.0
    """
    xp, _, _ = _check_table(logits, rewards)
    return xp.sum(softmax(logits, axis=1) * rewards)


def expected_reward_vjp(logits: Any, rewards: Any, cotangent: Any) -> ExpectedRewardGrads:
    r"""VJP of [`expected_reward`][moeref.reinforce.expected_reward]: the exact gradient.

    $$\frac{\partial\, \mathbb E[R]}{\partial z_{te}} = \pi_{te}\Big(R_{te} - \sum_{e'} \pi_{te'} R_{te'}\Big), \qquad
    \frac{\partial\, \mathbb E[R]}{\partial R_{te}} = \pi_{te},$$

    both times the scalar cotangent.
    """
    xp, _, _ = _check_table(logits, rewards)
    cotangent = check_scalar_cotangent(cotangent, logits, what="the expected reward is a scalar")
    p = softmax(logits, axis=1)  # (T, E)
    return ExpectedRewardGrads(logits=_softmax_vjp(p, cotangent * rewards, 1, xp), rewards=cotangent * p)
