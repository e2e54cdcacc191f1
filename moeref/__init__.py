"""moeref: a reference implementation (ground-truth oracle) of Mixture-of-Experts formulations.

Every formulation is a forward function and, beside it, its analytic VJP::

    y = moeref.mixture(gates, expert_outputs)
    grads = moeref.mixture_vjp(gates, expert_outputs, cotangent)   # MixtureGrads(gates=..., expert_outputs=...)

written once in array-API math, so NumPy, CuPy, PyTorch, JAX and array-api-strict arrays all work.
"""

from ._version import __version__
from . import core, datasets, em, regression_mixture
from .experts import LinearExpertsGrads, LinearExpertsParams, linear_experts, linear_experts_vjp
from .gates import (
    LinearSoftmaxGateGrads,
    LinearSoftmaxGateParams,
    linear_softmax_gate,
    linear_softmax_gate_logits,
    linear_softmax_gate_vjp,
    log_linear_softmax_gate,
)
from .mixture import MixtureGrads, hard_mixture, hard_mixture_vjp, mixture, mixture_vjp
from .meta_pi import (
    MetaPiFit,
    MetaPiGrads,
    MetaPiLossGrads,
    MetaPiParams,
    fit_meta_pi,
    meta_pi,
    meta_pi_loss,
    meta_pi_loss_vjp,
    meta_pi_vjp,
)
from .local_experts import (
    LinearLocalExpertsParams,
    LocalExpertsFit,
    LocalExpertsLogLikelihoodGrads,
    LocalExpertsParams,
    LocalExpertsPredictGrads,
    fit_local_experts,
    local_experts_log_likelihood,
    local_experts_log_likelihood_vjp,
    local_experts_means,
    local_experts_posteriors,
    local_experts_predict,
    local_experts_predict_vjp,
)
from .hierarchical_moe import (
    HMEGrads,
    HMELogLikelihoodGrads,
    HMEParams,
    HMEPosteriors,
    HMEPriors,
    hme,
    hme_branching,
    hme_log_likelihood,
    hme_log_likelihood_vjp,
    hme_posteriors,
    hme_priors,
    hme_vjp,
)
from .mixture_of_softmaxes import (
    MixtureOfSoftmaxesGrads,
    MixtureOfSoftmaxesNllGrads,
    MixtureOfSoftmaxesParams,
    mixture_of_softmaxes_log_probs,
    mixture_of_softmaxes_log_probs_vjp,
    mixture_of_softmaxes_nll,
    mixture_of_softmaxes_nll_vjp,
)
from .deep_moe import (
    DeepMoEGrads,
    DeepMoELayerGrads,
    DeepMoELayerParams,
    deep_moe,
    deep_moe_gates,
    deep_moe_layer,
    deep_moe_layer_gates,
    deep_moe_layer_vjp,
    deep_moe_vjp,
)

__all__ = [
    "__version__",
    "core",
    "datasets",
    "em",
    "regression_mixture",
    # building blocks
    "LinearSoftmaxGateParams",
    "LinearSoftmaxGateGrads",
    "linear_softmax_gate",
    "linear_softmax_gate_logits",
    "linear_softmax_gate_vjp",
    "log_linear_softmax_gate",
    "LinearExpertsParams",
    "LinearExpertsGrads",
    "linear_experts",
    "linear_experts_vjp",
    # the generic mixture
    "MixtureGrads",
    "mixture",
    "mixture_vjp",
    "hard_mixture",
    "hard_mixture_vjp",
    # meta-pi
    "MetaPiParams",
    "MetaPiGrads",
    "MetaPiLossGrads",
    "MetaPiFit",
    "meta_pi",
    "meta_pi_vjp",
    "meta_pi_loss",
    "meta_pi_loss_vjp",
    "fit_meta_pi",
    # adaptive mixtures of local experts
    "LocalExpertsParams",
    "LinearLocalExpertsParams",
    "LocalExpertsLogLikelihoodGrads",
    "LocalExpertsPredictGrads",
    "LocalExpertsFit",
    "local_experts_means",
    "local_experts_log_likelihood",
    "local_experts_log_likelihood_vjp",
    "local_experts_posteriors",
    "local_experts_predict",
    "local_experts_predict_vjp",
    "fit_local_experts",
    # hierarchical MoE
    "HMEParams",
    "HMEGrads",
    "HMELogLikelihoodGrads",
    "HMEPriors",
    "HMEPosteriors",
    "hme",
    "hme_vjp",
    "hme_log_likelihood",
    "hme_log_likelihood_vjp",
    "hme_priors",
    "hme_posteriors",
    "hme_branching",
    # mixture of softmaxes
    "MixtureOfSoftmaxesParams",
    "MixtureOfSoftmaxesGrads",
    "MixtureOfSoftmaxesNllGrads",
    "mixture_of_softmaxes_log_probs",
    "mixture_of_softmaxes_log_probs_vjp",
    "mixture_of_softmaxes_nll",
    "mixture_of_softmaxes_nll_vjp",
    # deep MoE
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
