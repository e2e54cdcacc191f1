"""The ``moeref`` command line."""

from __future__ import annotations

from click.testing import CliRunner

from moeref import __version__
from moeref.cli import main


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "selfcheck" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_info_lists_backends_and_formulations():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0
    assert "numpy" in result.output and "available" in result.output and "mixture" in result.output


def test_selfcheck_passes_on_numpy_and_strict():
    result = CliRunner().invoke(main, ["selfcheck", "--backend", "numpy", "--backend", "array_api_strict", "--only", "mixture"])
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output


def test_selfcheck_rejects_unknown_backend_and_filter():
    result = CliRunner().invoke(main, ["selfcheck", "--backend", "tensorflow"])
    assert result.exit_code != 0 and "unknown backend 'tensorflow'" in result.output
    result = CliRunner().invoke(main, ["selfcheck", "--backend", "numpy", "--only", "no-such-model"])
    assert result.exit_code == 1 and "no formulation matches" in result.output
