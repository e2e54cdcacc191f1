r"""Deep mixture of experts (DMoE): mixtures of experts stacked layer on layer.

Eigen, Ranzato & Sutskever (2013), "Learning Factored Representations in a Deep Mixture of
Experts", ICLR 2014 workshop track, arXiv:1312.4314. Each layer $l$ has its own gating network
$g^l$ and experts $f^l_i$, both reading the previous layer's output:

$$z^0 = x, \qquad z^l = \sum_{i=1}^{n_l} g^l_i(z^{l-1})\, f^l_i(z^{l-1}), \qquad l = 1, \dots, L,$$

with linear-ReLU experts $f^l_i(z) = \max(0, W^l_i z + b^l_i)$ and linear-ReLU-linear-softmax
gates $g^l(z) = \operatorname{softmax}(B^l \max(0, A^l z + a^l) + b^l)$. Combining one expert
per layer gives $\prod_l n_l$ effective "paths" from a model whose size grows only additively.

Each layer is the generic dense [`mixture`][moeref.mixture.mixture] of ReLU'd
[`linear_experts`][moeref.experts.linear_experts] under a
[`linear_softmax_gate`][moeref.gates.linear_softmax_gate] applied to a ReLU hidden layer; the
layer's forward and VJP are built from those blocks, and the stack from the layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from .core import array_namespace, relu, softmax
from .experts import LinearExpertsParams, _linear_experts, _linear_experts_vjp
from .gates import LinearSoftmaxGateParams, _gate_vjp, _logits
from .mixture import _mixture, _mixture_vjp
from .validation import check_cotangent, check_finite, check_float_array, check_same_dtype, check_shape

__all__ = [
    "DeepMoELayerParams",
    "DeepMoELayerGrads",
    "DeepMoEGrads",
    "deep_moe_layer",
    "deep_moe_layer_vjp",
    "deep_moe_layer_gates",
    "deep_moe",
    "deep_moe_vjp",
    "deep_moe_gates",
]


class DeepMoELayerParams(NamedTuple):
    r"""Parameters of one DMoE layer: $n$ linear-ReLU experts and a two-layer gate.

    Row-vector convention (``z @ weight``), as in [`moeref.experts`][moeref.experts] and
    [`moeref.gates`][moeref.gates]; the paper's matrices act on column vectors, hence the
    transposes below.

    Attributes
    ----------
    expert_weight : array, shape (n, d_in, d_out)
        ``expert_weight[i]`` is $(W^l_i)^\top$.
    expert_bias : array, shape (n, d_out)
        Row ``i`` is $b^l_i$.
    gate_hidden_weight : array, shape (d_in, h)
        $(A^l)^\top$: the gate's first (hidden) linear map, $h$ hidden units.
    gate_hidden_bias : array, shape (h,)
        $a^l$.
    gate_weight : array, shape (h, n)
        $(B^l)^\top$: column ``i`` (row $i$ of $B^l$) gives expert $i$'s gate logit.
    gate_bias : array, shape (n,)
        $b^l$ (the gate's output bias; not the experts' $b^l_i$).
    """

    expert_weight: Any
    expert_bias: Any
    gate_hidden_weight: Any
    gate_hidden_bias: Any
    gate_weight: Any
    gate_bias: Any


class DeepMoELayerGrads(NamedTuple):
    """Cotangents of [`deep_moe_layer`][moeref.deep_moe.deep_moe_layer]'s inputs."""

    x: Any
    params: DeepMoELayerParams


class DeepMoEGrads(NamedTuple):
    """Cotangents of [`deep_moe`][moeref.deep_moe.deep_moe]'s inputs (``params``: one record per layer)."""

    x: Any
    params: tuple[DeepMoELayerParams, ...]


class _LayerForward(NamedTuple):
    """Intermediate values of one layer, reused by its VJP."""

    gate_pre: Any  # (N, h)          A z + a
    gate_hidden: Any  # (N, h)       max(0, A z + a)
    gates: Any  # (N, n)             g(z)
    expert_pre: Any  # (N, n, d_out) W_i z + b_i
    expert_out: Any  # (N, n, d_out) f_i(z)
    out: Any  # (N, d_out)           sum_i g_i f_i


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_layer_params(p: Any, d_in: int, prefix: str, source: str) -> int:
    """Check one layer's record against its input width; return its output width d_out."""
    if not isinstance(p, DeepMoELayerParams):
        raise TypeError(f"{prefix} must be a DeepMoELayerParams, got {type(p).__name__}")
    names = tuple(f"{prefix}.{f}" for f in DeepMoELayerParams._fields)
    array_namespace(*p, names=names)
    check_float_array(p.expert_weight, f"{prefix}.expert_weight", ndim=3)
    check_float_array(p.gate_hidden_weight, f"{prefix}.gate_hidden_weight", ndim=2)
    check_float_array(p.gate_weight, f"{prefix}.gate_weight", ndim=2)
    n, _, d_out = p.expert_weight.shape
    h = p.gate_hidden_weight.shape[1]
    check_shape(p.expert_weight, f"{prefix}.expert_weight", (n, d_in, d_out), what=f"{source}")
    check_shape(p.expert_bias, f"{prefix}.expert_bias", (n, d_out), what=f"{prefix}.expert_weight has n={n} experts, d_out={d_out}")
    check_shape(p.gate_hidden_weight, f"{prefix}.gate_hidden_weight", (d_in, h), what=f"{source}")
    check_shape(p.gate_hidden_bias, f"{prefix}.gate_hidden_bias", (h,), what=f"{prefix}.gate_hidden_weight has h={h} hidden units")
    check_shape(
        p.gate_weight, f"{prefix}.gate_weight", (h, n), what=f"the gate has h={h} hidden units and {prefix}.expert_weight n={n} experts"
    )
    check_shape(p.gate_bias, f"{prefix}.gate_bias", (n,), what=f"{prefix}.expert_weight has n={n} experts")
    return d_out


def _check_layer(x: Any, params: DeepMoELayerParams) -> Any:
    if not isinstance(params, DeepMoELayerParams):
        raise TypeError(f"params must be a DeepMoELayerParams, got {type(params).__name__}")
    names = ("x",) + tuple(f"params.{f}" for f in DeepMoELayerParams._fields)
    xp = array_namespace(x, *params, names=names)
    check_float_array(x, "x", ndim=2)
    _check_layer_params(params, x.shape[1], "params", f"x has d_in={x.shape[1]} features")
    named = {"x": x, **{f"params.{f}": a for f, a in zip(DeepMoELayerParams._fields, params)}}
    check_same_dtype(named)
    _check_finite(named)
    return xp


def _check_finite(named: dict) -> None:
    """Finite values everywhere; a gate bias may hold -inf (an expert switched off, as in moeref.gates)."""
    for name, a in named.items():
        check_finite(a, name, allow_neg_inf=name.endswith(".gate_bias"))


def _check_stack(x: Any, params: Any) -> tuple[Any, list[int]]:
    """Check x and a sequence of layer records whose widths chain; return xp and the widths."""
    if isinstance(params, DeepMoELayerParams):
        raise TypeError("params must be a sequence of DeepMoELayerParams, one per layer; for one layer pass (params,)")
    if not isinstance(params, (tuple, list)) or len(params) == 0:
        raise TypeError(f"params must be a non-empty tuple or list of DeepMoELayerParams, got {type(params).__name__}")
    xp = array_namespace(x, names=("x",))
    check_float_array(x, "x", ndim=2)
    widths = [x.shape[1]]
    for l, p in enumerate(params):
        source = f"x has d={x.shape[1]} features" if l == 0 else f"layer {l} reads the d={widths[-1]} outputs of layer {l - 1}"
        widths.append(_check_layer_params(p, widths[-1], f"params[{l}]", source))
    named = {"x": x}
    for l, p in enumerate(params):
        named.update({f"params[{l}].{f}": a for f, a in zip(DeepMoELayerParams._fields, p)})
    array_namespace(*named.values(), names=tuple(named))  # one array library for the whole stack
    check_same_dtype(named)
    _check_finite(named)
    return xp, widths


# --------------------------------------------------------------------------------------------
# One layer: forward and backward cores (no validation: the public functions check first)
# --------------------------------------------------------------------------------------------


def _layer_forward(xp: Any, x: Any, p: DeepMoELayerParams) -> _LayerForward:
    gate_pre = xp.matmul(x, p.gate_hidden_weight) + p.gate_hidden_bias  # (N, h)
    gate_hidden = relu(gate_pre)  # (N, h)
    gates = softmax(_logits(gate_hidden, LinearSoftmaxGateParams(p.gate_weight, p.gate_bias), xp), axis=-1)  # (N, n)
    expert_pre = _linear_experts(x, LinearExpertsParams(p.expert_weight, p.expert_bias), xp)  # (N, n, d_out)
    expert_out = relu(expert_pre)  # (N, n, d_out)
    return _LayerForward(gate_pre, gate_hidden, gates, expert_pre, expert_out, _mixture(gates, expert_out, xp))  # out: (N, d_out)


def _layer_backward(xp: Any, x: Any, p: DeepMoELayerParams, fw: _LayerForward, cotangent: Any) -> DeepMoELayerGrads:
    mix = _mixture_vjp(fw.gates, fw.expert_out, cotangent, xp)  # gates (N, n), expert_outputs (N, n, d_out)
    # ReLU: derivative 1 where the pre-activation is > 0, and 0 elsewhere (also at 0)
    expert_pre_bar = xp.where(fw.expert_pre > 0, mix.expert_outputs, xp.zeros_like(mix.expert_outputs))
    ex = _linear_experts_vjp(x, LinearExpertsParams(p.expert_weight, p.expert_bias), expert_pre_bar, xp)
    gate = _gate_vjp(fw.gate_hidden, LinearSoftmaxGateParams(p.gate_weight, p.gate_bias), mix.gates, fw.gates, xp)
    gate_pre_bar = xp.where(fw.gate_pre > 0, gate.x, xp.zeros_like(gate.x))  # (N, h)
    x_bar = ex.x + xp.matmul(gate_pre_bar, xp.matrix_transpose(p.gate_hidden_weight))  # (N, d_in)
    return DeepMoELayerGrads(
        x=x_bar,
        params=DeepMoELayerParams(
            expert_weight=ex.params.weight,  # (n, d_in, d_out)
            expert_bias=ex.params.bias,  # (n, d_out)
            gate_hidden_weight=xp.matmul(xp.matrix_transpose(x), gate_pre_bar),  # (d_in, h)
            gate_hidden_bias=xp.sum(gate_pre_bar, axis=0),  # (h,)
            gate_weight=gate.params.weight,  # (h, n)
            gate_bias=gate.params.bias,  # (n,)
        ),
    )


# --------------------------------------------------------------------------------------------
# Public API: one layer
# --------------------------------------------------------------------------------------------


def deep_moe_layer(x: Any, params: DeepMoELayerParams) -> Any:
    r"""One layer of a deep mixture of experts.

    $$z = \sum_{i=1}^{n} g_i(x)\, f_i(x), \qquad f_i(x) = \max(0, W_i x + b_i), \qquad
    g(x) = \operatorname{softmax}\big(B \max(0, A x + a) + b\big).$$

    The layer of Eigen, Ranzato & Sutskever (2013), "Learning Factored Representations in a Deep
    Mixture of Experts", ICLR 2014 workshop, arXiv:1312.4314: the mixture of Section 3 (the
    standard MoE combination, their Eq. (1) without the per-expert softmax), with the experts
    $f^1_i(x) = \max(0, W^1_i x + b^1_i)$ and the gate $g^1(x) = \operatorname{softmax}(B \cdot
    \max(0, A x + a) + b)$ given in Section 4.1.

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : DeepMoELayerParams

    Returns
    -------
    array, shape (N, d_out)

    Notes
    -----
    The combination is dense: every expert runs on every input. The paper's training-time
    balancing constraint (zeroing $g^l_i$ for experts whose running total assignment exceeds
    the mean by a margin $m$, Section 3) is a stateful training device, not part of the model
    function, and is not applied here. ReLU's derivative at 0 is taken as 0.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.deep_moe import DeepMoELayerParams, deep_moe_layer
    >>> p = DeepMoELayerParams(np.stack([np.eye(2), -np.eye(2)]), np.zeros((2, 2)),
    ...                        np.zeros((2, 3)), np.zeros(3), np.zeros((3, 2)), np.zeros(2))
    >>> deep_moe_layer(np.array([[1.0, -2.0]]), p).tolist()  # gates (1/2, 1/2)
    [[0.5, 1.0]]
    """
    xp = _check_layer(x, params)
    return _layer_forward(xp, x, params).out


def deep_moe_layer_gates(x: Any, params: DeepMoELayerParams) -> Any:
    r"""The gate values $g(x) = \operatorname{softmax}(B\max(0, Ax + a) + b)$ of one DMoE layer.

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : DeepMoELayerParams

    Returns
    -------
    array, shape (N, n)
        Rows are probability vectors over the layer's experts.
    """
    xp = _check_layer(x, params)
    return _layer_forward(xp, x, params).gates


def deep_moe_layer_vjp(x: Any, params: DeepMoELayerParams, cotangent: Any) -> DeepMoELayerGrads:
    r"""VJP of [`deep_moe_layer`][moeref.deep_moe.deep_moe_layer].

    With $\bar z$ the output cotangent, $e_i = W_i x + b_i$, $s = A x + a$, $r = \max(0, s)$:

    $$\bar g_i = \langle \bar z, f_i \rangle, \quad \bar e_i = [e_i > 0] \odot g_i \bar z, \quad
    \bar u_i = g_i\Big(\bar g_i - \sum_j g_j \bar g_j\Big), \quad \bar s = [s > 0] \odot B^\top \bar u,$$

    $$\bar W_i = \bar e_i x^\top, \quad \bar b_i = \bar e_i, \quad \bar B = \bar u\, r^\top, \quad
    \bar b = \bar u, \quad \bar A = \bar s\, x^\top, \quad \bar a = \bar s, \quad
    \bar x = \sum_i W_i^\top \bar e_i + A^\top \bar s,$$

    summed over the rows of the batch (in the stored, transposed layout of
    [`DeepMoELayerParams`][moeref.deep_moe.DeepMoELayerParams]). Built from
    [`mixture_vjp`][moeref.mixture.mixture_vjp],
    [`linear_experts_vjp`][moeref.experts.linear_experts_vjp] and
    [`linear_softmax_gate_vjp`][moeref.gates.linear_softmax_gate_vjp].

    Parameters
    ----------
    x, params
        As in the forward.
    cotangent : array, shape (N, d_out)
    """
    xp = _check_layer(x, params)
    check_cotangent(cotangent, (x.shape[0], params.expert_weight.shape[2]), like=x, what="the shape of the layer's output (N, d_out)")
    fw = _layer_forward(xp, x, params)
    return _layer_backward(xp, x, params, fw, cotangent)


# --------------------------------------------------------------------------------------------
# Public API: the stack
# --------------------------------------------------------------------------------------------


def deep_moe(x: Any, params: Sequence[DeepMoELayerParams]) -> Any:
    r"""Deep mixture of experts: $L$ stacked DMoE layers, returning the last layer's output $z^L$.

    $$z^0 = x, \qquad z^l = \sum_{i=1}^{n_l} g^l_i(z^{l-1})\, f^l_i(z^{l-1}), \qquad l = 1, \dots, L,$$

    $$f^l_i(z) = \max(0, W^l_i z + b^l_i), \qquad
    g^l(z) = \operatorname{softmax}\big(B^l \max(0, A^l z + a^l) + b^l\big).$$

    Eigen, Ranzato & Sutskever (2013), "Learning Factored Representations in a Deep Mixture of
    Experts", ICLR 2014 workshop, arXiv:1312.4314: the composed mixtures $z^1$, $z^2$ of
    Section 3 (generalised from their two layers to $L$), with the expert and gate forms of
    Section 4.1.

    Parameters
    ----------
    x : array, shape (N, d_0)
    params : tuple or list of DeepMoELayerParams, length L >= 1
        Layer $l$ (0-based ``params[l]``) maps width $d_l$ to $d_{l+1}$; the widths must chain.

    Returns
    -------
    array, shape (N, d_L)

    Notes
    -----
    * The paper's classifier head, $F(x) = \operatorname{softmax}(f^3(z^2))$ with a final linear
      layer $f^3(z) = W^3 z + b^3$, is not part of this function: compose it with a linear map
      and [`log_softmax`][moeref.core.log_softmax].
    * A one-layer stack is the generic [`mixture`][moeref.mixture.mixture] of ReLU'd
      [`linear_experts`][moeref.experts.linear_experts].
    * Experts of one layer are exchangeable: permuting ``expert_weight`` / ``expert_bias``
      together with the columns of ``gate_weight`` and entries of ``gate_bias`` (the rows of
      $B^l$ and entries of $b^l$) leaves the output unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.deep_moe import DeepMoELayerParams, deep_moe
    >>> layer = DeepMoELayerParams(np.stack([np.eye(2), 2 * np.eye(2)]), np.zeros((2, 2)),
    ...                            np.zeros((2, 1)), np.zeros(1), np.zeros((1, 2)), np.zeros(2))
    >>> deep_moe(np.array([[1.0, 2.0]]), (layer, layer)).tolist()  # each layer scales by 1.5
    [[2.25, 4.5]]
    """
    xp, _ = _check_stack(x, params)
    z = x
    for p in params:
        z = _layer_forward(xp, z, p).out  # (N, d_l) -> (N, d_{l+1})
    return z


def deep_moe_gates(x: Any, params: Sequence[DeepMoELayerParams]) -> tuple[Any, ...]:
    r"""The gate values $g^l(z^{l-1})$ of every layer of a deep mixture of experts.

    Eigen et al. (2013), arXiv:1312.4314, analyse these (Figs. 2, 3 and 5: mean gate output by
    input translation and by class; per-combination assignments $g^1_i g^2_j$).

    Parameters
    ----------
    x : array, shape (N, d_0)
    params : tuple or list of DeepMoELayerParams

    Returns
    -------
    tuple of arrays, shapes (N, n_1), ..., (N, n_L)
        Rows are probability vectors over each layer's experts. The joint assignment of a path
        $(i_1, \dots, i_L)$ is the product $\prod_l g^l_{i_l}$.
    """
    xp, _ = _check_stack(x, params)
    z = x
    gates = []
    for p in params:
        fw = _layer_forward(xp, z, p)
        gates.append(fw.gates)  # (N, n_l)
        z = fw.out
    return tuple(gates)


def deep_moe_vjp(x: Any, params: Sequence[DeepMoELayerParams], cotangent: Any) -> DeepMoEGrads:
    r"""VJP of [`deep_moe`][moeref.deep_moe.deep_moe]: reverse-mode through the stack.

    $$\bar z^L = \text{cotangent}, \qquad
    (\bar z^{l-1}, \bar\theta^l) = \text{layer-VJP}^l(z^{l-1}, \theta^l, \bar z^l), \quad l = L, \dots, 1,
    \qquad \bar x = \bar z^0,$$

    each step being [`deep_moe_layer_vjp`][moeref.deep_moe.deep_moe_layer_vjp]'s formula at the
    forward activations $z^{l-1}$.

    Parameters
    ----------
    x, params
        As in the forward.
    cotangent : array, shape (N, d_L)

    Returns
    -------
    DeepMoEGrads
        ``params`` is a tuple of [`DeepMoELayerParams`][moeref.deep_moe.DeepMoELayerParams],
        one per layer, shaped like the forward's.
    """
    xp, widths = _check_stack(x, params)
    check_cotangent(cotangent, (x.shape[0], widths[-1]), like=x, what=f"the last layer has d_out={widths[-1]}")
    inputs = []
    caches = []
    z = x
    for p in params:
        fw = _layer_forward(xp, z, p)
        inputs.append(z)
        caches.append(fw)
        z = fw.out
    z_bar = cotangent
    grads: list[DeepMoELayerParams] = []
    for p, z_in, fw in zip(reversed(params), reversed(inputs), reversed(caches)):
        layer = _layer_backward(xp, z_in, p, fw, z_bar)
        grads.append(layer.params)
        z_bar = layer.x  # (N, d_{l-1})
    return DeepMoEGrads(x=z_bar, params=tuple(reversed(grads)))
