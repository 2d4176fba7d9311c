"""Progress reporting and cancellation shared by the CLI, the Python API and Slicer.

Long jobs take a ``Progress`` object. The CLI wraps it around tqdm; the Slicer module
runs the job in a separate process and parses the ``PROGRESS <fraction> <stage>`` lines
that ``LineProgress`` prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Cancelled


@dataclass
class Progress:
    """Receives ``(fraction in [0, 1], stage text)`` updates and can be asked to stop."""

    callback: Callable[[float, str], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    _stage: str = field(default="", init=False)

    def update(self, fraction: float, stage: str | None = None) -> None:
        if stage is not None:
            self._stage = stage
        if self.callback is not None:
            self.callback(min(max(float(fraction), 0.0), 1.0), self._stage)
        self.check_cancelled()

    def check_cancelled(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("Cancelled by the user.")


def line_progress() -> Progress:
    """Progress that prints machine-readable lines on stdout (read by the Slicer module)."""

    def emit(fraction: float, stage: str) -> None:
        print(f"PROGRESS {fraction:.4f} {stage}", file=sys.stdout, flush=True)

    return Progress(callback=emit)


def silent() -> Progress:
    return Progress()
