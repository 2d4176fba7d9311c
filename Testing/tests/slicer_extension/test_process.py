"""The non-blocking path: a real child process, progress lines read on poll, cancel kills the tree, scene untouched."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_results import node_ids

from COVIDInfectionSegLib import SegmentationProcess
from COVIDInfectionSegLib.process import CANCELLED, FAILED, RUNNING, SUCCEEDED, parse_progress_line, segment_command

# Stands in for `relseg segment`: checks the input NRRD Slicer wrote, starts a grandchild, reports progress, waits.
SLOW_JOB = r"""
import subprocess, sys, time
import SimpleITK as sitk
image = sitk.ReadImage(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[2], "w").write(f"{child.pid}\n")
print("PROGRESS 0.1000 Lungs", flush=True)
print("PROGRESS 0.2500 Infection", flush=True)
time.sleep(120)
"""

# Writes what `relseg segment` writes, on the input's grid, so the loading path is tested on its own.
WRITING_JOB = r"""
import json, sys
from pathlib import Path
import numpy as np, SimpleITK as sitk
image = sitk.ReadImage(sys.argv[1]); out = Path(sys.argv[2]); out.mkdir(parents=True)
array = sitk.GetArrayFromImage(image)
lungs = np.zeros(array.shape, np.uint8); lungs[:, :, : array.shape[2] // 2] = 2; lungs[:, :, array.shape[2] // 2 :] = 1
infection = ((array > 0) & (lungs > 0)).astype(np.uint8)
for name, labels in (("lungs", lungs), ("infection", infection)):
    result = sitk.GetImageFromArray(labels); result.CopyInformation(image)
    sitk.WriteImage(result, str(out / f"input_{name}.nii.gz"))
report = {"infection": {"classes": {"infection": {"name": "Infection", "label": 1}}}, "model": {"name": "fake"}}
(out / "input_report.json").write_text(json.dumps(report))
print("PROGRESS 1.0 Report", flush=True)
"""

FAILING_JOB = r"""
import sys
print("PROGRESS 0.05 Checks", flush=True)
print("relseg: error: The image is not a CT: its values are not in Hounsfield units.", file=sys.stderr)
sys.exit(2)
"""


def python_job(script: str, *extra: str):
    return lambda input_path, out_dir: [sys.executable, "-c", script, str(input_path), *extra]


def alive(pid: int) -> bool:
    """Running (not exited, not a zombie)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def small_ct(mrml):
    import slicer

    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "small CT")
    array = np.full((4, 16, 20), -800, np.int16)
    array[:, 4:8, 3:17] = 40
    slicer.util.updateVolumeFromArray(volume, array)
    volume.SetSpacing(0.8, 0.8, 3.0)
    volume.SetOrigin(10.0, -20.0, 30.0)
    return volume


def poll_until(process, condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out; state {process.state}, stage {process.stage!r}"
        process.poll()
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform == "win32", reason="process-group check uses /proc")
def test_cancel_kills_the_process_tree_and_leaves_the_scene_unchanged(mrml, tmp_path):
    volume = small_ct(mrml)
    before = node_ids()
    pid_file = tmp_path / "child.pid"
    process = SegmentationProcess(volume, command=python_job(SLOW_JOB, str(pid_file)))
    process.start()
    work_dir = process._work_dir
    assert process.poll() == RUNNING
    poll_until(process, lambda: process.fraction >= 0.25)
    assert process.stage == "Infection"
    assert 0 <= process.remaining_seconds() < 120  # extrapolated from a quarter done
    child_pid = int(pid_file.read_text())
    assert alive(process.pid) and alive(child_pid)

    started = time.monotonic()
    process.cancel()
    assert time.monotonic() - started < 5
    assert process.poll() == CANCELLED
    deadline = time.monotonic() + 5
    while (alive(process.pid) or alive(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(process.pid) and not alive(child_pid)
    assert not work_dir.exists()
    assert node_ids() == before and process.output_segmentation is None


def test_successful_run_loads_the_written_labelmaps_through_the_shared_path(mrml):
    import slicer

    volume = small_ct(mrml)
    process = SegmentationProcess(volume, command=lambda path, out: [sys.executable, "-c", WRITING_JOB, str(path),
                                                                       str(out)])
    process.start()
    assert process.wait(timeout_s=60) == SUCCEEDED, process.error
    segmentation = process.output_segmentation
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == ["Left lung", "Right lung", "Infection"]
    infection_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Infection")
    infection = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, infection_id, volume)
    np.testing.assert_array_equal(infection > 0, slicer.util.arrayFromVolume(volume) > 0)
    assert process.fraction == 1.0


def test_failure_reports_the_error_line_and_adds_nothing(mrml):
    volume = small_ct(mrml)
    before = node_ids()
    process = SegmentationProcess(volume, command=python_job(FAILING_JOB))
    process.start()
    assert process.wait(timeout_s=30) == FAILED
    assert process.error == "relseg: error: The image is not a CT: its values are not in Hounsfield units."
    assert node_ids() == before


# A message naming a user's folder outside Latin-1 (a Windows user name in Chinese, say).
NON_ASCII_FAILING_JOB = r"""
import sys
print("PROGRESS 0.05 Checks", flush=True)
print("relseg: error: Cannot read C:/Users/张伟/Jürgen ≥ 5 mm/ct.nii.gz: not a NIfTI file.", file=sys.stderr)
sys.exit(2)
"""


def test_an_error_naming_a_non_latin_path_reaches_the_panel_whatever_the_hosts_encoding(mrml, monkeypatch):
    """Slicer on Windows pipes a child's output in the ANSI code page: the child could not even print such a
    path (it died with a UnicodeEncodeError traceback). The child writes and the panel reads UTF-8."""
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1")  # a host whose stdio cannot hold the path
    volume = small_ct(mrml)
    process = SegmentationProcess(volume, command=python_job(NON_ASCII_FAILING_JOB))
    process.start()
    assert process.wait(timeout_s=30) == FAILED
    assert process.error == "relseg: error: Cannot read C:/Users/张伟/Jürgen ≥ 5 mm/ct.nii.gz: not a NIfTI file."


def test_progress_lines_and_command():
    assert parse_progress_line("PROGRESS 0.4200 Infection slices") == (0.42, "Infection slices")
    assert parse_progress_line("PROGRESS 1.5 Done") == (1.0, "Done")
    assert parse_progress_line("loading model") is None
    assert parse_progress_line("PROGRESS abc") is None
    command = segment_command(Path("/tmp/in.nrrd"), Path("/tmp/out"), "covid-infection-2d", "cpu", True)
    assert command[1:5] == ["-m", "relsegcore.cli", "segment", "/tmp/in.nrrd"]
    assert command[command.index("--progress") + 1] == "lines" and command[-1] == "--tta"
