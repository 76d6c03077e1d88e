"""The one row chunker: every pass over many rows (inference, scoring, decoding, HMC) runs in
slices of rows sized to a budget of elements, so memory stays bounded whatever n is."""

from __future__ import annotations

__all__ = ["row_chunks"]


def row_chunks(n_rows: int, per_row: int, budget: int) -> list[slice]:
    """Consecutive slices covering ``range(n_rows)``, each of at most ``budget // per_row`` rows (>= 1)."""
    step = max(1, budget // max(per_row, 1))
    return [slice(start, start + step) for start in range(0, n_rows, step)]
