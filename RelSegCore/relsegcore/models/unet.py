"""The dual-encoder U-Net of Zhang et al. (IEEE JBHI 2021), 2D or 3D.

A *general encoder* (trained on non-COVID lung lesions) and a *target encoder*
(trained on COVID-19 infection) of the same architecture run side by side; at each
fused resolution level their features are concatenated and passed to one shared
decoder. With ``use_general_encoder=False`` the same code is a plain U-Net.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .blocks import DecoderStage, Encoder, conv_class


@dataclass
class NetworkConfig:
    """Everything needed to rebuild a network; stored in the model card as ``architecture``."""

    in_channels: int = 1
    num_classes: int = 2  # including background: 2 = binary infection, 3 = background/GGO/consolidation
    dims: int = 2
    base_channels: int = 16
    depth: int = 5
    max_channels: int = 256
    use_general_encoder: bool = True
    # Resolution levels (0 = full resolution, depth-1 = bottleneck) whose general features reach the decoder.
    fusion_levels: list[int] | None = None  # None = all levels
    deep_supervision: bool = False
    extra: dict = field(default_factory=dict)

    def channels(self) -> list[int]:
        return [min(self.base_channels * 2**level, self.max_channels) for level in range(self.depth)]

    def fused(self) -> list[int]:
        if not self.use_general_encoder:
            return []
        return list(range(self.depth)) if self.fusion_levels is None else sorted(self.fusion_levels)

    def to_dict(self) -> dict:
        return asdict(self)


class DualEncoderUNet(nn.Module):
    """General + target encoders, one decoder. ``forward`` returns logits ``(B, num_classes, ...)``.

    In training mode with deep supervision, ``forward`` returns a list of logits, finest first.
    ``forward(x, return_features=True)`` also returns ``{"target": [...], "general": [...]}``,
    the per-level encoder features that the relation loss compares.
    """

    def __init__(self, config: NetworkConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or NetworkConfig(**kwargs)
        cfg = self.config
        widths = cfg.channels()
        self.target_encoder = Encoder(cfg.dims, cfg.in_channels, widths)
        self.general_encoder = Encoder(cfg.dims, cfg.in_channels, widths) if cfg.use_general_encoder else None
        fused = set(cfg.fused())
        skip_widths = [w * (2 if level in fused else 1) for level, w in enumerate(widths)]
        self.decoder = nn.ModuleList(
            DecoderStage(cfg.dims, skip_widths[level + 1] if level == cfg.depth - 2 else widths[level + 1],
                         skip_widths[level], widths[level])
            for level in range(cfg.depth - 1)
        )
        head = conv_class(cfg.dims)
        self.head = head(widths[0], cfg.num_classes, kernel_size=1)
        self.deep_heads = (
            nn.ModuleList(head(widths[level], cfg.num_classes, kernel_size=1) for level in range(1, cfg.depth - 1))
            if cfg.deep_supervision else None
        )

    def encode(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        features = {"target": self.target_encoder(x)}
        if self.general_encoder is not None:
            features["general"] = self.general_encoder(x)
        return features

    def fuse(self, features: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        fused = set(self.config.fused())
        skips = []
        for level, target in enumerate(features["target"]):
            skips.append(torch.cat([target, features["general"][level]], dim=1) if level in fused else target)
        return skips

    def decode(self, skips: list[torch.Tensor]):
        x = skips[-1]
        outputs = []
        for level in range(self.config.depth - 2, -1, -1):
            x = self.decoder[level](x, skips[level])
            if self.deep_heads is not None and self.training and level > 0:
                outputs.append(self.deep_heads[level - 1](x))
        logits = self.head(x)
        if self.deep_heads is not None and self.training:
            return [logits, *reversed(outputs)]
        return logits

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.encode(x)
        logits = self.decode(self.fuse(features))
        return (logits, features) if return_features else logits

    def freeze_general_encoder(self, frozen: bool = True) -> None:
        """Keep the general encoder's non-COVID knowledge fixed (stage 2 default)."""
        if self.general_encoder is None:
            return
        for parameter in self.general_encoder.parameters():
            parameter.requires_grad_(not frozen)

    def load_general_encoder(self, state: dict[str, torch.Tensor]) -> None:
        """Load general-encoder weights from a stage-1 checkpoint (its target encoder, or a saved general one)."""
        if self.general_encoder is None:
            raise ValueError("this network has no general encoder")
        self.general_encoder.load_state_dict(state)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
