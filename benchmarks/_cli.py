"""The command line every benchmark script shares: its docstring as help, ``--threads``, ``--out``."""

from __future__ import annotations

import argparse
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
