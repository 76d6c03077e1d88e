"""skjnf against the reference JNF (MultiVae 1.0.3), side by side, in one run.

Both implementations are trained and evaluated on the same arrays (three datasets, three
modalities each, features in [0, 1]) with the same latent size, batch size, learning rate,
epochs per stage, validation fraction and thread count. The reference runs in a subprocess of
its own virtual environment (``benchmarks/_peer.py``; setup in ``benchmarks/README.md``);
the two processes never run at the same time.

Usage::

    python benchmarks/run.py --quick               # smoke run: small data, 2+2 epochs (minutes)
    python benchmarks/run.py                       # the full run behind README.md's table
    python benchmarks/run.py --no-peer             # skjnf only (no reference venv needed)
    python benchmarks/run.py --datasets digits --no-scaling

Every timing is the median of ``--repeats`` (>= 3) calls after a warm-up call; wall-clock and
process CPU time are both recorded (CPU time is less sensitive to other jobs on the machine).
Ratios are reference / skjnf: above 1 means skjnf is faster. Results go to
``benchmarks/results/latest.json`` and ``benchmarks/results/latest.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _report import calibrate, machine, render, render_saved, skjnf_version, timing_table  # noqa: E402
from _side_by_side import (  # noqa: E402
    DEFAULT_PEER_PYTHON,
    quality,
    reference_scales,
    run_ours,
    run_peer,
    run_scaling,
    scaling_worker,
)
from _tables import gaussian_log_likelihood, unit_range_sets  # noqa: E402


# ------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 300 train / 60 test rows, 2+2 epochs, reference HMC with 10 steps, 1 timed repeat",
    )
    ap.add_argument(
        "--datasets",
        nargs="+",
        default=["linear-gaussian", "nonlinear", "digits"],
        choices=["linear-gaussian", "nonlinear", "digits"],
    )
    ap.add_argument("--n-train", type=int, default=1500, help="training rows of the synthetic sets (digits: 1,347)")
    ap.add_argument("--n-test", type=int, default=450)
    ap.add_argument("--joint-epochs", type=int, default=30)
    ap.add_argument("--flow-epochs", type=int, default=30)
    ap.add_argument("--latent-dim", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--nll-k", type=int, default=100, help="importance samples K of the joint log-likelihood")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the reference venv")
    ap.add_argument(
        "--peer-mcmc-steps",
        type=int,
        default=None,
        help="override the reference's HMC steps (default: its own 100); --quick uses 10",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the reference")
    ap.add_argument(
        "--at-defaults",
        action="store_true",
        help="each implementation at its own defaults (same data, latent size and validation split): skjnf "
        "JNFEstimator() with early stopping; the reference at MultiVae's defaults (10+90 epochs, batch 64, lr 1e-4, "
        "decoder scale 1); the epoch, batch, lr and architecture options then apply to neither",
    )
    ap.add_argument(
        "--architecture",
        choices=["matched", "default"],
        default="matched",
        help="matched: skjnf gets the reference's layers (trunks d-512-512-latent, decoders latent-512-d + sigmoid); "
        "default: skjnf's own (decoders mirror hidden_sizes)",
    )
    ap.add_argument(
        "--reference-scale",
        default="auto",
        help="the reference's normal decoder scale: a float, or auto = what skjnf's default picks per modality",
    )
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--scaling-sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--scaling-epochs", type=int, default=1, help="epochs per stage in the scaling runs")
    ap.add_argument("--scaling-hmc-max", type=int, default=10000, help="largest size whose 2-of-3 inference is timed")
    ap.add_argument("--out", default=str(HERE / "results" / "latest"), help="prefix of the .json / .md results")
    ap.add_argument("--render", default=None, metavar="JSON", help="only re-print the report of a saved results JSON")
    ap.add_argument("--scaling-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test = min(args.n_train, 300), min(args.n_test, 60)
        args.joint_epochs, args.flow_epochs = min(args.joint_epochs, 2), min(args.flow_epochs, 2)
        args.repeats = 1
        args.peer_mcmc_steps = args.peer_mcmc_steps or 10
        args.scaling_sizes = [s for s in args.scaling_sizes if s <= 10000][:2] or [1000]
        args.scaling_hmc_max = min(args.scaling_hmc_max, 1000)
        args.scaling_epochs = 1
        if args.out == str(HERE / "results" / "latest"):
            args.out = str(HERE / "results" / "quick")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_saved(args.render)
    import torch

    torch.set_num_threads(args.threads)
    if args.scaling_worker is not None:
        print(json.dumps(scaling_worker(args.scaling_worker, args)))
        return 0
    warnings.filterwarnings("ignore", category=UserWarning)
    have_peer = not args.no_peer and Path(args.peer_python).exists()
    if not args.no_peer and not have_peer:
        print(f"[peer] {args.peer_python} not found: running skjnf only (see benchmarks/README.md)", file=sys.stderr)
    started = time.time()
    version = skjnf_version()
    print(f"[skjnf] {version}", flush=True)
    calibration = {"start": calibrate(args.threads)}
    print(f"[calibration] {calibration['start']}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="jnf_bench_") as tmp:
        for ds in unit_range_sets(args.n_train, args.n_test, args.datasets):
            print(f"[{ds.name}] skjnf ...", flush=True)
            ours, ours_preds = run_ours(ds, args)
            peer, peer_preds = (None, None)
            if have_peer:
                print(f"[{ds.name}] reference ...", flush=True)
                peer, peer_preds = run_peer(ds, args, Path(tmp))
            ours["gflops"] = calibration["start"][f"gflops_{args.threads}_threads"]
            res = {
                "dataset": ds.name,
                "description": ds.description,
                "ours": ours,
                "peer": peer,
                "nll_k": args.nll_k,
                "reference_scales": reference_scales(ds, args),
                "n_train": len(next(iter(ds.train.values()))),
                "n_test": len(next(iter(ds.test.values()))),
            }
            res["quality"] = quality(ds, ours_preds, peer_preds, ours, peer)
            if ds.covariance is not None:
                res["exact_ll"] = float(np.mean(gaussian_log_likelihood(ds, ds.test)))
            results.append(res)
            print("\n".join(timing_table(ds.name, ours, peer, args)) + "\n", flush=True)
            partial = Path(args.out).with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(
                json.dumps(
                    {"args": vars(args), "results": results, "skjnf": version, "calibration": calibration},
                    indent=1,
                    default=float,
                )
            )
    scaling = [] if args.no_scaling else run_scaling(args)
    calibration["end"] = calibrate(args.threads)
    gflops = "; ".join(
        f"{when}: " + ", ".join(f"{v:.1f} GFLOP/s at {k.split('_')[1]} thread(s)" for k, v in c.items())
        for when, c in calibration.items()
    )

    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render(args, results, scaling, cmd, machine(), (time.time() - started) / 60, gflops, version)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "results": results,
                "scaling": scaling,
                "machine": machine(),
                "calibration": calibration,
                "command": cmd,
                "skjnf": version,
                "minutes": (time.time() - started) / 60,
            },
            indent=1,
            default=float,
        )
    )
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
