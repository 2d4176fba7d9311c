"""Several trained networks of one architecture as one model: their class probabilities averaged.

One training run on a few patients is a noisy draw (two runs of one recipe differ by up to 9 points of Dice on a
held-out patient fold); averaging runs is the usual remedy, as nnU-Net averages its folds (on this project's
shipped recipe it did not pay: RelSegCore/EXPERIMENTS.md, session 21). The ensemble is an ordinary
``nn.Module`` so that inference, the OpenVINO engine and saving treat it like any network: ``forward`` returns
the log of the mean probability, whose softmax (what inference applies to logits) is that mean exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import DualEncoderUNet, NetworkConfig

SMALLEST_PROBABILITY = 1e-12  # log(0) would make the softmax of a certain class undefined


class EnsembleNetwork(nn.Module):
    """``members`` networks built from one ``config``; the state dict's keys are ``members.<i>.<member key>``."""

    def __init__(self, config: NetworkConfig, members: int):
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, not {members}")
        self.config = config
        self.members = nn.ModuleList(DualEncoderUNet(config) for _ in range(members))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if return_features:
            raise ValueError("an ensemble has no single set of encoder features: read one member's")
        probabilities = torch.stack([torch.softmax(member(x).float(), dim=1) for member in self.members]).mean(0)
        return torch.log(probabilities.clamp_min(SMALLEST_PROBABILITY))

    def member_states(self) -> list[dict[str, torch.Tensor]]:
        """Each member's own state dict (keys as a single network has them)."""
        return [member.state_dict() for member in self.members]

    @classmethod
    def of(cls, config: NetworkConfig, states: list[dict[str, torch.Tensor]]) -> EnsembleNetwork:
        """The ensemble of networks with these member state dicts."""
        network = cls(config, len(states))
        for member, state in zip(network.members, states, strict=True):
            member.load_state_dict(state)
        return network
