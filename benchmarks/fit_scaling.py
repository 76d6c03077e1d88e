"""How a default fit grows with the rows: 10^3, 10^4 and 10^5 rows of a three-view table.

``JNFEstimator(random_state=0)`` at its defaults (early stopping) on the nonlinear table of
``_tables.py`` (three views of 20, 16 and 12 features), each size in a fresh process so that the
peak memory is that size's alone. Reported per size: the fit's wall time, the epochs each stage
ran, the seconds per epoch of each stage (skorch's ``dur``), what is left outside the two
training loops (validation split, linear paths, route choices, calibration), and the peak
resident memory above the process's start.

Usage::

    python benchmarks/fit_scaling.py --threads 1                     # 1e3, 1e4, 1e5 rows
    python benchmarks/fit_scaling.py --threads 1 --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cli import benchmark_parser, set_threads, stage_record, worker_call  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next((int(line.split()[1]) for line in fh if line.startswith(field + ":")), 0)


def worker(n_rows: int) -> dict:
    from _tables import nonlinear

    from skjnf import JNFEstimator

    X = nonlinear(n_rows, 0).train
    start_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = JNFEstimator(random_state=0).fit(X)
    fit_s = time.perf_counter() - start
    record = stage_record(model, n_rows)
    return {
        "n_rows": n_rows,
        "fit_s": fit_s,
        **record,
        "outside_loops_s": fit_s - record["loops_s"],
        "peak_mib": (_status_kb("VmHWM") - start_kb) / 1024,
    }


def report(rows: list[dict]) -> str:
    lines = [
        "| rows | fit (s) | epochs (stage 1 + 2) | s / epoch, stage 1 | s / epoch, stage 2 | outside the loops (s) "
        "| peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_rows']:,} | {r['fit_s']:.1f} | {r['epochs'][0]} + {r['epochs'][1]} | "
            f"{r['epoch_s'][0]:.3f} | {r['epoch_s'][1]:.3f} | {r['outside_loops_s']:.1f} | "
            f"{r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "fit_scaling.json")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10_000, 100_000])
    parser.add_argument("--worker", nargs=1, type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    set_threads(args.threads)
    if worker_call(args, worker):
        return
    rows = []
    for n in args.sizes:
        command = [sys.executable, __file__, "--worker", str(n), "--threads", str(args.threads)]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(report(rows[-1:]).splitlines()[-1], flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    title = f"# Default fits by size (`python benchmarks/fit_scaling.py --threads {args.threads}`)"
    Path(args.out).with_suffix(".md").write_text(f"{title}\n\n{report(rows)}\n")
    print(report(rows))


if __name__ == "__main__":
    main()
