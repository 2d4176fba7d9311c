"""Training for both stages of the method.

Stage 1 (``relseg pretrain-general``) trains a single-encoder network on non-COVID lung
lesions; its encoder becomes the *general encoder*. Stage 2 (``relseg train``) trains the
dual-encoder network on COVID-19 slices with that general encoder loaded (frozen, or at a
reduced learning rate) and, optionally, the relation-consistency loss. A trained model can also be
distilled into the network being trained (``TrainConfig.teacher``): it learns the teacher's softened
predictions beside the masks.

The training slices live in memory as one uint8 tensor on the training device and batches
are augmented there (``data.augment.augment_batch``), so loading never starves the network,
on two CPU cores or on a GPU. Runs are seeded, resumable from an atomic checkpoint, log a
CSV and a PNG of the learning curves, use bf16 autocast on CUDA and run data-parallel under
``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .data.augment import MAX_NOISE_SIGMA, augment_batch
from .device import autocast, select_device
from .errors import ModelError
from .fileutil import atomic_path
from .inference import class_probabilities
from .losses import distillation_loss, relation_loss, segmentation_loss
from .models import DualEncoderUNet, NetworkConfig
from .progress import Progress

log = logging.getLogger(__name__)

RELATION_READINGS = ("none", "encoders", "ema")


@dataclass
class RelationConfig:
    """Which feature relations are kept consistent (see losses.relation_loss).

    ``encoders``: relations among the batch's samples in the target encoder's features are
    pulled towards those in the general encoder's features (knowledge from non-COVID lesions).
    ``ema``: relations in the dual model are pulled towards those of an exponential-moving-
    average copy that sees a differently perturbed batch (SRC-MT's reading).
    """

    reading: str = "none"
    weight: float = 1.0
    level: int = -1  # encoder level whose features are compared; -1 = bottleneck
    ema_decay: float = 0.99
    ramp_up_fraction: float = 0.2  # weight ramps up (sigmoid) over this fraction of training

    def __post_init__(self) -> None:
        if self.reading not in RELATION_READINGS:
            raise ValueError(f"relation reading must be one of {RELATION_READINGS}")


@dataclass
class TrainConfig:
    out_dir: Path
    network: NetworkConfig = field(default_factory=NetworkConfig)
    iterations: int = 3000
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_iterations: int = 50
    seed: int = 0
    general_encoder: Path | None = None  # stage-1 checkpoint or model whose encoder is the general encoder
    freeze_general: bool = True
    general_lr_scale: float = 0.1  # used when the general encoder is not frozen
    init_target_from_general: bool = False
    relation: RelationConfig = field(default_factory=RelationConfig)
    augment_strength: float = 1.0
    augment_series: bool = False  # also the series differences of covid-ct-seg-2d (data.augment, series=True)
    augment_noise: float = MAX_NOISE_SIGMA  # the top of the added noise's sigma, in grey range units (0..1)
    false_negative_weight: float = 0.5  # the overlap loss's weight of missed pixels (0.5: Dice; above: Tversky)
    dice_per_sample: bool = False  # one Dice per sample, averaged (the per-slice metric), instead of batch Dice
    patch_size: int | None = None  # random square crops of the augmented slices (None: whole slices)
    validate_every: int = 250
    checkpoint_every: int = 250
    device: str = "auto"
    amp: bool = True
    trainable: str = "all"  # with initial_state (fine-tuning): which parameters learn (TRAINABLE)
    teacher: str | None = None  # a model (name or .pt with its card) whose predictions are distilled
    distill_weight: float = 1.0
    distill_temperature: float = 2.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


@dataclass
class TrainResult:
    network: DualEncoderUNet
    history: list[dict]
    final_val_dice: float | None
    best_val_dice: float | None
    seconds: float


# ----------------------------------------------------------------------------- distributed


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _init_distributed(device: torch.device) -> None:
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


# ----------------------------------------------------------------------------- helpers


def encoder_state_from(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The encoder weights to use as the general encoder, from a stage-1 model or checkpoint.

    Accepts a model ``.pt`` (state_dict of a network) or a training ``checkpoint.pt``; the
    stage-1 network's *target* encoder is the encoder it trained.
    """
    from .zoo import find_model, load_state_dict_verified

    path = Path(path)
    if path.suffix == ".pt" and path.with_suffix(".json").is_file():
        card = find_model(path)
        state = load_state_dict_verified(card.path, card.sha256)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    prefix = "target_encoder."
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError(f"{path} holds no encoder weights")
    return encoder


def learning_rate_at(iteration: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to zero."""
    if iteration < config.warmup_iterations:
        return config.learning_rate * (iteration + 1) / config.warmup_iterations
    progress = (iteration - config.warmup_iterations) / max(1, config.iterations - config.warmup_iterations)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def relation_weight_at(iteration: int, config: TrainConfig) -> float:
    ramp = config.relation.ramp_up_fraction * config.iterations
    if ramp <= 0:
        return config.relation.weight
    phase = min(iteration / ramp, 1.0)
    return config.relation.weight * math.exp(-5.0 * (1.0 - phase) ** 2)


def build_network(config: TrainConfig) -> DualEncoderUNet:
    network = DualEncoderUNet(config.network)
    if config.general_encoder is not None:
        encoder = encoder_state_from(config.general_encoder)
        if network.general_encoder is None:
            raise ValueError("a general encoder was given but the network has use_general_encoder=False")
        network.load_general_encoder(encoder)
        if config.init_target_from_general:
            network.target_encoder.load_state_dict(encoder)
        network.freeze_general_encoder(config.freeze_general)
    return network


TRAINABLE = ("all", "decoder", "norm")


def limit_trainable(network: DualEncoderUNet, trainable: str) -> None:
    """Freeze all but ``trainable``'s parameters: ``all`` (whatever is not frozen already: the target encoder,
    decoder and head), ``decoder`` (decoder and head), ``norm`` (the normalisation layers' scales and shifts)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, not {trainable!r}")
    if trainable == "all":
        return
    norms = {name for name, module in network.named_modules()
             if isinstance(module, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d))}
    for name, parameter in network.named_parameters():
        module = name.rsplit(".", 1)[0]
        keep = name.startswith(("decoder.", "head.")) if trainable == "decoder" else module in norms
        if not keep:
            parameter.requires_grad_(False)


def make_optimizer(network: DualEncoderUNet, config: TrainConfig) -> torch.optim.Optimizer:
    general = [p for n, p in network.named_parameters() if n.startswith("general_encoder.") and p.requires_grad]
    others = [p for n, p in network.named_parameters() if not n.startswith("general_encoder.") and p.requires_grad]
    groups = [{"params": others, "lr_scale": 1.0}]
    if general:
        groups.append({"params": general, "lr_scale": config.general_lr_scale})
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N,H,W) -> uint8 (N,1,H,W) on the device; converted to float per batch."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(device)


@torch.inference_mode()
def predict_labels(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 16,
                   threshold: float = 0.5, flip: bool = False) -> torch.Tensor:
    """Labels for uint8 (N,1,H,W) images: the argmax, or a binary network's foreground above ``threshold``;
    with ``flip``, of the probabilities averaged with the left-right mirrored prediction (a card's flip_tta)."""
    was_training = network.training
    network.eval()
    labels = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].float() / 255.0
        with autocast(batch.device):
            probabilities = class_probabilities(network, batch, flip)
        if probabilities.shape[1] == 2:
            labels.append((probabilities[:, 1] > threshold).long())
        else:
            labels.append(probabilities.argmax(1))
    network.train(was_training)
    return torch.cat(labels)


def mean_case_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over slices of each slice's Dice of infection (any foreground class); empty vs empty = 1."""
    p = (pred > 0).flatten(1).float()
    t = (target > 0).flatten(1).float()
    intersection = (p * t).sum(1)
    denominator = p.sum(1) + t.sum(1)
    dice = torch.where(denominator > 0, 2 * intersection / denominator.clamp(min=1), torch.ones_like(denominator))
    return float(dice.mean())


# ----------------------------------------------------------------------------- checkpoint


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- logs


def write_log(out_dir: Path, history: list[dict]) -> None:
    """CSV of every logged iteration and a PNG of the learning curves, both atomic."""
    if not history:
        return
    columns = sorted({key for row in history for key in row}, key=lambda k: (k != "iteration", k))
    with atomic_path(out_dir / "log.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    plot_curves(out_dir / "curves.png", history)


def plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 4))
    iterations = [row["iteration"] for row in history]
    for key in ("loss", "segmentation_loss", "relation_loss"):
        values = [row.get(key) for row in history]
        if any(v not in (None, "") for v in values):
            loss_axis.plot(iterations, [np.nan if v in (None, "") else v for v in values], label=key)
    loss_axis.set_xlabel("iteration")
    loss_axis.set_yscale("log")
    loss_axis.legend()
    validated = [(row["iteration"], row["val_dice"]) for row in history if row.get("val_dice") not in (None, "")]
    if validated:
        dice_axis.plot(*zip(*validated, strict=True), marker="o")
    dice_axis.set_xlabel("iteration")
    dice_axis.set_ylabel("validation mean Dice")
    dice_axis.set_ylim(0, 1)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


# ----------------------------------------------------------------------------- training loop


def share_weights(member: np.ndarray, share: float) -> np.ndarray:
    """Per-slice draw weights (summing to 1) under which the ``member`` slices are ``share`` of the draws.

    With no member, or only members, every slice is equally likely.
    """
    member = np.asarray(member, bool)
    count = int(member.sum())
    if not 0 < count < len(member):
        return np.full(len(member), 1.0 / len(member))
    return np.where(member, share / count, (1.0 - share) / (len(member) - count))


def lesion_share(masks: np.ndarray, fraction: float, weights: np.ndarray | None = None,
                 targets: int | None = None) -> np.ndarray | None:
    """Draw weights under which the slices with a lesion among the first ``targets`` (all by default; pooled or
    negative slices come after them) get at least ``fraction`` of those slices' draws, which keep their total
    share of ``weights`` (uniform when None). None when no weights were given and none are needed (lesions
    already that common, or none at all), i.e. uniform draws."""
    targets = len(masks) if targets is None else targets
    has_lesion = np.asarray(masks[:targets]).reshape(targets, -1).any(axis=1)
    if has_lesion.all() or not has_lesion.any() or has_lesion.mean() >= fraction:
        return weights
    weights = np.full(len(masks), 1.0 / len(masks)) if weights is None else np.asarray(weights, np.float64).copy()
    weights[:targets] = share_weights(has_lesion, fraction) * weights[:targets].sum()
    return weights


def random_crops(images: torch.Tensor, masks: torch.Tensor, size: int | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``size x size`` crop of each 2D sample (B,1,H,W) / (B,H,W); unchanged when ``size`` is None or
    not smaller than the slices. Fully convolutional networks learn the same from crops at a fraction of the
    cost of whole slices."""
    height, width = images.shape[-2:]
    if size is None or (size >= height and size >= width):
        return images, masks
    size_y, size_x = min(size, height), min(size, width)
    tops = torch.randint(0, height - size_y + 1, (len(images),), generator=generator, device=images.device)
    lefts = torch.randint(0, width - size_x + 1, (len(images),), generator=generator, device=images.device)
    crops = [(int(t), int(left)) for t, left in zip(tops.tolist(), lefts.tolist(), strict=True)]
    return (torch.stack([images[i, ..., t:t + size_y, x:x + size_x] for i, (t, x) in enumerate(crops)]),
            torch.stack([masks[i, ..., t:t + size_y, x:x + size_x] for i, (t, x) in enumerate(crops)]))


def train(config: TrainConfig, train_images: np.ndarray, train_masks: np.ndarray,
          val_images: np.ndarray | None = None, val_masks: np.ndarray | None = None,
          progress: Progress | None = None, resume: bool = True, show_bar: bool = False,
          initial_state: dict[str, torch.Tensor] | None = None,
          sample_weights: np.ndarray | None = None) -> TrainResult:
    """Train ``config.network`` on uint8 slices (N,H,W) with class-index masks (N,H,W).

    ``initial_state`` starts from an existing model's weights (fine-tuning); the general
    encoder is then frozen as ``config.freeze_general`` says. ``sample_weights`` (N,) makes
    some slices more likely in a batch (edited slices when fine-tuning from corrections).
    Resumes from ``out_dir/checkpoint.pt`` when present and ``resume`` is true.
    """
    started = time.perf_counter()
    rank, world, device = _training_device(config.device)
    out_dir = Path(config.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    network = _starting_network(config, initial_state).to(device)
    optimizer = make_optimizer(network, config)
    teacher = frozen(copy.deepcopy(network)) if config.relation.reading == "ema" else None
    distill_from = load_teacher(config.teacher, device) if config.teacher else None
    checkpoint_path = out_dir / "checkpoint.pt"
    start_iteration, history = _resume(checkpoint_path, network, optimizer, teacher) if resume else (0, [])
    started -= history[-1]["seconds"] if history else 0.0  # seconds count the whole run, not this part
    model = network if world == 1 else torch.nn.parallel.DistributedDataParallel(
        network, device_ids=[device.index] if device.type == "cuda" else None)
    slices = _slices_on(device, train_images, train_masks, sample_weights)
    val = _slices_on(device, val_images, val_masks) if val_images is not None and len(val_images) else None
    # One generator per rank, re-seeded from the iteration so a resumed run continues the same stream.
    generator = torch.Generator(device=device)
    bar = _progress_bar(config.iterations, start_iteration) if show_bar and rank == 0 else None
    network.train()
    running: dict[str, float] = {}
    for iteration in range(start_iteration, config.iterations):
        generator.manual_seed(config.seed * 1_000_003 + iteration * 101 + rank)
        batch_images, batch_masks = _draw_batch(slices, config, generator)
        lr = learning_rate_at(iteration, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        terms = _loss_terms(model, config, batch_images, batch_masks, teacher, distill_from, generator)
        loss = _total_loss(terms, iteration, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        if teacher is not None:
            _update_ema(teacher, network, config.relation.ema_decay)
        _add_to_running(running, {"loss": loss, **terms})
        step = iteration + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step % config.validate_every == 0 or step == config.iterations:
            row = _log_row(step, lr, time.perf_counter() - started, running)
            running = {}
            if val is not None and rank == 0:
                row["val_dice"] = mean_case_dice(predict_labels(network, val.images), val.masks)
            history.append(row)
            if rank == 0:
                write_log(out_dir, history)
                if bar is not None and "val_dice" in row:
                    bar.write(f"iteration {step}: loss {row['loss']:.4f} val Dice {row['val_dice']:.4f}")
        if rank == 0 and (step % config.checkpoint_every == 0 or step == config.iterations):
            save_checkpoint(checkpoint_path, _training_state(config, network, optimizer, teacher, step, history))
        if progress is not None:  # after the checkpoint, so a cancelled run resumes from here
            progress.update(step / config.iterations, "training")
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    vals = [row["val_dice"] for row in history if "val_dice" in row]
    return TrainResult(network=network, history=history, final_val_dice=vals[-1] if vals else None,
                       best_val_dice=max(vals) if vals else None, seconds=time.perf_counter() - started)


def _training_device(requested: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun it joins the process group, each rank on its
    own GPU."""
    rank, world, local_rank = distributed_context()
    device = select_device(requested)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        _init_distributed(device)
    return rank, world, device


def _starting_network(config: TrainConfig, initial_state: dict[str, torch.Tensor] | None) -> DualEncoderUNet:
    """The seeded new network, or ``initial_state``'s weights with only the layers that fine-tuning trains
    left learnable."""
    torch.manual_seed(config.seed)
    network = build_network(config)
    if initial_state is not None:
        network.load_state_dict(initial_state)
        network.freeze_general_encoder(config.freeze_general)
        limit_trainable(network, config.trainable)
    return network


def _resume(path: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
            teacher: torch.nn.Module | None) -> tuple[int, list[dict]]:
    """Load a stopped run's checkpoint into the network, optimizer and EMA teacher; return its iteration and
    history ((0, []) when there is none)."""
    if not path.is_file():
        return 0, []
    state = load_checkpoint(path)
    network.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if teacher is not None and "teacher" in state:
        teacher.load_state_dict(state["teacher"])
    log.info("resumed from %s at iteration %d", path, int(state["iteration"]))
    return int(state["iteration"]), list(state.get("history", []))


def _training_state(config: TrainConfig, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    teacher: torch.nn.Module | None, step: int, history: list[dict]) -> dict:
    """What ``_resume`` needs to go on from ``step``, and the config that made it."""
    state = {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
             "iteration": step, "history": history, "config": config.to_dict()}
    if teacher is not None:
        state["teacher"] = teacher.state_dict()
    return state


class _Slices(NamedTuple):
    images: torch.Tensor  # uint8 (N,1,H,W) on the training device
    masks: torch.Tensor  # class indices (N,H,W)
    weights: torch.Tensor | None  # per-slice draw weights (None: uniform)


def _slices_on(device: torch.device, images: np.ndarray, masks: np.ndarray,
               weights: np.ndarray | None = None) -> _Slices:
    """The slices in memory on the training device, where batches are drawn and augmented."""
    return _Slices(images_to_tensor(images, device),
                   torch.from_numpy(np.ascontiguousarray(masks)).long().to(device),
                   None if weights is None else
                   torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32, device=device))


def _draw_batch(slices: _Slices, config: TrainConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of ``config.batch_size`` slices (drawn by their weights), augmented and cropped to the patch."""
    if slices.weights is None:
        index = torch.randint(0, slices.images.shape[0], (config.batch_size,), generator=generator,
                              device=slices.images.device)
    else:
        index = torch.multinomial(slices.weights, config.batch_size, replacement=True, generator=generator)
    batch_images, batch_masks = augment_batch(slices.images[index].float() / 255.0, slices.masks[index],
                                              generator=generator, strength=config.augment_strength,
                                              series=config.augment_series, max_noise_sigma=config.augment_noise)
    return random_crops(batch_images, batch_masks, config.patch_size, generator)


def _loss_terms(model: torch.nn.Module, config: TrainConfig, batch_images: torch.Tensor, batch_masks: torch.Tensor,
                teacher: torch.nn.Module | None, distill_from: torch.nn.Module | None,
                generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    """The batch's segmentation loss, and its relation and distillation losses (None where not trained)."""
    with autocast(batch_images.device):
        logits, features = model(batch_images, return_features=True)
        terms = {"segmentation_loss": segmentation_loss(logits, batch_masks, config.false_negative_weight,
                                                        config.dice_per_sample),
                 "relation_loss": _relation_term(config, features, teacher, batch_images, generator),
                 "distill_loss": None}
        if distill_from is not None:
            with torch.no_grad():
                teacher_logits = distill_from(batch_images)
            terms["distill_loss"] = distillation_loss(_finest(logits), teacher_logits, config.distill_temperature)
    return terms


def _total_loss(terms: dict[str, torch.Tensor | None], iteration: int, config: TrainConfig) -> torch.Tensor:
    """Segmentation + the relation loss at this iteration's ramped weight + the weighted distillation loss."""
    loss = terms["segmentation_loss"]
    if terms["relation_loss"] is not None:
        loss = loss + relation_weight_at(iteration, config) * terms["relation_loss"]
    if terms["distill_loss"] is not None:
        loss = loss + config.distill_weight * terms["distill_loss"]
    return loss


def _add_to_running(running: dict[str, float], losses: dict[str, torch.Tensor | None]) -> None:
    """Sum each loss used (and the count of iterations) since the last log row."""
    for key, value in losses.items():
        if value is not None:
            running[key] = running.get(key, 0.0) + float(value.detach())
    running["n"] = running.get("n", 0) + 1


def _log_row(step: int, lr: float, seconds: float, running: dict[str, float]) -> dict:
    """One row of ``log.csv``: the losses averaged over the iterations since the last row."""
    row = {"iteration": step, "lr": lr, "seconds": round(seconds, 1)}
    row.update({k: v / running["n"] for k, v in running.items() if k != "n"})
    return row


def _progress_bar(total: int, initial: int):
    """The command line's tqdm bar over the iterations (a resumed run starts at ``initial``)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="it")


def load_teacher(model: str | os.PathLike, device: torch.device) -> torch.nn.Module:
    """The frozen network of a shipped or trained model (verified against its card); not an ensemble, whose
    members have no one set of features for the relation loss to read."""
    from .zoo import load_model

    loaded = load_model(model, device)
    if loaded.card.members > 1:
        raise ModelError(f"the teacher {loaded.card.name} is an ensemble of {loaded.card.members} networks; "
                         "name one of its members as the teacher")
    return frozen(loaded.network)


def frozen(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` in eval mode with no parameter learning: a teacher that only predicts."""
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.eval()


def _finest(logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution logits (deep supervision returns a list, finest first)."""
    return logits[0] if isinstance(logits, list) else logits


def _relation_term(config: TrainConfig, features: dict, teacher, batch_images, generator):
    reading = config.relation.reading
    if reading == "none" or config.relation.weight == 0:
        return None
    level = config.relation.level
    if reading == "encoders":
        if "general" not in features:
            raise ValueError("the 'encoders' relation reading needs a general encoder")
        return relation_loss(features["target"][level], features["general"][level].detach())
    noise = torch.randn(batch_images.shape, generator=generator, device=batch_images.device) * 0.03
    with torch.no_grad():
        _, teacher_features = teacher(batch_images + noise, return_features=True)
    return relation_loss(features["target"][level], teacher_features["target"][level])


@torch.no_grad()
def _update_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
