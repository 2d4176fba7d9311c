"""Segmentation in a separate process, so Slicer's GUI never freezes.

``SegmentationProcess`` writes the input volume to a temporary NRRD, runs
``python -m relsegcore.cli segment ... --progress lines`` in its own process group,
and is polled from a timer: ``poll()`` never blocks. Cancel kills the whole process
tree; the scene is only touched after a successful run, through the same
``write_result`` as the blocking path.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk
import slicer

from .geometry import array_on_volume_grid, check_not_warped
from .results import ResultArrays, check_overwrite_allowed, write_result

INPUT_STEM = "input"
PROGRESS_PREFIX = "PROGRESS "

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


def python_executable() -> str:
    """Slicer's own Python (``PythonSlicer`` sets up Slicer's environment); the current one elsewhere."""
    return shutil.which("PythonSlicer") or sys.executable


def parse_progress_line(line: str) -> tuple[float, str] | None:
    """``PROGRESS 0.4200 stage text`` -> (0.42, "stage text"); anything else -> None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    parts = line[len(PROGRESS_PREFIX):].strip().split(" ", 1)
    try:
        fraction = float(parts[0])
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), parts[1] if len(parts) > 1 else ""


def segment_command(input_path: Path, out_dir: Path, model: str, device: str, tta: bool) -> list[str]:
    """The relsegcore command line the process runs (same code path as ``relseg segment``)."""
    command = [python_executable(), "-m", "relsegcore.cli", "segment", str(input_path), "--out", str(out_dir),
               "--model", model, "--device", device, "--progress", "lines"]
    return command + (["--tta"] if tta else [])


def read_result_files(out_dir: Path, volume_node) -> ResultArrays:
    """Load the labelmaps and report the command wrote, checked against the input volume's grid."""
    report = json.loads((out_dir / f"{INPUT_STEM}_report.json").read_text(encoding="utf-8"))
    lungs = array_on_volume_grid(sitk.ReadImage(str(out_dir / f"{INPUT_STEM}_lungs.nii.gz")), volume_node)
    infection = array_on_volume_grid(sitk.ReadImage(str(out_dir / f"{INPUT_STEM}_infection.nii.gz")), volume_node)
    classes = sorted(report["infection"]["classes"].values(), key=lambda item: item["label"])
    class_names = [item["name"] for item in classes]
    return ResultArrays(lungs=lungs, infection=infection, class_names=class_names, report=report)


class CommandProcess:
    """A command run in its own process group, polled from a timer: ``start()``, then ``poll()`` until done.

    Lines ``PROGRESS <fraction> <stage>`` on its stdout update ``fraction`` and ``stage``;
    the last ``relseg: error:`` line on stderr becomes ``error`` when it fails.
    """

    def __init__(self, command: list[str] | None = None, environment: dict[str, str] | None = None) -> None:
        self.command = command
        self._environment = environment
        self.state = "new"
        self.fraction = 0.0
        self.stage = ""
        self.error = ""
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._stderr: list[str] = []
        self.output_lines: list[str] = []  # stdout lines other than progress (e.g. a fine-tuning summary)
        self._closed_streams = 0
        self._started_at: float | None = None

    def start(self) -> None:
        popen_group = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        )
        # The child writes and this side reads UTF-8, whatever the host's code page (Windows pipes use the ANSI
        # one, in which a user's path may not be printable); an undecodable byte must not end the reader thread.
        self._process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            errors="replace", env={**os.environ, **(self._environment or {}), "PYTHONIOENCODING": "utf-8"},
            **popen_group,
        )
        for stream, name in ((self._process.stdout, "out"), (self._process.stderr, "err")):
            threading.Thread(target=self._read_lines, args=(stream, name), daemon=True).start()
        self._started_at = time.monotonic()
        self.state = RUNNING

    def _read_lines(self, stream, name: str) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\n")))
        self._lines.put((name, None))

    def _drain(self) -> None:
        """Consume the lines read so far."""
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._closed_streams += 1
            elif name == "err":
                self._stderr.append(line)
            elif (parsed := parse_progress_line(line)) is not None:
                self.fraction, self.stage = parsed
            else:
                self.output_lines.append(line)

    def poll(self) -> str:
        """Update ``fraction``/``stage``; once the process has ended, finish (success) or record the error."""
        if self.state != RUNNING:
            return self.state
        self._drain()
        if self._process.poll() is None:
            return self.state
        self._read_remaining_output()
        if self._process.returncode == 0:
            self._on_success()
        else:
            errors = [line for line in self._stderr if line.startswith("relseg: error:")]
            self.error = (errors or self._stderr or [f"exit status {self._process.returncode}"])[-1]
            self.state = FAILED
            self._cleanup()
        return self.state

    def _read_remaining_output(self, timeout_s: float = 5.0) -> None:
        """After exit, take the output still buffered (both reader threads end at end of file)."""
        deadline = time.monotonic() + timeout_s
        self._drain()
        while self._closed_streams < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
            self._drain()

    def _on_success(self) -> None:
        self.fraction, self.stage, self.state = 1.0, "done", SUCCEEDED
        self._cleanup()

    def cancel(self, grace_s: float = 3.0) -> None:
        """Kill the process and everything it spawned; nothing is loaded."""
        if self.state != RUNNING:
            return
        kill_process_tree(self._process, grace_s)
        self.state = CANCELLED
        self._cleanup()

    def wait(self, timeout_s: float | None = None, interval_s: float = 0.1) -> str:
        """Poll until the run ends (scripting and tests); cancels it after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.poll() == RUNNING:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                self.error = f"Cancelled after {timeout_s:g} s."
                break
            time.sleep(interval_s)
        return self.state

    def remaining_seconds(self) -> float | None:
        """Time left, extrapolated from the progress so far (None until there is some progress)."""
        if self.state != RUNNING or self._started_at is None or self.fraction < 0.05:
            return None
        elapsed = time.monotonic() - self._started_at
        return elapsed * (1.0 - self.fraction) / self.fraction

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _cleanup(self) -> None:
        """Remove temporary files (subclasses)."""


class SegmentationProcess(CommandProcess):
    """Segmentation of a volume node in a separate process; the result is loaded on success only."""

    def __init__(
        self,
        input_volume,
        output_segmentation=None,
        model: str = "covid-infection-2d",
        device: str = "auto",
        tta: bool = False,
        overwrite: bool = False,
        command: Callable[[Path, Path], list[str]] | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        super().__init__(None, environment)
        self.input_volume = input_volume
        self.output_segmentation = output_segmentation
        self.overwrite = overwrite
        self._make_command = command or (lambda path, out: segment_command(path, out, model, device, tta))
        self._work_dir: Path | None = None

    def start(self) -> None:
        """Write the input to a temporary NRRD, then launch the command."""
        if self.output_segmentation is not None:
            check_overwrite_allowed(self.output_segmentation, self.overwrite)  # fail before a long run
        check_not_warped(self.input_volume)  # the file written holds the unwarped grid
        self._work_dir = Path(tempfile.mkdtemp(prefix="COVIDInfectionSeg-"))
        input_path = self._work_dir / f"{INPUT_STEM}.nrrd"
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(input_path))
        storage.SetUseCompression(False)
        if not storage.WriteData(self.input_volume):
            self._cleanup()
            raise OSError(f"Could not write the input volume to {input_path}.")
        self.command = self._make_command(input_path, self._work_dir / "out")
        super().start()

    def _on_success(self) -> None:
        created = self.output_segmentation is None
        try:
            result = read_result_files(self._work_dir / "out", self.input_volume)
            if created:
                self.output_segmentation = new_segmentation_node(self.input_volume)
            write_result(self.output_segmentation, self.input_volume, result, overwrite=self.overwrite)
            self.fraction, self.stage, self.state = 1.0, "done", SUCCEEDED
        except Exception as error:
            if created and self.output_segmentation is not None:
                slicer.mrmlScene.RemoveNode(self.output_segmentation)
                self.output_segmentation = None
            self.error, self.state = str(error), FAILED
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None


def kill_process_tree(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Terminate a process started in its own group, with everything it spawned."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        process.wait()
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while _group_alive(process.pid) and time.monotonic() < deadline:
            process.poll()  # reap the leader so that it stops counting as alive
            time.sleep(0.05)
        if not _group_alive(process.pid):
            break
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def new_segmentation_node(input_volume):
    """A fresh segmentation node named after the CT."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{input_volume.GetName()} infection")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
    return node
