"""The bad-input catalogue over moeref's public API.

Every public function of a covered module has an `Entry`: a builder for one *good* call (tiny
NumPy float64 inputs) and the judgement of the generic mutations that
[`mutations`][bad_input_catalogue.mutations] derives from it. Each array argument and each record
field is mutated in turn (wrong rank, wrong size of one axis, integer / bool / float32 dtype, a NaN
or an infinity, a PyTorch tensor among NumPy arrays, a list, ``None``), each record is replaced by
``None`` or a plain tuple, and each option (a Python scalar argument or a field of an options
dataclass) gets a wrong value (negative int, NaN, unknown string). A mutated call must

* raise ``ValueError`` / ``TypeError`` (or a moeref error class) from moeref's own code, with a
  message that names the mutated argument or field: a **clear** error; or
* be a mutation the entry marks as legitimately valid (``valid``: broadcasting, an optional
  argument, NaN propagation in a primitive): **accepted-valid**.

Returning without error is a **silent** acceptance; another exception type, or an error raised
inside NumPy / PyTorch instead of at moeref's boundary, is a **deep** error; a ValueError /
TypeError that does not name the argument is **unclear**. Known defects in modules this catalogue
does not own are `ISSUES` (owner, summary, minimal reproduction, and the mutations they explain);
tests/test_bad_inputs.py reports them as ``xfail(strict=True)`` per issue and function, and fails
when an issue's rule no longer explains any failure (the defect was fixed: remove the rule).

Run ``python tests/bad_input_catalogue.py`` for the coverage report without pytest.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import inspect
import math
import pkgutil
import re
import traceback
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

import moeref

try:
    import torch
except ImportError:  # pragma: no cover - torch is a test dependency
    torch = None

# --------------------------------------------------------------------------------------------
# Argument trees: paths, walking, functional replacement
# --------------------------------------------------------------------------------------------

Path = tuple  # of str (argument / field name) and int (position in a sequence)


def show(path: Path) -> str:
    """``("params", "gate", "weight")`` -> ``params.gate.weight``; ``("params", 0, "w")`` -> ``params[0].w``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (("." if out else "") + p)
    return out


def is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray)


def is_record(v: Any) -> bool:
    return isinstance(v, tuple) and hasattr(v, "_fields")


def is_options(v: Any) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def get_at(root: Any, path: Path) -> Any:
    for p in path:
        root = root[p] if isinstance(root, (dict, list)) or (isinstance(root, tuple) and isinstance(p, int)) else getattr(root, p)
    return root


def replace_at(root: Any, path: Path, new: Any) -> Any:
    """A copy of ``root`` with the value at ``path`` replaced (dicts, records, options, sequences)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(root, dict):
        return {**root, head: replace_at(root[head], rest, new)}
    if is_record(root) and isinstance(head, str):
        return root._replace(**{head: replace_at(getattr(root, head), rest, new)})
    if is_options(root):
        return dataclasses.replace(root, **{head: replace_at(getattr(root, head), rest, new)})
    items = list(root)
    items[head] = replace_at(root[head], rest, new)
    return type(root)(items)


class Node(NamedTuple):
    path: Path
    kind: str  # "array" | "record" | "options" | "int" | "float" | "str"
    value: Any
    optional: bool  # None is a documented value here


def walk(value: Any, path: Path = (), optional: bool = False) -> Iterator[Node]:
    """Every array, record, options dataclass and Python scalar option under ``value``."""
    if is_array(value):
        yield Node(path, "array", value, optional)
    elif is_record(value):
        yield Node(path, "record", value, optional)
        defaults = getattr(type(value), "_field_defaults", {})
        for f in value._fields:
            yield from walk(getattr(value, f), path + (f,), defaults.get(f, 0) is None)
    elif is_options(value):
        yield Node(path, "options", value, optional)
        for f in dataclasses.fields(value):
            yield from walk(getattr(value, f.name), path + (f.name,), f.default is None)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, path + (k,), False)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from walk(v, path + (i,), False)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        yield Node(path, "int", value, optional)
    elif isinstance(value, float):
        yield Node(path, "float", value, optional)
    elif isinstance(value, str):
        yield Node(path, "str", value, optional)


# --------------------------------------------------------------------------------------------
# Generic mutations
# --------------------------------------------------------------------------------------------


def _with_first(a: np.ndarray, value: Any) -> np.ndarray:
    out = np.array(a, copy=True)
    out.reshape(-1)[0] = value
    return out


def _grow(a: np.ndarray, axis: int) -> np.ndarray:
    return np.concatenate([a, np.take(a, [0], axis=axis)], axis=axis)


def array_mutations(a: np.ndarray) -> Iterator[tuple[str, Any]]:
    """(label, replacement) pairs for one array, by dtype kind."""
    yield "ndim+1", a[None]
    if a.ndim:
        yield "ndim-1", a[0]
    for ax in range(a.ndim):
        yield f"size{ax}+1", _grow(a, ax)
    if a.dtype.kind == "f":
        yield "int", a.astype(np.int64)
        yield "bool", a != 0
        yield "float32", a.astype(np.float32)
        if a.size:
            yield "nan", _with_first(a, math.nan)
            yield "inf", _with_first(a, math.inf)
    elif a.dtype.kind in "iu":
        yield "float", a.astype(np.float64)
        if a.size:
            yield "too_large", _with_first(a, int(a.max()) + 1000)
            yield "negative", _with_first(a, -1)
    elif a.dtype.kind == "b":
        yield "float", a.astype(np.float64)
        yield "int", a.astype(np.int64)
    yield "list", a.tolist() if a.ndim else [a.tolist()]
    yield "none", None


SCALAR_MUTATIONS = {
    "int": (("-1", -1), ("0", 0), ("float", 1.5)),
    "float": (("nan", math.nan), ("-1", -1.0)),
    "str": (("bogus", "bogus_choice"),),
}


class Mutation(NamedTuple):
    id: str  # "<path>:<label>", e.g. "params.weight:ndim+1", "options.router.k:-1"
    names: tuple  # names one of which the error message must contain
    build: Callable[[], dict]  # the mutated arguments (may raise: options validate on construction)
    optional: bool  # "none" of an optional argument or field


def accepted_names(path: Path, positional: dict[str, int]) -> tuple:
    strs = [p for p in path if isinstance(p, str)]
    names = {show(path), strs[-1]} if strs else {show(path)}
    if len(path) == 1 and path[0] in positional:  # positional-only parameters are named by position
        names.add(f"argument {positional[path[0]]}")
    return tuple(sorted(names))


def mutations(args: dict, positional: dict[str, int] | None = None, optional: tuple = (),
              fresh: Callable[[], dict] | None = None) -> list[Mutation]:
    """Every generic mutation of the good arguments ``args`` (``optional``: parameters whose default is None).

    ``fresh`` rebuilds the good arguments for each mutated call (a generator argument has state).
    """
    fresh = fresh or (lambda: args)
    positional = positional or {}
    nodes = [n._replace(optional=True) if len(n.path) == 1 and n.path[0] in optional else n for n in walk(args)]
    float_arrays = [n.path for n in nodes if n.kind == "array" and n.value.dtype.kind == "f"]
    all_arrays = [n.path for n in nodes if n.kind == "array"]
    out: list[Mutation] = []

    # a size that disagrees with another argument (or with a size option) may be reported on either
    every_name = tuple(sorted({n for node in nodes if node.path for n in accepted_names(node.path, positional)}))

    def add(node: Node, label: str, new: Any) -> None:
        names = accepted_names(node.path, positional)
        out.append(
            Mutation(
                f"{show(node.path)}:{label}",
                names + every_name if label.startswith("size") else names,
                lambda p=node.path, v=new: replace_at(fresh(), p, v),
                label == "none" and node.optional,
            )
        )

    for node in nodes:
        if node.kind == "array":
            others = [p for p in all_arrays if p != node.path]
            for label, new in array_mutations(node.value):
                if label == "float32" and not [p for p in float_arrays if p != node.path]:
                    continue  # float32 alone is a valid dtype; only float32 among float64 is mixed
                add(node, label, new)
            if torch is not None and others:
                add(node, "torch", torch.from_numpy(np.ascontiguousarray(node.value)))
        elif node.kind == "record":
            add(node, "none", None)
            add(node, "tuple", tuple(node.value))
        elif node.kind == "options":
            add(node, "none", None)
        else:
            for label, new in SCALAR_MUTATIONS[node.kind]:
                if not (new == node.value or (isinstance(new, float) and math.isnan(new) and math.isnan(node.value))):
                    add(node, label, new)
            if node.kind == "str":
                add(node, "none", None)
    return out


# --------------------------------------------------------------------------------------------
# Entries and verdicts
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """One public function: a good call and the judgement of its mutations.

    ``valid`` maps fnmatch patterns over mutation ids (``"x:nan"``, ``"*:torch"``) to a reason
    (a `Same` reason is checked: the output must equal the good call's); ``extra`` adds targeted mutations ``label -> (names, build)`` where ``build``
    takes the good arguments and returns bad ones (k > E, inconsistent options...).
    """

    qualname: str  # "module.function"
    good: Callable[[], dict]
    valid: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    skip: dict = dataclasses.field(default_factory=dict)  # patterns not generated -> why
    call: Callable | None = None  # calls the function with the good-call dict (default: by signature)
    errors: tuple = ()  # further documented exception types, judged like ValueError (AssertionError of an assert_*)

    @property
    def fn(self) -> Callable:
        module, name = self.qualname.split("[")[0].rsplit(".", 1)
        return getattr(importlib.import_module(f"moeref.{module}"), name)

    def positional_only(self) -> dict[str, int]:
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: i for i, p in enumerate(params) if p.kind is p.POSITIONAL_ONLY}

    def optional(self) -> tuple:
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.default is None)

    def __call__(self, args: dict) -> Any:
        return self.call(**args) if self.call is not None else invoke(self.fn, args)

    def mutations(self) -> list[Mutation]:
        args = self.good()
        ms = [m for m in mutations(args, self.positional_only(), self.optional(), self.good) if not _matches(m.id, self.skip)]
        for label, (names, build) in self.extra.items():
            ms.append(Mutation(f"extra:{label}", tuple(names), lambda b=build: b(self.good()), False))
        return ms


def _matches(mutation_id: str, patterns: Any) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(mutation_id, pattern):
            return pattern
    return None


def invoke(fn: Callable, args: dict) -> Any:
    """Call ``fn`` with ``args``: positional-only parameters by position, the others by keyword."""
    params = inspect.signature(fn).parameters
    pos = [args[n] for n, p in params.items() if p.kind is p.POSITIONAL_ONLY and n in args]
    kw = {n: v for n, v in args.items() if n not in params or params[n].kind is not params[n].POSITIONAL_ONLY}
    return fn(*pos, **kw)


class Verdict(NamedTuple):
    entry: str
    mutation: str
    outcome: str  # clear | valid | silent | unclear | deep | xfail
    detail: str


FAILURES = ("silent", "unclear", "deep")


def _raised_in_moeref(exc: BaseException) -> bool:
    """Raised by moeref's own code, or by Python binding the call's arguments (unknown keyword)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and (frames[-1].filename.startswith(moeref.__path__[0]) or frames[-1].filename == __file__)


def _names_in(message: str, names: tuple) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", message) for n in names)


class Same(str):
    """A ``valid`` reason that claims the mutated call returns exactly the good call's output
    (the mutated value is not read, or is recomputed); the claim is checked."""


def leaves_of(tree: Any) -> list:
    if is_record(tree) or isinstance(tree, (list, tuple)):
        return [leaf for t in tree for leaf in leaves_of(t)]
    if is_options(tree):
        return [leaf for f in dataclasses.fields(tree) for leaf in leaves_of(getattr(tree, f.name))]
    return [tree if tree is None or isinstance(tree, (bool, int, float, str)) else np.asarray(tree)]


def _same_leaf(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape and x.dtype == y.dtype
                and bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")))
    return bool(x == y)


def same_output(a: Any, b: Any) -> bool:
    la, lb = leaves_of(a), leaves_of(b)
    return len(la) == len(lb) and all(_same_leaf(x, y) for x, y in zip(la, lb))


def run_mutation(entry: Entry, m: Mutation) -> tuple[Verdict, Any]:
    """Build and run one mutated call and judge the outcome (before ``valid`` / ``known``)."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            result = entry(m.build())
    except (ValueError, TypeError, *entry.errors) as exc:
        outcome = _judge_error(exc, m)
        return Verdict(entry.qualname, m.id, outcome, f"{type(exc).__name__}: {exc}"), None
    except Exception as exc:  # noqa: BLE001 - every other exception is a finding
        moeref_error = type(exc).__module__.startswith("moeref")
        outcome = _judge_error(exc, m) if moeref_error else "deep"
        return Verdict(entry.qualname, m.id, outcome, f"{type(exc).__name__}: {exc}"), None
    return Verdict(entry.qualname, m.id, "valid" if m.optional else "silent", "returned"), result


def _judge_error(exc: BaseException, m: Mutation) -> str:
    if not _raised_in_moeref(exc):
        return "deep"
    return "clear" if _names_in(str(exc), m.names) else "unclear"


def good_call(entry: Entry) -> Any:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return entry(entry.good())


class Expected(str):
    """A ``valid`` reason for a mutation whose right answer is a named moeref error that need not
    name the argument (e.g. a duplicated design column: ``SingularWeightedLeastSquaresError``)."""


def known_issue(entry: str, mutation_id: str) -> Issue | None:
    """The catalogued defect covering ``entry[mutation_id]``, if any."""
    for found in ISSUES.values():
        for entry_glob, mutation_globs in found.where:
            if fnmatch.fnmatchcase(entry, entry_glob) and _matches(mutation_id, mutation_globs) is not None:
                return found
    return None


def judge(entry: Entry, m: Mutation) -> Verdict:
    """The verdict of one mutation after the catalogue's ``valid`` marks and known issues."""
    v, result = run_mutation(entry, m)
    marks = {**GLOBAL_VALID, **entry.valid}
    if v.outcome in FAILURES and (p := _matches(m.id, marks)) is not None:
        reason = marks[p]
        if isinstance(reason, Expected):
            if v.outcome == "unclear":
                return v._replace(outcome="valid", detail=f"{reason}: {v.detail}")
        elif v.outcome == "silent" and not isinstance(reason, Same):
            return v._replace(outcome="valid", detail=reason)
        elif v.outcome == "silent" and same_output(result, good_call(entry)):
            return v._replace(outcome="valid", detail=f"{reason} (output unchanged: checked)")
        elif v.outcome == "silent":
            v = v._replace(detail=f"marked '{reason}' but the output changed")
    if v.outcome in FAILURES and (found := known_issue(entry.qualname, m.id)) is not None:
        return v._replace(outcome="xfail", detail=f"{v.outcome}: {v.detail} [known: {found.key}]")
    return v


def run_entry(entry: Entry) -> list[Verdict]:
    return [judge(entry, m) for m in entry.mutations()]


# --------------------------------------------------------------------------------------------
# Coverage over the public API
# --------------------------------------------------------------------------------------------

#: Modules whose every public function must have an entry (or a reason in NOT_APPLICABLE).
REQUIRED_MODULES = (
    "core validation gates experts mixture meta_pi local_experts hierarchical_moe mixture_of_softmaxes "
    "deep_moe router capacity aux_losses expert_ffn dispatch sparse_moe soft_moe regression_mixture "
    "moe_em hme_em presets"
).split()


def public_functions() -> dict[str, list[str]]:
    """``module -> [function names from __all__]`` for every moeref module (subpackages excluded)."""
    out: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(moeref.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"moeref.{info.name}")
        except Exception:  # noqa: BLE001 - a module being written right now
            continue
        names = [n for n in getattr(mod, "__all__", ()) if inspect.isfunction(getattr(mod, n, None))]
        if names:
            out[info.name] = names
    return out


class Issue(NamedTuple):
    """A defect the catalogue found in a module this file does not own, with a minimal reproduction.

    ``where`` lists ``(entry glob, mutation globs)``: the mutations it explains. The tests mark
    them ``xfail(strict=True)`` per entry, so a fix shows up as an XPASS (then narrow ``where``).
    """

    key: str
    owner: str
    summary: str
    repro: str
    where: tuple


ISSUES: dict[str, Issue] = {}


def issue(key: str, owner: str, summary: str, repro: str, *where: tuple) -> None:
    ISSUES[key] = Issue(key, owner, summary, repro, where)

# --------------------------------------------------------------------------------------------
# Known defects in modules this file does not own (each: owner, summary, minimal reproduction)
# --------------------------------------------------------------------------------------------

# (none left: every known issue found by the catalogue has been fixed)

#: Judgements shared by every entry (fnmatch over mutation ids).
GLOBAL_VALID: dict = {
    "expert:0": "0 is a valid expert index",
    "*up_offset:-1": "any real offset is valid (GPT-OSS uses +1)",
    "*group_masked_score:-1": "any real masked score is valid (the sources use 0.0 and -inf)",
    "*routed_scaling_factor:-1": "any real scale is well defined",
    "*capacity.capacity:0": "capacity 0 is documented (every route dropped, or dropless with zero_capacity_means_dropless)",
    "options.capacity:0": "capacity 0 is documented (every route dropped, or dropless with zero_capacity_means_dropless)",
    "*min_capacity:0": "0 means no minimum",
    "steps:0": "zero steps returns the start (a trace of length 1)",
    "n_starts:0": "zero random starts: an empty tuple",
}

CATALOGUE: dict[str, Entry] = {}
NOT_APPLICABLE: dict[str, str] = {}


def register(qualname: str, good: Callable[[], dict], **kw: Any) -> Entry:
    entry = Entry(qualname, good, **kw)
    CATALOGUE[qualname] = entry
    return entry


def coverage() -> tuple[list[str], list[str]]:
    """(covered, uncovered) qualified names over every public function."""
    covered, uncovered = [], []
    for module, names in public_functions().items():
        for name in names:
            q = f"{module}.{name}"
            known = q in NOT_APPLICABLE or any(e.split("[")[0] == q for e in CATALOGUE)
            (covered if known else uncovered).append(q)
    return covered, uncovered


def summary(verdicts: list[Verdict]) -> str:
    covered, uncovered = coverage()
    counts = {o: sum(v.outcome == o for v in verdicts) for o in ("clear", "valid", "silent", "unclear", "deep", "xfail")}
    lines = [
        f"bad-input catalogue: {len(covered)}/{len(covered) + len(uncovered)} public functions covered "
        f"({len(CATALOGUE)} with mutations, {len(NOT_APPLICABLE)} not applicable)",
        f"  mutations tried {len(verdicts)}: clear errors {counts['clear']}, accepted-valid {counts['valid']}, "
        f"silent {counts['silent']}, unclear {counts['unclear']}, deep {counts['deep']}, known (xfail) {counts['xfail']}",
    ]
    per_issue: dict[str, int] = {}
    for v in verdicts:
        if v.outcome == "xfail":
            key = v.detail.rsplit("[known: ", 1)[1].rstrip("]")
            per_issue[key] = per_issue.get(key, 0) + 1
    for key, count in per_issue.items():
        lines.append(f"  known issue {key} ({ISSUES[key].owner}): {count} mutations")
    if uncovered:
        lines.append(f"  uncovered ({len(uncovered)}): " + ", ".join(uncovered))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The entries
# --------------------------------------------------------------------------------------------


# Sizes are pairwise distinct so that a mutated size never matches another dimension by chance.
N, D_IN, N_EXP, D_OUT = 5, 2, 3, 4


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


PROPAGATES = "NaN / inf propagate through a primitive (documented; it is not a boundary function)"
ANY_SHAPE = "an elementwise / any-rank primitive: every shape is valid"
PRIMITIVE_INT = "core primitives take any real array: NumPy promotes int / bool to float (boundary checks are the callers')"


def _register_core() -> None:
    from moeref import core

    x = lambda: {"x": _rng().normal(size=(N, N_EXP))}  # noqa: E731
    elementwise = dict(valid={"x:ndim*": ANY_SHAPE, "x:size*": ANY_SHAPE, "x:nan": PROPAGATES, "x:inf": PROPAGATES},
                       skip={"axis:*": "axis is NumPy's own argument"})
    for name in ("logsumexp", "log_softmax", "softmax", "softplus", "sigmoid", "log_sigmoid", "relu", "erf", "erfc",
                 "normal_cdf", "normal_logpdf"):
        register(f"core.{name}", x, **elementwise)
    vjp = dict(valid={"*:nan": PROPAGATES, "*:inf": PROPAGATES, "*:float32": "NumPy promotes float32 with float64"},
               skip={"axis:*": "axis is NumPy's own argument"})
    pc = lambda: {"p": core.softmax(_rng().normal(size=(N, N_EXP))), "cotangent": _rng(1).normal(size=(N, N_EXP))}  # noqa: E731
    register("core.softmax_vjp", pc, **vjp)
    register("core.log_softmax_vjp", pc, **vjp)
    register("core.array_namespace", lambda: {"a": _rng().normal(size=(N,)), "b": _rng().normal(size=(2, 2))},
             call=lambda a, b: core.array_namespace(a, b, names=("a", "b")),
             valid={"*:ndim*": ANY_SHAPE, "*:size*": ANY_SHAPE, "*:int": "any dtype", "*:bool": "any dtype",
                    "*:float32": "any dtype", "*:nan": "values are not looked at", "*:inf": "values are not looked at",
                    "*:none": "None entries are ignored (optional arguments, documented); all None is an error naming them"})
    register("core.device_of", x, valid={"x:*": "any array has a device"},
             )
    register("core.one_hot", lambda: {"indices": np.array([0, 2, 1]), "num_classes": 3, "dtype": np.float64},
             valid={"indices:ndim*": ANY_SHAPE, "indices:size*": ANY_SHAPE,
                    "indices:too_large": "an index >= num_classes gives an all-zero row (documented one_hot convention)",
                    "indices:negative": "a negative index gives an all-zero row"})
    register("core.top_k", lambda: {"x": _rng().normal(size=(N, N_EXP)), "k": 2},
             valid={"x:ndim*": ANY_SHAPE, "x:size*": ANY_SHAPE, "x:int": "integers are ordered too",
                    "x:bool": "booleans are ordered too", "x:nan": PROPAGATES, "x:inf": "+inf is the largest value"},
             skip={"axis:*": "axis is NumPy's own argument"})
    register("core.argmax", x, valid={"x:ndim*": ANY_SHAPE, "x:size*": ANY_SHAPE, "x:int": "integers are ordered too",
                                      "x:bool": "booleans are ordered too", "x:nan": PROPAGATES, "x:inf": "+inf is the largest value"},
             skip={"axis:*": "axis is NumPy's own argument"})
    register("core.take_along_axis", lambda: {"x": _rng().normal(size=(N, N_EXP)), "indices": np.array([[0, 2]] * N)},
             valid={"x:nan": PROPAGATES, "x:inf": PROPAGATES, "x:int": "a gather of any dtype", "x:bool": "a gather of any dtype",
                    "x:size1+1": "the gathered axis is free (the indices stay in range)",
                    "indices:size1+1": "any number of entries may be gathered"},
             skip={"axis:*": "axis is NumPy's own argument"})
    register("core.inverse_permutation", lambda: {"perm": np.array([2, 0, 1, 4, 3])},
             valid={"perm:ndim+1": "a batch of permutations"})
    register("core.segment_sum", lambda: {"values": _rng().normal(size=(N, 2)), "segment_ids": np.array([0, 1, 0, 2, 1]),
                                          "num_segments": 3},
             valid={"values:nan": PROPAGATES, "values:inf": PROPAGATES, "values:int": "sums of integers",
                    "values:bool": PRIMITIVE_INT, "values:size1+1": "trailing axes are summed elementwise"})
    register("core.tree_add_scaled",
             lambda: {"params": _gate_params(), "grads": _gate_params(1), "step": 0.5},
             valid={"params.*:nan": PROPAGATES, "params.*:inf": PROPAGATES, "grads.*:nan": PROPAGATES, "grads.*:inf": PROPAGATES,
                    "step:*": "any step", "*:int": PRIMITIVE_INT, "*:bool": PRIMITIVE_INT, "*:float32": "NumPy promotes"})


def _gate_params(seed: int = 0, d: int = D_IN, n: int = N_EXP):
    from moeref.gates import LinearSoftmaxGateParams

    r = _rng(seed)
    return LinearSoftmaxGateParams(r.normal(size=(d, n)), r.normal(size=(n,)))


def _experts_params(seed: int = 0, n: int = N_EXP, d: int = D_IN, d_out: int = D_OUT):
    from moeref.experts import LinearExpertsParams

    r = _rng(seed)
    return LinearExpertsParams(r.normal(size=(n, d, d_out)), r.normal(size=(n, d_out)))


META = {"name:*": "the argument name used in the message", "expected*": "describes the check",
        "choices*": "describes the check", "minimum:*": "describes the check", "maximum:*": "describes the check",
        "N:*": "describes the check", "K:*": "describes the check", "d_in:*": "describes the check",
        "ndim:*": "describes the check", "allow_neg_inf:*": "describes the check"}


def _register_validation() -> None:
    from moeref.gates import LinearSoftmaxGateParams

    a = lambda: _rng().normal(size=(N, D_IN))  # noqa: E731
    register("validation.check_float_array", lambda: {"x": a(), "name": "x", "ndim": 2}, skip=META,
             valid={"x:size*": "no size is asked for", "x:nan": "values are not looked at", "x:inf": "values are not looked at"})
    register("validation.check_shape", lambda: {"x": a(), "name": "x", "expected": (N, None)}, skip=META,
             valid={"x:size1+1": "None matches any size", "x:int": "a shape check", "x:bool": "a shape check",
                    "x:nan": "a shape check", "x:inf": "a shape check"})
    register("validation.check_same_dtype", lambda: {"named": {"x": a(), "y": a()}},
             valid={"*:ndim*": "a dtype check", "*:size*": "a dtype check", "*:nan": "a dtype check", "*:inf": "a dtype check",
                    "*:none": "None entries are dropped (documented)", "*:torch": "float64 in both libraries"})
    register("validation.check_finite", lambda: {"x": a(), "name": "x"}, skip=META,
             valid={"x:ndim*": "a value check", "x:size*": "a value check", "x:int": "integers are finite",
                    "x:bool": "booleans are finite"})
    register("validation.check_arrays", lambda: {"named": {"x": a(), "y": _rng(1).normal(size=(3,))}},
             valid={"*:ndim*": "no shape is asked for", "*:size*": "no shape is asked for",
                    "*:none": "None entries are dropped (documented)"})
    register("validation.check_record_type",
             lambda: {"value": _gate_params(), "name": "value", "expected": LinearSoftmaxGateParams}, skip=META,
             valid={"value.*": "only the record type is checked"})
    register("validation.check_gate_params", lambda: {"weight": _gate_params().weight, "bias": _gate_params().bias, "d_in": D_IN},
             skip=META, valid={"*:nan": "a shape check", "*:inf": "a shape check"})
    register("validation.check_experts_params",
             lambda: {"weight": _experts_params().weight, "bias": _experts_params().bias, "d_in": D_IN, "n": N_EXP},
             skip=META, valid={"*:nan": "a shape check", "*:inf": "a shape check"})
    register("validation.check_responsibilities",
             lambda: {"weights": np.full((N, N_EXP), 1.0 / N_EXP), "N": N, "K": N_EXP}, skip=META)
    register("validation.check_array", lambda: {"x": a(), "name": "x"}, skip=META,
             valid={f"x:{m}": "only 'is an array' is checked" for m in ("ndim*", "size*", "int", "bool", "nan", "inf")})
    register("validation.check_cotangent",
             lambda: {"cotangent": _rng(2).normal(size=(N, D_IN)), "expected": (N, D_IN), "like": a(), "name": "cotangent"},
             skip=META, valid={"like:ndim*": "only the library and dtype of like are read", "like:size*": "only the library and dtype of like are read",
                               "like:nan": "only the library and dtype of like are read", "like:inf": "only the library and dtype of like are read",
                               "like:*": Expected("like is one of the forward's inputs; the message calls it that")})
    register("validation.check_scalar_cotangent", lambda: {"cotangent": np.array(1.0), "like": a(), "name": "cotangent"},
             skip=META | {"what:*": "describes the check"},
             valid={"like:ndim*": "only the library and dtype of like are read", "like:size*": "only the library and dtype of like are read",
                    "like:nan": "only the library and dtype of like are read", "like:inf": "only the library and dtype of like are read",
                    "like:*": Expected("like is one of the forward's inputs; the message calls it that")})
    register("validation.check_positive_int", lambda: {"value": 3, "name": "value", "minimum": 1, "maximum": 5}, skip=META)
    register("validation.check_positive_float", lambda: {"value": 0.5, "name": "value"}, skip=META)
    register("validation.check_choice", lambda: {"value": "a", "name": "value", "choices": ("a", "b")}, skip=META)
    register("validation.check_int", lambda: {"value": 3, "name": "value"}, skip=META,
             valid={"value:-1": "any integer (ranges: check_positive_int)", "value:0": "any integer (ranges: check_positive_int)"})
    idx = lambda: np.array([0, 2, 1])  # noqa: E731
    unread = "values are not looked at"
    register("validation.check_int_array", lambda: {"x": idx(), "name": "x", "ndim": 1}, skip=META,
             valid={"x:size*": "no size is asked for", "x:too_large": unread, "x:negative": unread})
    register("validation.check_index_range", lambda: {"x": idx(), "name": "x", "upper": 3},
             skip=META | {"upper:*": "describes the check"},
             valid={"x:ndim*": ANY_SHAPE, "x:size*": "a grown array repeats an index in range",
                    "x:float": "a range check (the dtype is check_int_array's)"})
    register("validation.check_permutation", lambda: {"perm": np.array([2, 0, 1])}, call=lambda perm: __import__(
                 "moeref.validation", fromlist=["x"]).check_permutation(perm, "perm"),
             valid={"perm:ndim+1": "a batch of permutations, one per row",
                    "perm:float": "a value check (the dtype is check_int_array's): 2.0, 0.0, 1.0 is a permutation"})
    register("validation.check_same_tree", lambda: {"tree": _gate_params(1), "like": _gate_params(), "name": "tree", "like_name": "like"},
             skip=META | {"like_name:*": "the argument name used in the message"},
             valid={f"*:{m}": "structure, shapes and libraries are compared; dtypes and values are the caller's"
                    for m in ("int", "bool", "float32", "nan", "inf")})
    NOT_APPLICABLE["validation.concrete_bool"] = "bool() of a value, None under tracing: every input is valid by design"


def _register_gates_experts_mixture() -> None:
    x = lambda: _rng(5).normal(size=(N, D_IN))  # noqa: E731
    free_n = {"x:size0+1": "N is free in a forward"}
    for name in ("linear_softmax_gate", "linear_softmax_gate_logits", "log_linear_softmax_gate"):
        register(f"gates.{name}", lambda: {"x": x(), "params": _gate_params()}, valid=free_n)
    register("gates.linear_softmax_gate_vjp", lambda: {"x": x(), "params": _gate_params(), "cotangent": _rng(2).normal(size=(N, N_EXP))})
    register("experts.linear_experts", lambda: {"x": x(), "params": _experts_params()}, valid=free_n)
    register("experts.linear_experts_vjp",
             lambda: {"x": x(), "params": _experts_params(), "cotangent": _rng(2).normal(size=(N, N_EXP, D_OUT))})
    from moeref.core import softmax

    gates = lambda: softmax(_rng(3).normal(size=(N, N_EXP)))  # noqa: E731
    outs = lambda: _rng(4).normal(size=(N, N_EXP, D_OUT))  # noqa: E731
    for name in ("mixture", "hard_mixture"):
        register(f"mixture.{name}", lambda: {"gates": gates(), "expert_outputs": outs()},
                 valid={"expert_outputs:size2+1": "d_out is free in a forward"})
        register(f"mixture.{name}_vjp",
                 lambda: {"gates": gates(), "expert_outputs": outs(), "cotangent": _rng(2).normal(size=(N, D_OUT))})


def _register_classical_dense() -> None:
    from moeref.deep_moe import DeepMoELayerParams
    from moeref.experts import LinearExpertsParams
    from moeref.hierarchical_moe import HMEParams
    from moeref.local_experts import LinearLocalExpertsParams, LocalExpertsParams
    from moeref.meta_pi import MetaPiParams
    from moeref.mixture_of_softmaxes import MixtureOfSoftmaxesParams

    x = lambda: _rng(5).normal(size=(N, D_IN))  # noqa: E731
    y = lambda: _rng(6).normal(size=(N, D_OUT))  # noqa: E731
    mp = lambda: MetaPiParams(_gate_params(), _experts_params())  # noqa: E731
    free_n = {"x:size0+1": "N is free in a forward", "y:size0+1": "checked against x (either may be named)"}
    register("meta_pi.meta_pi", lambda: {"x": x(), "params": mp()}, valid=free_n)
    register("meta_pi.meta_pi_vjp", lambda: {"x": x(), "params": mp(), "cotangent": y()})
    register("meta_pi.meta_pi_loss", lambda: {"x": x(), "y": y(), "params": mp()})
    register("meta_pi.meta_pi_loss_vjp", lambda: {"x": x(), "y": y(), "params": mp(), "cotangent": np.array(1.0)},
             valid={"cotangent:none": "None means a cotangent of 1 (documented)"})
    register("meta_pi.fit_meta_pi", lambda: {"x": x(), "y": y(), "init_params": mp(), "learning_rate": 0.01, "steps": 2})

    lep = lambda: LocalExpertsParams(_gate_params(), _rng(7).normal(size=(N_EXP, D_OUT)))  # noqa: E731
    llp = lambda: LinearLocalExpertsParams(_gate_params(), _experts_params())  # noqa: E731
    unread = {"": {"x:nan": Same("constant means do not read x"), "x:inf": Same("constant means do not read x"),
                   "params.gate.*:nan": Same("the means do not read the gate"), "params.gate.*:inf": Same("the means do not read the gate")},
              "[linear]": {"params.gate.*:nan": Same("the means do not read the gate"),
                           "params.gate.*:inf": Same("the means do not read the gate")}}
    free_out = {"params.means:size1+1": "d_out is free in a forward"}
    for suffix, params in (("", lep), ("[linear]", llp)):
        register(f"local_experts.local_experts_means{suffix}", lambda p=params: {"x": x(), "params": p()},
                 valid=free_n | free_out | unread[suffix])
        register(f"local_experts.local_experts_predict{suffix}", lambda p=params: {"x": x(), "params": p()}, valid=free_n | free_out)
        register(f"local_experts.local_experts_predict_vjp{suffix}", lambda p=params: {"x": x(), "params": p(), "cotangent": y()})
        register(f"local_experts.local_experts_log_likelihood{suffix}", lambda p=params: {"x": x(), "y": y(), "params": p(), "variance": 0.5})
        register(f"local_experts.local_experts_posteriors{suffix}", lambda p=params: {"x": x(), "y": y(), "params": p(), "variance": 0.5})
        register(f"local_experts.local_experts_log_likelihood_vjp{suffix}",
                 lambda p=params: {"x": x(), "y": y(), "params": p(), "cotangent": _rng(8).normal(size=(N,)), "variance": 0.5})
        register(f"local_experts.fit_local_experts{suffix}",
                 lambda p=params: {"x": x(), "y": y(), "init_params": p(), "learning_rate": 0.01, "steps": 2, "variance": 0.5})

    def hme_params():
        r = _rng(9)  # a depth-2 tree, branching (2, 3): 6 leaves
        return HMEParams((r.normal(size=(1, D_IN, 2)), r.normal(size=(2, D_IN, 3))), (r.normal(size=(1, 2)), r.normal(size=(2, 3))),
                         LinearExpertsParams(r.normal(size=(6, D_IN, D_OUT)), r.normal(size=(6, D_OUT))))

    register("hierarchical_moe.hme_branching", lambda: {"params": hme_params()},
             valid={"params.*:nan": "a shape query", "params.*:inf": "a shape query", "params.*:int": "a shape query",
                    "params.*:bool": "a shape query", "params.*:float32": "a shape query", "params.*:torch": "a shape query",
                    "params.experts.*:size2+1": "d_out is free"})
    register("hierarchical_moe.hme", lambda: {"x": x(), "params": hme_params()}, valid=free_n)
    register("hierarchical_moe.hme_priors", lambda: {"x": x(), "params": hme_params()}, valid=free_n)
    register("hierarchical_moe.hme_vjp", lambda: {"x": x(), "params": hme_params(), "cotangent": y()})
    register("hierarchical_moe.hme_log_likelihood", lambda: {"x": x(), "y": y(), "params": hme_params(), "variance": 0.5})
    register("hierarchical_moe.hme_posteriors", lambda: {"x": x(), "y": y(), "params": hme_params(), "variance": 0.5})
    register("hierarchical_moe.hme_log_likelihood_vjp",
             lambda: {"x": x(), "y": y(), "params": hme_params(), "cotangent": _rng(8).normal(size=(N,)), "variance": 0.5})

    V, K, D_E = 6, 2, 3

    def mos_params():
        r = _rng(10)
        return MixtureOfSoftmaxesParams(r.normal(size=(D_IN, K)), r.normal(size=(K, D_IN, D_E)), r.normal(size=(K, D_E)),
                                        r.normal(size=(D_E, V)), r.normal(size=(V,)))

    targets = lambda: np.array([0, 5, 2, 3, 1])  # noqa: E731
    register("mixture_of_softmaxes.mixture_of_softmaxes_log_probs", lambda: {"g": x(), "params": mos_params()},
             valid={"g:size0+1": "N is free in a forward"})
    register("mixture_of_softmaxes.mixture_of_softmaxes_log_probs_vjp",
             lambda: {"g": x(), "params": mos_params(), "cotangent": _rng(11).normal(size=(N, V))})
    register("mixture_of_softmaxes.mixture_of_softmaxes_log_probs[eps]", lambda: {"g": x(), "params": mos_params(), "eps": 1e-8},
             valid={"g:size0+1": "N is free in a forward"})
    register("mixture_of_softmaxes.mixture_of_softmaxes_nll", lambda: {"g": x(), "targets": targets(), "params": mos_params()})
    register("mixture_of_softmaxes.mixture_of_softmaxes_nll_vjp",
             lambda: {"g": x(), "targets": targets(), "params": mos_params(), "cotangent": np.array(1.0)})

    def dm_layer(seed=12, d_in=D_IN, d_out=D_OUT, n=N_EXP, h=3):
        r = _rng(seed)
        return DeepMoELayerParams(r.normal(size=(n, d_in, d_out)), r.normal(size=(n, d_out)), r.normal(size=(d_in, h)),
                                  r.normal(size=(h,)), r.normal(size=(h, n)), r.normal(size=(n,)))

    stack = lambda: (dm_layer(), dm_layer(13, d_in=D_OUT, d_out=2, n=2))  # noqa: E731
    for name in ("deep_moe_layer", "deep_moe_layer_gates"):
        register(f"deep_moe.{name}", lambda: {"x": x(), "params": dm_layer()}, valid=free_n)
    register("deep_moe.deep_moe_layer_vjp", lambda: {"x": x(), "params": dm_layer(), "cotangent": y()})
    for name in ("deep_moe", "deep_moe_gates"):
        register(f"deep_moe.{name}", lambda: {"x": x(), "params": stack()}, valid=free_n)
    register("deep_moe.deep_moe_vjp", lambda: {"x": x(), "params": stack(), "cotangent": _rng(14).normal(size=(N, 2))})


T, D_MODEL, E, K, I_FFN = 6, 4, 5, 2, 3  # tokens, model width, experts, routes per token, FFN width


def _ffn_params(seed: int = 20, e: int = E, d: int = D_MODEL, i: int = I_FFN, gated: bool = False):
    from moeref.expert_ffn import ExpertFFNParams

    r = _rng(seed)
    k_in = 2 * i if gated else i
    return ExpertFFNParams(r.normal(size=(e, d, k_in)), r.normal(size=(e, i, d)), r.normal(size=(e, k_in)), r.normal(size=(e, d)))


def _router_params(seed: int = 21, noisy: bool = False):
    from moeref.router import RouterParams

    r = _rng(seed)
    return RouterParams(r.normal(size=(D_MODEL, E)), r.normal(size=(E,)), r.normal(size=(D_MODEL, E)) if noisy else None,
                        0.1 * r.normal(size=(E,)))


def _tokens(seed: int = 22):
    return _rng(seed).normal(size=(T, D_MODEL))


def _routes(k: int = K):
    """Routes after a capacity of 3 (some dropped), positions set."""
    from moeref.capacity import CapacityOptions, apply_capacity
    from moeref.router import RouterOptions, route

    routes = route(_tokens(), _router_params(), RouterOptions(k=k, normalize="sum")).routes
    return apply_capacity(routes, E, CapacityOptions(capacity=3, capacity_factor=None, dropless=False)).routes


FREE_T = {"x:size0+1": "T is free in a forward"}
TRUSTED_OUTPUT = "the forward's own output passed back to skip recomputing it: a cache, trusted (only its type is checked)"


def _register_router_capacity() -> None:
    from moeref.capacity import CapacityDraws, CapacityOptions
    from moeref.router import RouterDraws, RouterOptions, route

    variants = {
        "": (RouterOptions(k=K, normalize="sum"), False, lambda: None),
        "[noisy]": (RouterOptions(k=K, score="topk_softmax", noisy_top_k=True), True,
                    lambda: RouterDraws(noise=_rng(23).normal(size=(T, E)))),
        "[grouped]": (RouterOptions(k=K, score="sigmoid", n_group=1, topk_group=1, normalize="sum_plus_eps", normalize_eps=1e-20,
                                    routed_scaling_factor=2.5), False, lambda: None),
        "[jitter_gumbel_random2nd]": (RouterOptions(k=2, input_jitter=0.01, gumbel="selection", second_expert_policy="random"), False,
                                      lambda: RouterDraws(jitter=_rng(24).uniform(0.99, 1.01, size=(T, D_MODEL)),
                                                          gumbel=_rng(25).gumbel(size=(T, E)),
                                                          second_expert_uniform=_rng(26).uniform(size=(T,)))),
    }
    def with_options(**changes):
        return lambda a: {**a, "options": dataclasses.replace(a["options"], **changes)}

    # option combinations that no system uses: each must be refused, naming an option involved
    combinations = {
        "n_group_without_topk_group": (("n_group", "topk_group"), with_options(n_group=5)),
        "n_group_not_dividing_E": (("n_group",), with_options(n_group=2, topk_group=1)),
        "sum_plus_eps_without_eps": (("normalize_eps",), with_options(normalize="sum_plus_eps")),
        "topk_sigmoid_on_scores": (("selection",), with_options(score="topk_sigmoid", selection="scores")),
        "noisy_without_noise_weight": (("noise_weight",), lambda a: {**with_options(noisy_top_k=True)(a),
                                                                     "draws": RouterDraws(noise=_rng(23).normal(size=(T, E)))}),
        "unused_draws": (("noise", "draws"), lambda a: {**a, "draws": RouterDraws(noise=_rng(23).normal(size=(T, E)))}),
        "gumbel_without_draws": (("gumbel",), with_options(gumbel="selection")),
    }
    for suffix, (opts, noisy, draws) in variants.items():
        good = lambda o=opts, n=noisy, d=draws: {"x": _tokens(), "params": _router_params(noisy=n), "options": o, "draws": d()}
        register(f"router.route{suffix}", good, valid=FREE_T,
                 extra={"k>E": (("k",), with_options(k=E + 1))} | (combinations if not suffix else {}))

        def vjp_good(o=opts, n=noisy, d=draws):
            args = {"x": _tokens(), "params": _router_params(noisy=n), "options": o, "draws": d()}
            out = route(**args)
            return {**args, "output": out, "cotangent_weight": _rng(27).normal(size=(T, o.k))}

        register(f"router.route_weights_vjp{suffix}", vjp_good, skip={"output.*": TRUSTED_OUTPUT},
                 valid={"output:none": "None: the forward is recomputed (documented)"})
    weight = lambda: _rng(28).uniform(0.1, 1.0, size=(T, K))  # noqa: E731
    kept = lambda: _rng(29).uniform(size=(T, K)) > 0.3  # noqa: E731
    for mode, kw in (("sum", {}), ("sum_clamp", {"eps": 1e-6}), ("lp", {"p": 2.0})):
        register(f"router.normalize_route_weights[{mode}]", lambda m=mode, kw=kw: {"weight": weight(), "kept": kept(), "mode": m, **kw},
                 valid={"weight:size0+1": "T is free", "weight:ndim*": "any leading shape", "kept:none": "None: every route kept"})
        register(f"router.normalize_route_weights_vjp[{mode}]",
                 lambda m=mode, kw=kw: {"weight": weight(), "kept": kept(), "mode": m, "cotangent": _rng(30).normal(size=(T, K)), **kw},
                 valid={"kept:none": "None: every route kept"})
    register("router.renormalize_routes", lambda: {"routes": _routes(), "options": RouterOptions(k=K, normalize="sum")},
             valid={"routes.expert_index:*": "carried through unchanged: renormalisation reads weight and kept only",
                    "routes.position:*": "carried through unchanged: renormalisation reads weight and kept only"})

    register("capacity.expert_capacity",
             lambda: {"tokens_per_group": T, "num_experts": E, "k": K, "options": CapacityOptions(capacity_factor=1.25)},
             valid={"extra:k>num_experts": "a formula: k is checked against E by the router, not here"},
             extra={"k>num_experts": (("k", "num_experts"), lambda a: {**a, "k": E + 1})})
    cap = CapacityOptions(capacity=2, capacity_factor=None, dropless=False)
    recomputed = {"routes.position:*": Same("positions are recomputed by apply_capacity")}
    register("capacity.apply_capacity", lambda: {"routes": _routes(), "num_experts": E, "options": cap},
             valid={"routes.*:size0+1": "T is free (all route fields must agree)"} | recomputed,
             extra={"expert_index>=E": (("expert_index", "num_experts"), lambda a: {**a, "num_experts": 2}),
                    "random_priority_without_draws": (("draws", "priority"), lambda a: {
                        **a, "options": dataclasses.replace(a["options"], priority="random")}),
                    "capacity_and_capacity_factor": (("capacity_factor", "capacity"), lambda a: {
                        **a, "options": dataclasses.replace(a["options"], capacity_factor=1.0)})})
    register("capacity.apply_capacity[random]",
             lambda: {"routes": _routes(), "num_experts": E, "options": dataclasses.replace(cap, priority="random"),
                      "draws": CapacityDraws(_rng(31).uniform(size=(T, K)))}, valid=recomputed)
    register("capacity.apply_capacity[batch_prioritized]",
             lambda: {"routes": _routes(), "num_experts": E, "options": dataclasses.replace(cap, priority="batch_prioritized"),
                      "priority": _rng(32).normal(size=(T,))}, valid=recomputed)


def _register_aux_losses() -> None:
    from moeref.aux_losses import (
        DEEPSEEK_V3_SEQUENCE_BALANCE, HF_MIXTRAL, SHAZEER_TENSOR2TENSOR, NoisyTopKDraws)
    from moeref.core import top_k

    logits = lambda seed=33: _rng(seed).normal(size=(T, E))  # noqa: E731
    sel = lambda seed=33: top_k(logits(seed), K)[1]  # noqa: E731
    v = lambda: _rng(34).uniform(0.5, 2.0, size=(E,))  # noqa: E731
    free_e = {"v:size0+1": "E is free", "logits:size1+1": "E is read from logits", "selection:size1+1": "k is free",
              "logits_per_layer*:size1+1": "E is read from logits", "selections*:size1+1": "k is free"}
    register("aux_losses.cv_squared", lambda: {"v": v(), "options": SHAZEER_TENSOR2TENSOR}, valid=free_e)
    register("aux_losses.cv_squared_vjp", lambda: {"v": v(), "cotangent": np.array(1.0), "options": SHAZEER_TENSOR2TENSOR},
             valid=free_e)
    shaz = lambda: {"clean_logits": logits(), "noise_logits": logits(35), "draws": NoisyTopKDraws(_rng(36).normal(size=(T, E))),  # noqa: E731
                    "k": K, "options": SHAZEER_TENSOR2TENSOR}
    k_big = {"k>E": (("k",), lambda a: {**a, "k": E + 1})}
    for name in ("noisy_top_k_gates", "smooth_load", "importance_loss", "load_loss"):
        register(f"aux_losses.{name}", shaz, extra=k_big)
    for name in ("importance_loss_vjp", "load_loss_vjp"):
        register(f"aux_losses.{name}", lambda: {**shaz(), "cotangent": np.array(1.0)}, extra=k_big)
    aux = importlib.import_module("moeref.aux_losses")
    if hasattr(aux, "vmoe_importance_loss"):  # V-MoE losses (being added while this catalogue was written)
        grouped = lambda: {"logits": logits(), "group_size": 3}  # noqa: E731
        register("aux_losses.vmoe_importance_loss", grouped, valid=free_e)
        register("aux_losses.vmoe_importance_loss_vjp", lambda: {**grouped(), "cotangent": np.array(1.0)}, valid=free_e)
        noisy = lambda: {**grouped(), "draws": NoisyTopKDraws(_rng(36).normal(size=(T, E))), "k": K, "noise_std": 1.0}  # noqa: E731
        register("aux_losses.vmoe_load_loss", noisy, valid=free_e, extra=k_big)
        register("aux_losses.vmoe_load_loss_vjp", lambda: {**noisy(), "cotangent": np.array(1.0)}, valid=free_e, extra=k_big)
    mask = lambda: np.array([True, True, False, True, True, True])  # noqa: E731
    register("aux_losses.expert_fractions", lambda: {"selection": sel(), "num_experts": E, "options": HF_MIXTRAL, "mask": mask()},
             valid={"mask:none": "None: no padding", "selection:size0+1": "T is free"} | free_e,
             extra={"selection>=E": (("selection", "num_experts"), lambda a: {**a, "num_experts": 2})})
    register("aux_losses.load_balancing_loss", lambda: {"logits": logits(), "selection": sel(), "options": HF_MIXTRAL, "mask": mask()},
             valid={"mask:none": "None: no padding"} | free_e)
    register("aux_losses.load_balancing_loss_vjp",
             lambda: {"logits": logits(), "selection": sel(), "cotangent": np.array(1.0), "options": HF_MIXTRAL, "mask": mask()},
             valid={"mask:none": "None: no padding"} | free_e)
    layers = lambda: {"logits_per_layer": (logits(), logits(37)), "selections": (sel(), sel(37))}  # noqa: E731
    register("aux_losses.multilayer_load_balancing_loss", layers, valid=free_e)
    register("aux_losses.multilayer_load_balancing_loss_vjp", lambda: {**layers(), "cotangent": np.array(1.0)}, valid=free_e)
    seq = lambda: {"logits": logits(), "selection": sel(), "options": dataclasses.replace(DEEPSEEK_V3_SEQUENCE_BALANCE, sequence_length=3)}  # noqa: E731
    register("aux_losses.sequence_balance_loss", seq, valid=free_e)
    register("aux_losses.sequence_balance_loss_vjp", lambda: {**seq(), "cotangent": np.array(1.0)}, valid=free_e)
    register("aux_losses.router_z_loss", lambda: {"logits": logits(), "mask": mask()}, valid={"mask:none": "None: no padding"} | free_e)
    register("aux_losses.router_z_loss_vjp", lambda: {"logits": logits(), "cotangent": np.array(1.0), "mask": mask()},
             valid={"mask:none": "None: no padding"} | free_e)


def _register_ffn_dispatch_layers() -> None:
    from moeref.capacity import CapacityOptions
    from moeref.expert_ffn import RELU_FFN, SWIGLU
    from moeref.router import RouterOptions
    from moeref.soft_moe import SoftMoEOptions, SoftMoEParams
    from moeref.sparse_moe import SparseMoEOptions, SparseMoEParams

    n = 3  # tokens per expert in the batched form
    for ffn_name, ffn in (("relu", RELU_FFN), ("swiglu", SWIGLU)):
        g = ffn.gated
        register(f"expert_ffn.expert_ffn[{ffn_name}]", lambda f=ffn, g=g: {"x": _tokens(), "params": _ffn_params(gated=g), "ffn": f, "expert": 1},
                 valid=FREE_T, extra={"expert>=E": (("expert",), lambda a: {**a, "expert": E})})
        register(f"expert_ffn.expert_ffn_vjp[{ffn_name}]",
                 lambda f=ffn, g=g: {"x": _tokens(), "params": _ffn_params(gated=g), "ffn": f, "cotangent": _rng(40).normal(size=(T, D_MODEL)), "expert": 1},
                 extra={"expert>=E": (("expert",), lambda a: {**a, "expert": E})})
        xb = lambda: _rng(41).normal(size=(E, n, D_MODEL))  # noqa: E731
        register(f"expert_ffn.batched_expert_ffn[{ffn_name}]", lambda f=ffn, g=g: {"x": xb(), "params": _ffn_params(gated=g), "ffn": f},
                 valid={"x:size1+1": "tokens per expert are free"})
        register(f"expert_ffn.batched_expert_ffn_vjp[{ffn_name}]",
                 lambda f=ffn, g=g: {"x": xb(), "params": _ffn_params(gated=g), "ffn": f, "cotangent": _rng(42).normal(size=(E, n, D_MODEL))})
        register(f"expert_ffn.check_expert_ffn_params[{ffn_name}]",
                 lambda f=ffn, g=g: {"params": _ffn_params(gated=g), "ffn": f, "d": D_MODEL, "name": "params"},
                 skip={"name:*": "the argument name used in the message"},
                 valid={"params.*:nan": "a shape check", "params.*:inf": "a shape check",
                        "params.*:float32": "a shape check (dtypes: the caller's check_arrays)",
                        "params.*:torch": "a shape check (libraries: the caller's check_arrays)"})

    disp = lambda: {"x": _tokens(), "routes": _routes(), "experts": _ffn_params(), "ffn": RELU_FFN}  # noqa: E731
    unread_pos = {"routes.position:too_large": Same("the sorted dispatch does not read positions"),
                  "routes.position:negative": Same("the sorted dispatch does not read positions")}
    register("dispatch.dispatch_combine", disp, valid=FREE_T | unread_pos)
    register("dispatch.dispatch_combine[input_weight]", lambda: {**disp(), "apply_weight_to": "input"}, valid=unread_pos)
    register("dispatch.dispatch_combine_vjp", lambda: {**disp(), "cotangent": _rng(43).normal(size=(T, D_MODEL))}, valid=unread_pos)
    register("dispatch.dispatch_combine_value_and_vjp", lambda: {**disp(), "cotangent": _rng(43).normal(size=(T, D_MODEL))}, valid=unread_pos)
    register("dispatch.dense_dispatch_tensors", lambda: {"routes": _routes(), "num_experts": E, "capacity": 3},
             valid={"routes.*:size0+1": "T is free (all route fields must agree)"})
    register("dispatch.dense_dispatch_combine", lambda: {**disp(), "capacity": 3})

    def sparse_params():
        from moeref.router import RouterParams

        r = _router_params()
        return SparseMoEParams(RouterParams(r.weight, r.bias), _ffn_params(), None)

    sopts = SparseMoEOptions(router=RouterOptions(k=K, normalize="sum"), capacity=CapacityOptions(capacity=3, capacity_factor=None, dropless=False),
                             load_balancing_coef=0.01, z_loss_coef=0.001)
    register("sparse_moe.sparse_moe_layer", lambda: {"x": _tokens(), "params": sparse_params(), "options": sopts}, valid=FREE_T,
             extra={"k>E": (("k",), lambda a: {**a, "options": dataclasses.replace(sopts, router=dataclasses.replace(sopts.router, k=E + 1))})})
    register("sparse_moe.sparse_moe_layer_vjp",
             lambda: {"x": _tokens(), "params": sparse_params(), "options": sopts, "cotangent_y": _rng(44).normal(size=(T, D_MODEL))})
    register("sparse_moe.sparse_moe_layer_value_and_vjp",
             lambda: {"x": _tokens(), "params": sparse_params(), "options": sopts, "cotangent_y": _rng(44).normal(size=(T, D_MODEL))})

    def soft_params():
        r = _rng(45)
        return SoftMoEParams(r.normal(size=(D_MODEL, E, 2)), _ffn_params(), np.array(1.0), None, None)

    soft = SoftMoEOptions(slots_per_expert=2, ffn=RELU_FFN)
    register("soft_moe.soft_moe_layer", lambda: {"x": _tokens(), "params": soft_params(), "options": soft},
             valid=FREE_T | {"x:ndim+1": "x of shape (B, m, d) is documented"})
    register("soft_moe.soft_moe_layer_vjp",
             lambda: {"x": _tokens(), "params": soft_params(), "options": soft, "cotangent_y": _rng(46).normal(size=(T, D_MODEL))})
    register("soft_moe.soft_moe_slots", lambda: {"num_tokens": T, "num_experts": E, "capacity_factor": 1.0})
    for name in ("vmoe", "soft_moe_pytorch"):
        register(f"soft_moe.{name}", lambda: {"normalization": "l2"}, call=getattr(importlib.import_module("moeref.soft_moe"), name))


N_EM = 8  # samples in the EM fits (max_iter small: a few ms each)


def _em_options():
    from moeref.em import EMOptions

    return EMOptions(max_iter=3, warn_not_converged=False)


GENERATOR = {"generator:*": "a NumPy Generator, not an array"}


def _register_em() -> None:
    from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
    from moeref.hierarchical_moe import HMEParams, hme_posteriors
    from moeref.experts import LinearExpertsParams
    from moeref.hme_em import HMEFitParams
    from moeref.moe_em import MoEParams
    from moeref.regression_mixture import RegressionMixtureParams, with_intercept
    from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams

    r = lambda: _rng(50)  # noqa: E731
    x_em = lambda: r().normal(size=(N_EM, D_IN))  # noqa: E731
    y_em = lambda: _rng(51).normal(size=(N_EM, 1))  # noqa: E731

    # Regression mixtures (mixtools regmixEM): design with intercept, y of shape (N,)
    xr = lambda: with_intercept(_rng(52).normal(size=(N_EM, 1)))  # noqa: E731
    yr = lambda: _rng(53).normal(size=(N_EM,))  # noqa: E731
    pr = lambda: RegressionMixtureParams(np.array([[0.5, -0.5], [1.0, -1.0]]), np.array([1.0, 0.5]), np.array([0.4, 0.6]))  # noqa: E731
    register("regression_mixture.with_intercept", lambda: {"x": _rng(52).normal(size=(N_EM, 1))},
             valid={"x:ndim-1": "a 1-D x of shape (N,) is one regressor (documented)", "x:size*": ANY_SHAPE})
    for name in ("regression_mixture_log_joint", "regression_mixture_loglik", "regression_mixture_posteriors",
                 "regression_mixture_e_step"):
        register(f"regression_mixture.{name}", lambda: {"x": xr(), "y": yr(), "params": pr()})
    register("regression_mixture.regression_mixture_loglik_vjp",
             lambda: {"x": xr(), "y": yr(), "params": pr(), "cotangent": _rng(54).normal(size=(N_EM,))})
    tau = lambda: np.column_stack([np.linspace(0.1, 0.9, N_EM), 1 - np.linspace(0.1, 0.9, N_EM)])  # noqa: E731
    collinear = {"x:size1+1": Expected("a duplicated design column is singular: SingularWeightedLeastSquaresError")}
    register("regression_mixture.regression_mixture_m_step", lambda: {"x": xr(), "y": yr(), "responsibilities": tau()},
             valid=collinear | {"responsibilities:size1+1": "K is read from the responsibilities"})
    register("regression_mixture.regression_mixture_n_free_parameters", lambda: {"n_regressors": 2, "n_components": 2})
    register("regression_mixture.regression_mixture_random_starts",
             lambda: {"x": xr(), "y": yr(), "n_components": 2, "generator": np.random.default_rng(0), "n_starts": 2}, skip=GENERATOR,
             valid=collinear)
    register("regression_mixture.fit_regression_mixture", lambda: {"x": xr(), "y": yr(), "init": pr(), "options": _em_options()})

    # Generic MoE EM: softmax gate, isotropic linear-Gaussian experts
    gate, experts = SoftmaxGate(), LinearGaussianExperts(covariance="isotropic")
    mp = lambda: MoEParams(SoftmaxGateParams(np.zeros((D_IN, 2)), np.zeros(2)),  # noqa: E731
                           LinearGaussianExpertsParams(_rng(55).normal(size=(2, D_IN, 1)), _rng(56).normal(size=(2, 1)), np.ones(2)))
    fam = lambda: {"x": x_em(), "y": y_em(), "gate": gate, "experts": experts}  # noqa: E731
    families = {"gate[.:]*": "a family object (frozen dataclass of fitting options), checked by its own module",
                "experts[.:]*": "a family object (frozen dataclass of fitting options), checked by its own module"}
    for name in ("moe_log_joint", "moe_log_likelihood", "moe_posteriors", "moe_e_step"):
        register(f"moe_em.{name}", lambda: {**fam(), "params": mp()}, skip=families)
    register("moe_em.moe_log_likelihood_vjp", lambda: {**fam(), "params": mp(), "cotangent": _rng(57).normal(size=(N_EM,))}, skip=families)
    register("moe_em.moe_m_step", lambda: {**fam(), "params": mp(), "responsibilities": tau()}, skip=families)
    counts = {f"params.*:{m}": "a count from shapes: values, dtypes and libraries are not read"
              for m in ("int", "bool", "float32", "nan", "inf", "torch")}
    register("moe_em.moe_n_free_parameters", lambda: {"gate": gate, "experts": experts, "params": mp()}, skip=families,
             valid=counts | {"params.experts.bias:*": Same("the count reads the weight and cov shapes only"),
                             "params.gate.weight:size0+1": "a gate for wider inputs has more parameters: the count follows the shapes",
                             "params.experts.cov:*": "the count of isotropic covariances is K (cov is not read)",
                             "params.experts.weight:size*": "a bigger model has more parameters: the count follows the shapes"})
    register("moe_em.moe_penalty", lambda: {"gate": gate, "experts": experts, "params": mp()}, skip=families,
             valid={"params.experts*": Same("the penalty reads the gate only (the experts have none)"),
                    "params.gate.weight:size0+1": "a gate for wider inputs: its penalty is well defined"})
    register("moe_em.moe_random_starts",
             lambda: {**fam(), "template": mp(), "generator": np.random.default_rng(0), "n_starts": 2}, skip=families | GENERATOR)
    register("moe_em.fit_moe", lambda: {**fam(), "init": mp(), "options": _em_options()}, skip=families)
    register("moe_em.fit_moe_gradient", lambda: {**fam(), "init": mp(), "learning_rate": 0.01, "options": _em_options()}, skip=families)

    # HME EM: a depth-1 tree with two experts
    def hp():
        q = _rng(58)
        return HMEParams((np.zeros((1, D_IN, 2)),), (np.zeros((1, 2)),),
                         LinearExpertsParams(q.normal(size=(2, D_IN, 1)), q.normal(size=(2, 1))))

    hm = lambda: {"x": x_em(), "y": y_em()}  # noqa: E731
    register("hme_em.hme_e_step", lambda: {**hm(), "params": hp(), "variance": 0.5})
    singular = {"x:size1+1": Expected("a duplicated input column is singular: SingularWeightedLeastSquaresError")}
    unread = Same("the M-step does not read the likelihood fields of the posteriors (documented)")
    register("hme_em.hme_m_step", lambda: {**hm(), "state": HMEFitParams(hp(), 0.5),
                                            "posteriors": hme_posteriors(x_em(), y_em(), hp(), variance=0.5)},
             valid=singular | {"posteriors.log_likelihood:*": unread, "posteriors.log_node_likelihoods*": unread})
    register("hme_em.hme_random_starts", lambda: {**hm(), "template": hp(), "generator": np.random.default_rng(0), "n_starts": 2},
             skip=GENERATOR, valid=singular | {"template.experts.*": Same("the starts fit the experts: the template's values are not read")})
    register("hme_em.fit_hme", lambda: {**hm(), "init": hp(), "variance": 0.5, "options": _em_options()})
    register("hme_em.hme_penalty", lambda: {"params": hp(), "gate": SoftmaxGate(ridge=0.1)},
             skip={"gate[.:]*": "a family object, checked by its own module"},
             valid={"params.experts*": Same("the penalty reads the gates only")})
    register("hme_em.hme_n_free_parameters", lambda: {"params": hp()},
             valid={f"params.*:{m}": "a count from shapes" for m in ("float32", "nan", "inf", "torch")})


def _defaults(fn: Callable) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def _register_presets() -> None:
    from moeref import presets

    for name in ("mixtral", "switch", "deepseek_v3", "qwen2_moe", "olmoe", "gpt_oss", "llama4", "dbrx", "gshard_top2",
                 "fairseq_top2", "deepspeed_top1", "deepspeed_top2", "deepspeed_topk", "shazeer2017", "vmoe"):
        register(f"presets.{name}", lambda f=getattr(presets, name): _defaults(f),
                 valid={"n_shared_experts:0": "no shared expert is a valid configuration"},
                 extra={"unknown_keyword": (("bogus_keyword",), lambda a: {**a, "bogus_keyword": 1})})
    register("presets.deepspeed_capacity", lambda: {"num_tokens": T, "num_experts": E, "capacity_factor": 1.0, "k": 2, "min_capacity": 4})
    register("presets.preset_source", lambda: {"name": "mixtral"})
    register("presets.conventions_table", lambda: {"presets": {"mixtral": presets.mixtral()}, "detailed": False})
    register("presets.options_from_column", lambda: {"column": {"router.k": "2"}})


def _register_stable_extras() -> None:
    """Modules outside the required list (special functions, EM helpers, gates)."""
    from moeref.softmax_gate import SoftmaxGate  # noqa: F401  (import check)

    pos = {"x:ndim*": ANY_SHAPE, "x:size*": ANY_SHAPE}
    pos |= {"x:nan": PROPAGATES, "x:inf": "lgamma(inf) = inf and digamma(inf) = inf are the limits"}
    register("special.lgamma", lambda: {"x": np.array([0.5, 1.0, 3.5, 10.0])}, valid=pos)
    register("special.digamma", lambda: {"x": np.array([0.5, 1.0, 3.5, 10.0])}, valid=pos)
    xs = lambda: _rng(60).normal(size=(N_EM, D_IN))  # noqa: E731
    tg = lambda: np.column_stack([np.linspace(0.1, 0.9, N_EM), 1 - np.linspace(0.1, 0.9, N_EM)])  # noqa: E731
    wmn = lambda: {"x": xs(), "targets": tg(), "sample_weight": np.ones(N_EM), "weight": np.zeros((D_IN, 2)), "bias": np.zeros(2)}  # noqa: E731
    unit = {"sample_weight:none": "None: unit observation weights (documented)"}
    register("softmax_gate.weighted_multinomial_objective", wmn, valid=unit)
    register("softmax_gate.fit_weighted_multinomial", lambda: {**wmn(), "max_iter": 5}, valid=unit)
    register("glm_experts.class_targets", lambda: {"labels": np.array([0, 2, 1, 1]), "n_classes": 3},
             valid={"labels:size0+1": "N is free"})
    register("em_init.random_responsibilities", lambda: {"draws": np.linspace(0.05, 0.95, N_EM), "n_components": 2},
             valid={"draws:size0+1": "N is free"})
    register("em.entropy", lambda: {"responsibilities": tg()}, valid={"responsibilities:size*": "N and K are free"})
    register("em.check_nonempty_components", lambda: {"weights": tg(), "min_weight": 1e-8},
             valid={"weights:int": Expected("the cast weights are all 0: EmptyComponentError is the right answer"),
                    "weights:size*": "N and K are free"})
    register("weighted_lstsq.design_matrix", lambda: {"x": xs()}, valid={"x:size*": ANY_SHAPE})
    register("weighted_lstsq.weighted_least_squares",
             lambda: {"design": with_ones(xs()), "y": _rng(61).normal(size=(N_EM, 1)), "weights": tg()},
             valid={"y:size1+1": "D is free", "weights:size1+1": "K is free",
                    "design:size1+1": Expected("a duplicated column is singular: SingularWeightedLeastSquaresError"),
                    "weights:int": Expected("the cast weights are all 0: SingularWeightedLeastSquaresError")})



def _register_finished() -> None:
    """Modules finished after the catalogue was first written: hash routing, expert choice, BASE layers and
    their balanced assignment, REINFORCE routing, upcycling, the covariance structures, EM initialisation
    and the weighted least squares (soft_moe is registered with the sparse layers above)."""
    from moeref.balanced_assignment import AuctionOptions
    from moeref.base_layer import BaseLayerOptions, BaseLayerParams
    from moeref.expert_choice import ExpertChoiceOptions, ExpertChoiceParams
    from moeref.expert_ffn import RELU_FFN
    from moeref.router import RouterParams
    from moeref.upcycling import RouterInit

    V = 7  # vocabulary of the hash routes
    ids = lambda: np.array([0, 3, 6, 3, 1, 5])  # noqa: E731  (T token ids)
    table = lambda: np.array([0, 1, 4, 2, 3, 1, 0])  # noqa: E731  (V,) expert of each id
    register("hash_routing.random_hash_table", lambda: {"vocab_ids": np.arange(V), "num_experts": E, "seed": 3, "layer": 1},
             valid={"vocab_ids:ndim+1": ANY_SHAPE, "vocab_ids:size0+1": "any ids may be hashed (a repeated id hashes the same)",
                    "vocab_ids:too_large": "any id in [0, 2^32) is hashed", "seed:0": "0 is a seed", "layer:0": "layer 0 is the first"})
    register("hash_routing.balanced_hash_table", lambda: {"counts": np.array([5.0, 9.0, 1.0, 4.0, 4.0, 0.0, 2.0]), "num_experts": E},
             valid={"counts:size0+1": "V is free", "counts:int": "integer counts are counts"})
    register("hash_routing.hash_routes", lambda: {"token_ids": ids(), "table": table(), "num_experts": E},
             valid={"token_ids:size0+1": "T is free", "table:size0+1": "V is free (a bigger vocabulary)"})
    hl = lambda: {"x": _tokens(), "token_ids": ids(), "table": table(), "experts": _ffn_params(), "ffn": RELU_FFN}  # noqa: E731
    register("hash_routing.hash_layer", hl, valid=FREE_T | {"table:size0+1": "V is free (a bigger vocabulary)"})
    register("hash_routing.hash_layer_vjp", lambda: {**hl(), "cotangent": _rng(70).normal(size=(T, D_MODEL))},
             valid={"table:size0+1": "V is free (a bigger vocabulary)"})

    ec_opts = ExpertChoiceOptions(capacity_factor=1.0, min_capacity=0, ffn=RELU_FFN)
    ec_params = lambda: ExpertChoiceParams(_rng(71).normal(size=(D_MODEL, E)), _ffn_params(), _rng(72).normal(size=(E,)))  # noqa: E731
    register("expert_choice.expert_choice_capacity", lambda: {"tokens_per_group": T, "num_experts": E, "options": ec_opts})
    register("expert_choice.expert_choice_routes", lambda: {"scores": core_softmax(_rng(73).normal(size=(T, E))), "capacity": 2},
             valid={"scores:size*": "T and E are free"})
    register("expert_choice.expert_choice_layer", lambda: {"x": _tokens(), "params": ec_params(), "options": ec_opts}, valid=FREE_T)
    register("expert_choice.expert_choice_layer_vjp",
             lambda: {"x": _tokens(), "params": ec_params(), "options": ec_opts, "cotangent": _rng(74).normal(size=(T, D_MODEL))})

    T_BAL = 6  # tokens: a multiple of the 3 experts of the balanced problems
    aff = lambda: _rng(75).normal(size=(T_BAL, 3))  # noqa: E731
    register("balanced_assignment.balanced_assignment", lambda: {"affinities": aff(), "options": AuctionOptions()},
             valid={"affinities:size1+1": Expected("T=6 tokens over 4 experts is not balanced: the error says T % E"),
                    "affinities:size0+1": Expected("T=7 tokens over 3 experts is not balanced: the error says T % E")})
    assigned = lambda: np.array([0, 1, 2, 0, 1, 2])  # noqa: E731
    register("balanced_assignment.assignment_value", lambda: {"affinities": aff(), "expert_index": assigned()},
             valid={"affinities:size1+1": "E is free (the indices stay in range)"})
    register("balanced_assignment.dual_bound", lambda: {"affinities": aff(), "prices": np.array([0.1, -0.2, 0.3])})
    register("balanced_assignment.positions_in_expert", lambda: {"expert_index": assigned(), "num_experts": 3},
             valid={"expert_index:size0+1": "T is free"})

    base_params = lambda: BaseLayerParams(_rng(76).normal(size=(E, D_MODEL)), _ffn_params())  # noqa: E731
    base_opts = BaseLayerOptions()
    T_BASE = 10  # a multiple of E for the balanced (training) assignment
    xb = lambda: _rng(77).normal(size=(T_BASE, D_MODEL))  # noqa: E731
    register("base_layer.base_layer", lambda: {"x": xb(), "params": base_params(), "options": base_opts})
    register("base_layer.base_layer[eval]", lambda: {"x": _tokens(), "params": base_params(), "options": base_opts, "training": False},
             valid=FREE_T)
    register("base_layer.base_layer_vjp",
             lambda: {"x": xb(), "params": base_params(), "options": base_opts, "cotangent": _rng(78).normal(size=(T_BASE, D_MODEL))})

    rp = lambda: RouterParams(_rng(79).normal(size=(D_MODEL, E)), _rng(80).normal(size=(E,)))  # noqa: E731
    logits = lambda: _rng(81).normal(size=(T, E))  # noqa: E731
    action = lambda: np.array([0, 4, 2, 2, 1, 3])  # noqa: E731
    reward = lambda: _rng(82).normal(size=(T,))  # noqa: E731
    register("reinforce.policy_logits", lambda: {"x": _tokens(), "params": rp()}, valid=FREE_T)
    free_e = {"logits:size1+1": "E is free (the actions stay in range)"}
    register("reinforce.sample_policy", lambda: {"logits": logits(), "uniform": _rng(83).uniform(size=(T,))}, valid=free_e)
    register("reinforce.reinforce_logits_gradient",
             lambda: {"logits": logits(), "action": action(), "reward": reward(), "baseline": np.full(T, 0.1)},
             valid={"baseline:none": "None: no baseline (documented)"} | free_e)
    register("reinforce.reinforce_gradient",
             lambda: {"x": _tokens(), "params": rp(), "action": action(), "reward": reward(), "baseline": np.full(T, 0.1)},
             valid={"baseline:none": "None: no baseline (documented)"})
    register("reinforce.expected_reward", lambda: {"logits": logits(), "rewards": _rng(84).normal(size=(T, E))})
    register("reinforce.expected_reward_vjp",
             lambda: {"logits": logits(), "rewards": _rng(84).normal(size=(T, E)), "cotangent": np.array(1.0)})

    dense = lambda: _ffn_params(e=1)._replace(w_in=_rng(85).normal(size=(D_MODEL, I_FFN)), w_out=_rng(86).normal(size=(I_FFN, D_MODEL)),  # noqa: E731
                                               b_in=_rng(87).normal(size=(I_FFN,)), b_out=_rng(88).normal(size=(D_MODEL,)))
    draws = lambda: np.clip(_rng(89).normal(size=(D_MODEL, E)), -2, 2)  # noqa: E731
    register("upcycling.upcycle", lambda: {"dense": dense(), "num_experts": E, "ffn": RELU_FFN, "router_draws": draws(),
                                           "router_init": RouterInit()})

    def up_ct():
        from moeref.upcycling import upcycle

        return upcycle(dense(), E, RELU_FFN, draws(), router_init=RouterInit())

    register("upcycling.upcycle_vjp", lambda: {"dense": dense(), "num_experts": E, "ffn": RELU_FFN, "router_draws": draws(),
                                               "cotangent": up_ct(), "router_init": RouterInit()},
             valid={"cotangent.*:none": "a None cotangent field counts as 0 (documented)"})
    # covariance structures: K=2 components, N=5 residuals of D=2 outputs
    from moeref import gaussian_covariance as gc

    r3 = lambda: _rng(90).normal(size=(2, 5, 2))  # noqa: E731
    chol = lambda: np.array([[[1.0, 0.0], [0.3, 0.8]], [[0.9, 0.0], [-0.2, 1.1]]])  # noqa: E731
    stored = {"full": chol, "diagonal": lambda: np.array([[1.0, 0.5], [2.0, 0.7]]), "isotropic": lambda: np.array([1.0, 0.4])}
    for st, cov in stored.items():
        register(f"gaussian_covariance.check_cov[{st}]", lambda c=cov, st=st: {"cov": c(), "structure": st, "n_cov": 2, "D": 2, "name": "cov"},
                 skip=META | {"n_cov:*": "describes the check"})
        free_r = {"r:size1+1": "N is free", **({"r:size2+1": "D is free (an isotropic cov does not fix it)"} if st == "isotropic" else {})}
        register(f"gaussian_covariance.residual_log_density[{st}]", lambda c=cov, st=st: {"structure": st, "cov": c(), "r": r3()},
                 valid=free_r)
        register(f"gaussian_covariance.residual_log_density_vjp[{st}]",
                 lambda c=cov, st=st: {"structure": st, "cov": c(), "r": r3(), "cotangent": _rng(91).normal(size=(2, 5))},
                 valid={k: v for k, v in free_r.items() if k != "r:size1+1"})
        register(f"gaussian_covariance.cov_matrices[{st}]", lambda c=cov, st=st: {"structure": st, "cov": c(), "D": 2},
                 valid={"cov:size0+1": "K' is free", "D:*": Same("isotropic: D is only the size of the identity")} if st == "isotropic"
                 else {"cov:size0+1": "K' is free"})
        register(f"gaussian_covariance.cov_unconstrained[{st}]", lambda c=cov, st=st: {"structure": st, "cov": c()},
                 valid={"cov:size*": "K' and D are free"})
        free = lambda c=cov, st=st: gc.cov_unconstrained(st, c())  # noqa: E731
        register(f"gaussian_covariance.cov_constrained[{st}]", lambda f=free, st=st: {"structure": st, "free": f()},
                 valid={"free:size0+1": "K' is free", **({"free:size1+1": "D is free"} if st == "diagonal" else {})})
        register(f"gaussian_covariance.cov_constrained_vjp[{st}]",
                 lambda f=free, st=st: {"structure": st, "free": f(), "cov_bar": _rng(92).normal(size=f().shape)})
        register(f"gaussian_covariance.weighted_cov_mle[{st}]",
                 lambda st=st: {"structure": st, "r": r3(), "weights": _rng(93).uniform(0.2, 1.0, size=(5, 2)), "tied": False,
                                "factor": 1.0, "min_sigma": 1e-8},
                 valid={} if st == "full" else {"r:size2+1": "D is free"})
    register("gaussian_covariance.cov_count", lambda: {"structure": "full", "D": 3})
    register("gaussian_covariance.cov_from_matrices",
             lambda: {"structure": "full", "sigma": gc.cov_matrices("full", chol(), 2)},
             valid={"sigma:size0+1": "K' is free"})

    # EM initialisation and helpers
    like = lambda: np.zeros((N_EM, 1))  # noqa: E731
    register("em_init.draw_uniforms", lambda: {"generator": np.random.default_rng(0), "n_samples": N_EM, "like": like()},
             skip=GENERATOR, valid={"like:*": "only the namespace, dtype and device of like are read"})
    register("em_init.random_starts",
             lambda: {"generator": np.random.default_rng(0), "n_starts": 2, "m_step": lambda tau: tau, "n_components": 2,
                      "like": like()},
             skip=GENERATOR, valid={"like:*": "only the first axis, namespace, dtype and device of like are read"})
    register("weighted_lstsq.split_coefficients", lambda: {"theta": _rng(94).normal(size=(2, 3, 1)), "d": 2},
             valid={"theta:size0+1": "K is free", "theta:size2+1": "D is free", "theta:nan": PROPAGATES, "theta:inf": PROPAGATES})
    register("gaussian_gate.gaussian_gate_params",
             lambda: {"weights": np.array([0.4, 0.6]), "means": _rng(95).normal(size=(2, 3)), "cov": np.array([1.0, 0.5])},
             valid={"means:size1+1": "d is free with an isotropic cov"})
    register("em.first_true", lambda: {"flags": np.array([False, True, True])}, valid={"flags:size0+1": "any length"})
    register("em.check_nonnegative_float", lambda: {"value": 0.5, "name": "value"}, skip=META)
    register("em.information_criteria", lambda: {"loglik": -10.0, "n_free_parameters": 3, "n_samples": 20, "entropy_value": 0.5},
             valid={"loglik:-1": "any real log-likelihood", "n_free_parameters:0": "a model without free parameters"})
    register("em.aitken_limit", lambda: {"l0": -12.0, "l1": -11.0, "l2": -10.5},
             valid={"l*:-1": "any real log-likelihood",
                    "l*:nan": "None: the extrapolation is undefined there (documented; run_em refuses a NaN log-likelihood first)"})
    for name in ("stopping_rule_met", "find_loglik_decreases", "check_loglik_trace"):
        NOT_APPLICABLE[f"em.{name}"] = "host-side rules over a Python sequence of floats (exercised through every fit_* entry)"
    for name in ("run_em", "run_restarts"):
        NOT_APPLICABLE[f"em.{name}"] = "drivers over caller callables (exercised through every fit_* entry)"


SHARED_KINDS = {  # kind -> (gate width, gate bias?, budget): one entry per system family
    "add": (0, False, None),  # DeepSeek-V2 / V3
    "sigmoid_gate": (1, False, None),  # Qwen2-MoE: a bias-free gate
    "residual_softmax": (2, True, None),  # DeepSpeed Residual MoE
    "nllb_cmr": (1, True, 0.3),  # NLLB-200 CMR with its budget loss
}
VECTORS_CASE = "sparse_moe.mixtral.T1-d4-I6-E8.float64"  # the smallest sparse-layer case
_VECTORS: list = []  # [folder]: generated once per process, in a temporary directory


def vectors_folder() -> str:
    """A vectors folder holding `VECTORS_CASE` only (written on first use, removed at exit)."""
    if not _VECTORS:
        import atexit
        import shutil
        import tempfile

        from moeref.vectors.generate import generate

        folder = tempfile.mkdtemp(prefix="moeref-catalogue-vectors-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        generate(folder, only=[VECTORS_CASE])
        _VECTORS.append(folder)
    return _VECTORS[0]


MISMATCH = Expected("a mismatch is reported as AssertionError, the function's purpose")
ARRAY_LIKE = "array-likes are read through np.asarray, torch tensors are documented: equal values pass"
EQUAL_WITHIN = "float32 rounding is within the tolerance: the comparison passes, its purpose"


def _register_routes_shared_testing() -> None:
    """The Routes record check, the shared experts and the test-suite helpers of moeref.testing."""
    from moeref.expert_ffn import RELU_FFN
    from moeref.shared_experts import SharedExpertOptions, SharedExpertParams

    register("routes.check_routes", lambda: {"routes": _routes(), "name": "routes"}, skip=META,
             valid={f"routes.*:{m}": "only 'every field is an array of one library' is checked (documented: shapes and dtypes are the caller's)"
                    for m in ("ndim*", "size*", "int", "float", "bool", "float32", "nan", "inf", "too_large", "negative")})

    x = lambda: _tokens(60)  # noqa: E731
    routed = lambda: _rng(61).normal(size=(T, D_MODEL))  # noqa: E731
    for kind, (width, bias, budget) in SHARED_KINDS.items():
        opts = SharedExpertOptions(kind, RELU_FFN, budget=budget, budget_loss_coef=0.0 if budget is None else 0.1)

        def params(width=width, bias=bias):
            r = _rng(62)
            return SharedExpertParams(_ffn_params(63, e=2), r.normal(size=(D_MODEL, width)) if width else None,
                                      r.normal(size=(width,)) if bias else None)

        good = lambda p=params, o=opts: {"x": x(), "routed_y": routed(), "params": p(), "options": o}  # noqa: E731
        register(f"shared_experts.combine_shared_experts[{kind}]", good, valid=FREE_T | {"routed_y:size0+1": "checked against x (either may be named)"})
        vjp = lambda g=good: {**g(), "cotangent": _rng(64).normal(size=(T, D_MODEL)), "budget_cotangent": 0.5}  # noqa: E731
        register(f"shared_experts.combine_shared_experts_vjp[{kind}]", vjp, valid={"budget_cotangent:-1": "any finite real cotangent"})

    register("testing.load_case", lambda: {"folder": vectors_folder(), "name": VECTORS_CASE})
    register("testing.load_cases", lambda: {"folder": vectors_folder(), "pattern": "mixtral"})

    def case():
        from moeref.testing import load_case

        return load_case(vectors_folder(), VECTORS_CASE)

    def arrays(*names):
        c = case()
        return [c[n].copy() for n in names]

    close = {"*:ndim*": MISMATCH, "*:size*": MISMATCH, "*:int": MISMATCH, "*:bool": MISMATCH, "*:nan": MISMATCH, "*:inf": MISMATCH,
             "*:list": ARRAY_LIKE, "*:torch": ARRAY_LIKE, "*:float32": EQUAL_WITHIN}
    register("testing.assert_moe_close", lambda: {"actual": case()["outputs/y"], "expected": case(), "name": "outputs/y"},
             valid=close, errors=(AssertionError,))
    register("testing.assert_moe_close[array]",
             lambda: dict(zip(("actual", "expected"), arrays("outputs/y", "outputs/y"))) | {"rtol": 1e-6, "atol": 1e-9, "dtype": "float64"},
             valid=close, errors=(AssertionError,))
    routing = {"*:too_large": MISMATCH, "*:negative": MISMATCH, "*:list": ARRAY_LIKE, "*:torch": ARRAY_LIKE,
               "scores:inf": "an infinite score is a value (-inf marks a masked expert); every token matches",
               "scores:size1+1": "E is free (the scores only measure near ties)"}
    register("testing.assert_routing_equal", lambda: {"actual": case()["outputs/routes/expert_index"], "expected": case()},
             valid=routing, errors=(AssertionError,))
    register("testing.assert_routing_equal[array]",
             lambda: dict(zip(("actual", "expected", "scores"),
                              arrays("outputs/routes/expert_index", "outputs/routes/expert_index", "outputs/selection_scores")))
             | {"k": 2, "dtype": "float64", "max_report": 3},
             valid=routing, errors=(AssertionError,))


def with_ones(x: np.ndarray) -> np.ndarray:
    return np.column_stack([x, np.ones(len(x))])


def register_all() -> None:
    _register_core()
    _register_validation()
    _register_gates_experts_mixture()
    _register_classical_dense()
    _register_router_capacity()
    _register_aux_losses()
    _register_ffn_dispatch_layers()
    _register_em()
    _register_presets()
    _register_stable_extras()
    _register_finished()
    _register_routes_shared_testing()


def core_softmax(x: np.ndarray) -> np.ndarray:
    from moeref.core import softmax

    return softmax(x)


register_all()


def compact(verdicts: list[Verdict]) -> str:
    """Failures per entry, one line each: ``entry: s=[...] u=[...] d=[...]``."""
    by: dict[str, dict[str, list[str]]] = {}
    for v in verdicts:
        if v.outcome in FAILURES:
            by.setdefault(v.entry, {}).setdefault(v.outcome[0], []).append(v.mutation)
    return "\n".join(f"{e}: " + " ".join(f"{o}={m}" for o, m in d.items()) for e, d in by.items())


if __name__ == "__main__":
    import sys

    for e in CATALOGUE.values():
        try:
            good_call(e)
        except Exception as exc:  # noqa: BLE001
            print(f"BROKEN GOOD CALL {e.qualname}: {type(exc).__name__}: {exc}")
    everything = [v for e in CATALOGUE.values() for v in run_entry(e)]
    if "-c" in sys.argv:
        print(compact(everything))
    for v in everything:
        if "-c" in sys.argv:
            break
        if v.outcome in FAILURES + ("xfail",) or "-v" in sys.argv:
            print(f"{v.outcome:8} {v.entry}[{v.mutation}] {v.detail[:200]}")
    print(summary(everything))
