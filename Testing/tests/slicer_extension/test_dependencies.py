"""First-use installation: one confirmation, nothing when present, no repeated installs; run-time warning."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from COVIDInfectionSegLib import DependencyError, ensure_dependencies, estimate_seconds, long_run_warning
from COVIDInfectionSegLib.dependencies import bundled_relsegcore_dir

REPO = Path(__file__).resolve().parents[3]


class Recorder:
    def __init__(self, answer: bool = True):
        self.answer, self.messages = answer, []

    def __call__(self, message: str) -> bool:
        self.messages.append(message)
        return self.answer


def test_nothing_asked_when_everything_is_importable():
    confirm = Recorder()
    assert ensure_dependencies(confirm, {"torch": pytest.fail, "relsegcore": pytest.fail}) == []
    assert confirm.messages == []


def test_missing_package_installed_once_after_one_confirmation(tmp_path, monkeypatch):
    name = "relseg_slicer_test_dependency"
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []

    def install():  # a real "install": the module appears on sys.path
        calls.append(name)
        (tmp_path / f"{name}.py").write_text("VALUE = 1\n")

    confirm = Recorder()
    installers = {"torch": pytest.fail, name: install}
    assert ensure_dependencies(confirm, installers) == [name]
    assert len(confirm.messages) == 1 and name in confirm.messages[0]
    assert ensure_dependencies(confirm, installers) == []  # second use: nothing asked, nothing installed
    assert calls == [name] and len(confirm.messages) == 1
    sys.modules.pop(name, None)


def test_declined_or_failed_installs_raise_clear_errors():
    name = "relseg_slicer_test_absent_package"
    calls = []
    with pytest.raises(DependencyError, match="declined"):
        ensure_dependencies(Recorder(answer=False), {name: lambda: calls.append(1)})
    assert calls == []
    with pytest.raises(DependencyError, match="still cannot be imported"):
        ensure_dependencies(Recorder(), {name: lambda: None})

    def broken():
        raise OSError("no network")

    with pytest.raises(DependencyError, match=f"Installing {name} failed: no network"):
        ensure_dependencies(Recorder(), {name: broken})


def test_bundled_relsegcore_is_found_in_the_checkout():
    assert bundled_relsegcore_dir() == REPO / "RelSegCore"


def test_long_cpu_run_is_announced_with_an_estimate():
    assert long_run_warning(40, "cpu", tta=False) is None
    warning = long_run_warning(2000, "cpu", tta=False)
    assert warning is not None and "2000 slices on the CPU" in warning and "min" in warning
    assert long_run_warning(2000, "cuda", tta=False) is None
    assert long_run_warning(1000, "cpu", tta=False) is None and long_run_warning(1000, "cpu", tta=True) is not None
    # a 300-slice chest CT with the default's mirror took 20.4-21.5 s on 2 cores: no dialog for it
    assert long_run_warning(300, "cpu", tta=True) is None
    assert 15 < estimate_seconds(300, "cpu", tta=True) < 40
