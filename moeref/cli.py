"""The ``moeref`` command line."""

from __future__ import annotations

import sys

import click

from ._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="moeref")
def main() -> None:
    """moeref: the reference implementation Mixture-of-Experts code is checked against.

    Every formulation is written once in array-API math and runs on NumPy, array-api-strict,
    PyTorch, JAX and CuPy arrays alike.
    """


@main.command()
def info() -> None:
    """Print the version, the array backends usable here, and the formulations."""
    from .backends import BACKEND_NAMES, get_backend
    from .vectors.cases import FORMULATIONS, preset_names

    click.echo(f"moeref {__version__}")
    click.echo("backends:")
    for name in BACKEND_NAMES:
        b = get_backend(name)
        status = "available" if b.available() else f"unavailable ({b.reason_unavailable()})"
        click.echo(f"  {name:<28} {status}")
    click.echo("formulations (golden vectors, `moeref check --formulation NAME`):")
    for f in FORMULATIONS.values():
        click.echo(f"  {f.name:<28} {f.summary}")
        presets = preset_names(f.name)
        if presets:
            click.echo(f"  {'':<28} presets: {', '.join(presets)}")


@main.command()
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="Backend to check (repeatable); default: every available one.",
)
@click.option("--only", default=None, help="Only formulations whose name contains this text.")
@click.option("--seed", default=0, show_default=True, help="Seed of the NumPy generator that draws the inputs.")
def selfcheck(backends: tuple[str, ...], only: str | None, seed: int) -> None:
    """Run every formulation on every backend and check it.

    For each formulation: the forward on each backend against NumPy (float64, relative error), and
    the analytic VJP against central finite differences (NumPy, float64). Exits non-zero if any
    check exceeds its tolerance.
    """
    from .backends import available_backends, get_backend
    from .backends.selfcheck import run_selfcheck

    try:
        chosen = [get_backend(b) for b in backends] if backends else available_backends()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--backend") from None
    missing = [b.name for b in chosen if not b.available()]
    if missing:
        raise click.BadParameter(f"not available here: {', '.join(missing)}", param_hint="--backend")
    ok = run_selfcheck(chosen, only=only, seed=seed, echo=click.echo)
    sys.exit(0 if ok else 1)


# --------------------------------------------------------------------------------------------
# Golden vectors: generate, verify, check a user's implementation
# --------------------------------------------------------------------------------------------


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # logs and captured output: wide, no colour, no live display
        console = Console(stderr=stderr, highlight=False, width=160, no_color=True)
    return console


def _progress(total: int, description: str):
    """A rich progress bar on stderr (silent when stderr is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[case]}"), console=console, transient=True, disable=not console.is_terminal,
    )
    task = progress.add_task(description, total=total, case="")
    return progress, task


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@main.command()
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Folder to write (default: ./moeref-vectors).")
@click.option("--only", multiple=True, help="Only cases whose name contains this text or matches this glob (repeatable).")
@click.option("--force", is_flag=True, help="Replace files whose content differs from this run's.")
def vectors(out: str | None, only: tuple[str, ...], force: bool) -> None:
    """Write golden reference vectors: every formulation and preset, several shapes, float64 and float32.

    One safetensors file per case (inputs, parameters, random draws, every output, the VJP for a
    stated cotangent) and a manifest.json (options, shapes, dtypes, seeds, tolerances, SHA-256).
    Deterministic and all-or-nothing: the run builds the folder as .NAME.partial beside it and
    swaps it in when complete, so an interrupted run leaves the folder as it was; run the same
    command again to finish. Cases already in the folder and not selected by --only are kept.
    """
    from rich.table import Table

    from .vectors import VectorsError
    from .vectors.cases import select_cases
    from .vectors.generate import DEFAULT_FOLDER, generate, shapes_of

    folder = out or DEFAULT_FOLDER
    try:
        total = len(select_cases(only))
        progress, task = _progress(total, "generating")
        with progress:
            def on_case(spec, i, n):
                progress.update(task, completed=i, case=spec.name)

            result = generate(folder, only=only, force=force, on_case=on_case)
    except VectorsError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo(f"interrupted: {folder} is unchanged; run the same command again to finish", err=True)
        sys.exit(130)
    table = Table(title=f"moeref vectors -> {result.folder}", title_justify="left")
    for col, justify in (("case", "left"), ("shapes", "left"), ("tensors", "right"), ("file", "left"),
                         ("bytes", "right"), ("status", "left"), ("time", "right")):
        table.add_column(col, justify=justify)
    for row in result.cases:
        table.add_row(row.spec.name, shapes_of(row.spec), str(row.ntensors), row.file, f"{row.nbytes:,}", row.status,
                      f"{row.seconds:.2f} s")
    console = _console()
    console.print(table)
    counts = {s: sum(r.status == s for r in result.cases) for s in ("written", "replaced", "kept")}
    console.print(
        f"{len(result.cases)} cases ({', '.join(f'{v} {k}' for k, v in counts.items() if v)}), "
        f"manifest {result.manifest_status}, in {result.seconds:.1f} s. Next: moeref verify {result.folder}"
    )
    if result.dropped:
        console.print(f"dropped from the manifest, {len(result.dropped)} case(s) whose file was missing or changed "
                      "(add them back with --only NAME):")
        for name, problem in result.dropped:
            console.print(f"  - {name}: {problem}")


@main.command()
@click.argument("folder", required=False, type=click.Path())
@click.option("--backend", "backends", multiple=True, help="Array backend to recompute on (repeatable); default numpy.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance for every dtype (default: per dtype, see the manifest).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance for every dtype.")
@click.option("--only", multiple=True, help="Only cases whose name contains this text (repeatable).")
def verify(folder: str | None, backends: tuple[str, ...], rtol: float | None, atol: float | None, only: tuple[str, ...]) -> None:
    """Check a vectors folder: SHA-256 of every file, then recompute every case on a backend and compare.

    Prints a table per formulation and preset (worst absolute / relative errors, pass or fail).
    Exit status: 0 all passed, 1 some case failed, 2 the folder cannot be used (missing,
    incomplete, modified, newer schema, unknown names).
    """
    from rich.table import Table

    from .vectors import VectorsError
    from .vectors.generate import DEFAULT_FOLDER
    from .vectors.io import read_manifest
    from .vectors.verify import summary_rows, verify as run_verify

    folder = folder or DEFAULT_FOLDER
    backends = backends or ("numpy",)
    try:
        n = len(read_manifest(folder)["cases"]) * len(backends)
        progress, task = _progress(n, "verifying")
        with progress:
            result = run_verify(folder, backends=backends, rtol=rtol, atol=atol, only=only,
                                on_case=lambda name, i, total: progress.update(task, completed=i, case=name))
    except VectorsError as exc:
        _fail(str(exc))
    console = _console()
    for note in result.notes:
        console.print(f"note: {note}")
    table = Table(title=f"moeref verify {result.folder} (vectors of moeref {result.moeref_version})", title_justify="left")
    for col in ("formulation", "preset", "dtype", "backend", "cases", "out max abs", "out max rel", "grad max rel", "ties", "result"):
        table.add_column(col, justify="right" if col in ("cases", "ties") or "max" in col else "left")
    for r in summary_rows(result):
        status = "pass" if not r["failed"] else f"FAIL ({r['failed']})"
        table.add_row(r["formulation"], r["preset"], r["dtype"], r["backend"], str(r["cases"]), f"{r['out_abs']:.1e}",
                      f"{r['out_rel']:.1e}", f"{r['grad_rel']:.1e}", str(r["ties"]), status)
    console.print(table)
    for o in result.outcomes:
        if not o.ok:
            click.echo(f"FAIL {o.name} [{o.backend}]\n" + (f"  {o.error}" if o.error else o.comparison.report()))
    failed = sum(not o.ok for o in result.outcomes)
    console.print(
        f"{len(result.outcomes)} case runs in {result.seconds:.1f} s: "
        + ("all passed" if not failed else f"{failed} FAILED")
    )
    sys.exit(0 if result.ok else 1)


@main.command()
@click.argument("target")
@click.option("--formulation", required=True, help="Registry name, e.g. sparse_moe (see `moeref info`).")
@click.option("--preset", default=None, help="Preset of the formulation, e.g. mixtral.")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "jax", "numpy"]),
              help="Framework the target computes in.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "float64"]),
              help="Input dtype(s) of the cases (default: every one generated).")
@click.option("--kind", default="auto", show_default=True, type=click.Choice(["auto", "function", "module"]),
              help="function: fn(x, router_weight, experts); module: fn(case) -> nn.Module; auto: by signature.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default: per dtype).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default: per dtype).")
def check(target: str, formulation: str, preset: str | None, backend: str, dtypes: tuple[str, ...], kind: str,
          rtol: float | None, atol: float | None) -> None:
    """Check your implementation TARGET (MODULE:FUNCTION or path/to/file.py:FUNCTION) against moeref.

    Calls it on every case of the formulation (and preset), converted to the framework, compares
    its outputs and, where the framework can differentiate it, its gradients; on a mismatch, tries
    moeref with one convention changed at a time and says which one your code follows.
    Exit status: 0 agreement, 1 a mismatch, 2 the target or the names cannot be used.
    """
    from .vectors import VectorsError
    from .vectors.check import run_check

    try:
        report = run_check(target, formulation=formulation, preset=preset, backend=backend, dtypes=dtypes or None,
                           kind=kind, rtol=rtol, atol=atol)
    except VectorsError as exc:
        _fail(str(exc))
    click.echo(report.text())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
