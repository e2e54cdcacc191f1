"""A real ``moeref vectors`` process killed mid-run leaves its folder as before or complete, never partial.

Each test starts ``python -m moeref.cli vectors --out X`` over a folder that holds a complete,
smaller set of vectors, waits (polling the file system) until the staging folder ``.X.partial``
holds a few newly written case files, sends a signal, and checks that X is byte-identical to
before (or complete), that ``moeref verify`` says the right thing, and that a rerun finishes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeref.vectors import VectorsError
from moeref.vectors import io as vio
from moeref.vectors import staging
from moeref.vectors.cases import all_cases
from moeref.vectors.generate import generate
from moeref.vectors.verify import check_folder, verify

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and renameat2")

OLDER = ["meta_pi", "mixture.N6"]  # the complete state the folder holds before the run
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def older(tmp_path_factory):
    folder = tmp_path_factory.mktemp("older") / "v"
    generate(folder, only=OLDER)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _count(folder: Path) -> int:
    try:
        return sum(1 for _ in folder.rglob("*.safetensors"))
    except FileNotFoundError:  # the folder went away while being listed
        return 0


# ``python -m moeref.cli`` with Python's own Ctrl-C handling restored first. A process started
# with SIGINT ignored (a background job of a non-interactive shell: ``nohup pytest &``, some CI
# runners) passes the ignored disposition on across exec, and Python then raises no
# KeyboardInterrupt at all: the child would finish its run instead of being interrupted.
CLI = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "sys.argv[0] = 'moeref'; runpy.run_module('moeref.cli', run_name='__main__')")


def _start_and_wait(folder: Path, new_files: int, may_finish: bool = False) -> subprocess.Popen:
    """Start ``moeref vectors --out folder``; return once its staging folder holds ``new_files`` more files
    (or, with ``may_finish``, once the run ended)."""
    already = _count(folder)
    proc = subprocess.Popen([sys.executable, "-c", CLI, "vectors", "--out", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=folder.parent)
    partial = staging.staging_path(folder)
    deadline = time.monotonic() + TIMEOUT
    while _count(partial) < already + new_files:
        if proc.poll() is not None:
            if may_finish and proc.returncode == 0:
                return proc
            pytest.fail(f"moeref vectors ended (status {proc.returncode}) before it could be interrupted: "
                        f"{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the staging folder never held {new_files} new files")
        time.sleep(0.002)
    return proc


def _outcome(folder: Path, before: dict[str, bytes]) -> str:
    """``"as before"``, ``"complete"`` (manifest lists every case, checksums pass), or a failure."""
    if folder.is_dir() and _snapshot(folder) == before:
        return "as before"
    manifest, entries, _ = check_folder(folder)  # raises on a partial folder
    assert {e["name"] for e in entries} == {s.name for s in all_cases()}
    return "complete"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_early_in_the_run_leaves_the_folder_as_before(older, tmp_path, sig):
    folder = tmp_path / "v"
    shutil.copytree(older, folder)
    before = _snapshot(folder)
    proc = _start_and_wait(folder, new_files=3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert _outcome(folder, before) == "as before"
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err.decode()
        assert f"interrupted: {folder} is unchanged; run the same command again to finish" in err.decode()
        assert not staging.leftovers(folder), "Ctrl-C deletes the staging folder"
    else:
        assert proc.returncode == -sig
        notes = " ".join(check_folder(folder)[2])
        assert "interrupted `moeref vectors` left .v.partial" in notes and "previous complete state" in notes
    result = generate(folder)  # the rerun
    assert {r.status for r in result.cases} == {"kept", "written"}
    assert not staging.leftovers(folder) and not vio.temp_files(folder)
    assert _outcome(folder, before) == "complete"
    if sig == signal.SIGKILL:
        assert verify(folder).ok  # recomputes every case once (about 2 s)


def test_kill_of_a_first_run_leaves_no_folder(tmp_path):
    folder = tmp_path / "v"
    proc = _start_and_wait(folder, new_files=3)
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert not folder.exists() and staging.leftovers(folder) == [staging.staging_path(folder)]
    with pytest.raises(VectorsError, match=r"does not exist: an interrupted `moeref vectors` left \.v\.partial"):
        vio.read_manifest(folder)


def test_kill_late_in_the_run_leaves_the_folder_as_before_or_complete(older, tmp_path):
    """Killed close to the swap: either outcome is correct, a mixture is not."""
    folder = tmp_path / "v"
    shutil.copytree(older, folder)
    before = _snapshot(folder)
    proc = _start_and_wait(folder, new_files=len(all_cases()) - len(before) + 1, may_finish=True)  # every case written
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert _outcome(folder, before) in ("as before", "complete")
    generate(folder)
    assert _outcome(folder, before) == "complete" and not staging.leftovers(folder)
