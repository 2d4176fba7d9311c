"""Segment many CTs: a folder of cases or a CSV list, resumable, one bad case never stops the rest.

A case is finished when all its output files exist and its report names the same model
weights (SHA-256) and high-opacity threshold; finished cases are skipped, so an interrupted batch is simply run
again. Each case's files appear all together or not at all (``outputs.write_outputs``).
``summary.csv`` (written atomically after every batch) holds one row per case: its
status, the error for a failed case, and the report's numbers flattened into columns.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import imageio, outputs, zoo
from .errors import Cancelled, InputError, RelSegError
from .fileutil import atomic_write_text
from .opacity import HIGH_OPACITY_HU
from .progress import Progress

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.csv"
CSV_SUFFIX = ".csv"
WORKER_DIED = "its worker process stopped unexpectedly (out of memory?)"


@dataclass(frozen=True)
class Case:
    """One input of a batch and the name its outputs get."""

    name: str
    path: Path
    series: str | None = None


@dataclass
class CaseOutcome:
    """What happened to one case: ``done`` (segmented now), ``skipped`` (already finished) or ``failed``."""

    case: Case
    status: str
    error: str = ""
    report: dict = field(default_factory=dict)


def is_batch_input(path: str | os.PathLike) -> bool:
    """True for a CSV list or a folder of cases; False for one CT file or one DICOM series folder."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == CSV_SUFFIX
    if not path.is_dir() or imageio.dicom_series_ids(path):
        return False
    return any(_is_case_entry(entry) for entry in path.iterdir())


def list_cases(source: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Case]:
    """The cases of a CSV list (column ``path``, optional ``name`` and ``series``) or of a folder.

    In a folder, ``out_dir`` and the files this package writes are not cases, so that
    outputs written beside the inputs are not segmented on the next run.
    """
    source = Path(source)
    cases = _cases_from_csv(source) if source.is_file() else _cases_from_folder(source, out_dir)
    if not cases:
        raise InputError(f"No cases found in {source}: expected CT files (NIfTI, NRRD, MHA) or DICOM folders.")
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"Several cases would write outputs named {', '.join(duplicates)}; give each a unique name.")
    return cases


def _is_case_entry(entry: Path) -> bool:
    if entry.name.startswith(".") or entry.name.endswith(tuple(outputs.OUTPUT_SUFFIXES.values())):
        return False
    if entry.is_dir():
        return True
    lowered = entry.name.lower()
    return lowered.endswith(imageio.VOLUME_SUFFIXES) and not lowered.endswith(".dcm")


def _cases_from_folder(folder: Path, out_dir: str | os.PathLike | None) -> list[Case]:
    from .pipeline import case_name

    skip = Path(out_dir).resolve() if out_dir is not None else None
    return [Case(case_name(entry), entry) for entry in sorted(folder.iterdir())
            if _is_case_entry(entry) and entry.resolve() != skip]


def _cases_from_csv(csv_path: Path) -> list[Case]:
    from .pipeline import case_name

    try:
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"Cannot read the case list {csv_path}: {error}.") from None
    if not rows or "path" not in rows[0]:
        raise InputError(f"The case list {csv_path} needs a header row with a 'path' column.")
    cases = []
    for number, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise InputError(f"Line {number} of {csv_path} has an empty path.")
        path = Path(row["path"].strip()).expanduser()
        path = path if path.is_absolute() else csv_path.parent / path
        name = (row.get("name") or "").strip() or case_name(path)
        cases.append(Case(name, path, (row.get("series") or "").strip() or None))
    return cases


def case_is_finished(out_dir: Path, name: str, model_sha256: str, high_opacity_hu: float = HIGH_OPACITY_HU,
                     stored_window: tuple[float, float] | None = None) -> bool:
    """All outputs of ``name`` exist and its report was made by the model with this SHA-256 at this threshold,
    from the CT read the same way (``stored_window``)."""
    paths = outputs.output_paths(out_dir, name)
    if not all(path.is_file() for path in paths.values()):
        return False
    try:
        report = json.loads(paths["report"].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    window = None if stored_window is None else [float(value) for value in stored_window]
    return (isinstance(report, dict) and report.get("model", {}).get("sha256") == model_sha256
            and report.get("high_opacity_hu") == high_opacity_hu and report.get("stored_window_hu") == window)


def run_batch(
    cases: list[Case],
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    tta: bool = False,
    workers: int = 1,
    progress: Progress | None = None,
    lung_model: str | os.PathLike = "hu",
    high_opacity_hu: float = HIGH_OPACITY_HU,
    engine: str = "auto",
    stored_window: tuple[float, float] | None = None,
) -> list[CaseOutcome]:
    """Segment every unfinished case, then write ``summary.csv``; failures are recorded, not raised.

    With ``workers > 1`` cases run in that many processes, torch's CPU threads split
    between them. ``Cancelled`` stops the batch (finished cases stay, the summary is written).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = zoo.find_model(model)  # a bad model name fails once, before any case
    progress = progress or Progress()
    outcomes: dict[Case, CaseOutcome] = {}
    for case in cases:
        if case_is_finished(out_dir, case.name, card.sha256, high_opacity_hu, stored_window):
            outcomes[case] = CaseOutcome(case, "skipped", report=_read_report(out_dir, case.name))
    pending = [case for case in cases if case not in outcomes]
    if outcomes:
        log.info("Skipping %d finished case(s) in %s", len(outcomes), out_dir)
    job = (str(out_dir), str(card.path.with_suffix(".json")), device, tta, high_opacity_hu, str(lung_model), engine,
           stored_window)
    try:
        if workers <= 1 or len(pending) <= 1:
            _run_here(pending, job, progress, outcomes, len(cases))
        else:
            _run_in_processes(pending, job, workers, progress, outcomes, len(cases))
    finally:
        write_summary(out_dir / SUMMARY_NAME, [outcomes[c] for c in cases if c in outcomes])
    return [outcomes[case] for case in cases]


def _run_here(pending: list[Case], job: tuple, progress: Progress, outcomes: dict, total: int) -> None:
    for case in pending:
        finished = len(outcomes)
        case_progress = Progress(
            callback=lambda fraction, stage, done=finished, name=case.name: progress.update(
                (done + fraction) / total, f"{stage} {name} ({done + 1}/{total})"),
            should_cancel=progress.should_cancel,
        )
        outcomes[case] = segment_case(case, *job, progress=case_progress)
        progress.update(len(outcomes) / total, f"Finished {case.name} ({len(outcomes)}/{total})")


def _run_in_processes(pending: list[Case], job: tuple, workers: int, progress: Progress, outcomes: dict,
                      total: int) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(threads,)) as pool:
        futures = {pool.submit(segment_case, case, *job): case for case in pending}
        try:
            for future in concurrent.futures.as_completed(futures):
                case = futures[future]
                try:
                    outcomes[case] = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    outcomes[case] = CaseOutcome(case, "failed", WORKER_DIED)
                progress.update(len(outcomes) / total, f"Finished {case.name} ({len(outcomes)}/{total})")
        except Cancelled:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def segment_case(case: Case, out_dir: str, model_card: str, device: str, tta: bool,
                 high_opacity_hu: float = HIGH_OPACITY_HU, lung_model: str = "hu", engine: str = "auto",
                 stored_window: tuple[float, float] | None = None, progress: Progress | None = None) -> CaseOutcome:
    """Segment one case and write its outputs; any failure becomes a ``failed`` outcome (``Cancelled`` excepted)."""
    from .pipeline import segment_file

    try:
        segment_file(case.path, out_dir, model=model_card, device=device, tta=tta, series=case.series,
                     progress=progress, name=case.name, high_opacity_hu=high_opacity_hu, lung_model=lung_model,
                     engine=engine, stored_window=stored_window)
    except Cancelled:
        raise
    except RelSegError as error:
        log.warning("%s: %s", case.name, error)
        return CaseOutcome(case, "failed", str(error))
    except Exception as error:  # noqa: BLE001 - one bad case must not stop the batch
        log.exception("%s: unexpected error", case.name)
        return CaseOutcome(case, "failed", f"unexpected error: {type(error).__name__}: {error}")
    return CaseOutcome(case, "done", report=_read_report(Path(out_dir), case.name))


def _read_report(out_dir: Path, name: str) -> dict:
    try:
        return json.loads(outputs.output_paths(out_dir, name)["report"].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_summary(path: Path, outcomes: list[CaseOutcome]) -> None:
    """One CSV row per case: name, input, status, error, then every report value under a dotted column name."""
    rows = []
    for outcome in outcomes:
        row = {"name": outcome.case.name, "input": str(outcome.case.path), "status": outcome.status,
               "error": outcome.error}
        row.update(flatten(outcome.report))
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as JSON text."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        column = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{column}."))
        elif isinstance(value, list):
            flat[column] = json.dumps(value)
        else:
            flat[column] = "" if value is None else value
    return flat
