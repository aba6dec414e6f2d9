"""Short, bounded coverage-guided fuzz runs (atheris) of every file loader, in a subprocess (libFuzzer owns its
process).

Skipped where atheris is not installed (it has wheels for Linux x86_64 CPython < 3.13 only). By default one process
fuzzes all loaders (``TORCHDRR_ATHERIS_RUNS`` inputs per loader, default 200); ``TORCHDRR_ATHERIS_EACH=1`` adds one
process per loader. Longer campaigns: run ``atheris_loaders.py`` by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .fuzzing import ATHERIS_LOADERS

pytest.importorskip("atheris")

SCRIPT = Path(__file__).with_name("atheris_loaders.py")
ROOT = SCRIPT.parents[2]
# atheris_loaders.py itself is not imported here: it instruments the loaders on import.
LOADERS = ATHERIS_LOADERS


def _fuzz(loader: str, runs: int, artifacts: Path) -> None:
    command = [sys.executable, str(SCRIPT), loader, f"-runs={runs}", "-max_total_time=120", "-timeout=20"]
    command.append(f"-artifact_prefix={artifacts}/")  # crash files go to tmp_path, not the working directory
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"atheris found a broken rule for {loader} (exit {result.returncode}):\n{tail}"
    assert f"Done {runs} runs" in tail, f"atheris did not finish its runs for {loader}:\n{tail}"


def test_atheris_all_loaders(tmp_path: Path) -> None:
    """Every loader in one process (a process start costs ~15 s: torch and the instrumented parsers)."""
    _fuzz("all", int(os.environ.get("TORCHDRR_ATHERIS_RUNS", "200")) * len(LOADERS), tmp_path)


@pytest.mark.skipif(
    os.environ.get("TORCHDRR_ATHERIS_EACH") != "1", reason="one process per loader: TORCHDRR_ATHERIS_EACH=1"
)
@pytest.mark.parametrize("loader", LOADERS)
def test_atheris_loader(loader: str, tmp_path: Path) -> None:
    _fuzz(loader, int(os.environ.get("TORCHDRR_ATHERIS_RUNS", "200")), tmp_path)
