"""The COVID-19-CT-Seg benchmark protocols (Ma et al., Medical Physics 2021) on a user's copy of the data.

Task 1 (limited annotations): the cases are split into ``folds`` groups and each group is the
*training* set once (4 of 20 cases), the other cases its test set (16) -- the reverse of ordinary
cross-validation. Task 3: the non-COVID lesion data plus the same 4 COVID cases per fold, either
``pooled`` into one training (the benchmark's naive baseline) or ``dual`` (this project's method:
a general encoder trained once on the non-COVID data, then the dual model with the relation loss).

Each fold trains a 2D model on every slice of its training volumes (rendered from HU by ``recipe`` as at
inference: by default the shipped models' ``full-slice-clahe``; ``lung-crop`` reproduces the 1.x models;
slices with infection drawn at least ``lesion_fraction`` of the time, as nnU-Net oversamples foreground)
and scores its test CTs through the full ``pipeline.segment`` in mm: DSC and NSD at 3 mm. Results are
kept per fold, so a rerun skips finished folds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .crossval import fold_indices
from .data.intensity import FULL_SLICE_CLAHE, RECIPES, preprocessing_for, recipe_of
from .data.readers import SliceSet, VolumeOptions, find_volume_pairs, read_pairs
from .errors import InputError
from .fileutil import atomic_path, atomic_write_text
from .imageio import hu_from_stored_window, in_grey_range

TASKS = ("task1", "task3")
METHODS = ("dual", "pooled")
TOLERANCE_MM = 3.0  # NSD tolerance for infection in the benchmark
BENCHMARK_WINDOW = (-1250.0, 250.0)  # the benchmark's window; its Radiopaedia CTs are stored in it as 0..255
GENERAL_MODEL_NAME = "general-encoder"
CasePair = tuple[str, Path, Path]


@dataclass
class BenchmarkConfig:
    """One benchmark run: the data, the protocol, and the training recipe of every fold."""

    task: str
    images: Path
    out_dir: Path
    masks: Path | None = None  # None: the images folder holds image/mask or imagesTr/labelsTr folders
    folds: int = 5
    train_cases: int = 4
    splits: Path | None = None  # JSON of each fold's training cases, e.g. the benchmark's published split
    seed: int = 0
    method: str = "dual"  # task3 only
    general_data: tuple[str, ...] = ()  # task3: KIND:PATH sets of non-COVID lesions
    general_encoder: Path | None = None  # task3 dual: an existing stage-1 model instead of training one
    iterations: int = 3000
    general_iterations: int | None = None  # stage 1; default: iterations
    batch_size: int = 16
    learning_rate: float = 2e-3
    size: int = 256
    base_channels: int = 16
    depth: int = 5
    relation_weight: float = 10.0  # the shipped default: reading "encoders", weight 10
    lesion_fraction: float = 0.5
    recipe: str = FULL_SLICE_CLAHE  # how HU slices look to the network (intensity.RECIPES), as the shipped models
    device: str = "auto"
    cache_dir: Path | None = None
    command: str = ""  # the exact command, recorded in the model cards and results.json

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"the benchmark task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.recipe not in RECIPES:
            raise InputError(f"the recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")
        if self.method not in METHODS:
            raise InputError(f"the Task 3 method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.task == "task3" and not self.general_data and not (self.method == "dual" and self.general_encoder):
            raise InputError("Task 3 needs the non-COVID data: give --general-data KIND:PATH"
                             + (" or --general-encoder MODEL" if self.method == "dual" else ""))

    @property
    def label(self) -> str:
        """What the table's title calls the method."""
        if self.task == "task1":
            return "2D U-Net, COVID cases only"
        return ("dual encoder + relation loss (general encoder from non-COVID data)" if self.method == "dual"
                else "2D U-Net, non-COVID data pooled with the COVID cases")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


# ----------------------------------------------------------------------------- folds


def case_pairs(images: Path, masks: Path | None = None) -> list[CasePair]:
    """``(case, image, mask)`` of every CT, masks matched by file name (Ma et al.'s release, Decathlon)."""
    return find_volume_pairs(images, masks)


def in_hounsfield_units(pairs: Sequence[CasePair], out_dir: Path) -> list[CasePair]:
    """The pairs with every CT stored already windowed (voxels within 0..255, no air below zero) replaced
    by a copy in HU under ``out_dir``, so that lung segmentation and the model's window see real CT values.

    The COVID-19-CT-Seg release stores its Radiopaedia cases windowed to [-1250, 250] HU as 0..255; a CT in
    HU always has air far below zero, so the test cannot mistake one for the other.
    """
    import SimpleITK as sitk

    result = []
    for case, image_path, mask_path in pairs:
        target = Path(out_dir) / f"{case}.nii.gz"
        if not target.is_file():
            image = sitk.ReadImage(str(image_path))
            voxels = sitk.GetArrayViewFromImage(image)
            if image.GetNumberOfComponentsPerPixel() != 1 or not in_grey_range(voxels.min(), voxels.max()):
                result.append((case, image_path, mask_path))
                continue
            hu = hu_from_stored_window(image, BENCHMARK_WINDOW)
            with atomic_path(target) as tmp:
                sitk.WriteImage(hu, str(tmp), useCompression=True)
        result.append((case, target, mask_path))
    return result


def training_splits(cases: Sequence[str], folds: int, train_cases: int, seed: int = 0) -> list[list[str]]:
    """Each fold's training cases: the cases split into ``folds`` groups, each group trains once.

    Groups come from ``crossval.fold_indices`` (deterministic by seed); with more cases than
    ``folds * train_cases`` the rest of each group is only ever tested.
    """
    if folds < 2 or train_cases < 1 or folds * train_cases > len(cases):
        raise InputError(f"{folds} folds of {train_cases} training case(s) need at least {folds * train_cases} "
                         f"cases and at least 2 folds; found {len(cases)} cases")
    groups = fold_indices(len(cases), folds, seed)
    return [sorted(cases[i] for i in group[:train_cases]) for group in groups]


def read_splits(path: Path, cases: Sequence[str]) -> list[list[str]]:
    """Training cases per fold from JSON: ``[[case, ...], ...]``, ``{"folds": [[...], ...]}`` or nnU-Net's
    ``splits_final.json`` (``[{"train": [...], "val": [...]}, ...]``; the benchmark's published ``.pkl``
    splits hold the same lists, pickled, and are not read here because unpickling can run code)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the splits file {path}: {error}") from error
    splits = data.get("folds") if isinstance(data, dict) else data
    if isinstance(splits, list):
        splits = [split.get("train") if isinstance(split, dict) else split for split in splits]
    if not isinstance(splits, list) or len(splits) < 2 or not all(isinstance(s, list) and s for s in splits):
        raise InputError(f"{path} must hold a list of at least 2 folds, each a list of training case names")
    known = set(cases)
    for split in splits:
        unknown = [str(name) for name in split if str(name) not in known]
        if unknown:
            raise InputError(f"{path} names case {unknown[0]!r}, which is not among the CT volumes")
    return [sorted(str(name) for name in split) for split in splits]


def fold_plan(config: BenchmarkConfig, pairs: Sequence[CasePair]) -> list[tuple[list[CasePair], list[CasePair]]]:
    """``(training pairs, test pairs)`` per fold; a case is never tested in the fold it trains."""
    names = [case for case, _, _ in pairs]
    splits = (read_splits(config.splits, names) if config.splits
              else training_splits(names, config.folds, config.train_cases, config.seed))
    plan = []
    for split in splits:
        chosen = set(split)
        plan.append(([p for p in pairs if p[0] in chosen], [p for p in pairs if p[0] not in chosen]))
    if any(not test for _, test in plan):
        raise InputError("a fold would have no test case left: use fewer training cases")
    return plan


# ----------------------------------------------------------------------------- data


def volume_slices(pairs: Sequence[CasePair], config: BenchmarkConfig) -> SliceSet:
    """Every slice of the training CTs, rendered by the config's recipe as at inference."""
    options = VolumeOptions(size=config.size, only_lesion_slices=False, context="lungs", recipe=config.recipe)
    return read_pairs(list(pairs), options, source="covid", cache_dir=config.cache_dir)


def general_slices(config: BenchmarkConfig) -> SliceSet:
    """The non-COVID lesion sets (``KIND:PATH``) as one set with binary lesion masks."""
    from .data.general import read_dataset_spec

    data = SliceSet.concat([read_dataset_spec(spec, size=config.size, cache_dir=config.cache_dir,
                                              recipe=config.recipe) for spec in config.general_data])
    return dataclasses.replace(data, masks=(data.masks > 0).astype(np.uint8))


# ----------------------------------------------------------------------------- training


def _train_config(config: BenchmarkConfig, out_dir: Path, general: bool, iterations: int, **extra):
    from .models import NetworkConfig
    from .training import TrainConfig

    network = NetworkConfig(num_classes=2, base_channels=config.base_channels, depth=config.depth,
                            use_general_encoder=general)
    return TrainConfig(out_dir=out_dir, network=network, iterations=iterations, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, seed=config.seed, device=config.device,
                       validate_every=max(1, iterations // 10), checkpoint_every=max(1, iterations // 10), **extra)


def train_and_save(config: BenchmarkConfig, train_config, data: SliceSet, name: str, role: str,
                   show_bar: bool = False) -> Path:
    """Train on ``data`` (resuming a checkpoint in the run folder) and save ``<name>.pt`` + card there."""
    from .training import lesion_share, train
    from .zoo import ModelCard, save_model

    masks = (data.masks > 0).astype(np.uint8)
    result = train(train_config, data.images, masks, sample_weights=lesion_share(masks, config.lesion_fraction),
                   show_bar=show_bar)
    card = ModelCard(
        name=name, version="1.0.0", description=f"COVID-19-CT-Seg {config.task} {role} model (relseg benchmark)",
        file="", sha256="", architecture={}, classes=["background", "lesion" if role == "general-encoder"
                                                      else "infection"],
        preprocessing=preprocessing_for(config.recipe, config.size),
        training={"role": role, "data": f"{data.source} ({len(data)} slices)", "command": config.command,
                  "iterations": train_config.iterations, "seconds": round(result.seconds, 1),
                  "config": train_config.to_dict()},
    )
    return save_model(result.network, card, train_config.out_dir)


def general_encoder_model(config: BenchmarkConfig, say: Callable[[str], None], show_bar: bool = False) -> Path:
    """Stage 1 for Task 3 ``dual``: the given model, or one trained once on the non-COVID data and reused."""
    if config.general_encoder is not None:
        _check_recipe(config, Path(config.general_encoder))
        return Path(config.general_encoder)
    out_dir = Path(config.out_dir) / "general"
    model_path = out_dir / f"{GENERAL_MODEL_NAME}.pt"
    if model_path.is_file() and model_path.with_suffix(".json").is_file():
        say(f"general encoder: reusing {model_path}")
        return model_path
    data = general_slices(config)
    say(f"general encoder: training on {len(data)} non-COVID slices from {data.source}")
    train_config = _train_config(config, out_dir, general=False,
                                 iterations=config.general_iterations or config.iterations)
    return train_and_save(config, train_config, data, GENERAL_MODEL_NAME, "general-encoder", show_bar)


def _check_recipe(config: BenchmarkConfig, model: Path) -> None:
    """A given general encoder must have learned slices in the recipe the folds train in (a bare training
    checkpoint has no card to tell: it is taken as it is)."""
    from .errors import RelSegError
    from .zoo import find_model

    try:
        card = find_model(model)
    except RelSegError:
        return
    seen = recipe_of(card.preprocessing)
    if seen != config.recipe:
        raise InputError(f"--general-encoder {model.name} learned {seen} slices; this benchmark trains on "
                         f"{config.recipe} slices (give --recipe {seen}, or a general encoder of that recipe)")


def fold_model(config: BenchmarkConfig, fold: int, train_pairs: Sequence[CasePair], say: Callable[[str], None],
               general_model: Path | None = None, show_bar: bool = False) -> Path:
    """Train (or resume) the fold's model on its training CTs and the task's extra data."""
    from .training import RelationConfig

    data = volume_slices(train_pairs, config)
    extra: dict = {}
    general = False
    if config.task == "task3" and config.method == "pooled":
        data = SliceSet.concat([general_slices(config), data])
    elif config.task == "task3":
        general = True
        extra = {"general_encoder": general_model, "freeze_general": True,
                 "relation": RelationConfig(reading="encoders", weight=config.relation_weight)}
    say(f"fold {fold}: training on {len(data)} slices ({', '.join(case for case, _, _ in train_pairs)})")
    train_config = _train_config(config, fold_dir(config, fold), general, config.iterations, **extra)
    return train_and_save(config, train_config, data, f"{config.task}-fold{fold}", "infection", show_bar)


# ----------------------------------------------------------------------------- runs


def fold_dir(config: BenchmarkConfig, fold: int) -> Path:
    return Path(config.out_dir) / f"fold{fold}"


def run_fold(config: BenchmarkConfig, fold: int, train_pairs: Sequence[CasePair], test_pairs: Sequence[CasePair],
             say: Callable[[str], None] = print, show_bar: bool = False) -> dict:
    """Train fold ``fold`` (1-based) and score its test CTs; ``foldK/result.json`` makes it skip next time."""
    from .evaluation import evaluate_volume_cases

    result_path = fold_dir(config, fold) / "result.json"
    train_names = [case for case, _, _ in train_pairs]
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        if result.get("train_cases") != train_names or result.get("task") != config.task:
            raise InputError(f"{result_path} was made with other training cases or another task; "
                             "use a new --out folder")
        say(f"fold {fold}: done before, skipped ({result_path})")
        return result
    general_model = (general_encoder_model(config, say, show_bar)
                     if config.task == "task3" and config.method == "dual" else None)
    model_path = fold_model(config, fold, train_pairs, say, general_model, show_bar)
    say(f"fold {fold}: evaluating {len(test_pairs)} test CTs")
    scores = evaluate_volume_cases(model_path, list(test_pairs), device=config.device, tolerance_mm=TOLERANCE_MM)
    result = {
        "fold": fold, "task": config.task, "method": config.method if config.task == "task3" else "target-only",
        "train_cases": train_names, "test_cases": [case for case, _, _ in test_pairs],
        "model": str(model_path), "general_encoder": str(general_model) if general_model else None,
        "tolerance_mm": TOLERANCE_MM, "dsc": metric_summary(scores["per_case"], "dice"),
        "nsd": metric_summary(scores["per_case"], "nsd"), "per_case": scores["per_case"],
    }
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result


def metric_summary(per_case: Sequence[dict], key: str) -> dict:
    """Mean and sample sd of one metric over cases (non-finite values left out)."""
    values = [float(case[key]) for case in per_case if math.isfinite(float(case.get(key, math.nan)))]
    return {"mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def run_benchmark(config: BenchmarkConfig, only_fold: int | None = None, say: Callable[[str], None] = print,
                  show_bar: bool = False) -> dict:
    """Run every fold (or only ``only_fold``, 1-based), then write ``results.json`` and ``table.md``."""
    pairs = in_hounsfield_units(case_pairs(config.images, config.masks), Path(config.out_dir) / "hu")
    plan = fold_plan(config, pairs)
    if only_fold is not None and not 1 <= only_fold <= len(plan):
        raise InputError(f"--fold must be between 1 and {len(plan)}, not {only_fold}")
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    for fold, (train_pairs, test_pairs) in enumerate(plan, start=1):
        if only_fold is None or fold == only_fold:
            run_fold(config, fold, train_pairs, test_pairs, say, show_bar)
    finished = [json.loads(path.read_text(encoding="utf-8")) for fold in range(1, len(plan) + 1)
                if (path := fold_dir(config, fold) / "result.json").is_file()]
    summary = summarise_benchmark(config, finished, planned_folds=len(plan))
    atomic_write_text(Path(config.out_dir) / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(Path(config.out_dir) / "table.md", format_table(summary))
    return summary


def summarise_benchmark(config: BenchmarkConfig, fold_results: Sequence[dict], planned_folds: int) -> dict:
    """Per-fold DSC / NSD and their mean over all test results of the finished folds."""
    per_case = [case for result in fold_results for case in result["per_case"]]
    return {
        "task": config.task, "method": fold_results[0]["method"] if fold_results else None, "label": config.label,
        "tolerance_mm": TOLERANCE_MM, "planned_folds": planned_folds, "finished_folds": len(fold_results),
        "folds": [{key: result[key] for key in ("fold", "train_cases", "test_cases", "model", "dsc", "nsd")}
                  for result in fold_results],
        "mean": {"dsc": metric_summary(per_case, "dice"), "nsd": metric_summary(per_case, "nsd")},
        "command": config.command, "config": config.to_dict(),
    }


def format_table(summary: dict) -> str:
    """The benchmark's layout: one row per fold and a mean row, DSC and NSD in % as mean ± sd."""
    def cell(stats: dict) -> str:
        return "–" if stats["mean"] is None else f"{100 * stats['mean']:.1f} ± {100 * stats['sd']:.1f}"

    task = {"task1": "Task 1", "task3": "Task 3"}[summary["task"]]
    lines = [f"COVID-19-CT-Seg {task}, infection: {summary['label']}", "",
             f"| fold | training cases | test cases | DSC (%) | NSD@{summary['tolerance_mm']:g}mm (%) |",
             "|---|---|---|---|---|"]
    for fold in summary["folds"]:
        lines.append(f"| {fold['fold']} | {len(fold['train_cases'])} | {len(fold['test_cases'])} | "
                     f"{cell(fold['dsc'])} | {cell(fold['nsd'])} |")
    done = summary["finished_folds"]
    name = "mean" if done == summary["planned_folds"] else f"mean ({done} of {summary['planned_folds']} folds)"
    lines.append(f"| {name} | | | {cell(summary['mean']['dsc'])} | {cell(summary['mean']['nsd'])} |")
    lines += ["", "mean ± sd over the test cases of each fold; the mean row pools the test cases of all folds."]
    return "\n".join(lines) + "\n"


def command_line(argv: Sequence[str]) -> str:
    return "relseg " + shlex.join(argv)
