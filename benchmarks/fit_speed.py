"""Default fits of this working tree against another commit of skjnf, in one run.

Each (table, seed) is fitted by both versions at their defaults, one process at a time and
alternating, so that both see the same machine: the baseline is checked out in a temporary git
worktree and imported from there. Reported per table: the median fit time of each version and
their ratio, each stage's epochs and seconds per epoch, each version's fit over its compute floor
(6 FLOP per trained parameter per row and epoch at the matmul rate measured at the start), and the
held-out log-likelihood and one-view cross-modal MSE of each (quality must not move beyond seed noise).

Usage::

    python benchmarks/fit_speed.py --threads 1 --baseline 7f5cfaa --tables digits6 cancer --seeds 0 1
    python benchmarks/fit_speed.py --threads 1 --baseline HEAD~1 --tables mfeat-like   # the 646-feature table
    python benchmarks/fit_speed.py --threads 1 --baseline HEAD~1 --tables nonlinear-10000  # 10^4 rows, fit_scaling.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cli import benchmark_parser, set_threads, stage_record, worker_call  # noqa: E402
from _report import calibrate, compute_floor_s  # noqa: E402


def worker(table_name: str, seed: str) -> dict:
    import numpy as np
    from _tables import load_table

    from skjnf import JNFEstimator

    if table_name.startswith("nonlinear-"):  # nonlinear-N: N rows of fit_scaling.py's three-view table
        from _tables import nonlinear

        table = nonlinear(int(table_name.split("-")[1]), 2000)
    else:
        table = load_table(table_name, seed=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = JNFEstimator(random_state=int(seed)).fit(table.train)
        fit_s = time.perf_counter() - start
        errors = [
            float(((model.predict({m: table.test[m]})[t] - table.test[t]) ** 2).mean())
            for m in table.names
            for t in table.names
            if t != m
        ]
        log_likelihood = float(model.score(table.test))
    import skjnf

    return {
        "skjnf": skjnf.__file__,
        "fit_s": fit_s,
        **stage_record(model, len(next(iter(table.train.values())))),
        "log_likelihood": log_likelihood,
        "mse_one_view": float(np.mean(errors)),
    }


def run(source: Path, table: str, seed: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", table, str(seed), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(source)}  # this version's skjnf first on the path
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=source)
    if proc.returncode != 0:
        raise RuntimeError(f"{source} failed on {table}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict, baseline: str, gflops: float) -> str:
    """One row per table; "fit / floor" divides each fit by its compute floor (`_report.compute_floor_s`:
    6 FLOP per trained parameter per training row per epoch, at the matmul rate measured at the start)."""
    lines = [
        f"| table | fit (s), {baseline} | fit (s), now | speed-up | epochs then / now | s per epoch (stage 1, 2) "
        "then / now | fit / floor then / now (floor s) | held-out LL then / now | MSE one view then / now |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for table, sides in results.items():
        then, now = sides["baseline"], sides["current"]
        fit = [statistics.median(r["fit_s"] for r in side) for side in (then, now)]

        def mean(side, key):
            return statistics.mean(r[key] for r in side)

        def epochs(side):
            return "+".join(str(round(statistics.mean(r["epochs"][i] for r in side))) for i in (0, 1))

        def floor(side):
            return statistics.mean(
                compute_floor_s(r["stage_parameters"], r["train_rows"], r["epochs"], gflops) for r in side
            )

        floors = [floor(side) for side in (then, now)]

        def per_epoch(side):
            return ", ".join(f"{statistics.mean(r['epoch_s'][i] for r in side):.3f}" for i in (0, 1))

        lines.append(
            f"| {table} ({len(now)} seeds) | {fit[0]:.1f} | {fit[1]:.1f} | {fit[0] / fit[1]:.2f}× | "
            f"{epochs(then)} / {epochs(now)} | {per_epoch(then)} / {per_epoch(now)} | "
            f"{fit[0] / floors[0]:.2f} / {fit[1] / floors[1]:.2f} ({floors[0]:.1f} / {floors[1]:.1f}) | "
            f"{mean(then, 'log_likelihood'):.2f} / {mean(now, 'log_likelihood'):.2f} | "
            f"{mean(then, 'mse_one_view'):.3f} / {mean(now, 'mse_one_view'):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "fit_speed.json")
    parser.add_argument("--baseline", help="a git commit of skjnf (required)")
    parser.add_argument("--tables", nargs="+", default=["digits6", "cancer"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # table, seed: one fit here
    args = parser.parse_args()
    set_threads(args.threads)
    if worker_call(args, worker):
        return
    if args.baseline is None:
        parser.error("--baseline is required")
    root = HERE.parent
    results: dict = {}
    gflops = calibrate(args.threads)[f"gflops_{args.threads}_threads"]
    print(f"[calibration] matmul {gflops:.0f} GFLOP/s at {args.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="skjnf_baseline_") as tmp:
        baseline = Path(tmp) / "tree"
        git = ["git", "-C", str(root), "worktree"]
        subprocess.run([*git, "add", "--detach", str(baseline), args.baseline], check=True)
        try:
            for table in args.tables:
                results[table] = {"baseline": [], "current": []}
                for seed in args.seeds:
                    for side, source in (("baseline", baseline), ("current", root)):
                        results[table][side].append(run(source, table, seed, args.threads))
                print(report({table: results[table]}, args.baseline, gflops).splitlines()[-1], flush=True)
        finally:
            subprocess.run([*git, "remove", "--force", str(baseline)], check=True)
    Path(args.out).write_text(json.dumps({"baseline": args.baseline, "gflops": gflops, "results": results}, indent=1))
    text = report(results, args.baseline, gflops)
    Path(args.out).with_suffix(".md").write_text(
        f"# Default fits, this tree against {args.baseline} (`benchmarks/fit_speed.py --threads {args.threads}`)"
        f"\n\n{text}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
