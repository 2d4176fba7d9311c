"""``relseg`` command line: one sub-module per command group, each a thin layer over the API.

Each command module defines ``register(subparsers)`` which adds its parser(s) and sets
``func`` to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import RelSegError
from ..progress import Progress, line_progress

# Command modules, in the order they appear in ``relseg --help``.
COMMAND_MODULES = ("segment", "evaluate", "train", "finetune", "models", "benchmark")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="relseg",
        description="COVID-19 lung infection segmentation on chest CT (dual-encoder network).",
    )
    parser.add_argument("--version", action="version", version=f"relsegcore {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{name}":
                continue  # command group not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    _escape_unprintable_output()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in model cards as the exact command
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        _check_outputs(args)
        return int(args.func(args) or 0)
    except RelSegError as error:
        print(f"relseg: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from ..device import is_cuda_oom

        if not is_cuda_oom(error):
            raise
        print("relseg: error: the GPU ran out of memory; lower --batch-size or run with --device cpu",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("relseg: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the file system refused: disk full, no permission, a file where a folder goes
        if args.verbose:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"relseg: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2


OUTPUT_OPTIONS = ("out", "json", "model_dir")  # where commands write: a folder, or a file (.pt, .json) in one
OUTPUT_FILE_SUFFIXES = (".pt", ".json")


def _check_outputs(args: argparse.Namespace) -> None:
    """Where the command will write, checked before its slow work (a training writes its first checkpoint
    minutes in, a segmentation its files at the end)."""
    for option in OUTPUT_OPTIONS:
        value = getattr(args, option, None)
        if value is not None:
            path = Path(value)
            check_output_folder(path.parent if path.suffix in OUTPUT_FILE_SUFFIXES else path)


def check_output_folder(folder: str | os.PathLike) -> None:
    """Stop before any slow work when no results could be written to ``folder`` (created later, only once there
    is something to write): a file in the way, or a folder the user may not write in."""
    from ..errors import InputError

    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write results to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write results to {folder}: no permission to write in {existing}")


def _escape_unprintable_output() -> None:
    """Characters the console's code page cannot show (a path in another script) are printed escaped: a
    UnicodeEncodeError at the final summary would turn a finished run into a traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def ctseg_folder(spec: str, command: str, instead: str):
    """The folder of ``--data ctseg2d:DIR``: the one ``--data`` kind of ``train``, ``evaluate`` and ``finetune``
    (its slices carry patients and slice order); ``instead`` says what to give for other data."""
    from ..data.general import parse_data_spec
    from ..errors import InputError

    kind, path = parse_data_spec(spec)
    if kind != "ctseg2d":
        raise InputError(f"relseg {command} reads --data ctseg2d:DIR, not {kind}; give {instead}")
    return path


def case_list(text: str | None) -> list[str] | None:
    """``--cases "A,B"`` -> ``["A", "B"]``; None (every slice) without ``--cases``."""
    if text is None:
        return None
    cases = [case.strip() for case in text.split(",") if case.strip()]
    if not cases:
        from ..errors import InputError

        raise InputError("--cases needs at least one case or patient name")
    return cases


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress bar|lines|none``, shown by ``progress_display``."""
    parser.add_argument("--progress", choices=("bar", "lines", "none"), default="bar",
                        help="progress display; 'lines' prints 'PROGRESS <fraction> <stage>' for tools")


@contextlib.contextmanager
def progress_display(kind: str) -> Iterator[Progress]:
    """A tqdm bar on stderr (when it is a terminal), ``PROGRESS`` lines on stdout, or nothing."""
    if kind == "lines":
        yield line_progress()
        return
    if kind == "none":
        yield Progress()
        return
    from tqdm import tqdm

    bar = tqdm(total=1000, file=sys.stderr, bar_format="{desc:<28.28} {percentage:3.0f}%|{bar}| {elapsed}",
               leave=False, disable=None)  # None: no bar when stderr is not a terminal (logs, pipes)

    def show(fraction: float, stage: str) -> None:
        bar.set_description_str(stage, refresh=False)
        bar.update(round(fraction * 1000) - bar.n)

    try:
        yield Progress(callback=show)
    finally:
        bar.close()


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="where the network runs: auto picks the GPU when PyTorch sees one (default: auto)",
    )


if __name__ == "__main__":
    sys.exit(main())
