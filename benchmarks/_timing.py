"""Timing helpers shared by ``run.py`` (skjnf) and ``_peer.py`` (the reference's venv): stdlib only."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int):
    """Median wall and CPU seconds over ``repeats`` calls (after the caller's warm-up), and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "walls": walls}, result


def fastest_chunking(run_rows, n_rows: int, chunks, repeats: int) -> dict:
    """The fastest of running ``run_rows(slice)`` over ``n_rows`` in chunks of each size (None = one batch).

    Each chunking is warmed up once, then timed with :func:`timed`; returns its timing plus ``chunk``.
    """
    best = None
    for chunk in chunks:
        step = chunk or n_rows

        def run(step=step):
            for start in range(0, n_rows, step):
                run_rows(slice(start, start + step))

        run()
        t, _ = timed(run, repeats)
        if best is None or t["wall"] < best["wall"]:
            best = {**t, "chunk": chunk}
    return best
