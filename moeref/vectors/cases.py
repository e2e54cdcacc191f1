r"""The case registry: every formulation, the cases it is checked on, and how to run them.

A **case** is one formulation (with one preset, if it has presets) at one set of sizes and one
input dtype: a [`CaseSpec`][moeref.vectors.cases.CaseSpec]. Its arrays form a
[`Problem`][moeref.vectors.cases.Problem] of four trees, drawn on the host with a NumPy
generator seeded from the case name:

* ``inputs``: the data (``x``; ``y`` for likelihoods);
* ``params``: the parameters (a NamedTuple record such as ``SparseMoEParams``);
* ``draws``: every explicit random draw the options need (jitter, noise, Gumbel, uniforms);
* ``cotangents``: the stated cotangents of the VJP.

The reference is computed from those arrays in float64 (from the float32 values themselves for a
float32 case): every output of the forward (``outputs/...``) and the VJP (``grads/...``; for the
sparse layer also ``aux_grads/...``, the VJP of the auxiliary losses alone). Leaves are named by
their path in the trees (``params/router/weight``, ``outputs/routes/expert_index``).

**Adding a formulation** is one [`register`][moeref.vectors.cases.register] call. The simplest
form reuses a self-check builder: append a ``backends.selfcheck.Case`` (``make(rng, **sizes) ->
(args, cotangent)``, the forward, its VJP, a few ``shapes``) to ``selfcheck.CASES`` and it is
registered here automatically, with its arguments named after the forward's signature. A
formulation with options and presets (a layer) registers a [`Formulation`][moeref.vectors.cases.Formulation]
(this is the whole registration of expert-choice routing, below in this module):

```python
def build(spec, rng):                     # float64 NumPy arrays; the registry casts to spec.dtype
    T, d, E = spec.sizes["T"], spec.sizes["d"], spec.sizes["E"]
    params = ExpertChoiceParams(w_g=rng.normal(size=(d, E)), experts=...)
    return Problem({"x": rng.normal(size=(T, d))}, params, None, {"y": rng.normal(size=(T, d))})

register(Formulation(
    name="expert_choice",
    summary="expert-choice routing: each expert takes its top-C tokens (Zhou et al. 2022)",
    cases=layer_cases("expert_choice", {"flaxformer": ExpertChoiceOptions(capacity_rule="flaxformer")},
                      ({"T": 8, "d": 6, "I": 5, "E": 4}, {"T": 9, "d": 5, "I": 3, "E": 3}), ("float64",)),
    build=build,
    forward=lambda spec, p: expert_choice_layer(p.inputs["x"], p.params, spec.options),
    vjp=lambda spec, p: {"grads": expert_choice_layer_vjp(p.inputs["x"], p.params, spec.options, p.cotangents["y"])},
    call_args=lambda spec, p: [p.inputs["x"], p.params, spec.options],   # for `moeref check`
    arg_names=("x", "params", "options"),
))
```

Give a ``routing=`` ([`RoutingSpec`][moeref.vectors.cases.RoutingSpec]) when the formulation
chooses experts per token: the comparison becomes tie-aware and the inputs are redrawn until the
choice is unambiguous in float32; without one, keep a discrete choice to float64 cases.

A new **preset** of the sparse layer needs nothing: every entry of
[`moeref.presets.PRESETS`][moeref.presets] is picked up, its draws are derived from its options
(jitter, noisy top-$k$, logit noise, Gumbel, the second-expert and capacity uniforms). Add a line to
``SPARSE_PRESET_KWARGS`` to change a size argument for the small cases (the Switch capacity) and
to ``SPARSE_PRESET_PARAMS`` for optional parameters the system has (router bias, expert biases).
A new field of ``SparseMoEParams`` gets its builder in ``SPARSE_EXTRA_PARAMS``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from .. import presets as _presets
from ..backends import get_backend
from ..backends.selfcheck import CASES as _SELFCHECK_CASES
from ..capacity import CapacityDraws
from ..expert_ffn import ExpertFFNParams
from ..router import RouterDraws, RouterParams, route
from ..sparse_moe import SparseMoEAuxCotangents, SparseMoEDraws, SparseMoEParams, sparse_moe_layer, sparse_moe_layer_vjp
from ._errors import VectorsError, closest
from ._tree import flatten, map_leaves, unflatten
from .compare import TIE_THRESHOLDS, top_gaps

__all__ = [
    "CaseSpec",
    "Problem",
    "RoutingSpec",
    "Formulation",
    "Reference",
    "FORMULATIONS",
    "PROBLEM_GROUPS",
    "register",
    "get_formulation",
    "all_cases",
    "find_case",
    "select_cases",
    "options_to_json",
    "reference",
    "compute",
    "problem_tensors",
    "problem_from_tensors",
    "cast_floats",
    "layer_cases",
]

PROBLEM_GROUPS = ("inputs", "params", "draws", "cotangents")
"""The four trees of a Problem, in the order of their tensor-name prefixes."""

DTYPES = ("float64", "float32")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """One case: a formulation (and preset) at given sizes and input dtype.

    Attributes
    ----------
    formulation : str
        The registry name (``"sparse_moe"``, ``"meta_pi"``).
    preset : str or None
        The preset name, for formulations that have presets.
    label : str
        The sizes, short (``"T7-d5-I3-E8"``).
    dtype : {"float64", "float32"}
        Dtype of the stored inputs; the reference is always computed in float64 from them.
    sizes : dict
        Every size (JSON-safe), e.g. ``{"T": 7, "d": 5, "I": 3, "E": 8, "k": 2}``.
    options : object
        The formulation's options: a frozen dataclass (``SparseMoEOptions``) or a dict of keyword
        arguments; serialised into the manifest by [`options_to_json`][moeref.vectors.cases.options_to_json].
    preset_kwargs : dict
        Keyword arguments the preset function was called with.
    """

    formulation: str
    preset: str | None
    label: str
    dtype: str
    sizes: Mapping[str, Any]
    options: Any = None
    preset_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``formulation[.preset].label.dtype``, unique over the registry."""
        return ".".join(p for p in (self.formulation, self.preset, self.label, self.dtype) if p)

    @property
    def file(self) -> str:
        """Path of the case file inside a vectors folder."""
        return f"{self.formulation}/{self.name}.safetensors"

    @property
    def base_seed(self) -> int:
        """Seed of the first draw attempt: CRC-32 of the name (stable across runs and machines)."""
        return zlib.crc32(self.name.encode())


class Problem(NamedTuple):
    """The arrays of one case, as four trees (NumPy on the host; any backend when computing).

    Attributes
    ----------
    inputs : dict of arrays
    params : tree of arrays (NamedTuple, dict or tuple), or None
    draws : tree of arrays, or None
    cotangents : dict of arrays
    """

    inputs: dict
    params: Any
    draws: Any
    cotangents: dict


@dataclass(frozen=True)
class RoutingSpec:
    """Where a case's routing lives, for the tie-aware comparison ([`moeref.vectors.compare`][moeref.vectors.compare]).

    Attributes
    ----------
    index : str
        Flat name of the ``(T, k)`` chosen experts (rank order).
    values : str
        Flat name of the ``(T, E)`` values the top-$k$ ran on.
    k : int
    rows : tuple of str
        Tensors whose axis 0 is the token axis and whose row $t$ depends on token $t$'s routing
        only (empty when a capacity limit couples the tokens).
    independent : tuple of str
        Tensors that do not depend on the routing at all.
    """

    index: str
    values: str
    k: int
    rows: tuple[str, ...] = ()
    independent: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"index": self.index, "values": self.values, "k": self.k}


@dataclass(frozen=True)
class Formulation:
    """How one formulation is registered: its cases, how to build their arrays, run them, compare them.

    Attributes
    ----------
    name, summary : str
    cases : callable () -> sequence of CaseSpec
    build : callable (spec, rng) -> Problem
        Float64 NumPy arrays; the registry casts the floats to ``spec.dtype``.
    forward : callable (spec, problem) -> tree
        The outputs, on the arrays' backend (NamedTuple or dict; stored as ``outputs/...``).
    vjp : callable (spec, problem) -> dict of trees
        ``{"grads": tree, ...}``: each entry stored under its key.
    routing : callable (spec) -> RoutingSpec or None
        For the tie-aware comparison and the tie-free draw of the reference inputs.
    call_args : callable (spec, problem) -> list, optional
        The positional arguments of the forward, for ``moeref check`` of a function with the
        forward's signature (named by ``arg_names``).
    arg_names : tuple of str
    """

    name: str
    summary: str
    cases: Callable[[], Sequence[CaseSpec]]
    build: Callable[[CaseSpec, np.random.Generator], Problem]
    forward: Callable[[CaseSpec, Problem], Any]
    vjp: Callable[[CaseSpec, Problem], Mapping[str, Any]]
    routing: Callable[[CaseSpec], RoutingSpec | None] = lambda spec: None
    call_args: Callable[[CaseSpec, Problem], list] | None = None
    arg_names: tuple[str, ...] = ()


FORMULATIONS: dict[str, Formulation] = {}
"""Registry name -> Formulation, in registration order."""


def register(formulation: Formulation) -> Formulation:
    """Add a formulation to the registry (its name must be new); returns it."""
    if formulation.name in FORMULATIONS:
        raise ValueError(f"formulation {formulation.name!r} is already registered")
    FORMULATIONS[formulation.name] = formulation
    return formulation


# --------------------------------------------------------------------------------------------
# Look-up
# --------------------------------------------------------------------------------------------


def all_cases() -> list[CaseSpec]:
    """Every case of every registered formulation, in registry order."""
    return [spec for f in FORMULATIONS.values() for spec in f.cases()]


def get_formulation(name: str) -> Formulation:
    """The registered formulation ``name``; a VectorsError naming the closest one otherwise."""
    if name in FORMULATIONS:
        return FORMULATIONS[name]
    presets = {spec.preset: spec.formulation for spec in all_cases() if spec.preset}
    if name in presets:
        raise VectorsError(f"{name!r} is a preset, not a formulation; use --formulation {presets[name]} --preset {name}")
    raise VectorsError(
        f"unknown formulation {name!r}{closest(name, FORMULATIONS)} (known: {', '.join(FORMULATIONS)})"
    )


def preset_names(formulation: str) -> list[str]:
    """The presets a formulation's cases use (empty when it has none)."""
    seen: dict[str, None] = {}
    for spec in get_formulation(formulation).cases():
        if spec.preset:
            seen[spec.preset] = None
    return list(seen)


def find_case(name: str) -> tuple[Formulation, CaseSpec]:
    """The registered case called ``name`` (as written in a manifest)."""
    cases = {spec.name: spec for spec in all_cases()}
    if name not in cases:
        raise VectorsError(f"case {name!r} is not produced by this version of moeref{closest(name, cases)}")
    spec = cases[name]
    return FORMULATIONS[spec.formulation], spec


def select_cases(patterns: Sequence[str] | None = None) -> list[CaseSpec]:
    """Cases whose name matches any pattern: a glob (``*``, ``?``, ``[``) or else a substring.

    No pattern selects every case; a pattern that matches nothing is a VectorsError naming the
    closest case, formulation or preset.
    """
    cases = all_cases()
    if not patterns:
        return cases
    chosen: dict[str, CaseSpec] = {}
    for pattern in patterns:
        glob = any(c in pattern for c in "*?[")
        hits = [s for s in cases if (fnmatch.fnmatchcase(s.name, pattern) if glob else pattern in s.name)]
        if not hits:
            words = {s.name for s in cases} | set(FORMULATIONS) | {s.preset for s in cases if s.preset}
            raise VectorsError(f"no case matches {pattern!r}{closest(pattern, words)}")
        chosen.update((s.name, s) for s in hits)
    return [s for s in cases if s.name in chosen]


# --------------------------------------------------------------------------------------------
# Options as JSON
# --------------------------------------------------------------------------------------------


def options_to_json(obj: Any) -> Any:
    """A JSON-safe copy of options: dataclasses as objects of their fields (in field order),
    tuples as lists, non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: options_to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): options_to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [options_to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot write option value {obj!r} of type {type(obj).__name__} to JSON")


# --------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------


class Reference(NamedTuple):
    """A case's reference: the seed its inputs were drawn with, the inputs, every tensor to store."""

    spec: CaseSpec
    seed: int
    problem: Problem
    tensors: dict[str, np.ndarray]


MAX_DRAW_ATTEMPTS = 200
TIE_FREE_FACTOR = 10.0
"""A case with routing is redrawn until every top-(k+1) gap exceeds this many float32 tie thresholds."""


def cast_floats(tree: Any, dtype: str) -> Any:
    """The tree with every float leaf cast to ``dtype`` (NumPy; integer and bool leaves kept)."""

    def cast(a):
        a = np.asarray(a)
        return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a

    return map_leaves(cast, tree)


def _build(formulation: Formulation, spec: CaseSpec, seed: int) -> Problem:
    return cast_floats(formulation.build(spec, np.random.default_rng(seed)), spec.dtype)


def problem_tensors(problem: Problem) -> dict[str, np.ndarray]:
    """The problem's arrays as ``{"inputs/x": ..., "params/router/weight": ...}``."""
    out: dict[str, np.ndarray] = {}
    for group, tree in zip(PROBLEM_GROUPS, problem):
        out.update({k: np.asarray(v) for k, v in flatten(tree, group).items()})
    return out


def problem_from_tensors(formulation: Formulation, spec: CaseSpec, tensors: Mapping[str, Any]) -> Problem:
    """Rebuild a case's Problem from its stored tensors (the tree structure comes from the registry)."""
    template = formulation.build(spec, np.random.default_rng(spec.base_seed))
    expected = set(problem_tensors(template))
    stored = {k for k in tensors if k.split("/")[0] in PROBLEM_GROUPS}
    if expected != stored:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise VectorsError(
            f"case {spec.name}: the stored inputs do not match what this version of moeref expects"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
        )
    return Problem(*(unflatten(tree, dict(tensors), group) for group, tree in zip(PROBLEM_GROUPS, template)))


def _host(value: Any, backend: Any) -> np.ndarray:
    if isinstance(value, bool):
        return np.asarray(value)
    if isinstance(value, int):
        return np.asarray(value, dtype=np.int64)
    if isinstance(value, float):
        return np.asarray(value, dtype=np.float64)
    return np.asarray(backend.to_numpy(value))


def compute(spec: CaseSpec, problem: Problem, backend: str = "numpy", *, vjp: bool = True) -> dict[str, np.ndarray]:
    """Run a case's forward (and VJP) on ``backend`` from NumPy arrays; every result as a host array.

    Returns ``{"outputs/...": ..., "grads/...": ..., ...}``. Arrays keep their dtype: a float32
    problem is computed in float32 (cast it with float64 leaves for the reference).
    """
    formulation = get_formulation(spec.formulation)
    b = get_backend(backend)
    b.setup()
    try:
        p = Problem(*(map_leaves(b.from_numpy, tree) for tree in problem))
        flat = flatten(formulation.forward(spec, p), "outputs")
        for group, tree in (formulation.vjp(spec, p).items() if vjp else ()):
            flat.update(flatten(tree, group))
        return {k: _host(v, b) for k, v in flat.items()}
    finally:
        b.teardown()


def _min_gap(formulation: Formulation, spec: CaseSpec, tensors: Mapping[str, np.ndarray]) -> float:
    routing = formulation.routing(spec)
    if routing is None:
        return math.inf
    rel_gap = top_gaps(tensors[routing.values], routing.k)
    return float(np.min(rel_gap)) if rel_gap.size else math.inf


def reference(spec: CaseSpec) -> Reference:
    """Draw a case's inputs and compute its float64 reference (NumPy).

    With routing, the inputs are redrawn (seeds ``base_seed + 1, 2, ...``) until no token has a
    near-tie in its top-$(k+1)$ selection values at ``TIE_FREE_FACTOR`` times the float32 tie
    threshold, so that the stored routing is unambiguous in float32 too.
    """
    formulation = get_formulation(spec.formulation)
    wanted = TIE_FREE_FACTOR * TIE_THRESHOLDS["float32"]
    best = None
    attempts = MAX_DRAW_ATTEMPTS if formulation.routing(spec) is not None else 1
    for attempt in range(attempts):
        seed = (spec.base_seed + attempt) % 2**32
        problem = _build(formulation, spec, seed)
        gap = math.inf
        if attempts > 1:
            gap = _min_gap(formulation, spec, compute(spec, cast_floats(problem, "float64"), vjp=False))
        if best is None or gap > best[0]:
            best = (gap, seed, problem)
        if gap > wanted:
            break
    _, seed, problem = best
    computed = compute(spec, cast_floats(problem, "float64"))
    return Reference(spec, seed, problem, {**problem_tensors(problem), **computed})


# --------------------------------------------------------------------------------------------
# Classical formulations: the self-check builders
# --------------------------------------------------------------------------------------------


def _label(sizes: Mapping[str, Any]) -> str:
    def fmt(v):
        return "x".join(str(i) for i in v) if isinstance(v, (tuple, list)) else str(v)

    return "-".join(f"{k}{fmt(v)}" for k, v in sizes.items())


def _from_selfcheck(case: Any) -> Formulation:
    """A Formulation for a ``backends.selfcheck.Case``: arguments named after the forward's signature.

    Bare array arguments become ``inputs/<name>``; the argument ``params`` becomes ``params/...``
    (other structured arguments ``params/<name>/...``); the output is ``outputs/<forward name>``
    with the cotangent ``cotangents/<forward name>``; the VJP's record is ``grads/...``.
    """
    sig = inspect.signature(case.forward)
    positional = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {n: p.default for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
    make_defaults = {n: p.default for n, p in inspect.signature(case.make).parameters.items() if n != "rng"}
    out_name = case.forward.__name__

    def cases():
        return [
            CaseSpec(case.name, None, _label({**make_defaults, **shape}), "float64",
                     options_to_json({**make_defaults, **shape}), dict(keywords))
            for shape in case.shapes
        ]

    def structured(args):
        return [n for n, a in zip(positional, args) if isinstance(a, (tuple, list, dict))]

    def build(spec, rng):
        sizes = {k: tuple(v) if isinstance(make_defaults.get(k), tuple) else v for k, v in spec.sizes.items()}
        args, cotangent = case.make(rng, **sizes)
        trees = structured(args)
        inputs = {n: a for n, a in zip(positional, args) if n not in trees}
        named = {n: a for n, a in zip(positional, args) if n in trees}
        params = named["params"] if list(named) == ["params"] else (named or None)
        return Problem(inputs, params, None, {out_name: cotangent})

    def args_of(p):
        return [
            p.inputs[n] if n in p.inputs else (p.params if not isinstance(p.params, dict) else p.params[n])
            for n in positional
        ]

    return Formulation(
        name=case.name,
        summary=case.summary,
        cases=cases,
        build=build,
        forward=lambda spec, p: {out_name: case.forward(*args_of(p))},
        vjp=lambda spec, p: {"grads": case.vjp(*args_of(p), p.cotangents[out_name])},
        call_args=lambda spec, p: args_of(p),
        arg_names=tuple(positional),
    )


for _case in _SELFCHECK_CASES:
    register(_from_selfcheck(_case))


# --------------------------------------------------------------------------------------------
# The sparse token-choice layer, for every preset
# --------------------------------------------------------------------------------------------

SPARSE_SHAPES: tuple[dict, ...] = (
    {"T": 1, "d": 4, "I": 6, "group": 1},  # a single token
    {"T": 7, "d": 5, "I": 3, "group": 7},  # odd sizes
    {"T": 32, "d": 16, "I": 24, "group": 8},  # four routing groups of 8 tokens
)
"""Sizes of the sparse-layer cases (``group``: tokens per routing group for presets that take one)."""

SPARSE_DTYPES: dict[str, tuple[str, ...]] = {"float64": ("T1", "T7", "T32"), "float32": ("T7", "T32")}
"""Which shapes (by their ``T`` label) each input dtype is generated for."""

SPARSE_PRESET_KWARGS: dict[str, Callable[[Mapping[str, int]], dict]] = {
    # capacity 2 per group of tokens, so that the small cases drop routes
    "switch": lambda shape: {"capacity": 2, "group_size": shape["group"]},
}
"""Preset name -> keyword arguments of the preset function for a shape (default: none)."""

SPARSE_PRESET_PARAMS: dict[str, tuple[str, ...]] = {
    "gpt_oss": ("router.bias", "experts.b_in", "experts.b_out"),
    "deepseek_v3": ("router.selection_bias",),
}
"""Preset name -> optional parameters the system has (``router.bias``, ``router.selection_bias``,
``experts.b_in``, ``experts.b_out``, ``experts.b_up``)."""



def _ffn_params(ffn: Any, n: int, d: int, I: int, rng: np.random.Generator) -> ExpertFFNParams:
    """``n`` FFNs of family ``ffn`` (no biases), scaled so that activations stay O(1)."""
    K = 2 * I if ffn.fused else I
    separate = ffn.gated and not ffn.fused
    return ExpertFFNParams(
        w_in=rng.normal(size=(n, d, K)) / math.sqrt(d),
        w_out=rng.normal(size=(n, I, d)) / math.sqrt(I),
        w_up=rng.normal(size=(n, d, I)) / math.sqrt(d) if separate else None,
    )


def _shared_params(spec: CaseSpec, rng: np.random.Generator) -> Any:
    """One shared FFN and its gate when ``options.shared`` is set (``moeref.shared_experts``)."""
    shared = getattr(spec.options, "shared", None)
    if shared is None:
        return None
    from ..shared_experts import SharedExpertParams

    d, I = spec.sizes["d"], spec.sizes["I"]
    width = shared.gate_width
    return SharedExpertParams(
        ffn=_ffn_params(shared.ffn, 1, d, I, rng),
        gate_weight=rng.normal(size=(d, width)) / math.sqrt(d) if width else None,
        gate_bias=rng.normal(size=(width,)) * 0.1 if width and shared.kind != "sigmoid_gate" else None,
    )


SPARSE_EXTRA_PARAMS: dict[str, Callable[[CaseSpec, np.random.Generator], Any]] = {"shared": _shared_params}
"""Field of ``SparseMoEParams`` beyond ``router`` and ``experts`` -> builder (spec, rng) -> its record
(used when the field exists)."""


def _num_experts(options: Any) -> int:
    """Smallest E >= max(8, 2k) that splits into the router's groups, two experts or more per group."""
    r = options.router
    groups, top_groups = r.n_group or 1, r.topk_group or 1
    per_group = max(2, -(-max(8, 2 * r.k) // groups), -(-r.k // top_groups))
    return groups * per_group


def _sparse_cases() -> list[CaseSpec]:
    specs = []
    for preset, make in _presets.PRESETS.items():
        for shape in SPARSE_SHAPES:
            kwargs = SPARSE_PRESET_KWARGS.get(preset, lambda s: {})(shape)
            options = make(**kwargs)
            E, k = _num_experts(options), options.router.k
            sizes = {"T": shape["T"], "d": shape["d"], "I": shape["I"], "E": E, "k": k}
            label = f"T{sizes['T']}-d{sizes['d']}-I{sizes['I']}-E{E}"
            for dtype, labels in SPARSE_DTYPES.items():
                if f"T{shape['T']}" in labels:
                    specs.append(CaseSpec("sparse_moe", preset, label, dtype, sizes, options, kwargs))
    return specs


def _sparse_params(spec: CaseSpec, rng: np.random.Generator) -> SparseMoEParams:
    o, s = spec.options, spec.sizes
    d, I, E = s["d"], s["I"], s["E"]
    extras = SPARSE_PRESET_PARAMS.get(spec.preset, ())
    K = 2 * I if o.ffn.fused else I
    separate = o.ffn.gated and not o.ffn.fused

    def opt(name, shape, scale):
        return rng.normal(size=shape) * scale if name in extras else None

    router = RouterParams(
        weight=rng.normal(size=(d, E)) / math.sqrt(d),
        bias=opt("router.bias", (E,), 0.5),
        noise_weight=rng.normal(size=(d, E)) / math.sqrt(d) if o.router.noisy_top_k else None,
        selection_bias=opt("router.selection_bias", (E,), 0.1),
    )
    experts = ExpertFFNParams(
        w_in=rng.normal(size=(E, d, K)) / math.sqrt(d),
        w_out=rng.normal(size=(E, I, d)) / math.sqrt(I),
        b_in=opt("experts.b_in", (E, K), 0.1),
        b_out=opt("experts.b_out", (E, d), 0.1),
        w_up=rng.normal(size=(E, d, I)) / math.sqrt(d) if separate else None,
        b_up=opt("experts.b_up", (E, I), 0.1) if separate else None,
    )
    others = {name: build(spec, rng) for name, build in SPARSE_EXTRA_PARAMS.items() if name in SparseMoEParams._fields}
    return SparseMoEParams(router=router, experts=experts, **others)


def _sparse_draws(spec: CaseSpec, rng: np.random.Generator) -> SparseMoEDraws:
    """Every draw the options use (see RouterDraws / CapacityDraws), none otherwise."""
    o, s = spec.options, spec.sizes
    T, d, E, k = s["T"], s["d"], s["E"], s["k"]
    r = o.router
    eps = r.input_jitter
    router = RouterDraws(
        jitter=rng.uniform(1 - eps, 1 + eps, size=(T, d)) if eps > 0 else None,
        noise=rng.normal(size=(T, E)) if r.noisy_top_k else None,
        logit_noise=rng.normal(size=(T, E)) if r.logit_noise_std > 0 else None,
        gumbel=rng.gumbel(size=(T, E)) if r.gumbel != "none" else None,
        second_expert_uniform=rng.uniform(size=T) if r.second_expert_policy == "random" else None,
    )
    random_priority = not o.capacity.dropless and o.capacity.priority == "random"
    return SparseMoEDraws(
        router=router if any(v is not None for v in router) else None,
        capacity=CapacityDraws(rng.uniform(size=(T, k))) if random_priority else None,
    )


def _build_sparse(spec: CaseSpec, rng: np.random.Generator) -> Problem:
    T, d = spec.sizes["T"], spec.sizes["d"]
    x = rng.normal(size=(T, d))
    params = _sparse_params(spec, rng)
    draws = _sparse_draws(spec, rng)
    cotangents = {
        "y": rng.normal(size=(T, d)),
        "load_balancing_loss": np.asarray(rng.normal()),
        "z_loss": np.asarray(rng.normal()),
    }
    return Problem({"x": x}, params, draws, cotangents)


def _sparse_forward(spec: CaseSpec, p: Problem) -> dict:
    x = p.inputs["x"]
    out = sparse_moe_layer(x, p.params, spec.options, p.draws)
    routed = route(x, p.params.router, spec.options.router, p.draws.router if p.draws is not None else None)
    return {**out._asdict(), "selection_scores": routed.selection_scores}


def _sparse_vjp(spec: CaseSpec, p: Problem) -> dict:
    x, ct, o = p.inputs["x"], p.cotangents, spec.options
    y_only = SparseMoEAuxCotangents(0.0, 0.0)
    aux_only = SparseMoEAuxCotangents(ct["load_balancing_loss"], ct["z_loss"])
    return {
        "grads": sparse_moe_layer_vjp(x, p.params, o, ct["y"], draws=p.draws, aux_cotangents=y_only),
        "aux_grads": sparse_moe_layer_vjp(x, p.params, o, ct["y"] * 0, draws=p.draws, aux_cotangents=aux_only),
    }


def _sparse_routing(spec: CaseSpec) -> RoutingSpec:
    rows = ()
    if spec.options.capacity.dropless:  # with a capacity limit one token's route moves the others'
        rows = (
            "outputs/y", "outputs/routed_y", "outputs/scores", "outputs/selection_scores", "outputs/routes/expert_index",
            "outputs/routes/weight", "outputs/routes/kept", "outputs/routes/position", "outputs/router/scores",
            "outputs/router/selection_scores", "outputs/router/routes/expert_index", "outputs/router/routes/weight",
            "outputs/router/routes/kept", "outputs/shared/y", "grads/x", "aux_grads/x",
        )
    return RoutingSpec(
        index="outputs/routes/expert_index",
        values="outputs/selection_scores",
        k=spec.options.router.k,
        rows=rows,
        independent=("outputs/logits", "outputs/z_loss", "outputs/router/logits", "outputs/router/noisy_logits",
                     "outputs/router/router_input", "outputs/router/expert_input"),
    )


register(
    Formulation(
        name="sparse_moe",
        summary="sparse token-choice MoE layer: router, capacity, experts, auxiliary losses (every preset)",
        cases=_sparse_cases,
        build=_build_sparse,
        forward=_sparse_forward,
        vjp=_sparse_vjp,
        routing=_sparse_routing,
    )
)


# --------------------------------------------------------------------------------------------
# Other routings: Soft MoE, expert choice, hash layers, BASE layers
# --------------------------------------------------------------------------------------------


def _experts(spec: CaseSpec, ffn: Any, rng: np.random.Generator, *, biases: bool) -> ExpertFFNParams:
    """``E`` experts of family ``ffn`` at the spec's sizes, with small biases when ``biases``."""
    E, d, I = spec.sizes["E"], spec.sizes["d"], spec.sizes["I"]
    p = _ffn_params(ffn, E, d, I, rng)
    if not biases:
        return p
    return p._replace(b_in=rng.normal(size=(E, p.w_in.shape[2])) * 0.1, b_out=rng.normal(size=(E, d)) * 0.1)


def layer_cases(formulation: str, variants: Mapping[str | None, Any], shapes: Sequence[Mapping[str, int]],
                 dtypes: Sequence[str]) -> Callable[[], list[CaseSpec]]:
    """Cases for every (variant, shape, dtype); ``variants`` maps a preset name (or None) to options."""

    def cases():
        return [
            CaseSpec(formulation, preset, "-".join(f"{k}{v}" for k, v in shape.items()), dtype, dict(shape), options)
            for preset, options in variants.items() for shape in shapes for dtype in dtypes
        ]

    return cases


def _y_cotangent(spec: CaseSpec, rng: np.random.Generator) -> dict:
    return {"y": rng.normal(size=(spec.sizes["T"], spec.sizes["d"]))}


def _register_soft_moe() -> None:
    from .. import soft_moe as sm

    def options_for(preset: str) -> Any:
        return sm.SOFT_MOE_PRESETS[preset]()

    def build(spec, rng):
        o, (T, d, E) = spec.options, (spec.sizes["T"], spec.sizes["d"], spec.sizes["E"])
        p = o.slots_per_expert or sm.soft_moe_slots(T, E, o.capacity_factor, rounding=o.slot_rounding)
        gains = o.normalization in ("rms", "layer_norm")
        params = sm.SoftMoEParams(
            phi=rng.normal(size=(d, E, p)),
            experts=_experts(spec, o.ffn, rng, biases=True),
            scale=np.asarray(1.0 + 0.1 * rng.normal()) if o.normalization == "l2" else None,
            token_norm_weight=1.0 + 0.1 * rng.normal(size=d) if gains else None,
            slot_norm_weight=1.0 + 0.1 * rng.normal(size=d) if gains else None,
        )
        return Problem({"x": rng.normal(size=(T, d))}, params, None, _y_cotangent(spec, rng))

    register(Formulation(
        name="soft_moe",
        summary="Soft MoE: every slot a softmax mix of all tokens (Puigcerver et al. 2023)",
        cases=layer_cases("soft_moe", {p: options_for(p) for p in sm.SOFT_MOE_PRESETS},
                           ({"T": 8, "d": 6, "I": 5, "E": 4}, {"T": 7, "d": 5, "I": 3, "E": 3}), DTYPES),
        build=build,
        forward=lambda spec, p: sm.soft_moe_layer(p.inputs["x"], p.params, spec.options),
        vjp=lambda spec, p: {"grads": sm.soft_moe_layer_vjp(p.inputs["x"], p.params, spec.options, p.cotangents["y"])},
        call_args=lambda spec, p: [p.inputs["x"], p.params, spec.options],
        arg_names=("x", "params", "options"),
    ))


def _register_expert_choice() -> None:
    from .. import expert_choice as ec

    def build(spec, rng):
        T, d, E = spec.sizes["T"], spec.sizes["d"], spec.sizes["E"]
        params = ec.ExpertChoiceParams(
            w_g=rng.normal(size=(d, E)) / math.sqrt(d),
            experts=_experts(spec, spec.options.ffn, rng, biases=False),
            b_g=rng.normal(size=E) * 0.1 if spec.preset == "flaxformer" else None,
        )
        return Problem({"x": rng.normal(size=(T, d))}, params, None, _y_cotangent(spec, rng))

    register(Formulation(
        name="expert_choice",
        summary="expert-choice routing: each expert takes its top-C tokens (Zhou et al. 2022)",
        cases=layer_cases("expert_choice", {r: ec.ExpertChoiceOptions(capacity_rule=r) for r in ec.CAPACITY_RULES},
                           ({"T": 8, "d": 6, "I": 5, "E": 4}, {"T": 9, "d": 5, "I": 3, "E": 3}), ("float64",)),
        build=build,
        forward=lambda spec, p: ec.expert_choice_layer(p.inputs["x"], p.params, spec.options),
        vjp=lambda spec, p: {"grads": ec.expert_choice_layer_vjp(p.inputs["x"], p.params, spec.options, p.cotangents["y"])},
        call_args=lambda spec, p: [p.inputs["x"], p.params, spec.options],
        arg_names=("x", "params", "options"),
    ))


def _register_hash_layer() -> None:
    from .. import hash_routing as hr
    from ..expert_ffn import RELU_FFN

    def build(spec, rng):
        T, d, E, V = spec.sizes["T"], spec.sizes["d"], spec.sizes["E"], spec.sizes["V"]
        params = {"table": rng.integers(0, E, size=V), "experts": _experts(spec, spec.options, rng, biases=True)}
        inputs = {"x": rng.normal(size=(T, d)), "token_ids": rng.integers(0, V, size=T)}
        return Problem(inputs, params, None, _y_cotangent(spec, rng))

    def args(spec, p):
        return [p.inputs["x"], p.inputs["token_ids"], p.params["table"], p.params["experts"], spec.options]

    register(Formulation(
        name="hash_layer",
        summary="hash layer: each token to the expert its token id hashes to (Roller et al. 2021)",
        cases=layer_cases("hash_layer", {None: RELU_FFN},
                           ({"T": 8, "d": 6, "I": 5, "E": 4, "V": 10}, {"T": 7, "d": 5, "I": 3, "E": 3, "V": 5}), DTYPES),
        build=build,
        forward=lambda spec, p: hr.hash_layer(*args(spec, p)),
        vjp=lambda spec, p: {"grads": hr.hash_layer_vjp(*args(spec, p), p.cotangents["y"])},
        call_args=args,
        arg_names=("x", "token_ids", "table", "experts", "ffn"),
    ))


def _register_base_layer() -> None:
    from .. import base_layer as bl

    def build(spec, rng):
        T, d, E = spec.sizes["T"], spec.sizes["d"], spec.sizes["E"]
        params = bl.BaseLayerParams(
            centroids=rng.normal(size=(E, d)) / math.sqrt(d),
            experts=_experts(spec, spec.options["options"].ffn, rng, biases=False),
        )
        return Problem({"x": rng.normal(size=(T, d))}, params, None, _y_cotangent(spec, rng))

    def run(fn, spec, p, *extra):
        return fn(p.inputs["x"], p.params, spec.options["options"], *extra, training=spec.options["training"])

    modes = {"training": {"options": bl.BaseLayerOptions(), "training": True},
             "evaluation": {"options": bl.BaseLayerOptions(), "training": False}}
    register(Formulation(
        name="base_layer",
        summary="BASE layer: balanced assignment by an auction, gated residual (Lewis et al. 2021)",
        cases=layer_cases("base_layer", modes, ({"T": 8, "d": 6, "I": 5, "E": 4}, {"T": 9, "d": 5, "I": 3, "E": 3}),
                           ("float64",)),
        build=build,
        forward=lambda spec, p: run(bl.base_layer, spec, p),
        vjp=lambda spec, p: {"grads": run(bl.base_layer_vjp, spec, p, p.cotangents["y"])},
    ))


for _register in (_register_soft_moe, _register_expert_choice, _register_hash_layer, _register_base_layer):
    _register()
