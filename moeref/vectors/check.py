r"""``moeref check``: run a user's implementation on the cases of a formulation and compare it with moeref.

**Calling convention of the sparse layer** (``--formulation sparse_moe``; every array in moeref's
layout, converted to the framework of ``--backend`` and to the case's dtype):

* a **function** ``fn(x, router_weight, experts, **extras)``:

  - ``x``: ``(T, d)``; ``router_weight``: ``(d, E)``, the logits are ``x @ router_weight``;
  - ``experts``: a dict of the expert weights present in the case: ``w_in (E, d, K)``,
    ``w_out (E, I, d)`` and, for some presets, ``b_in``, ``b_out``, ``w_up``, ``b_up``
    (``K = 2I`` for a fused gated FFN: gate columns ``[:I]``, up ``[I:]`` for Mixtral-style
    ``"concatenated"``; see [`ExpertFFN`][moeref.expert_ffn.ExpertFFN]);
  - ``extras``, passed by keyword when the signature names them: ``router_bias (E,)``,
    ``selection_bias (E,)``, ``shared`` (a dict of the shared experts' weights,
    ``"ffn/w_in"``, ``"ffn/w_out"``, ``"gate_weight"``, ...), ``draws`` (a dict of the random
    draws, ``"router/second_expert_uniform"``, ...), ``k`` (int), ``options`` (the
    ``SparseMoEOptions``), ``case`` (the [`Case`][moeref.testing.Case]). A case that has a
    router bias, a selection bias, shared experts or draws needs a function that accepts them.

* a **module factory** ``fn(case) -> module`` (a single parameter named ``case``, or
  ``--kind module``): it builds the user's module (an ``nn.Module``, or any callable) and copies
  the weights from the [`Case`][moeref.testing.Case] (``case.torch("params/router/weight")``);
  ``module(x)`` is then called.

Either returns ``y (T, d)``, or a tuple ``(y, router_logits)``, or a dict with any of ``"y"``,
``"logits"`` ``(T, E)``, ``"expert_index"`` ``(T, k)`` (best first), ``"weight"`` ``(T, k)``.
Each returned value is compared with moeref's (``expert_index`` tie-aware). With
``--backend torch`` (or ``jax``) the gradients of $\langle \bar y, y\rangle$ for the case's
cotangent $\bar y$ are compared too: with respect to ``x`` and every weight for a function, with
respect to ``x`` for a module.

**Other formulations**: the function takes the same positional arguments as moeref's forward
(``moeref.meta_pi(x, params)``: ``fn(x, params)`` with ``params`` the same NamedTuple of
framework arrays) and returns the same array; gradients are compared for every float argument.

On a mismatch of the sparse layer, moeref is rerun with **one convention changed at a time** (the
router's score function and normalisation, the FFN activation and gate/up layout, where the
weight is applied, the capacity rule, every other preset); the ones that reproduce the user's
output are reported, with the systems that use them.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._errors import VectorsError, closest
from ._tree import flatten, map_leaves
from .cases import CaseSpec, Formulation, Problem, cast_floats, compute, get_formulation, preset_names, reference
from .compare import Comparison, _as_host, compare

__all__ = ["load_target", "run_check", "CheckReport", "CaseCheck", "convention_variants"]


# --------------------------------------------------------------------------------------------
# Loading the user's function
# --------------------------------------------------------------------------------------------


def load_target(target: str) -> Callable:
    """The callable named by ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    if ":" not in target:
        raise VectorsError(f"target {target!r} must be MODULE:FUNCTION (e.g. examples/my_moe.py:make_block)")
    module_name, _, attr = target.rpartition(":")
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise VectorsError(f"no file {module_name} (target {target!r})")
            spec = importlib.util.spec_from_file_location(f"moeref_check_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(module_name)
    except VectorsError:
        raise
    except Exception as exc:
        raise VectorsError(f"importing {module_name} raised {type(exc).__name__}: {exc}\n{_user_trace(exc)}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise VectorsError(f"{module_name} has no {attr!r}{closest(attr, names)}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise VectorsError(f"{target} is a {type(fn).__name__}, not a function")
    return fn


_PACKAGE = Path(__file__).resolve().parents[1]


def _user_trace(exc: BaseException, limit: int = 4) -> str:
    """The last frames of a user's exception, outside moeref."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _PACKAGE not in Path(f.filename).resolve().parents]
    lines = traceback.format_list(frames[-limit:])
    return "".join(lines).rstrip()


# --------------------------------------------------------------------------------------------
# Frameworks
# --------------------------------------------------------------------------------------------


class _Framework:
    """Conversions and differentiation for one framework (torch, jax, numpy)."""

    def __init__(self, name: str):
        self.name = name
        try:
            if name == "torch":
                import torch  # noqa: F401
            elif name == "jax":
                import jax

                jax.config.update("jax_enable_x64", True)
        except ImportError:
            raise VectorsError(f"--backend {name}: {name} is not installed") from None

    def array(self, a: np.ndarray, grad: bool = False):
        a = np.array(a, copy=True)
        if self.name == "torch":
            import torch

            t = torch.from_numpy(a)
            return t.requires_grad_(True) if grad and np.issubdtype(a.dtype, np.floating) else t
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        return a

    @property
    def differentiable(self) -> bool:
        return self.name in ("torch", "jax")


def _tree_map(fn: Callable, tree: Any) -> Any:
    return map_leaves(fn, tree)


# --------------------------------------------------------------------------------------------
# Normalising what the user returns
# --------------------------------------------------------------------------------------------

_SPARSE_RETURN = {"y": "outputs/y", "logits": "outputs/logits", "expert_index": "outputs/routes/expert_index",
                  "weight": "outputs/routes/weight"}


def _as_outputs(result: Any, main: str) -> dict[str, Any]:
    """``{"outputs/...": value}`` from an array, a tuple ``(y, logits)`` or a dict."""
    if isinstance(result, dict):
        unknown = [k for k in result if k not in _SPARSE_RETURN]
        if unknown:
            raise _UserError(f"returned a dict with unknown key(s) {unknown}; use {', '.join(_SPARSE_RETURN)}")
        return {_SPARSE_RETURN[k]: v for k, v in result.items()}
    if isinstance(result, (tuple, list)):
        if main != "outputs/y" or len(result) != 2:
            raise _UserError(f"returned a {type(result).__name__} of {len(result)}; expected y or (y, router_logits)")
        return {"outputs/y": result[0], "outputs/logits": result[1]}
    if not hasattr(result, "shape"):
        raise _UserError(f"returned {type(result).__name__}; expected an array, (y, router_logits) or a dict")
    return {main: result}


class _UserError(Exception):
    """The user's function failed or returned something unusable (a failed case, exit status 1)."""


# --------------------------------------------------------------------------------------------
# Calling the user's function on one case
# --------------------------------------------------------------------------------------------


def _kind(fn: Callable, kind: str) -> str:
    if kind != "auto":
        return kind
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "function"
    return "module" if params == ["case"] else "function"


def _accepts(fn: Callable, name: str) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return name in sig.parameters or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise _UserError(f"raised {type(exc).__name__}: {exc}\n{_user_trace(exc)}") from None


def _sparse_inputs(spec: CaseSpec, problem: Problem, fw: _Framework, grad: bool):
    router = problem.params.router
    experts = {k: v for k, v in problem.params.experts._asdict().items() if v is not None}
    x = fw.array(problem.inputs["x"], grad)
    W = fw.array(router.weight, grad)
    E = {k: fw.array(v, grad) for k, v in experts.items()}
    extras = {}
    if router.bias is not None:
        extras["router_bias"] = fw.array(router.bias, grad)
    if router.selection_bias is not None:
        extras["selection_bias"] = fw.array(router.selection_bias, False)
    shared = getattr(problem.params, "shared", None)
    if shared is not None:  # {"ffn/w_in": ..., "gate_weight": ...}
        extras["shared"] = {k.lstrip("/"): fw.array(v, False) for k, v in flatten(shared, "").items()}
    if problem.draws is not None and flatten(problem.draws, ""):  # {"router/second_expert_uniform": ...}
        extras["draws"] = {k.lstrip("/"): fw.array(v, False) for k, v in flatten(problem.draws, "").items()}
    return x, W, E, extras


def _grad_names(spec: CaseSpec, problem: Problem) -> dict[str, str]:
    names = {"x": "grads/x", "router_weight": "grads/params/router/weight", "router_bias": "grads/params/router/bias"}
    for k in problem.params.experts._fields:
        names[f"experts/{k}"] = f"grads/params/experts/{k}"
    return names


def _run_sparse(fn: Callable, kind: str, spec: CaseSpec, problem: Problem, fw: _Framework, case: Any) -> dict[str, Any]:
    """The user's outputs (and gradients) on one sparse-layer case, as ``{name: array}``."""
    grad = fw.differentiable
    x, W, E, extras = _sparse_inputs(spec, problem, fw, grad and fw.name == "torch")
    ct = problem.cotangents["y"]
    if kind == "module":
        module = _call(fn, case)
        if not callable(module):
            raise _UserError(f"the factory returned {type(module).__name__}, not a module or callable")
        call = lambda x_, W_, E_, ex_: module(x_)  # noqa: E731
    else:
        for name in extras:
            if not _accepts(fn, name):
                what = {"shared": "shared experts", "draws": "random draws"}.get(name, f"a {name.replace('_', ' ')}")
                raise _UserError(f"does not accept {name}=, and this case has {what}: add the keyword argument")
        kw = dict(extras)
        for name, value in (("k", spec.sizes["k"]), ("options", spec.options), ("case", case)):
            if _accepts(fn, name):
                kw[name] = value
        call = lambda x_, W_, E_, ex_: fn(x_, W_, E_, **{**kw, **ex_})  # noqa: E731

    if fw.name == "jax" and grad:
        return _jax_sparse(call, x, W, E, extras, ct, kind)
    outputs = _as_outputs(_call(call, x, W, E, {}), "outputs/y")
    if fw.name == "torch" and grad:
        outputs.update(_torch_grads(outputs["outputs/y"] if "outputs/y" in outputs else None, ct,
                                    {"x": x, "router_weight": W, **{f"experts/{k}": v for k, v in E.items()},
                                     **({"router_bias": extras["router_bias"]} if "router_bias" in extras else {})},
                                    _grad_names(spec, problem), module_only=kind == "module"))
    return outputs


def _torch_grads(y: Any, cotangent: np.ndarray, leaves: dict, names: dict, module_only: bool) -> dict[str, Any]:
    import torch

    if y is None or not isinstance(y, torch.Tensor) or not y.requires_grad:
        return {}
    if tuple(y.shape) != cotangent.shape:
        return {}  # the shape mismatch of y is reported by the comparison
    wanted = {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    if module_only:
        wanted = {"x": leaves["x"]}
    try:
        grads = torch.autograd.grad(y, list(wanted.values()), grad_outputs=torch.from_numpy(cotangent.copy()).to(y.dtype),
                                    allow_unused=True)
    except Exception as exc:
        raise _UserError(f"torch.autograd failed on your output: {type(exc).__name__}: {exc}") from None
    return {names[k]: (g if g is not None else torch.zeros_like(wanted[k])) for k, g in zip(wanted, grads)}


def _jax_sparse(call: Callable, x, W, E, extras, cotangent, kind) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def f(x_, W_, E_):
        out = _as_outputs(call(x_, W_, E_, {}), "outputs/y")
        if "outputs/y" not in out:
            raise _UserError("returned no y; with --backend jax it must return y, (y, router_logits) or a dict with 'y'")
        return out["outputs/y"], {k: v for k, v in out.items() if k != "outputs/y"}

    try:
        y, pullback, rest = jax.vjp(f, x, W, E, has_aux=True)
    except _UserError:
        raise
    except Exception as exc:
        raise _UserError(f"raised {type(exc).__name__} under jax.vjp: {exc}\n{_user_trace(exc)}") from None
    out = {"outputs/y": y, **rest}
    if tuple(y.shape) != cotangent.shape:
        return out
    gx, gW, gE = pullback(jnp.asarray(cotangent, dtype=y.dtype))
    out["grads/x"] = gx
    if kind != "module":
        out["grads/params/router/weight"] = gW
        out.update({f"grads/params/experts/{k}": v for k, v in gE.items()})
    return out


def _run_generic(fn: Callable, formulation: Formulation, spec: CaseSpec, problem: Problem, fw: _Framework) -> dict[str, Any]:
    """Other formulations: ``fn`` takes the positional arguments of moeref's forward."""
    if formulation.call_args is None:
        raise VectorsError(f"`moeref check` does not know the calling convention of {formulation.name} yet")
    (out_name,) = problem.cotangents
    cotangent = problem.cotangents[out_name]
    grad = fw.name == "torch"
    converted = Problem(*(_tree_map(lambda a: fw.array(a, grad), tree) for tree in problem))
    args = formulation.call_args(spec, converted)
    names = formulation.arg_names

    def grad_prefix(name):
        return "grads/params" if name == "params" else f"grads/{name}"

    if fw.name == "jax":
        import jax

        def is_float_tree(a):
            leaves = list(flatten(a, "").values())
            return bool(leaves) and all(hasattr(v, "dtype") and np.issubdtype(np.dtype(v.dtype), np.floating) for v in leaves)

        diff = [i for i, a in enumerate(args) if is_float_tree(a)]  # options and integer ids are held fixed

        def f(*d):
            full = list(args)
            for i, a in zip(diff, d):
                full[i] = a
            return fn(*full)

        try:
            y, pullback = jax.vjp(f, *(args[i] for i in diff))
        except Exception as exc:
            raise _UserError(f"raised {type(exc).__name__}: {exc}\n{_user_trace(exc)}") from None
        out = {f"outputs/{out_name}": y}
        if tuple(y.shape) == cotangent.shape:
            for i, g in zip(diff, pullback(fw.array(cotangent).astype(y.dtype))):
                out.update(flatten(g, grad_prefix(names[i])))
        return out
    y = _call(fn, *args)
    if not hasattr(y, "shape"):
        raise _UserError(f"returned {type(y).__name__}; expected an array")
    out = {f"outputs/{out_name}": y}
    if grad:
        leaves = {}
        for n, a in zip(names, args):
            leaves.update(flatten(a, grad_prefix(n)))
        out.update(_torch_grads(y, cotangent, leaves, {k: k for k in leaves}, module_only=False))
    return out


# --------------------------------------------------------------------------------------------
# Explaining a mismatch: moeref with one convention changed
# --------------------------------------------------------------------------------------------


def _replace_path(options: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(options, **{head: value})
    return dataclasses.replace(options, **{head: _replace_path(getattr(options, head), rest, value)})


def _get_path(options: Any, path: str) -> Any:
    for part in path.split("."):
        options = getattr(options, part)
    return options


def convention_variants(options: Any) -> list[tuple[str, Any]]:
    """``(description, options)`` for every valid single-convention change of sparse-layer options,
    then every other preset (with the same ``k``)."""
    from .. import presets
    from ..expert_ffn import ACTIVATIONS
    from ..router import NORMALIZATIONS, SCORE_FUNCTIONS
    from ..capacity import PRIORITIES

    r = options.router
    changes: list[tuple[str, Any]] = []
    changes += [("router.score", v) for v in SCORE_FUNCTIONS if v != r.score]
    changes += [("router.normalize", v) for v in NORMALIZATIONS if v != r.normalize]
    if r.routed_scaling_factor != 1.0:
        changes.append(("router.routed_scaling_factor", 1.0))
    if r.n_group is not None:
        changes.append(("router.group_masked_score", 0.0 if r.group_masked_score != 0.0 else float("-inf")))
    changes.append(("apply_weight_to", "input" if options.apply_weight_to == "output" else "output"))
    changes += [("ffn.activation", v) for v in ACTIVATIONS if v != options.ffn.activation]
    if options.ffn.fused:
        changes += [("ffn.gate_up_layout", v) for v in ("concatenated", "interleaved") if v != options.ffn.gate_up_layout]
    if not options.capacity.dropless:
        changes.append(("capacity.dropless", True))
        changes.append(("router.normalize_after_capacity", not r.normalize_after_capacity))
        changes += [("capacity.priority", v) for v in PRIORITIES if v not in (options.capacity.priority, "random")]
    out = []
    for path, value in changes:
        extra: dict[str, Any] = {}
        if path == "router.normalize" and value in ("sum_plus_eps", "sum_clamp"):
            extra["router.normalize_eps"] = "finfo_eps" if value == "sum_clamp" else 1e-20
        if path == "router.score":
            extra["router.selection"] = None
        if path == "ffn.activation" and options.ffn.swish_beta != 1.0 and value != "silu":
            extra["ffn.swish_beta"] = 1.0
        try:
            new = options
            for p, v in {path: value, **extra}.items():
                new = _replace_path(new, p, v)
        except (ValueError, TypeError):
            continue
        out.append((f"{path}={value!r} (instead of {_get_path(options, path)!r})", new))
    for name, make in presets.PRESETS.items():
        try:
            candidate = make()
            if candidate.router.k != r.k:
                candidate = _replace_path(candidate, "router.k", r.k)
        except (ValueError, TypeError):
            continue
        if candidate != options:
            out.append((f"the {name} preset", candidate))
    return out


def _systems_with(path: str, value: Any) -> list[str]:
    from .. import presets

    names = []
    for name, make in presets.PRESETS.items():
        try:
            if _get_path(make(), path) == value:
                names.append(name)
        except (ValueError, TypeError, AttributeError):
            continue
    return names


_MEANING = {
    ("router.normalize", "none"): "the top-k weights are used as gathered, not renormalised to sum 1",
    ("router.normalize", "sum"): "the top-k weights are renormalised to sum 1",
    ("router.normalize", "sum_plus_eps"): "the top-k weights are divided by their sum plus a small epsilon",
    ("router.normalize", "sum_clamp"): "the top-k weights are divided by max(sum, epsilon)",
    ("router.normalize", "lp"): "the top-k weights are divided by their Lp norm",
    ("router.score", "softmax"): "softmax over all E logits, then the top-k of the probabilities",
    ("router.score", "topk_softmax"): "top-k of the logits, then a softmax over the k winners only",
    ("router.score", "sigmoid"): "elementwise sigmoid scores",
    ("router.score", "topk_sigmoid"): "top-k of the logits, then the sigmoid of the winners",
    ("router.score", "none"): "the raw logits are the weights",
    ("router.routed_scaling_factor", 1.0): "no routed scaling factor",
    ("apply_weight_to", "input"): "the route weight multiplies the expert's input, not its output",
    ("apply_weight_to", "output"): "the route weight multiplies the expert's output",
    ("ffn.gate_up_layout", "interleaved"): "gate and up projections interleaved (even / odd columns)",
    ("ffn.gate_up_layout", "concatenated"): "gate and up projections concatenated (gate columns first)",
    ("capacity.dropless", True): "no token is dropped (no capacity limit)",
}


def _explain(spec: CaseSpec, problem: Problem, user_y: Any, tol_dtype: str) -> list[str]:
    """Which single convention change makes moeref reproduce the user's y."""
    got = _as_host(user_y)
    if got.shape != tuple(problem.inputs["x"].shape):
        return []
    p64 = cast_floats(problem, "float64")
    matches = []
    for description, options in convention_variants(spec.options):
        variant = dataclasses.replace(spec, options=options)
        try:
            y = compute(variant, p64, vjp=False)["outputs/y"]
        except Exception:
            continue
        result = compare({"outputs/y": got}, {"outputs/y": y}, dtype=tol_dtype)
        if result.ok:
            matches.append((result.max_rel(), description))
    lines = []
    for err, description in sorted(matches)[:3]:
        line = f"your y matches moeref with {description} (max rel err {err:.1e})"
        if " (instead of " in description and "=" in description:
            path, value = description.split(" (instead of ")[0].split("=", 1)
            value = eval_literal(value)
            if (path, value) in _MEANING:
                line += f": {_MEANING[path, value]}"
            systems = _systems_with(path, value)
            if systems:
                line += f"; presets with that convention: {', '.join(systems)}"
        lines.append(line)
    return lines


def eval_literal(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseCheck:
    name: str
    comparison: Comparison | None
    error: str | None = None
    explanation: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None and self.comparison is not None and self.comparison.ok


@dataclass(frozen=True)
class CheckReport:
    target: str
    formulation: str
    preset: str | None
    backend: str
    cases: tuple[CaseCheck, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    def text(self) -> str:
        """The report: one line per case, the details of the first failing case, the explanation."""
        what = self.formulation + (f" / {self.preset}" if self.preset else "")
        lines = [f"moeref check {self.target} against {what} (backend {self.backend})"]
        compared: list[str] = []
        for c in self.cases:
            comp = c.comparison
            if comp is not None:
                compared += [t.name for t in comp.tensors if t.name not in compared]
            if c.error:
                lines.append(f"  FAIL  {c.name}: {c.error.splitlines()[0]}")
                continue
            has_grads = any(t.name.startswith("grads/") for t in comp.tensors)
            errs = f"max rel err outputs {comp.max_rel('outputs'):.1e}, " + (
                f"grads {comp.max_rel('grads'):.1e}" if has_grads else "no gradients")
            failing = ", ".join(t.name for t in comp.failures)
            lines.append(f"  {'pass' if c.ok else 'FAIL'}  {c.name}: {errs}" + (f" ({failing} differ)" if failing else ""))
        lines.append(f"compared: {', '.join(compared)}" if compared else "compared: nothing")
        first = next((c for c in self.cases if not c.ok), None)
        if first is not None:
            lines.append(f"details of {first.name}:")
            body = first.error if first.error else first.comparison.report()
            lines += ["  " + ln.strip() if not ln.startswith("  ") else ln for ln in body.splitlines()]
            explained = [c for c in self.cases if c.explanation]
            if explained:
                lines.append(f"explanation ({len(explained)} of {sum(not c.ok for c in self.cases)} failing cases):")
                lines += [f"  {e}" for e in first.explanation or explained[0].explanation]
            elif first.comparison is not None:
                lines.append("no single convention change of moeref reproduces your output; see the tokens above")
        failed = sum(not c.ok for c in self.cases)
        lines.append(f"{len(self.cases)} cases: " + ("all agree with moeref" if not failed else f"{failed} disagree"))
        return "\n".join(lines)


def _select_specs(formulation: Formulation, preset: str | None, dtypes: Sequence[str] | None) -> list[CaseSpec]:
    specs = list(formulation.cases())
    presets = preset_names(formulation.name)
    if presets:
        if preset is None:
            raise VectorsError(f"{formulation.name} has presets: choose one with --preset ({', '.join(presets)})")
        if preset not in presets:
            raise VectorsError(f"unknown preset {preset!r} of {formulation.name}{closest(preset, presets)} (known: {', '.join(presets)})")
        specs = [s for s in specs if s.preset == preset]
    elif preset is not None:
        raise VectorsError(f"{formulation.name} has no presets (got --preset {preset})")
    if dtypes:
        specs = [s for s in specs if s.dtype in dtypes]
        if not specs:
            raise VectorsError(f"no {formulation.name} case in dtype {', '.join(dtypes)}")
    return specs


def _case_object(ref: Any) -> Any:
    from ..testing import Case
    from .generate import manifest_entry

    return Case(manifest_entry(ref, b""), ref.tensors)


def run_check(
    target: str | Callable,
    *,
    formulation: str,
    preset: str | None = None,
    backend: str = "torch",
    dtypes: Sequence[str] | None = None,
    kind: str = "auto",
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckReport:
    """Check ``target`` (``"module:function"``, ``"file.py:function"`` or a callable) on every case.

    Returns
    -------
    CheckReport
        ``ok`` when every case agrees; ``text()`` is what the command line prints.

    Raises
    ------
    VectorsError
        The target cannot be imported; unknown formulation or preset (with the closest name).
    """
    f = get_formulation(formulation)
    specs = _select_specs(f, preset, dtypes)
    fn = load_target(target) if isinstance(target, str) else target
    fw = _Framework(backend)
    kind = _kind(fn, kind)
    checks = []
    for spec in specs:
        ref = reference(spec)
        expected = dict(ref.tensors)
        try:
            if f.name == "sparse_moe":
                got = _run_sparse(fn, kind, spec, ref.problem, fw, _case_object(ref))
            else:
                got = _run_generic(fn, f, spec, ref.problem, fw)
        except _UserError as exc:
            checks.append(CaseCheck(spec.name, None, f"your {'factory' if kind == 'module' else 'function'} {exc}"))
            continue
        comparison = compare(got, expected, dtype=spec.dtype, rtol=rtol, atol=atol, routing=f.routing(spec), names=list(got))
        explanation: tuple[str, ...] = ()
        y_check = next((t for t in comparison.tensors if t.name == "outputs/y"), None)
        if f.name == "sparse_moe" and y_check is not None and y_check.status == "fail":
            explanation = tuple(_explain(spec, ref.problem, got["outputs/y"], spec.dtype))
        checks.append(CaseCheck(spec.name, comparison, None, explanation))
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return CheckReport(name, formulation, preset, backend, tuple(checks))
