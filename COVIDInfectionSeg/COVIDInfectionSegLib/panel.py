"""What the panel shows, as plain strings: the widget only copies them into Qt widgets.

Kept out of the module file so that the wording is tested without Qt and the widget stays
a thin wiring layer.
"""

from __future__ import annotations

import math

from .process import CANCELLED, FAILED, SUCCEEDED, CommandProcess, SegmentationProcess
from .quantify import table_rows

DEVICE_CHOICES = (("Auto", "auto"), ("GPU", "cuda"), ("CPU", "cpu"))
SETTINGS_PREFIX = "COVIDInfectionSeg/"
ALWAYS_TTA_TOOLTIP = ("This model always averages each slice with its left-right mirror: its card chose that, with "
                      "its decision threshold, on its patient folds. It runs at Accurate only.")


def quality_for(choice, free_tooltip: str) -> tuple[bool, str]:
    """(whether the quality is fixed at Accurate, the selector's tooltip) for the selected model choice
    (``models.ModelChoice`` or None): a model whose card always flips has no Fast run to offer."""
    if choice is not None and choice.always_tta:
        return True, ALWAYS_TTA_TOOLTIP
    return False, free_tooltip


def gpu_label() -> str:
    """The device selector's GPU entry, naming the card PyTorch sees (needs torch installed)."""
    import torch

    return f"GPU ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none found'})"


def progress_text(process: CommandProcess) -> str:
    """The stage line under the progress bar, with the time left once it can be estimated."""
    remaining = process.remaining_seconds()
    left = f" - about {remaining:.0f} s left" if remaining is not None else ""
    return (process.stage or "Starting...") + left


def status_text(process: CommandProcess) -> str:
    """The stage line for the process's state: progress while running, then the outcome
    (fine-tuning prints its Dice before/after as its last output line)."""
    if process.state == SUCCEEDED and isinstance(process, SegmentationProcess):
        return "Done."
    if process.state == SUCCEEDED:
        return (process.output_lines or ["Fine-tuning finished."])[-1]
    if process.state == CANCELLED:
        return "Cancelled; the scene was not changed."
    if process.state == FAILED:
        return f"Failed: {process.error}"
    return progress_text(process)


def result_rows(measurement: dict) -> list[tuple[str, list[str]]]:
    """The results box, as (row name, cells) per row of ``table_rows``: lung volume (mL), infection volume (mL),
    PO (%), PHO (%); blank where a number does not apply (a class row has no lung volume or PHO of its own)."""
    return [(row[0], ["" if math.isnan(value) else f"{value:.1f}" for value in row[1:]])
            for row in table_rows(measurement)]


def model_info_text(report: dict | None) -> str:
    """Which model made the result, where it ran, the CT's noise (the model takes noise for ground-glass) and the
    report's warnings (from the report stored on the segmentation)."""
    report = report or {}
    model = report.get("model", {})
    text = f"Model {model.get('name', '?')} {model.get('version', '')}".strip() + f" on {report.get('device', '?')}"
    if report.get("engine") not in (None, "torch"):
        text += f" ({report['engine']})"  # the faster CPU engine ran the network
    lungs = [f"Lungs: {report['lungs_method']}"] if report.get("lungs_method") else []
    noise = [f"CT noise: {report['noise_hu']:.0f} HU"] if report.get("noise_hu") is not None else []
    return "\n".join([text, *lungs, *noise, *(f"Warning: {warning}" for warning in report.get("warnings", []))])
