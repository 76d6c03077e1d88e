"""The command line every benchmark script shares: its docstring as help, ``--threads``, ``--out``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def benchmark_parser(doc: str, out_name: str) -> argparse.ArgumentParser:
    """A parser with ``--threads`` (torch threads, 1 by default: see benchmarks/README.md) and
    ``--out`` (a JSON file, ``results/<out_name>`` by default); the script adds its own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / out_name))
    return parser


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def stage_record(model, n_rows: int) -> dict:
    """Each stage's epochs and mean seconds per epoch (skorch's ``dur``) of a JNFEstimator fitted
    on ``n_rows`` rows, [stage 1, stage 2], the seconds of both training loops together, and what
    its compute floor needs: the parameters each stage trains and the rows an epoch trains on."""
    durations = [[row["dur"] for row in model.history_[stage]["epochs"]] for stage in ("joint", "flows")]
    return {
        "epochs": [len(d) for d in durations],
        "epoch_s": [sum(d) / max(len(d), 1) for d in durations],
        "loops_s": sum(sum(d) for d in durations),
        **floor_counts(model, n_rows),
    }


def floor_counts(model, n_rows: int) -> dict:
    """What a fit's compute floor (``_report.compute_floor_s``) counts: the parameters each stage of
    a JNFEstimator fitted on ``n_rows`` rows trains, and the rows an epoch trains on."""
    return {
        "stage_parameters": [
            sum(p.numel() for part in parts for p in part.parameters())
            for parts in (model.module_.joint_parts(), model.module_.expert_parts())
        ],
        "train_rows": n_rows - math.ceil(model.validation_fraction * n_rows),
    }


def worker_call(args, worker) -> bool:
    """Run ``worker(*args.worker)`` and print its result as JSON when this process is a worker
    (``--worker`` given); return whether it was."""
    import json

    if args.worker is None:
        return False
    print(json.dumps(worker(*args.worker)))
    return True
