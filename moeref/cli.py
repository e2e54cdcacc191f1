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
    from .backends.selfcheck import CASES

    click.echo(f"moeref {__version__}")
    click.echo("backends:")
    for name in BACKEND_NAMES:
        b = get_backend(name)
        status = "available" if b.available() else f"unavailable ({b.reason_unavailable()})"
        click.echo(f"  {name:<28} {status}")
    click.echo("formulations:")
    for case in CASES:
        click.echo(f"  {case.name:<28} {case.summary}")


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


if __name__ == "__main__":  # pragma: no cover
    main()
