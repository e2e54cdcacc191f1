r"""Sparse upcycling: a sparse MoE layer initialised from a dense FFN checkpoint.

Komatsuzaki, Puigcerver, Lee-Thorp, Riquelme Ruiz, Mustafa, Ainslie, Tay, Dehghani & Houlsby
(2023), "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", ICLR,
arXiv:2212.05055: every expert of the new MoE layer is an identical copy of the dense MLP it
replaces, and the router, which has no counterpart in the dense model, is the only newly
initialised part (their Figure 1). With $E$ copies of $\mathrm{FFN}$ and route weights
$w_{tj}$,

$$y_t = \sum_j w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t) = \Big(\sum_j w_{tj}\Big)\, \mathrm{FFN}(x_t),$$

so the upcycled layer starts as the dense layer exactly when the kept route weights of every
token sum to 1 (top-$k$ weights renormalised, dropless, weights applied to the output), whatever
the router, and in particular for a uniform (zero) router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import device_of
from .expert_ffn import ExpertFFN, ExpertFFNParams, check_expert_ffn_params
from .router import RouterParams
from .sparse_moe import SparseMoEParams
from .validation import (
    check_arrays,
    check_cotangent,
    check_float_array,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "LECUN_TRUNCATED_NORMAL_STD",
    "RouterInit",
    "FLAXFORMER_ROUTER_INIT",
    "VMOE_ROUTER_INIT",
    "ZERO_ROUTER_INIT",
    "UpcycleGrads",
    "upcycle",
    "upcycle_vjp",
]

LECUN_TRUNCATED_NORMAL_STD = 0.87962566103423978
"""Standard deviation of a standard normal truncated to $[-2, 2]$ (JAX's ``variance_scaling`` divides by it)."""


@dataclass(frozen=True)
class RouterInit:
    r"""How the fresh router weights are made from explicit standard-normal draws $N$: $W_r = s\, N$.

    Attributes
    ----------
    std : float or "lecun_normal"
        $s$. A float: plain scaling of standard normal draws (flaxformer
        `flaxformer/architectures/moe/routing.py`, ``RouterWeights`` ``default_kernel_init =
        nn.initializers.normal(stddev=2e-2)``, the T5X/flaxformer MoE code of the paper's language
        experiments). ``"lecun_normal"``: $s = 1/(0.8796\ldots\sqrt d)$ applied to draws of a
        standard normal truncated to $[-2, 2]$, i.e. flax's default ``lecun_normal`` kernel
        initialiser (variance $1/d$), which V-MoE's router uses (`vmoe/nn/routing.py`,
        ``nn.Dense(..., use_bias=False)`` without ``kernel_init``), the code of the paper's vision
        experiments. ``0.0``: a zero router (uniform routing probabilities).
    bias : bool
        Whether the router has a bias, initialised to 0 (flaxformer ``RouterWeights``:
        ``use_bias=True``, ``bias_init = zeros``; V-MoE: no bias).
    """

    std: float | str = 0.02
    bias: bool = False

    def __post_init__(self) -> None:
        s = self.std
        if s != "lecun_normal" and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0):
            raise ValueError(f"router_init.std must be a finite number >= 0 or 'lecun_normal', got {s!r}")
        if not isinstance(self.bias, bool):
            raise TypeError(f"router_init.bias must be a bool, got {type(self.bias).__name__} {self.bias!r}")

    def scale(self, d: int) -> float:
        """$s$ for a router over ``d`` input features."""
        if self.std == "lecun_normal":
            return 1.0 / (LECUN_TRUNCATED_NORMAL_STD * math.sqrt(d))
        return float(self.std)


FLAXFORMER_ROUTER_INIT = RouterInit(std=0.02, bias=True)
"""flaxformer / T5X MoE router: kernel $\\mathcal N(0, 0.02^2)$, zero bias."""

VMOE_ROUTER_INIT = RouterInit(std="lecun_normal", bias=False)
"""V-MoE router: flax ``lecun_normal`` kernel (truncated normal, variance $1/d$), no bias."""

ZERO_ROUTER_INIT = RouterInit(std=0.0, bias=False)
"""A zero router: uniform routing probabilities $1/E$ (no draws needed)."""


class UpcycleGrads(NamedTuple):
    """Cotangents of [`upcycle`][moeref.upcycling.upcycle]'s inputs.

    Attributes
    ----------
    dense : ExpertFFNParams
        In the layout ``dense`` was given (unstacked, or with a leading axis of 1).
    router_draws : array, shape (d, E), or None
        None when no draws were given.
    """

    dense: ExpertFFNParams
    router_draws: Any


def _check(dense: Any, num_experts: Any, ffn: Any, router_draws: Any, router_init: Any) -> tuple[Any, bool, int, int]:
    check_record_type(dense, "dense", ExpertFFNParams)
    check_record_type(router_init, "router_init", RouterInit)
    E = check_positive_int(num_experts, "num_experts")
    named = {f"dense.{f}": getattr(dense, f) for f in ExpertFFNParams._fields}
    xp = check_arrays({**named, "router_draws": router_draws})
    check_float_array(dense.w_out, "dense.w_out", ndim=(2, 3))
    stacked = dense.w_out.ndim == 3
    if stacked and dense.w_out.shape[0] != 1:
        raise ValueError(
            f"dense.w_out has shape {tuple(dense.w_out.shape)}: a dense FFN is one expert, either unstacked "
            "(w_in (d, K), w_out (I, d), ...) or with a leading axis of size 1"
        )
    for f, nd in (("w_in", 2), ("b_in", 1), ("b_out", 1)):
        a = getattr(dense, f)
        if a is not None and a.ndim != nd + stacked:
            layout = "stacked with a leading axis of size 1" if stacked else "unstacked"
            raise ValueError(
                f"dense.{f} has shape {tuple(a.shape)} but dense.w_out has shape {tuple(dense.w_out.shape)} ({layout}): "
                "every field of the dense FFN must have the same layout"
            )
    _, d, _ = check_expert_ffn_params(_as_stacked(dense, stacked), ffn, name="dense")
    if router_draws is not None:
        check_float_array(router_draws, "router_draws", ndim=2)
        check_shape(router_draws, "router_draws", (d, E), what=f"one standard normal draw per router weight, (d, E) = ({d}, {E})")
        if router_init.std == "lecun_normal" and concrete_bool(xp.any(xp.abs(router_draws) > 2)) is True:
            raise ValueError("router_draws must be standard normal draws truncated to [-2, 2] for router_init.std='lecun_normal'")
    elif router_init.std != 0.0:
        raise ValueError(f"router_draws (shape (d, E) = ({d}, {E})) are required unless router_init.std is 0 (a zero router)")
    return xp, stacked, d, E


def _as_stacked(p: ExpertFFNParams, stacked: bool) -> ExpertFFNParams:
    """The record with a leading expert axis of size 1."""
    return p if stacked else ExpertFFNParams(*(None if a is None else a[None, ...] for a in p))


def upcycle(
    dense: ExpertFFNParams,
    num_experts: int,
    ffn: ExpertFFN,
    router_draws: Any = None,
    *,
    router_init: RouterInit = FLAXFORMER_ROUTER_INIT,
) -> SparseMoEParams:
    r"""Parameters of an $E$-expert sparse MoE layer upcycled from one dense FFN.

    $$\theta_e = \theta_{\text{dense}} \quad (e = 0, \dots, E-1), \qquad W_r = s\, N, \qquad b_r = 0,$$

    the upcycling initialisation of Komatsuzaki et al. (2023), "Sparse Upcycling: Training
    Mixture-of-Experts from Dense Checkpoints", ICLR, arXiv:2212.05055 (Figure 1: experts are
    identical copies of the replaced MLP, the router is new). $N$ are explicit standard-normal
    draws and $s$ comes from ``router_init``.

    Parameters
    ----------
    dense : ExpertFFNParams
        The dense FFN in moeref's layout, either unstacked (``w_in (d, K)``, ``w_out (I, d)``,
        ``b_in (K,)``, ``b_out (d,)``, ``w_up (d, I)``, ``b_up (I,)``) or with a leading axis of
        size 1.
    num_experts : int
        $E$.
    ffn : ExpertFFN
        The FFN family and layout of ``dense`` (checked against its shapes).
    router_draws : array, shape (d, E), optional
        $N$; required unless ``router_init.std`` is 0.
    router_init : RouterInit
        Scale and bias of the new router (default flaxformer's
        [`FLAXFORMER_ROUTER_INIT`][moeref.upcycling.FLAXFORMER_ROUTER_INIT]).

    Returns
    -------
    SparseMoEParams
        ``router`` (``weight (d, E)``, ``bias (E,)`` or None) and ``experts`` (every parameter
        tiled to a leading axis of $E$).

    Notes
    -----
    With ``SparseMoEOptions(router=RouterOptions(k=k, normalize="sum"))`` (dropless, output
    weighting) the upcycled layer computes $\sum_j w_{tj}\,\mathrm{FFN}(x_t) = \mathrm{FFN}(x_t)$
    for any router; with a zero router the $k$ winners are experts $0..k-1$ (ties go to the lower
    index) with weight $1/k$ each. Without renormalisation (Switch-style top-1 with the softmax
    probability as weight) the output starts scaled by the winning probability instead.
    Capacity drops and input-side weighting (Llama 4) also break the identity.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN
    >>> from moeref.upcycling import ZERO_ROUTER_INIT, upcycle
    >>> dense = ExpertFFNParams(w_in=np.ones((2, 3)), w_out=np.ones((3, 2)))
    >>> p = upcycle(dense, 4, RELU_FFN, router_init=ZERO_ROUTER_INIT)
    >>> p.experts.w_in.shape, p.router.weight.shape, float(np.abs(p.router.weight).max())
    ((4, 2, 3), (2, 4), 0.0)
    """
    xp, stacked, d, E = _check(dense, num_experts, ffn, router_draws, router_init)
    like = dense.w_out
    tiled = ExpertFFNParams(
        *(None if a is None else xp.concat([a] * E, axis=0) for a in _as_stacked(dense, stacked))
    )  # every field (E, ...)
    if router_draws is None:
        weight = xp.zeros((d, E), dtype=like.dtype, device=device_of(like))
    else:
        weight = router_init.scale(d) * router_draws  # (d, E)
    bias = xp.zeros((E,), dtype=like.dtype, device=device_of(like)) if router_init.bias else None
    return SparseMoEParams(router=RouterParams(weight=weight, bias=bias), experts=tiled)


def upcycle_vjp(
    dense: ExpertFFNParams,
    num_experts: int,
    ffn: ExpertFFN,
    router_draws: Any,
    cotangent: SparseMoEParams,
    *,
    router_init: RouterInit = FLAXFORMER_ROUTER_INIT,
) -> UpcycleGrads:
    r"""VJP of [`upcycle`][moeref.upcycling.upcycle]: the copies' cotangents summed, the router's scaled.

    $$\bar\theta_{\text{dense}} = \sum_{e=0}^{E-1} \bar\theta_e, \qquad \bar N = s\, \bar W_r$$

    (the router bias is a constant 0 and passes nothing back). With ``cotangent`` the gradient
    of a loss of the upcycled layer at initialisation, $\bar\theta_{\text{dense}}$ is the
    gradient with all experts tied to the dense weights.

    Parameters
    ----------
    dense, num_experts, ffn, router_draws, router_init
        As in the forward.
    cotangent : SparseMoEParams
        Cotangents of the upcycled parameters (``router.weight (d, E)`` and the experts; ``None``
        fields count as 0).

    Returns
    -------
    UpcycleGrads
        ``dense`` in the layout it was given, ``router_draws (d, E)`` (None when no draws were given).
    """
    xp, stacked, d, E = _check(dense, num_experts, ffn, router_draws, router_init)
    check_record_type(cotangent, "cotangent", SparseMoEParams)
    check_record_type(cotangent.experts, "cotangent.experts", ExpertFFNParams)
    fields = []
    for f in ExpertFFNParams._fields:
        a, g = getattr(dense, f), getattr(cotangent.experts, f)
        if a is None:
            fields.append(None)
            continue
        want = (E,) + tuple(a.shape[1:] if stacked else a.shape)
        if g is None:
            fields.append(xp.zeros_like(a))
            continue
        check_cotangent(g, want, like=a, name=f"cotangent.experts.{f}", what=f"dense.{f} tiled to E={E} experts")
        total = xp.sum(g, axis=0)  # dense shape without the expert axis
        fields.append(total[None, ...] if stacked else total)
    draws_bar = None
    if router_draws is not None:
        check_record_type(cotangent.router, "cotangent.router", RouterParams)
        W_bar = cotangent.router.weight
        if W_bar is None:
            draws_bar = xp.zeros_like(router_draws)
        else:
            check_cotangent(W_bar, (d, E), like=router_draws, name="cotangent.router.weight", what="the router weight, (d, E)")
            draws_bar = router_init.scale(d) * W_bar
    return UpcycleGrads(dense=ExpertFFNParams(*fields), router_draws=draws_bar)
