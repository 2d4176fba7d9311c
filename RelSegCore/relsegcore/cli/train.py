"""``relseg pretrain-general`` (stage 1) and ``relseg train`` (stage 2), with cross-validation."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..crossval import summarise_folds, train_val_split, write_summary
from ..data.augment import MAX_NOISE_SIGMA
from ..data.intensity import FULL_SLICE_CLAHE, LUNG_CROP, RECIPES
from ..models import NetworkConfig
from ..training import (
    RELATION_READINGS,
    RelationConfig,
    TrainConfig,
    distributed_context,
    lesion_share,
    train,
)
from . import add_device_argument, case_list, ctseg_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    pretrain = subparsers.add_parser(
        "pretrain-general",
        help="stage 1: train the general encoder on non-COVID lung lesions",
        description="Train a single-encoder network on non-COVID lesion data (nodules, tumours, effusion); "
                    "its encoder becomes the general encoder of the dual model.",
    )
    lesions = pretrain.add_argument_group("non-COVID lesion data")
    lesions.add_argument("--data", action="append", default=[], metavar="KIND:PATH",
                         help="a dataset: folder:DIR (images/ + masks/), pairs:DIR (volumes + masks), "
                              "decathlon:DIR, npz:FILE (patches), slices:FILE (--save-slices); repeat for several")
    lesions.add_argument("--shared-data", type=Path, metavar="DIR",
                         help="read the recipe's non-COVID sets from this data folder (e.g. ../shared/data)")
    lesions.add_argument("--sets", default="lidc,pleural-effusion,lung-tumor,msd-patches",
                         help="with --shared-data: which sets (default: all four)")
    lesions.add_argument("--save-slices", type=Path, metavar="FILE",
                         help="also save the prepared slices (.npz) for --data slices:FILE on another machine")
    lesions.add_argument("--prepare-only", action="store_true", help="stop after reading (and saving) the data")
    lesions.add_argument("--cache-dir", type=Path, help="cache preprocessed slices here (fast second read)")
    lesions.add_argument("--recipe", choices=RECIPES, default=LUNG_CROP,
                         help="how whole-chest HU slices look to the network (the target model's recipe)")
    _add_common(pretrain)
    pretrain.set_defaults(func=run_pretrain)

    stage2 = subparsers.add_parser(
        "train", help="stage 2: train the dual-encoder model on COVID-19 slices",
        description="Train on a 2D image folder (images/*.jpg|png + masks/*.png), on CT volumes and their masks "
                    "(--volumes) or on --data ctseg2d:DIR, optionally with a general encoder and the "
                    "relation-consistency loss; --cross-validate runs k-fold cross-validation (by patient for "
                    "ctseg2d data, by volume for --volumes).",
    )
    _add_training_data(stage2.add_argument_group("COVID-19 training data"))
    _add_general_encoder(stage2.add_argument_group("general encoder and relation loss (the paper's method)"))
    _add_extra_slices(stage2.add_argument_group("negatives and pooled slices"))
    _add_starting_weights(stage2.add_argument_group("starting weights and distillation"))
    _add_folds(stage2.add_argument_group("folds (by patient, or by volume with --volumes)"))
    _add_common(stage2)
    stage2.set_defaults(func=run_train)


def _add_training_data(group: argparse._ArgumentGroup) -> None:
    """What the network learns from: a picture folder, CT volumes or a covid-ct-seg-2d folder."""
    group.add_argument("--images", type=Path, help="folder of training images (or give --data)")
    group.add_argument("--masks", type=Path, help="folder of masks with matching stems")
    group.add_argument("--volumes", action="store_true",
                       help="--images and --masks hold CT volumes in HU (NIfTI/NRRD/MHA, masks matched by file "
                            "name; without --masks, beside the CTs: NAME_ct + NAME_label, imagesTr/ + labelsTr/...): "
                            "every axial slice, rendered as full-slice-clahe like the shipped models at "
                            "inference, slices with a lesion drawn at least --lesion-fraction of the time; folds "
                            "go by volume (a Radiopaedia patient's series together)")
    group.add_argument("--lesion-fraction", type=float, default=0.5,
                       help="with --volumes: the least share of each batch drawn from slices with a lesion "
                            "(most slices of a CT have none; default 0.5)")
    group.add_argument("--data", metavar="ctseg2d:DIR",
                       help="a covid-ct-seg-2d folder (images/, masks/, lungs/, cases.csv): whole slices in the "
                            "full-slice-clahe appearance; folds and splits go by patient")
    group.add_argument("--target", choices=("infection", "lungs"), default="infection",
                       help="with --data: learn the infection masks or the lung masks (a lung model); with "
                            "--volumes: what the masks hold")
    group.add_argument("--cases", help="with --data or --volumes: only these cases or patients (comma-separated)")
    group.add_argument("--multiclass", action="store_true",
                       help="masks hold 0 background, 1 ground-glass, 2 consolidation")
    group.add_argument("--upright", action="store_true",
                       help="with --data ctseg2d: turn the patients stored posterior up (told by their lung masks) "
                            "anterior up, so the network only sees chests as relseg segment shows them; the card "
                            "says so and relseg evaluate turns such slices upright for it too")


def _add_general_encoder(group: argparse._ArgumentGroup) -> None:
    """The dual encoder: the general encoder from stage 1 and the relation-consistency loss."""
    group.add_argument("--general-encoder", type=Path, help="stage-1 model (.pt) whose encoder is the general one")
    group.add_argument("--finetune-general", action="store_true",
                       help="train the general encoder too, at --general-lr-scale times the learning rate")
    group.add_argument("--general-lr-scale", type=float, default=0.1)
    group.add_argument("--init-target-from-general", action="store_true",
                       help="start the target encoder from the general encoder's weights")
    group.add_argument("--relation", choices=RELATION_READINGS, default="none", help="relation-loss reading")
    group.add_argument("--relation-weight", type=float, default=1.0)
    group.add_argument("--relation-level", type=int, default=-1, help="encoder level compared (-1 = bottleneck)")
    group.add_argument("--fusion-levels", default="all", help="levels whose general features reach the decoder")


def _add_extra_slices(group: argparse._ArgumentGroup) -> None:
    """Slices beside the COVID-19 ones: negatives (no infection) and pooled lesion slices."""
    group.add_argument("--negatives", action="append", default=[], metavar="KIND:PATH",
                       help="non-COVID CT taught as containing no infection: ct:DIR (CT volumes, no masks "
                            "needed: up to --negative-slices lung slices each) or a kind of pretrain-general "
                            "--data (lesion slices, masks ignored); repeat for several; never validated on")
    group.add_argument("--negative-slices", type=int, default=16, metavar="N",
                       help="with --negatives ct:...: lung slices taken from each volume, evenly spread along z "
                            "(more slices: more of each volume's normal anatomy at the same share of each batch)")
    group.add_argument("--negative-noise", type=_noise_levels, default=(), metavar="HU[,HU...]",
                       help="with --negatives ct:...: each lung slice also rendered with white and with sharp-kernel "
                            "noise of each of these stds added in HU (e.g. 30,60,100): noisy normal lung taught as "
                            "no infection (without it CT noise is taken for ground-glass: RelSegCore/EXPERIMENTS.md)")
    group.add_argument("--negative-fraction", type=float, default=0.25,
                       help="with --negatives: their share of the slices drawn for each batch")
    group.add_argument("--pooled", action="append", default=[], metavar="KIND:PATH",
                       help="labelled slices pooled into the training slices, any lesion as infection: non-COVID "
                            "lesion data (a kind of pretrain-general --data; COVID-19-CT-Seg's Task 3, naive "
                            "pooling) or another appearance of COVID-19 infection, e.g. the COVID-SemiSeg "
                            "screenshots as folder:DIR (images/ + masks/, fingerprinted in the card)")
    group.add_argument("--pooled-fraction", type=float,
                       help="with --pooled: their share of the slices drawn for each batch, the others keeping "
                            "their relative shares (default: drawn like any training slice)")
    group.add_argument("--cache-dir", type=Path, help="cache the preprocessed --negatives slices here")


def _add_starting_weights(group: argparse._ArgumentGroup) -> None:
    """Weights to start from, and a model to distil."""
    group.add_argument("--init", metavar="MODEL",
                       help="start from a trained model's weights (name or .pt with its card: same architecture, "
                            "recipe, input size and classes) instead of random ones, e.g. to go on training a "
                            "model under another recipe; with --fold it must not have seen the fold's held-out "
                            "slices (its card's fingerprints are checked), so start each fold from its own model")
    group.add_argument("--teacher", metavar="MODEL",
                       help="a trained model (name or .pt with its card, same recipe and classes) whose softened "
                            "predictions the network learns beside the masks: e.g. a dual-encoder model "
                            "distilled into a target-only network that runs at its speed")
    group.add_argument("--distill-weight", type=float, default=1.0, help="with --teacher: the distillation "
                       "loss's weight beside Dice + cross-entropy")
    group.add_argument("--distill-temperature", type=float, default=2.0, help="with --teacher: softening")


def _add_folds(group: argparse._ArgumentGroup) -> None:
    """Cross-validation and Task 1's few-shot folds."""
    group.add_argument("--folds", type=int, default=5)
    group.add_argument("--fold", type=int, help="train on the other folds and validate on this one")
    group.add_argument("--few-shot", action="store_true",
                       help="with --fold and --data: train on this fold's patients only and validate on all the "
                            "others (COVID-19-CT-Seg's Task 1, limited annotations, by patient)")
    group.add_argument("--cross-validate", action="store_true", help="run every fold and summarise")
    group.add_argument("--jobs", type=int, default=1, help="folds run in parallel processes")


def _add_common(parser: argparse.ArgumentParser) -> None:
    """The network, schedule, loss and run options of both training commands."""
    network = parser.add_argument_group("network")
    network.add_argument("--size", type=int, default=256, help="input size in pixels")
    network.add_argument("--base-channels", type=int, default=16)
    network.add_argument("--depth", type=int, default=5)
    network.add_argument("--deep-supervision", action="store_true")
    schedule = parser.add_argument_group("schedule, loss and augmentation")
    schedule.add_argument("--iterations", type=int, default=3000)
    schedule.add_argument("--batch-size", type=int, default=16)
    schedule.add_argument("--lr", type=float, default=2e-3)
    schedule.add_argument("--seed", type=int, default=0)
    schedule.add_argument("--patch-size", type=int,
                          help="train on random square crops of this size (faster steps; validation and inference "
                               "see whole slices)")
    schedule.add_argument("--augment", type=float, default=1.0, help="augmentation strength (0 = none)")
    schedule.add_argument("--augment-series", action="store_true",
                          help="also flip slices upside down and squeeze their grey range, as the series of "
                               "covid-ct-seg-2d differ (Radiopaedia stored posterior-up, min-max squeezed by outliers)")
    schedule.add_argument("--augment-noise", type=float, default=MAX_NOISE_SIGMA, metavar="SIGMA",
                          help=f"the top of the Gaussian noise added to the 0..1 image (default {MAX_NOISE_SIGMA}; "
                               "0.1 covers about 60 HU of CT noise in the lungs after the full-slice-clahe recipe)")
    schedule.add_argument("--false-negative-weight", type=_open_fraction, default=0.5, metavar="B",
                          help="the overlap loss's weight of missed pixels against false ones: 0.5 is Dice + "
                               "cross-entropy (default), above 0.5 the Tversky index favours sensitivity")
    schedule.add_argument("--dice-per-sample", action="store_true",
                          help="one Dice per slice (or crop), averaged, as the mean per-slice Dice is scored, "
                               "instead of one Dice over the batch: slices with small structures weigh as much")
    schedule.add_argument("--validate-every", type=int, default=250)
    schedule.add_argument("--no-validation", action="store_true",
                          help="with --fold: do not score the held-out slices while training (score them "
                               "afterwards with relseg evaluate, which also gives NSD)")
    run = parser.add_argument_group("run folder and export")
    run.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, log.csv, curves.png)")
    run.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    run.add_argument("--export", metavar="NAME", help="also write the final model NAME.pt + NAME.json here")
    run.add_argument("--model-dir", type=Path, help="folder for --export (default: the run folder)")
    run.add_argument("--description", default="", help="one line for the model card")
    run.add_argument("--model-version", default="1.0.0", help="version for the --export model card")
    add_device_argument(parser)


def _network(args: argparse.Namespace, num_classes: int, general: bool) -> NetworkConfig:
    fusion = getattr(args, "fusion_levels", "all")
    return NetworkConfig(
        num_classes=num_classes, base_channels=args.base_channels, depth=args.depth,
        use_general_encoder=general, deep_supervision=args.deep_supervision,
        fusion_levels=None if fusion == "all" else [int(v) for v in fusion.split(",")],
    )


def _config(args: argparse.Namespace, out: Path, network: NetworkConfig, **extra) -> TrainConfig:
    return TrainConfig(
        out_dir=out, network=network, iterations=args.iterations, batch_size=args.batch_size,
        learning_rate=args.lr, seed=args.seed, augment_strength=args.augment,
        augment_series=args.augment_series, augment_noise=args.augment_noise,
        false_negative_weight=args.false_negative_weight, dice_per_sample=args.dice_per_sample,
        device=args.device,
        validate_every=args.validate_every, checkpoint_every=args.validate_every,
        patch_size=getattr(args, "patch_size", None), **extra,
    )


def run_pretrain(args: argparse.Namespace) -> int:
    from ..data.general import read_dataset_spec, read_general_sets
    from ..data.readers import SliceSet

    parts = [read_dataset_spec(spec, size=args.size, cache_dir=args.cache_dir, recipe=args.recipe)
             for spec in args.data]
    if args.shared_data:
        parts.append(read_general_sets(args.shared_data, names=tuple(args.sets.split(",")), size=args.size,
                                       cache_dir=args.cache_dir, recipe=args.recipe))
    if not parts:
        from ..errors import RelSegError

        raise RelSegError("give --data KIND:PATH or --shared-data DIR")
    data = SliceSet.concat(parts)
    masks = (data.masks > 0).astype("uint8")  # any lesion vs background
    print(f"general data: {len(data)} slices from {sorted(set(data.source.split('+')))}")
    if args.save_slices:
        data.save(args.save_slices)
        print(f"slices saved: {args.save_slices}")
    if args.prepare_only:
        return 0
    config = _config(args, args.out, _network(args, 2, general=False))
    result = train(config, data.images, masks, resume=not args.no_resume, show_bar=True)
    _export(args, result, config, classes=["background", "lesion"],
            training_data=f"non-COVID lung lesions: {data.source} ({len(data)} slices)", role="general-encoder",
            recipe=args.recipe)
    return 0


def _load_target(args: argparse.Namespace):
    from ..errors import RelSegError

    if args.volumes:
        return _load_volumes(args)
    if args.data:
        from ..data.ctseg import read_ctseg2d

        return read_ctseg2d(ctseg_folder(args.data, "train", "picture folders as --images/--masks"),
                            target=args.target, size=args.size, cases=case_list(args.cases), upright=args.upright)
    if args.images is None or args.masks is None:
        raise RelSegError("give --data ctseg2d:DIR, or --images DIR and --masks DIR")
    if args.upright:
        raise RelSegError("--upright needs --data ctseg2d:DIR (picture folders are turned upright by their own rule)")
    from ..data.readers import read_image_folder

    root = args.images.parent
    if args.masks.parent != root:
        raise RelSegError("--images and --masks must be sibling folders (ROOT/images, ROOT/<masks>)")
    return read_image_folder(root, size=args.size, image_dir=args.images.name, mask_dir=args.masks.name,
                             multiclass=args.multiclass)


def _load_volumes(args: argparse.Namespace):
    """Every slice of the ``--volumes`` pairs (``--cases`` of them), rendered from HU as at inference."""
    from ..data.readers import VolumeOptions, chosen_pairs, find_volume_pairs, read_pairs
    from ..errors import RelSegError

    if args.images is None or args.data:
        raise RelSegError("--volumes reads CT volumes from --images DIR and their masks from --masks DIR, or from "
                          "beside them (NAME_ct / NAME_label, imagesTr/ + labelsTr/...), not from --data")
    if args.upright:
        raise RelSegError("--upright is for --data ctseg2d:DIR: CT volumes are read anterior up already")
    if not 0.0 < args.lesion_fraction < 1.0:
        raise RelSegError(f"--lesion-fraction must lie between 0 and 1, not {args.lesion_fraction}")
    pairs = chosen_pairs(find_volume_pairs(args.images, args.masks), case_list(args.cases), args.images)
    options = VolumeOptions(size=args.size, label_map={1: 1, 2: 2} if args.multiclass else None,
                            only_lesion_slices=False, context="lungs", recipe=_recipe(args))
    data = read_pairs(pairs, options, source=args.images.name, cache_dir=args.cache_dir)
    print(f"volumes: {len(data)} slices of {len(pairs)} CTs in {args.images}")
    return data


def _recipe(args: argparse.Namespace) -> str:
    """The appearance the training slices are in: covid-ct-seg-2d slices are whole CLAHE slices, and CT volumes
    are rendered so."""
    return FULL_SLICE_CLAHE if getattr(args, "data", None) or getattr(args, "volumes", False) else LUNG_CROP


def _split(args: argparse.Namespace, names: list[str]):
    """Training and validation indices of ``--fold``: by patient for ctseg2d data and volumes, by slice otherwise."""
    if args.data or args.volumes:
        from ..data.ctseg import patient_split

        train_idx, val_idx = patient_split(names, args.folds, args.fold, seed=0)
        return (val_idx, train_idx) if args.few_shot else (train_idx, val_idx)
    if args.few_shot:
        from ..errors import RelSegError

        raise RelSegError("--few-shot splits by patient: it needs --data ctseg2d:DIR or --volumes")
    return train_val_split(len(names), args.folds, args.fold, seed=0)


def stage2_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration a ``relseg train`` command line stands for (model cards record the line)."""
    return _config(
        args, args.out, _network(args, 3 if args.multiclass else 2, general=args.general_encoder is not None),
        general_encoder=args.general_encoder, freeze_general=not args.finetune_general,
        general_lr_scale=args.general_lr_scale, init_target_from_general=args.init_target_from_general,
        relation=RelationConfig(reading=args.relation, weight=args.relation_weight, level=args.relation_level),
        teacher=args.teacher, distill_weight=args.distill_weight, distill_temperature=args.distill_temperature,
    )


def run_train(args: argparse.Namespace) -> int:
    if args.negatives and not 0.0 < args.negative_fraction < 1.0:  # before any fold process starts
        from ..errors import RelSegError

        raise RelSegError(f"--negative-fraction must lie between 0 and 1, not {args.negative_fraction}")
    if args.negatives and args.negative_slices < 1:
        from ..errors import RelSegError

        raise RelSegError(f"--negative-slices must be at least 1, not {args.negative_slices}")
    if args.pooled_fraction is not None and not (args.pooled and 0.0 < args.pooled_fraction < 1.0):
        from ..errors import RelSegError

        raise RelSegError(f"--pooled-fraction needs --pooled and a share between 0 and 1, not {args.pooled_fraction}")
    _check_sees_as_trained("--teacher", args.teacher, args)  # before any data is read or fold process starts
    _check_sees_as_trained("--init", args.init, args)
    if args.cross_validate:
        return _cross_validate(args)
    data = _load_target(args)
    masks = data.masks if args.multiclass else (data.masks > 0).astype("uint8")
    config = stage2_config(args)
    negatives = _read_negatives(args)
    pooled = _read_pooled(args)
    if args.fold is not None:
        train_idx, val_idx = _split(args, data.names)
        images, train_masks = _with_pooled(data.images[train_idx], masks[train_idx], pooled)
        images, train_masks, weights = _with_negatives(images, train_masks, negatives, args.negative_fraction)
        weights = _pooled_share(weights, len(images), len(train_idx), pooled, args.pooled_fraction)
        if args.volumes:
            weights = lesion_share(train_masks, args.lesion_fraction, weights, targets=len(train_idx))
        val_images, val_masks = (None, None) if args.no_validation else (data.images[val_idx], masks[val_idx])
        initial = _initial_state(args, config, [data.names[i] for i in val_idx])
        result = train(config, images, train_masks, val_images, val_masks,
                       resume=not args.no_resume, show_bar=True, sample_weights=weights, initial_state=initial)
        summary = {"fold": args.fold, "val_dice": result.final_val_dice, "best_val_dice": result.best_val_dice,
                   "val_cases": [data.names[i] for i in val_idx], "seconds": round(result.seconds, 1),
                   "train_slices": len(train_idx), "pooled_slices": 0 if pooled is None else len(pooled)}
        if args.data or args.volumes:
            from ..data.ctseg import patient_of_name

            summary["train_patients"] = sorted({patient_of_name(data.names[i]) for i in train_idx})
            summary["val_patients"] = sorted({patient_of_name(data.names[i]) for i in val_idx})
        if distributed_context()[0] == 0:
            write_summary(args.out / "fold_result.json", summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "val_cases"}))
        # the fold's model, for scoring its held-out patients with relseg evaluate (the protocols recipe)
        _export_trained(args, result, config, [data.names[i] for i in train_idx], pooled, negatives)
        return 0
    images, train_masks = _with_pooled(data.images, masks, pooled)
    images, train_masks, weights = _with_negatives(images, train_masks, negatives, args.negative_fraction)
    weights = _pooled_share(weights, len(images), len(data.images), pooled, args.pooled_fraction)
    if args.volumes:
        weights = lesion_share(train_masks, args.lesion_fraction, weights, targets=len(data.images))
    result = train(config, images, train_masks, resume=not args.no_resume, show_bar=True, sample_weights=weights,
                   initial_state=_initial_state(args, config, []))
    _export_trained(args, result, config, data.names, pooled, negatives)
    return 0


def _export_trained(args: argparse.Namespace, result, config: TrainConfig, names: list[str], pooled,
                    negatives) -> None:
    """``_export`` with the card's account of what trained the model: the target slices ``names``, the pooled
    lesions and the negatives."""
    classes = (["background", "ground-glass opacity", "consolidation"] if args.multiclass
               else ["background", "lung"] if args.target == "lungs" else ["background", "infection"])
    if args.volumes:
        volumes = _volumes_of(names)
        where = f"in {args.masks}" if args.masks else "beside them"
        training_data = (f"CT volumes in {args.images}, {args.target} masks {where} ({len(names)} slices of "
                         f"{len(volumes)} volume(s): {', '.join(volumes)}; slices with a lesion at least "
                         f"{args.lesion_fraction:g} of each batch)")
    elif args.data:
        patients = sorted({name.split("/")[0] for name in names})
        training_data = (f"{args.data} {args.target} masks ({len(names)} slices of {len(patients)} CT series: "
                         f"{', '.join(patients)})")
    else:
        training_data = f"{args.images} + {args.masks} ({len(names)} slices)"
    if pooled is not None:
        share = "" if args.pooled_fraction is None else f", {args.pooled_fraction:g} of each batch"
        training_data += (f"; pooled, their lesions as infection: {', '.join(args.pooled)} "
                          f"({len(pooled)} slices{share})")
    if args.teacher:
        from ..zoo import find_model

        teacher = find_model(args.teacher)
        training_data += f"; distilled from {teacher.name} {teacher.version} (sha256 {teacher.sha256[:12]})"
    if args.init:
        from ..zoo import find_model

        start = find_model(args.init)
        training_data = (f"started from {start.name} {start.version} (sha256 {start.sha256[:12]}: "
                         f"{start.training.get('data', 'data not stated')}), then {training_data}")
    if negatives is not None:
        volumes = _volumes_of(negatives.names)
        which = f" of {', '.join(volumes)};" if volumes else ","
        training_data += (f"; negatives (no infection): {', '.join(args.negatives)} ({len(negatives)} slices{which} "
                          f"{args.negative_fraction:g} of each batch)")
    _export(args, result, config, classes=classes, training_data=training_data,
            role="lungs" if args.target == "lungs" else "infection", recipe=_recipe(args),
            fingerprints=_fingerprints(args, names), upright=args.upright or args.volumes)


def _check_sees_as_trained(option: str, model: str | None, args: argparse.Namespace) -> None:
    """A teacher or a starting model must see the slices as the network does and predict the same classes: else
    stop now, naming the difference."""
    if not model:
        return
    from ..data.intensity import recipe_of
    from ..errors import RelSegError
    from ..zoo import find_model

    card = find_model(model)
    classes = 3 if args.multiclass else 2
    size = int(card.preprocessing.get("input_size", 256))
    if recipe_of(card.preprocessing) != _recipe(args) or size != args.size or len(card.classes) != classes:
        raise RelSegError(f"{option} {card.name} sees {recipe_of(card.preprocessing)} slices of {size} px with "
                          f"{len(card.classes)} classes; this training has {_recipe(args)} slices of {args.size} px "
                          f"with {classes} classes")
    if option == "--teacher" and bool(card.preprocessing.get("upright")) != args.upright:
        # a starting model may learn the other orientation (--init); a teacher would predict on slices it never saw
        seen, this = ("upright", "as stored") if card.preprocessing.get("upright") else ("as stored", "upright")
        raise RelSegError(f"--teacher {card.name} saw the slices {seen}; this training sees them {this} (--upright)")


def _initial_state(args: argparse.Namespace, config: TrainConfig, held_out: list[str]):
    """The verified weights of ``--init`` (None without it). They must fit the network this command builds, and
    the model must not have trained on ``held_out`` (the fold's validation slices): a fold started from a model
    that saw its patients would score them as if unseen."""
    if not args.init:
        return None
    from ..errors import RelSegError
    from ..training import build_network
    from ..zoo import find_model, load_state_dict_verified

    card = find_model(args.init)
    seen = set(card.training.get("image_fingerprints", []))
    if held_out and args.volumes:
        print(f"warning: whether --init {card.name} saw fold {args.fold}'s held-out CTs cannot be checked (cards "
              "fingerprint pictures, not volumes)", file=sys.stderr)
    elif held_out and seen:
        overlap = sum(f in seen for f in _picture_fingerprints(args, held_out))
        if overlap:
            raise RelSegError(f"--init {card.name} was trained on {overlap} of the {len(held_out)} slices fold "
                              f"{args.fold} holds out; start the fold from a model trained without them")
    elif held_out:
        print(f"warning: --init {card.name}'s card lists no training slices; whether it saw fold {args.fold}'s "
              "held-out slices cannot be checked", file=sys.stderr)
    state = load_state_dict_verified(card.path, card.sha256)
    try:
        build_network(config).load_state_dict(state)
    except RuntimeError:
        raise RelSegError(f"--init {card.name} has another architecture ({card.architecture}) than this command "
                          "builds: give the same --base-channels, --depth, --deep-supervision and general encoder"
                          ) from None
    print(f"starting from {card.name} {card.version} (sha256 {card.sha256[:12]})")
    return state


def _read_pooled(args: argparse.Namespace):
    """The ``--pooled`` slices (masks: any lesion is class 1), HU volumes rendered like the training data; or
    None."""
    if not args.pooled:
        return None
    from ..data.general import read_dataset_spec
    from ..data.readers import SliceSet

    pooled = SliceSet.concat([read_dataset_spec(spec, size=args.size, cache_dir=args.cache_dir,
                                                recipe=_recipe(args)) for spec in args.pooled])
    print(f"pooled: {len(pooled)} labelled slices ({pooled.source})")
    return pooled


def _with_pooled(images, masks, pooled):
    """Training slices with the pooled lesion slices appended (their lesions as class 1)."""
    if pooled is None:
        return images, masks
    import numpy as np

    return (np.concatenate([images, pooled.images]),
            np.concatenate([masks, (pooled.masks > 0).astype(masks.dtype)]))


def _pooled_share(weights, total: int, start: int, pooled, fraction: float | None):
    """Draw weights under which the pooled slices (``start`` onwards, before any negatives) are ``fraction`` of
    the draws and the other slices keep their relative weights; ``weights`` unchanged without a fraction."""
    if pooled is None or fraction is None:
        return weights
    import numpy as np

    weights = np.full(total, 1.0 / total) if weights is None else np.asarray(weights, np.float64).copy()
    is_pooled = np.zeros(total, bool)
    is_pooled[start:start + len(pooled)] = True
    weights[is_pooled] = 0.0
    weights *= (1.0 - fraction) / weights.sum()
    weights[is_pooled] = fraction / len(pooled)
    return weights


def _open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (``--false-negative-weight``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, not {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, not {text}")
    return value


def _noise_levels(text: str) -> tuple[float, ...]:
    """``--negative-noise``'s comma-separated HU levels, each above 0."""
    try:
        levels = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HU levels like 30,60,100, not {text!r}") from None
    if not all(level > 0 for level in levels):
        raise argparse.ArgumentTypeError(f"noise levels must be above 0 HU, not {text!r}")
    return levels


def _read_negatives(args: argparse.Namespace):
    """The ``--negatives`` slices as one SliceSet (their masks unused), or None without any."""
    if not args.negatives:
        return None
    from ..data.general import parse_data_spec, read_dataset_spec
    from ..data.readers import SliceSet
    from ..errors import RelSegError

    negatives = SliceSet.concat([
        read_dataset_spec(spec, size=args.size, cache_dir=args.cache_dir, recipe=_recipe(args),
                          **({"slices_per_volume": args.negative_slices, "noise_hu": args.negative_noise}
                             if parse_data_spec(spec)[0] == "ct" else {}))
        for spec in args.negatives])
    if not len(negatives):
        raise RelSegError(f"--negatives {' '.join(args.negatives)}: no slices found")
    volumes = _volumes_of(negatives.names)
    which = f" of {len(volumes)} volumes ({', '.join(volumes)})" if volumes else ""
    print(f"negatives: {len(negatives)} slices{which}, {args.negative_fraction:g} of each batch")
    return negatives


def _volumes_of(names: list[str]) -> list[str]:
    """The volumes slices come from, by their names (volume readers name slices ``CASE:zN``), [] for pictures."""
    return sorted({name.split(":")[0] for name in names if ":" in name})


def _with_negatives(images, masks, negatives, fraction: float):
    """Training slices with the negatives appended (all-background masks) and the draw weights that give
    the negatives ``fraction`` of each batch; unchanged slices and no weights without negatives."""
    if negatives is None:
        return images, masks, None
    import numpy as np

    from ..training import share_weights

    all_images = np.concatenate([images, negatives.images])
    all_masks = np.concatenate([masks, np.zeros_like(negatives.images, dtype=masks.dtype)])
    is_negative = np.arange(len(all_images)) >= len(images)
    return all_images, all_masks, share_weights(is_negative, fraction)


def _cross_validate(args: argparse.Namespace) -> int:
    """Run each fold as its own ``relseg train --fold k`` process (``--jobs`` at a time)."""
    argv = [a for a in args.argv if a != "--cross-validate"]
    argv = _drop_option(_drop_option(_drop_option(argv, "--out"), "--jobs"), "--export")
    commands = []
    for fold in range(args.folds):
        fold_out = args.out / f"fold{fold}"
        commands.append([sys.executable, "-m", "relsegcore.cli", *argv, "--out", str(fold_out), "--fold", str(fold)])
    # Split the cores between parallel folds so they do not oversubscribe the CPU.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // max(1, args.jobs))))
    pending, running, codes = list(commands), [], []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            running.append(subprocess.Popen(pending.pop(0), env=env))
        time.sleep(0.5)
        codes += [p.returncode for p in running if p.poll() is not None]
        running = [p for p in running if p.returncode is None]
    if any(codes):
        print(f"relseg: error: {sum(1 for c in codes if c)} fold(s) failed", file=sys.stderr)
        return 1
    results = [json.loads((args.out / f"fold{k}" / "fold_result.json").read_text(encoding="utf-8"))
               for k in range(args.folds)]
    summary = summarise_folds(results)
    summary["command"] = "relseg " + shlex.join(args.argv)
    write_summary(args.out / "cv_summary.json", summary)
    print(f"cross-validation: mean Dice {summary['mean_dice']:.4f} ± {summary['sd_dice']:.4f} over {args.folds} folds")
    return 0


def _drop_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == name:
            skip = True
            continue
        if item.startswith(name + "="):
            continue
        out.append(item)
    return out


def _fingerprints(args: argparse.Namespace, names: list[str]) -> list[str]:
    """Fingerprints of the training pictures ``names`` as stored, so ``relseg evaluate`` can spot them; with
    ``--init``, the starting model's too (it saw them)."""
    if not args.export:
        return []
    if args.volumes:  # fingerprints are of stored pictures, which relseg evaluate compares; volumes have none
        return []
    from ..data.general import parse_data_spec
    from ..data.readers import folder_fingerprints

    # pooled picture folders are training pictures too (e.g. COVID-SemiSeg screenshots beside covid-ct-seg-2d)
    pooled = []
    for kind, path in map(parse_data_spec, args.pooled):
        if kind == "folder":
            pooled += folder_fingerprints(path / "images", path / "masks")
    started_from = []
    if args.init:
        from ..zoo import find_model

        started_from = find_model(args.init).training.get("image_fingerprints", [])
    return list(dict.fromkeys([*started_from, *_picture_fingerprints(args, names), *pooled]))


def _picture_fingerprints(args: argparse.Namespace, names: list[str]) -> list[str]:
    """Fingerprints of the target pictures ``names`` as stored (not resized to --size), as relseg evaluate reads
    them."""
    from ..data.readers import folder_fingerprints, picture_fingerprint, read_gray_picture

    if args.data:
        images = ctseg_folder(args.data, "train", "picture folders as --images/--masks") / "images"
        return [picture_fingerprint(read_gray_picture(images / name.split("/", 1)[1])) for name in names]
    return folder_fingerprints(args.images, args.masks, stems={name.rsplit("/", 1)[-1] for name in names})


def _export(args, result, config: TrainConfig, classes: list[str], training_data: str, role: str,
            recipe: str = LUNG_CROP, fingerprints: list[str] | None = None, upright: bool = False) -> None:
    """Write the model and its card; ``fingerprints`` of the training pictures let ``relseg evaluate`` spot
    the model's training slices; ``upright``: it only saw slices turned anterior up (``--upright``)."""
    if not args.export or distributed_context()[0] != 0:  # under torchrun, rank 0 alone writes the model
        return
    from ..data.intensity import preprocessing_for
    from ..zoo import ModelCard, save_model

    card = ModelCard(
        name=args.export, version=args.model_version, description=args.description or f"{role} model trained by relseg",
        file="", sha256="", architecture={}, classes=classes,
        preprocessing={**preprocessing_for(recipe, args.size), **({"upright": True} if upright else {})},
        training={"role": role, "data": training_data, "command": "relseg " + shlex.join(args.argv),
                  "iterations": config.iterations, "seconds": round(result.seconds, 1),
                  "config": config.to_dict(),
                  **({"image_fingerprints": fingerprints} if fingerprints else {})},
        metrics={"final_val_dice": result.final_val_dice},
    )
    path = save_model(result.network, card, args.model_dir or args.out)
    print(f"model written: {path} (sha256 {card.sha256})")
