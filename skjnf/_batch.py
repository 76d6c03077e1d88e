"""The rows a training stage reads: the modality blocks and what ``fit`` computed for them once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StageBatch"]


@dataclass(frozen=True)
class StageBatch:
    """Rows of the training data as the stage losses read them; every tensor has one row per row.

    Parameters
    ----------
    blocks : dict of str to Tensor
        Each modality's flat block (n, d_m); a missing modality's rows hold placeholders.
    observed : bool Tensor of shape (n, M), optional
        True where a row observes a modality; None when every row observes every modality.
    joint_mean, joint_log_var : Tensor of shape (n, D), optional
        Stage 2: the frozen joint posterior of each row, computed once per fit.
    trunk_features : Tensor of shape (n, sum of trunk widths), optional
        Stage 2: the frozen trunks' features of every modality, concatenated, computed once per fit.
    noise : Tensor, optional
        Fixed noise (the validation rows'); None draws fresh noise every step.
    """

    blocks: dict[str, Tensor]
    observed: Tensor | None = None
    joint_mean: Tensor | None = None
    joint_log_var: Tensor | None = None
    trunk_features: Tensor | None = None
    noise: Tensor | None = None

    def __post_init__(self):
        if self.observed is not None and self.observed.dtype != torch.bool:
            raise TypeError(f"StageBatch.observed is a bool mask; got {self.observed.dtype}.")

    def __len__(self) -> int:
        return len(next(iter(self.blocks.values())))

    def rows(self, index) -> StageBatch:
        """The same rows' batch at ``index`` (a slice or a tensor of row indices)."""
        return self._map(lambda x: x[index])

    def to(self, device) -> StageBatch:
        """The same batch with every tensor on ``device``."""
        return self._map(lambda x: x.to(device))

    def _map(self, fn) -> StageBatch:
        """The batch with ``fn`` applied to every tensor (the blocks and each field that is set)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "blocks"}
        mapped = {name: None if value is None else fn(value) for name, value in fields.items()}
        return StageBatch({m: fn(x) for m, x in self.blocks.items()}, **mapped)

    def replace(self, **changes) -> StageBatch:
        return dataclasses.replace(self, **changes)
