"""Shared fixtures. Real data lives in ../shared/data beside the checkout; tests that need it skip without it."""

from __future__ import annotations

import locale
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("RELSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long real-data runs, excluded from CI (run with -m slow)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when the real data is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def process_locale_restored():
    """GDCM's DICOM writer (the DICOM fixtures) switches the process locale to "C": Python's default text
    encoding then becomes ASCII for every later test. Put back what the test found."""
    before = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != before:
        locale.setlocale(locale.LC_ALL, before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run many times faster on one thread than on two cores shared with other work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def two_gloo_processes():
    """Run a script under a real ``torchrun`` of two processes (gloo on the CPU, one thread each); fail the test
    with the end of its stderr unless both ranks exit cleanly. Returns the finished run (its stdout)."""

    def run(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        finished = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   str(script), *args], capture_output=True, text=True, timeout=240,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        assert finished.returncode == 0, finished.stderr[-3000:]
        return finished

    return run
