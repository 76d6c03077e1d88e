"""The one MLP builder every default network uses (encoders, trunks, decoders, coupling nets)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(in_features: int, widths: Sequence[int]) -> nn.Sequential:
    """Linear → ReLU for each width; ``widths=()`` is the identity."""
    layers, width_in = [], in_features
    for width in widths:
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        width_in = width
    return nn.Sequential(*layers)
