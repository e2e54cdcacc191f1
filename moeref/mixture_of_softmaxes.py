r"""Mixture of softmaxes (MoS): a convex combination of $K$ softmax distributions.

Yang, Dai, Salakhutdinov & Cohen (2017), "Breaking the Softmax Bottleneck: A High-Rank RNN
Language Model", ICLR 2018, arXiv:1711.03953, Section 2.4. A single softmax over logits
$h_c^\top w_x$ (their Eq. (1)) can only express log-probability matrices of rank at most
$d + 1$; mixing $K$ softmaxes in probability space lifts that bound:

$$P_\theta(x \mid c) = \sum_{k=1}^{K} \pi_{c,k}\,
\frac{\exp h_{c,k}^\top w_x}{\sum_{x'} \exp h_{c,k}^\top w_{x'}},
\qquad \pi_{c,k} = \frac{\exp w_{\pi,k}^\top g_c}{\sum_{k'} \exp w_{\pi,k'}^\top g_c},
\qquad h_{c,k} = \tanh(W_{h,k} g_c).$$

Everything is computed in log space, $\log P = \operatorname{lse}_k(\log\pi_k + \log\sigma(\ell_k))$,
so no probability is ever rounded to 0 before its logarithm is taken. Forward and analytic VJP
sit side by side, for the log-probabilities and for the mean negative log-likelihood.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .core import _log_softmax_vjp, _take_along_axis, array_namespace, log_softmax, logsumexp, one_hot
from .validation import (
    check_cotangent,
    check_scalar_cotangent,
    check_finite,
    check_float_array,
    check_index_range,
    check_int_array,
    check_same_dtype,
    check_shape,
)

__all__ = [
    "MixtureOfSoftmaxesParams",
    "MixtureOfSoftmaxesGrads",
    "MixtureOfSoftmaxesNllGrads",
    "mixture_of_softmaxes_log_probs",
    "mixture_of_softmaxes_log_probs_vjp",
    "mixture_of_softmaxes_nll",
    "mixture_of_softmaxes_nll_vjp",
]


class MixtureOfSoftmaxesParams(NamedTuple):
    r"""Parameters of a mixture of $K$ softmaxes over a vocabulary of $V$ tokens.

    The layout follows the reference code (zihangdai/mos, ``model.py``): the prior has **no
    bias** (``nn.Linear(nhidlast, n_experts, bias=False)``), the latent projections and the
    decoder (output embedding) **have biases**. The paper writes the model without any bias.

    Attributes
    ----------
    prior_weight : array, shape (d, K)
        Column ``k`` is $w_{\pi,k}$, so the prior logits are ``g @ prior_weight``.
    latent_weight : array, shape (K, d, d_e)
        ``latent_weight[k]`` is $W_{h,k}^\top$. From the reference code's
        ``latent = nn.Linear(d, K * d_e)`` (torch weight of shape ``(K * d_e, d)``), this is
        ``weight.reshape(K, d_e, d).transpose(0, 2, 1)``.
    latent_bias : array, shape (K, d_e)
        Bias of each component's projection before the $\tanh$ (``bias.reshape(K, d_e)``).
    output_weight : array, shape (d_e, V)
        Column ``x`` is the output word embedding $w_x$, shared by all components (the
        reference's ``decoder.weight.T``).
    output_bias : array, shape (V,)
        The decoder bias, shared by all components.
    """

    prior_weight: Any
    latent_weight: Any
    latent_bias: Any
    output_weight: Any
    output_bias: Any


class MixtureOfSoftmaxesGrads(NamedTuple):
    """Cotangents of [`mixture_of_softmaxes_log_probs`][moeref.mixture_of_softmaxes.mixture_of_softmaxes_log_probs]'s inputs."""

    g: Any
    params: MixtureOfSoftmaxesParams


class MixtureOfSoftmaxesNllGrads(NamedTuple):
    """Cotangents of [`mixture_of_softmaxes_nll`][moeref.mixture_of_softmaxes.mixture_of_softmaxes_nll]'s inputs.

    ``targets`` is integer-valued, hence not differentiable: its field is ``None``.
    """

    g: Any
    targets: Any
    params: MixtureOfSoftmaxesParams


class _Forward(NamedTuple):
    """Intermediate values of the forward pass, reused by the VJP."""

    log_prior: Any  # (N, K)    log pi_{c,k}
    h: Any  # (N, K, d_e)   h_{c,k} = tanh(W_{h,k} g_c + bias)
    component_log_probs: Any  # (N, K, V)   log softmax(h_{c,k}^T W + b)
    joint: Any  # (N, K, V)   log pi_{c,k} + log softmax_k
    exact_log_probs: Any  # (N, V)   lse_k joint (no eps)
    log_probs: Any  # (N, V)   the returned value (eps applied if given)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_PARAM_NAMES = tuple(f"params.{f}" for f in MixtureOfSoftmaxesParams._fields)


def _check_params_record(params: Any) -> None:
    if not isinstance(params, MixtureOfSoftmaxesParams):
        raise TypeError(f"params must be a MixtureOfSoftmaxesParams, got {type(params).__name__}")


def _check_eps(eps: Any) -> float | None:
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0) or math.isinf(eps):
        raise ValueError(f"eps must be None or a positive finite float (the reference code uses 1e-8), got {eps!r}")
    return float(eps)


def _check_mos(g: Any, params: MixtureOfSoftmaxesParams) -> Any:
    _check_params_record(params)
    xp = array_namespace(g, *params, names=("g",) + _PARAM_NAMES)
    check_float_array(g, "g", ndim=2)
    check_float_array(params.prior_weight, "params.prior_weight", ndim=2)
    check_float_array(params.latent_weight, "params.latent_weight", ndim=3)
    check_float_array(params.output_weight, "params.output_weight", ndim=2)
    d = g.shape[1]
    K = params.prior_weight.shape[1]
    check_shape(params.prior_weight, "params.prior_weight", (d, K), what=f"g has d={d} features")
    d_e = params.latent_weight.shape[2]
    check_shape(
        params.latent_weight,
        "params.latent_weight",
        (K, d, d_e),
        what=f"params.prior_weight has K={K} components and g has d={d} features",
    )
    check_shape(params.latent_bias, "params.latent_bias", (K, d_e), what=f"params.latent_weight has K={K}, d_e={d_e}")
    V = params.output_weight.shape[1]
    check_shape(params.output_weight, "params.output_weight", (d_e, V), what=f"params.latent_weight has d_e={d_e}")
    check_shape(params.output_bias, "params.output_bias", (V,), what=f"params.output_weight has V={V} columns")
    check_same_dtype({"g": g, **{n: a for n, a in zip(_PARAM_NAMES, params)}})
    for name, a in zip(("g",) + _PARAM_NAMES, (g, *params)):
        check_finite(a, name)
    return xp


def _check_targets(targets: Any, g: Any, V: int) -> Any:
    array_namespace(g, targets, names=("g", "targets"), allow_none=False)
    check_int_array(targets, "targets")
    check_shape(targets, "targets", (g.shape[0],), what=f"g has N={g.shape[0]} rows")
    check_index_range(targets, "targets", V, what=f"params.output_weight has a vocabulary of V={V}")
    return targets


# --------------------------------------------------------------------------------------------
# Forward and backward cores (no validation)
# --------------------------------------------------------------------------------------------


def _forward(xp: Any, g: Any, params: MixtureOfSoftmaxesParams, eps: float | None) -> _Forward:
    log_prior = log_softmax(xp.matmul(g, params.prior_weight), axis=-1)  # (N, K)
    # (K, N, d_e) -> (N, K, d_e)
    a = xp.matmul(g[None, :, :], params.latent_weight) + params.latent_bias[:, None, :]
    h = xp.tanh(xp.permute_dims(a, (1, 0, 2)))  # (N, K, d_e)
    logits = xp.matmul(h, params.output_weight) + params.output_bias  # (N, K, V)
    component_log_probs = log_softmax(logits, axis=-1)  # (N, K, V)
    joint = log_prior[:, :, None] + component_log_probs  # (N, K, V)
    exact = logsumexp(joint, axis=1)  # (N, V)
    if eps is None:
        out = exact
    else:
        # log(P + eps) without leaving log space
        out = xp.logaddexp(exact, xp.full_like(exact, math.log(eps)))
    return _Forward(log_prior, h, component_log_probs, joint, exact, out)


def _backward(xp: Any, g: Any, params: MixtureOfSoftmaxesParams, fw: _Forward, cotangent: Any) -> MixtureOfSoftmaxesGrads:
    # d log(P + eps) / d log P = P / (P + eps); equals 1 without eps
    ct = cotangent * xp.exp(fw.exact_log_probs - fw.log_probs)  # (N, V)
    # responsibilities r_{k} = pi_k softmax_k(x) / P(x): the softmax over k of the joint
    r = xp.exp(fw.joint - fw.exact_log_probs[:, None, :])  # (N, K, V)
    joint_bar = r * ct[:, None, :]  # (N, K, V)
    log_prior_bar = xp.sum(joint_bar, axis=2)  # (N, K)
    prior_logits_bar = _log_softmax_vjp(xp.exp(fw.log_prior), log_prior_bar, -1, xp)  # (N, K)
    logits_bar = _log_softmax_vjp(xp.exp(fw.component_log_probs), joint_bar, -1, xp)  # (N, K, V)
    N, K, d_e = fw.h.shape
    V = logits_bar.shape[2]
    h_flat = xp.reshape(fw.h, (N * K, d_e))
    logits_bar_flat = xp.reshape(logits_bar, (N * K, V))
    output_weight_bar = xp.matmul(xp.matrix_transpose(h_flat), logits_bar_flat)  # (d_e, V)
    output_bias_bar = xp.sum(logits_bar_flat, axis=0)  # (V,)
    h_bar = xp.matmul(logits_bar, xp.matrix_transpose(params.output_weight))  # (N, K, d_e)
    a_bar = xp.permute_dims(h_bar * (1.0 - fw.h * fw.h), (1, 0, 2))  # (K, N, d_e)
    latent_weight_bar = xp.matmul(xp.matrix_transpose(g)[None, :, :], a_bar)  # (K, d, d_e)
    latent_bias_bar = xp.sum(a_bar, axis=1)  # (K, d_e)
    g_bar = xp.matmul(prior_logits_bar, xp.matrix_transpose(params.prior_weight))  # (N, d)
    g_bar = g_bar + xp.sum(xp.matmul(a_bar, xp.matrix_transpose(params.latent_weight)), axis=0)  # (N, d)
    return MixtureOfSoftmaxesGrads(
        g=g_bar,
        params=MixtureOfSoftmaxesParams(
            prior_weight=xp.matmul(xp.matrix_transpose(g), prior_logits_bar),  # (d, K)
            latent_weight=latent_weight_bar,
            latent_bias=latent_bias_bar,
            output_weight=output_weight_bar,
            output_bias=output_bias_bar,
        ),
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def mixture_of_softmaxes_log_probs(g: Any, params: MixtureOfSoftmaxesParams, *, eps: float | None = None) -> Any:
    r"""Log-probabilities $\log P_\theta(x \mid c)$ of a mixture of softmaxes, for every token $x$.

    $$\log P_\theta(x \mid c) = \log \sum_{k=1}^{K} \pi_{c,k}\,
    \frac{\exp(h_{c,k}^\top w_x + b_x)}{\sum_{x'} \exp(h_{c,k}^\top w_{x'} + b_{x'})},
    \quad \pi_{c,k} = \frac{\exp w_{\pi,k}^\top g_c}{\sum_{k'} \exp w_{\pi,k'}^\top g_c},
    \quad h_{c,k} = \tanh(W_{h,k} g_c + b_{h,k}).$$

    The MoS definition of Yang, Dai, Salakhutdinov & Cohen (2017), "Breaking the Softmax
    Bottleneck: A High-Rank RNN Language Model", ICLR 2018, arXiv:1711.03953: the displayed
    (unnumbered) equation of Section 2.4 and the parameterisation of $\pi_{c_t,k}$ and
    $h_{c_t,k}$ that follows it. The biases $b_{h,k}$ and $b_x$ are those of the authors'
    reference code (zihangdai/mos); the paper omits them, and the prior has none in either.

    Computed exactly as $\operatorname{lse}_k\big(\log\pi_{c,k} + \log\sigma(\ell_{c,k})_x\big)$
    with the stable [`log_softmax`][moeref.core.log_softmax] and
    [`logsumexp`][moeref.core.logsumexp].

    Parameters
    ----------
    g : array, shape (N, d)
        Context vectors $g_c$ (in the paper, the last recurrent layer's hidden states $g_t$).
    params : MixtureOfSoftmaxesParams
    eps : float, optional
        If given, return $\log(P + \epsilon)$, as the reference code does
        (``torch.log(prob.add_(1e-8))``, i.e. ``eps=1e-8``). Default ``None``: the exact
        $\log P$. The rows of $e^{\log(P + \epsilon)}$ sum to $1 + V\epsilon$, not to 1.

    Returns
    -------
    array, shape (N, V)
        Rows are log-probability vectors (``logsumexp`` over a row is 0 when ``eps`` is None).

    Notes
    -----
    * $K = 1$ gives the plain softmax of Eq. (1): $\log\sigma(\tanh(W_{h,1} g_c + b_{h,1})^\top W + b)$.
    * The mixture is symmetric in the components: permuting the columns of ``prior_weight``
      together with ``latent_weight`` / ``latent_bias`` leaves $P$ unchanged.
    * No probability is formed before its logarithm: a token whose probability underflows
      float64 in every component still gets a finite log-probability (about $-745$ and below),
      where ``log(sum_k pi_k softmax_k)`` would give $-\infty$ (and ``log(P + 1e-8)`` would clip
      it at $\log 10^{-8} \approx -18.4$).
    * Dropout (on the latent vectors in the reference code) is a training-time device and is
      not part of this function.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.mixture_of_softmaxes import MixtureOfSoftmaxesParams, mixture_of_softmaxes_log_probs
    >>> p = MixtureOfSoftmaxesParams(np.zeros((2, 2)), np.zeros((2, 2, 3)), np.zeros((2, 3)),
    ...                              np.zeros((3, 4)), np.log(np.array([1.0, 1.0, 1.0, 5.0])))
    >>> np.exp(mixture_of_softmaxes_log_probs(np.ones((1, 2)), p)).round(3).tolist()
    [[0.125, 0.125, 0.125, 0.625]]
    """
    eps = _check_eps(eps)
    xp = _check_mos(g, params)
    return _forward(xp, g, params, eps).log_probs


def mixture_of_softmaxes_log_probs_vjp(
    g: Any, params: MixtureOfSoftmaxesParams, cotangent: Any, *, eps: float | None = None
) -> MixtureOfSoftmaxesGrads:
    r"""VJP of [`mixture_of_softmaxes_log_probs`][moeref.mixture_of_softmaxes.mixture_of_softmaxes_log_probs].

    With $\bar y_x$ the cotangent of $\log P(x)$ (first multiplied by $P/(P+\epsilon)$ when
    ``eps`` is given), $\ell_{k} = h_k^\top W + b$ the component logits, $p_k = \sigma(\ell_k)$,
    and the **responsibilities** (posterior over components given the token)

    $$r_{k}(x) = \frac{\pi_k\, p_k(x)}{P(x)} = \exp\big(\log\pi_k + \log p_k(x) - \log P(x)\big),
    \qquad \sum_k r_k(x) = 1,$$

    the chain rule through $\log P = \operatorname{lse}_k(\log\pi_k + \log p_k)$ gives

    $$\bar s_{kx} = r_k(x)\,\bar y_x, \qquad
    \bar u_k = \sum_x \bar s_{kx} - \pi_k \sum_{k'}\sum_x \bar s_{k'x}, \qquad
    \bar\ell_{kx} = \bar s_{kx} - p_k(x) \sum_{x'} \bar s_{kx'},$$

    for the prior logits $u_k = w_{\pi,k}^\top g$ and the component logits, then

    $$\bar W = \sum_{n,k} h_{nk} \bar\ell_{nk}^\top,\quad \bar b = \sum_{n,k} \bar\ell_{nk},\quad
    \bar a_{nk} = (1 - h_{nk}^2) \odot W \bar\ell_{nk},$$

    $$\bar W_{h,k}^\top = \sum_n g_n \bar a_{nk}^\top,\quad \bar b_{h,k} = \sum_n \bar a_{nk},\quad
    \bar w_{\pi} = \sum_n g_n \bar u_n^\top,\quad
    \bar g_n = \sum_k w_{\pi,k} \bar u_{nk} + \sum_k W_{h,k}^\top \bar a_{nk}.$$

    Parameters
    ----------
    g, params, eps
        As in the forward.
    cotangent : array, shape (N, V)

    Returns
    -------
    MixtureOfSoftmaxesGrads
        ``g`` of shape (N, d) and ``params`` with every field shaped like the forward's.
    """
    eps = _check_eps(eps)
    xp = _check_mos(g, params)
    check_cotangent(cotangent, (g.shape[0], params.output_weight.shape[1]), like=g, what="the shape of the log-probabilities (N, V)")
    fw = _forward(xp, g, params, eps)
    return _backward(xp, g, params, fw, cotangent)


def mixture_of_softmaxes_nll(
    g: Any, targets: Any, params: MixtureOfSoftmaxesParams, *, eps: float | None = None
) -> Any:
    r"""Mean negative log-likelihood of the targets under a mixture of softmaxes.

    $$\mathcal{L} = -\frac{1}{N}\sum_{n=1}^{N} \log P_\theta(x_n \mid c_n),$$

    the training objective of Yang et al. (2017), arXiv:1711.03953 (language modelling by
    maximum likelihood; the exponential of $\mathcal{L}$ is the perplexity reported there),
    with $\log P_\theta$ from
    [`mixture_of_softmaxes_log_probs`][moeref.mixture_of_softmaxes.mixture_of_softmaxes_log_probs].

    Parameters
    ----------
    g : array, shape (N, d)
        Context vectors, $N \ge 1$.
    targets : integer array, shape (N,)
        Token indices $x_n \in [0, V)$; gathered with [`take_along_axis`][moeref.core.take_along_axis].
    params : MixtureOfSoftmaxesParams
    eps : float, optional
        As in the log-probabilities (``1e-8`` reproduces the reference code's loss).

    Returns
    -------
    array, shape ()
        A 0-d array in the dtype of ``g``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.mixture_of_softmaxes import MixtureOfSoftmaxesParams, mixture_of_softmaxes_nll
    >>> p = MixtureOfSoftmaxesParams(np.zeros((2, 3)), np.zeros((3, 2, 2)), np.zeros((3, 2)),
    ...                              np.zeros((2, 4)), np.zeros(4))
    >>> float(mixture_of_softmaxes_nll(np.ones((5, 2)), np.array([0, 1, 2, 3, 0]), p))  # log 4
    1.3862943611198906
    """
    eps = _check_eps(eps)
    xp = _check_mos(g, params)
    N, V = g.shape[0], params.output_weight.shape[1]
    if N < 1:
        raise ValueError("g must have at least one row: the mean negative log-likelihood of no data is undefined")
    _check_targets(targets, g, V)
    log_probs = _forward(xp, g, params, eps).log_probs  # (N, V)
    picked = _take_along_axis(log_probs, xp.reshape(xp.astype(targets, xp.int64), (N, 1)), axis=1)  # (N, 1)
    return -xp.mean(picked[:, 0])


def mixture_of_softmaxes_nll_vjp(
    g: Any, targets: Any, params: MixtureOfSoftmaxesParams, cotangent: Any, *, eps: float | None = None
) -> MixtureOfSoftmaxesNllGrads:
    r"""VJP of [`mixture_of_softmaxes_nll`][moeref.mixture_of_softmaxes.mixture_of_softmaxes_nll].

    The loss picks one entry per row of $\log P$, so its cotangent there is

    $$\overline{\log P}_{nx} = -\frac{\bar{\mathcal{L}}}{N}\,[x = x_n],$$

    which is then pulled back by
    [`mixture_of_softmaxes_log_probs_vjp`][moeref.mixture_of_softmaxes.mixture_of_softmaxes_log_probs_vjp]
    (with $\bar y_x$ non-zero only at the target, the responsibilities $r_k(x_n)$ are the
    posterior $p(k \mid x_n, c_n)$ of the latent component).

    Parameters
    ----------
    g, targets, params, eps
        As in the forward.
    cotangent : array, shape () or float
        Cotangent of the scalar loss.

    Returns
    -------
    MixtureOfSoftmaxesNllGrads
        ``targets`` is ``None`` (integer input, not differentiable).
    """
    eps = _check_eps(eps)
    xp = _check_mos(g, params)
    N, V = g.shape[0], params.output_weight.shape[1]
    if N < 1:
        raise ValueError("g must have at least one row: the mean negative log-likelihood of no data is undefined")
    _check_targets(targets, g, V)
    ct = check_scalar_cotangent(cotangent, g, what="the loss is a scalar")
    log_probs_bar = (-ct / N) * one_hot(xp.astype(targets, xp.int64), V, dtype=g.dtype)  # (N, V)
    fw = _forward(xp, g, params, eps)
    grads = _backward(xp, g, params, fw, log_probs_bar)
    return MixtureOfSoftmaxesNllGrads(g=grads.g, targets=None, params=grads.params)
