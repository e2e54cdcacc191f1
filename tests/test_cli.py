"""The ``moeref`` command line."""

from __future__ import annotations

from click.testing import CliRunner

from moeref import __version__
from moeref.cli import main


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "selfcheck" in result.output
    assert all(cmd in result.output for cmd in ("vectors", "verify", "check"))
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_info_lists_backends_and_formulations():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0
    assert "numpy" in result.output and "available" in result.output and "mixture" in result.output
    assert "sparse_moe" in result.output and "presets: mixtral, switch" in result.output


def test_selfcheck_passes_on_numpy_and_strict():
    result = CliRunner().invoke(main, ["selfcheck", "--backend", "numpy", "--backend", "array_api_strict", "--only", "mixture"])
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output


def test_selfcheck_rejects_unknown_backend_and_filter():
    result = CliRunner().invoke(main, ["selfcheck", "--backend", "tensorflow"])
    assert result.exit_code != 0 and "unknown backend 'tensorflow'" in result.output
    result = CliRunner().invoke(main, ["selfcheck", "--backend", "numpy", "--only", "no-such-model"])
    assert result.exit_code == 1 and "no formulation matches" in result.output


def test_vectors_verify_round_trip_is_the_main_job(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["vectors", "--out", str(tmp_path), "--only", "sparse_moe.mixtral.T7-d5-I3-E8.float32"])
    assert result.exit_code == 0, result.output
    assert "Next: moeref verify" in result.output
    result = runner.invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 0 and "all passed" in result.output


def test_default_vectors_folder_is_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(main, ["vectors", "--only", "mixture.N6"]).exit_code == 0
    assert (tmp_path / "moeref-vectors" / "manifest.json").is_file()
    assert runner.invoke(main, ["verify"]).exit_code == 0
