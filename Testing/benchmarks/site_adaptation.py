"""Learning a new site from a few corrected slices: fine-tuning against training from scratch, on real patients.

``../shared/data/covid-ct-seg-2d`` holds two sites: coronacases.org (7 patients, HU CT) and Radiopaedia
(5 patients, 8-bit sources, another appearance). In each direction a base model is trained on part of
one site only (``relseg train --data ctseg2d:DIR --cases ...``, the commands below); then k = 4, 8, 16,
32 slices of 2 patients of the other site are "corrected" (their expert masks), spread evenly along each
patient's series, and the base model is fine-tuned on them with ``relsegcore.finetune.finetune`` (what ``relseg
finetune`` runs). Each model is scored by mean per-slice Dice (``relseg evaluate``'s ``mean_dice``) on

- ``near``: the other slices of the corrected patients, each at least 3 slices from a corrected one
  (the radiologist's loop inside one batch of scans; the issue's done-when);
- ``other``: the new site's other patients (at most 256 slices, spread);
- ``kept``: the first site's held-out patients (forgetting; at most 128 slices, spread).

Beside it, a network trained from scratch on the same k slices for the same iterations. At k = 16 the
study varies what learns (``trainable``: all / decoder / norm), replay of 64 of the base model's own
training slices, and the learning rate. Writes ``site_adaptation.json`` and ``site_adaptation.png`` into --out and
prints the markdown tables of ``RelSegCore/README.md``. Not part of pytest; about an hour on 2 CPU cores::

    relseg train --data ctseg2d:../shared/data/covid-ct-seg-2d \
        --cases coronacases_001,coronacases_002,coronacases_003,coronacases_004,coronacases_005 \
        --patch-size 160 --batch-size 8 --iterations 1200 --out work-dirs/site/base-coronacases \
        --export base-coronacases --device cpu
    relseg train --data ctseg2d:../shared/data/covid-ct-seg-2d --cases radiopaedia_10,radiopaedia_14,radiopaedia_27 \
        --patch-size 160 --batch-size 8 --iterations 1200 --out work-dirs/site/base-radiopaedia \
        --export base-radiopaedia --device cpu
    python Testing/benchmarks/site_adaptation.py --bases work-dirs/site --out work-dirs/site [--direction NAME]
        [--no-sweep] [--variants 1,2]   # parts may run in parallel processes; --render merges them
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relsegcore import zoo
from relsegcore.data.ctseg import patient_of, read_cases_csv, read_ctseg2d
from relsegcore.engines import resolve_engine
from relsegcore.finetune import DEFAULT_ITERATIONS, DEFAULT_LEARNING_RATE, case_orders, finetune, guard_candidates
from relsegcore.inference import predict_slices
from relsegcore.models import NetworkConfig
from relsegcore.training import TrainConfig, mean_case_dice, train

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
CORONACASES_TRAIN = [f"coronacases_00{i}" for i in (1, 2, 3, 4, 5)]
RADIOPAEDIA_TRAIN = ["radiopaedia_10", "radiopaedia_14", "radiopaedia_27"]
DIRECTIONS = {
    "coronacases -> radiopaedia": {"base": "base-coronacases", "kept": ["coronacases_007", "coronacases_008"],
                                   "corrected": ["radiopaedia_10", "radiopaedia_14"],  # the two largest: 195 slices
                                   "other": ["radiopaedia_27", "radiopaedia_29", "radiopaedia_36"]},
    "radiopaedia -> coronacases": {"base": "base-radiopaedia", "kept": ["radiopaedia_29", "radiopaedia_36"],
                                   "corrected": ["coronacases_001", "coronacases_002"],
                                   "other": ["coronacases_003", "coronacases_004", "coronacases_005",
                                             "coronacases_007", "coronacases_008"]},
}
REPLAY_SLICES = 64  # of the base model's own training slices, spread over its patients
KS = (4, 8, 16, 32)
STUDY_K = 16
STUDY = [  # (label, trainable, replay, learning rate); the first is the default, which every k runs with
    ("all, no replay, lr 5e-4", "all", False, DEFAULT_LEARNING_RATE),
    ("all, replay", "all", True, DEFAULT_LEARNING_RATE),
    ("decoder only", "decoder", False, DEFAULT_LEARNING_RATE),
    ("norm layers only", "norm", False, DEFAULT_LEARNING_RATE),
    ("all, lr 1e-3", "all", False, 1e-3),
    ("all, lr 2e-3", "all", False, 2e-3),
]


@dataclass
class Site:
    """Every slice of covid-ct-seg-2d in the models' appearance, with its series, patient and order."""

    images: np.ndarray
    masks: np.ndarray
    cases: np.ndarray
    patients: np.ndarray
    orders: np.ndarray

    @classmethod
    def read(cls, root: Path) -> Site:
        rows = read_cases_csv(root)
        data = read_ctseg2d(root, size=256)
        cases = np.array([row["case"] for row in rows], dtype=object)
        return cls(data.images, data.masks, cases, np.array([patient_of(c) for c in cases], dtype=object),
                   np.array(case_orders(rows)))

    def of(self, patients: list[str]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.patients, patients))


def corrected_slices(site: Site, patients: list[str], k: int) -> np.ndarray:
    """k slices, half of each patient's share, evenly spread along each patient's series (by order)."""
    chosen = []
    for index, patient in enumerate(patients):
        share = k // len(patients) + (index < k % len(patients))
        rows = site.of([patient])
        rows = rows[np.lexsort((site.orders[rows], site.cases[rows]))]  # series by series, each in order
        chosen.extend(rows[np.linspace(0, len(rows) - 1, share + 2).round().astype(int)[1:-1]])
    return np.array(sorted(chosen))


def spread(rows: np.ndarray, limit: int) -> np.ndarray:
    return rows if len(rows) <= limit else rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]


def score(network: torch.nn.Module, card: zoo.ModelCard, site: Site, rows: np.ndarray) -> float:
    """Mean per-slice Dice of infection (both empty = 1), as ``relseg evaluate`` reports it."""
    engine = resolve_engine("auto", torch.device("cpu"), 2)  # OpenVINO when installed: the same labels, faster
    unnamed = dataclasses.replace(card, sha256="")  # in-memory weights: not the card's, so nothing is cached
    loaded = zoo.LoadedModel(network=network.eval(), card=unnamed, device=torch.device("cpu"), engine=engine)
    labels = predict_slices(loaded, site.images[rows]).argmax(1)
    return mean_case_dice(torch.from_numpy(labels), torch.from_numpy(site.masks[rows].astype(np.int64)))


def scores(network, card, site: Site, sets: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: round(score(network, card, site, rows), 4) for name, rows in sets.items()}


def run_direction(name: str, spec: dict, site: Site, bases: Path, sweep: bool, variants: list[int]) -> dict:
    base_card = zoo.find_model(bases / spec["base"] / f"{spec['base']}.pt")  # relseg train --export writes it there
    base = zoo.load_model(base_card.path, torch.device("cpu"), "torch")
    kept = site.of(spec["kept"])
    other = site.of(spec["other"])
    source_train = site.of(CORONACASES_TRAIN if spec["base"] == "base-coronacases" else RADIOPAEDIA_TRAIN)
    replay_rows = spread(source_train, REPLAY_SLICES)
    result = {"direction": name, "base": str(base_card.path), "corrected_patients": spec["corrected"],
              "other_patients": spec["other"], "kept_patients": spec["kept"], "runs": []}
    runs = ([(k, STUDY[0]) for k in KS] if sweep else []) + [(STUDY_K, STUDY[index]) for index in variants]
    fixed = {"other": spread(other, 256), "kept": spread(kept, 128)}
    fixed_before = scores(base.network, base_card, site, fixed)  # the base model on sets that do not change with k
    for k, (label, trainable, replay, lr) in runs:
        corrected = corrected_slices(site, spec["corrected"], k)
        flags = np.zeros(len(site.cases), bool)
        flags[corrected] = True
        near = guard_candidates(site.cases, site.orders, flags, site.patients)
        near = near[np.isin(site.patients[near], spec["corrected"])]
        sets = {"near": near, **fixed}
        before = {**scores(base.network, base_card, site, {"near": near}), **fixed_before}
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            tuned = finetune(base_card.path, site.images[corrected], site.masks[corrected], out=Path(tmp) / "ft.pt",
                             cases=list(site.cases[corrected]), holdout_images=site.images[spread(near, 32)],
                             holdout_masks=site.masks[spread(near, 32)], device="cpu", learning_rate=lr,
                             trainable=trainable,
                             replay=(site.images[replay_rows], site.masks[replay_rows]) if replay else None)
            seconds = time.perf_counter() - started
            network = zoo.load_model(tuned.path, torch.device("cpu"), "torch").network
        after = scores(network, base_card, site, sets)
        row = {"k": k, "variant": label, "seconds": round(seconds, 1), "before": before, "after": after,
               "near_slices": len(near)}
        if label == STUDY[0][0]:
            row["scratch"] = scores(scratch(site, corrected, base_card), base_card, site, sets)
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    return result


def scratch(site: Site, rows: np.ndarray, card: zoo.ModelCard) -> torch.nn.Module:
    """A network of the base's architecture trained on the corrected slices alone, fine-tuning's iterations."""
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(out_dir=Path(tmp), network=NetworkConfig(**card.architecture),
                             iterations=DEFAULT_ITERATIONS, batch_size=8, warmup_iterations=6,
                             validate_every=DEFAULT_ITERATIONS, checkpoint_every=DEFAULT_ITERATIONS, device="cpu")
        return train(config, site.images[rows], (site.masks[rows] > 0).astype(np.uint8), resume=False).network


def merged(paths: list[Path]) -> list[dict]:
    """One result per direction from the parts run in separate processes (sweep first, then the variants)."""
    by_direction: dict[str, dict] = {}
    for path in paths:
        part = json.loads(path.read_text())
        kept = by_direction.setdefault(part["direction"], {**part, "runs": []})
        kept["runs"] += part["runs"]
    for result in by_direction.values():
        result["runs"].sort(key=lambda run: (run["variant"] != STUDY[0][0], run["k"]))
    return list(by_direction.values())


def tables(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines += [f"\n**{result['direction']}** (corrected: {', '.join(result['corrected_patients'])}; other: "
                  f"{', '.join(result['other_patients'])}; kept: {', '.join(result['kept_patients'])})\n",
                  "| k | variant | near: base -> fine-tuned (scratch) | other patients | kept (forgetting) | s |",
                  "|---|---|---|---|---|---|"]
        for run in result["runs"]:
            b, a, s = run["before"], run["after"], run.get("scratch")
            cell = {key: f"{b[key]:.3f} -> {a[key]:.3f}" + (f" ({s[key]:.3f})" if s else "") for key in b}
            lines.append(f"| {run['k']} | {run['variant']} | {cell['near']} | {cell['other']} | {cell['kept']} | "
                         f"{run['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        runs = [run for run in result["runs"] if "scratch" in run]
        ks = [run["k"] for run in runs]
        for key, colour in (("near", "tab:red"), ("other", "tab:blue"), ("kept", "tab:green")):
            axis.plot(ks, [run["after"][key] for run in runs], "-o", color=colour, label=f"fine-tuned, {key}")
            axis.plot(ks, [run["scratch"][key] for run in runs], ":x", color=colour, label=f"scratch, {key}")
            axis.axhline(runs[0]["before"][key], color=colour, alpha=0.4, linestyle="--")
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel("corrected slices k")
        axis.set_ylabel("mean per-slice Dice")
        axis.set_title(result["direction"] + " (dashed: base)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", type=Path, default=Path("work-dirs/site"))
    parser.add_argument("--out", type=Path, default=Path("work-dirs/site"))
    parser.add_argument("--direction", choices=list(DIRECTIONS), action="append")
    parser.add_argument("--no-sweep", action="store_true", help="skip the k sweep (default variant, k = 4..32)")
    parser.add_argument("--variants", default="", help="comma-separated indices of STUDY to run at k = 16 (1..)")
    parser.add_argument("--render", action="store_true", help="only print the tables and plot of saved results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    directions = args.direction or list(DIRECTIONS)
    variants = [int(index) for index in args.variants.split(",") if index]
    if not args.render:
        site = Site.read(DATA / "covid-ct-seg-2d")
        part = ("sweep" if not args.no_sweep else "") + "".join(f"-v{index}" for index in variants)
        for name in directions:
            result = run_direction(name, DIRECTIONS[name], site, args.bases, not args.no_sweep, variants)
            path = args.out / f"site_adaptation_{DIRECTIONS[name]['base']}_{part}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
    results = merged(sorted(args.out.glob("site_adaptation_*.json")))
    plot(results, args.out / "site_adaptation.png")
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
