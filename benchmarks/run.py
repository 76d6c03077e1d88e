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
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _data import Dataset, gaussian_log_likelihood, gaussian_predict, make_datasets  # noqa: E402
from _timing import fastest_chunking, timed  # noqa: E402

#: The reference's interpreter (a venv with multivae 1.0.3; see benchmarks/README.md): JNF_PEER_PYTHON,
#: else ``peer-venv/bin/python`` beside the repository.
DEFAULT_PEER_PYTHON = os.environ.get("JNF_PEER_PYTHON", str(HERE.parent.parent / "peer-venv" / "bin" / "python"))
AUTO_SCALE_FRACTION = 0.5  # skjnf's likelihood_scale="auto": half the RMS feature std of each modality
N_CHAINS_REFERENCE = 10  # the reference's best subset protocol: mean latent of 10 chains per row


# ------------------------------------------------------------------------------- helpers
def subsets_of(names, sizes):
    return [list(s) for k in sizes for s in itertools.combinations(names, k)]


def key(subset) -> str:
    return "+".join(subset)


def mse(pred: dict, truth: dict, targets) -> float:
    """Per-feature MSE over the rows whose prediction is finite (see :func:`nonfinite_rows`)."""
    err = np.concatenate([(np.asarray(pred[m], np.float64) - truth[m]) ** 2 for m in targets], axis=1)
    finite = np.isfinite(err).all(axis=1)
    return float(err[finite].mean()) if finite.any() else float("nan")


def nonfinite_rows(pred: dict, targets) -> int:
    """Rows with a NaN / Inf prediction (the reference's HMC can return NaN latents)."""
    return int((~np.isfinite(np.concatenate([np.asarray(pred[m]) for m in targets], axis=1))).any(axis=1).sum())


def reference_scales(ds: Dataset, args) -> dict[str, float]:
    """The reference's fixed normal decoder scale per modality (``--reference-scale``).

    ``auto``: what skjnf's default ``likelihood_scale="auto"`` picks (half the RMS feature std of
    the modality's training rows), so both models optimise the same objective. With
    ``--at-defaults``: MultiVae's default scale.
    """
    if args.at_defaults:
        return {m: REFERENCE_DEFAULTS["scale"] for m in ds.names}
    if args.reference_scale != "auto":
        return {m: float(args.reference_scale) for m in ds.names}
    return {m: AUTO_SCALE_FRACTION * float(np.sqrt(x.var(axis=0).mean())) for m, x in ds.train.items()}


# ------------------------------------------------------------------------------- skjnf side
class ReferenceTrunk:
    """The reference's joint-encoder branch per modality: d → 512 → 512 → latent (its mean head).

    MultiVae's default joint encoder runs a copy of each unimodal encoder up to its mean head
    and a 2×512 MLP on the concatenated means; with this trunk and ``hidden_sizes=(512, 512)``
    skjnf's joint encoder has the same layers (``--architecture matched``).
    """

    def __init__(self, latent_dim: int):
        self.latent_dim = latent_dim

    def __call__(self, in_shape):
        from torch import nn

        d = math.prod(in_shape)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(d, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, self.latent_dim)
        )


class ReferenceDecoder:
    """The reference's default decoder: latent → 512 → d, ending in a sigmoid (data in [0, 1]).

    The sigmoid matters at 30 epochs on [0, 1] data: with it skjnf's held-out log-likelihood on
    the linear-Gaussian set went from 61.0 to 63.9 (one seed), matching the reference's.
    """

    def __call__(self, latent_dim: int, out_shape):
        from torch import nn

        return nn.Sequential(nn.Linear(latent_dim, 512), nn.ReLU(), nn.Linear(512, math.prod(out_shape)), nn.Sigmoid())


#: MultiVae 1.0.3's own defaults (JNFConfig: warmup=10; MultistageTrainerConfig / BaseTrainerConfig:
#: num_epochs=100, per_device_train_batch_size=64, learning_rate=1e-4; normal decoders of scale 1),
#: what ``--at-defaults`` gives the reference.
REFERENCE_DEFAULTS = {"batch_size": 64, "lr": 1e-4, "joint_epochs": 10, "flow_epochs": 90, "scale": 1.0}


def make_ours(args, names=("a", "b", "c"), **overrides):
    """skjnf with the benchmark's sizes; ``--architecture matched`` copies the reference's layers;
    ``--at-defaults``: ``JNFEstimator`` at its defaults but for the latent size and validation split."""
    from skjnf import JNFEstimator

    if args.at_defaults:
        params = {"latent_dim": args.latent_dim, "validation_fraction": args.validation_fraction}
        return JNFEstimator(**{**params, "random_state": args.seed, **overrides})
    params = {
        "latent_dim": args.latent_dim,
        "hidden_sizes": (512, 512),
        "n_flow_blocks": 2,
        "flow_hidden_sizes": (128, 128, 128),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "joint_epochs": args.joint_epochs,
        "flow_epochs": args.flow_epochs,
        "validation_fraction": args.validation_fraction,
        "random_state": args.seed,
        "early_stopping": False,  # the same work on both sides: every epoch runs
        "rescale_likelihoods": False,  # the same objective: the reference weights modalities alike
    }
    if args.architecture == "matched":
        params["networks"] = {
            m: {"trunk": ReferenceTrunk(args.latent_dim), "decoder": ReferenceDecoder()} for m in names
        }
    params.update(overrides)
    return JNFEstimator(**params)


def run_ours(ds: Dataset, args) -> tuple[dict, dict]:
    import torch

    names, test = ds.names, ds.test
    out: dict = {}
    # fit: warm-up (1 + 1 epochs), then repeats at equal epochs; the last model is evaluated
    # the reference's fixed scales, passed as floats: the same objective on both sides (skjnf's
    # "auto" would also calibrate them after stage 1, which the reference does not do)
    scale = {} if args.at_defaults else {"likelihood_scale": reference_scales(ds, args)}
    make_ours(args, joint_epochs=1, flow_epochs=1, random_state=args.seed + 999, **scale).fit(ds.train)
    fits, stage_times, repeat_quality, est = [], [], [], None
    for r in range(args.repeats):
        est = make_ours(args, random_state=args.seed + r, **scale)
        t, _ = timed(lambda est=est: est.fit(ds.train), 1)
        fits.append(t)
        # each stage's epochs, timed by skorch (history_'s "dur"): the training loop alone
        stage_times.append([sum(row["dur"] for row in est.history_[stage]["epochs"]) for stage in ("joint", "flows")])
        repeat_quality.append(cheap_quality(est, ds, args))
    out["repeat_quality"] = repeat_quality
    out["fit"] = {k: statistics.median([f[k] for f in fits]) for k in ("wall", "cpu")}
    out["fit"]["walls"] = [f["wall"] for f in fits]
    # epochs each stage ran (early stopping at defaults: those of the last fit)
    n_joint, n_flow = (
        (len(est.history_["joint"]["epochs"]), len(est.history_["flows"]["epochs"]))
        if args.at_defaults
        else (args.joint_epochs, args.flow_epochs)
    )
    out["epochs_run"] = [n_joint, n_flow]
    if all(len(s) == 2 for s in stage_times):
        if n_joint:
            out["epoch_joint_s"] = statistics.median([s[0] for s in stage_times]) / n_joint
        if n_flow:
            out["epoch_flow_s"] = statistics.median([s[1] for s in stage_times]) / n_flow

    warm = {m: x[:20] for m, x in test.items()}
    preds: dict[str, dict] = {}
    # all modalities
    est.transform(warm)
    out["latent_all"], _ = timed(lambda: est.transform(test), args.repeats)
    preds[key(names)] = est.predict(test)
    # one modality (median over the modalities)
    est.transform(warm, cond_mod=names[0])
    ones = []
    for m in names:
        t, _ = timed(lambda m=m: est.transform(test, cond_mod=m), args.repeats)
        ones.append(t)
        preds[m] = est.predict(test, cond_mod=m)
    out["latent_one"] = {k: statistics.median([t[k] for t in ones]) for k in ("wall", "cpu")}
    # subsets of 2..M-1: one timed call per subset, median over subsets
    subsets = subsets_of(names, range(2, len(names)))
    if subsets:
        est.transform(warm, cond_mod=subsets[0])
        subs, acc = [], []
        for s in subsets:
            t, _ = timed(lambda s=s: est.transform(test, cond_mod=s), 1)
            subs.append(t)
            # acceptance of the HMC options, from draws on a few rows (None for the amortised posterior)
            _, diagnostics = est.sample_latent(warm, cond_mod=s, return_diagnostics=True)
            acc.append(diagnostics["acceptance"])
            # what a user gets: each target from the set fit chose for it (target routes), which
            # decoding transform's latent would not give; an HMC option runs its chains again here
            preds[key(s)] = est.predict(test, cond_mod=s)
        out["latent_subset"] = {k: statistics.median([t[k] for t in subs]) for k in ("wall", "cpu")}
        out["latent_subset"]["walls"] = [t["wall"] for t in subs]
        out["hmc_acceptance"] = acc
        out["hmc_settings"] = {
            k: est.get_params()[k] for k in ("n_mcmc_steps", "n_leapfrog", "n_posterior_samples", "step_size")
        }
    # joint log-likelihood, K importance samples
    est.set_params(n_importance_samples=args.nll_k)
    est.score_samples(warm)
    out["joint_ll"], ll = timed(lambda: est.score_samples(test), args.repeats)
    out["joint_ll_mean"] = float(np.mean(ll))
    out["joint_ll_floor"] = decoder_floor(est, test, args)
    out["n_parameters"] = int(sum(p.numel() for p in est.module_.parameters()))
    out["stage_parameters"] = [
        sum(p.numel() for part in parts for p in part.parameters())
        for parts in (est.module_.joint_parts(), est.module_.expert_parts())
    ]
    n_rows = len(next(iter(ds.train.values())))
    out["train_rows"] = n_rows - math.ceil(args.validation_fraction * n_rows)  # the rows each epoch trains on
    torch.set_num_threads(args.threads)
    return out, preds


def cheap_quality(est, ds: Dataset, args) -> dict:
    """Held-out joint log-likelihood and the one / all-modality MSEs of one fitted model.

    Computed for every fit repeat (one seed each): at 30 epochs the seed alone moves the
    log-likelihood by several nats, so the report gives medians over the repeats.
    """
    est.set_params(n_importance_samples=args.nll_k)
    result = {"joint_ll": float(np.mean(est.score_samples(ds.test))), "mse": {}}
    for cond in [[m] for m in ds.names] + [ds.names]:
        targets = [m for m in ds.names if m not in cond] or ds.names
        result["mse"][key(cond)] = mse(est.predict(ds.test, cond_mod=cond), ds.test, targets)
    return result


#: Chunk sizes (latents per pass) tried for the decoder floor, on both sides; None = one batch.
FLOOR_CHUNKS = (None, 2**14, 2**12, 2**10)


def decoder_floor(est, test: dict, args) -> dict:
    """Time of the K·n decoder forward passes alone (all modalities, no_grad, eval mode).

    The fastest of one batch and chunks of ``FLOOR_CHUNKS`` latents (``_peer.py`` does the same
    for the reference): on CPU, small chunks that keep activations in cache are much faster.
    """
    import torch

    module = est.module_
    n = len(next(iter(test.values())))
    z = torch.randn(args.nll_k * n, args.latent_dim, generator=torch.Generator().manual_seed(0))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return fastest_chunking(
                lambda rows: [decoder(z[rows]) for decoder in module.decoders],
                len(z),
                FLOOR_CHUNKS,
                max(args.repeats, 5),
            )
    finally:
        module.train(was_training)


# ------------------------------------------------------------------------------- reference side
def run_peer(ds: Dataset, args, workdir: Path) -> tuple[dict, dict] | tuple[None, None]:
    rng = np.random.default_rng(args.seed)
    n = len(next(iter(ds.train.values())))
    n_valid = math.ceil(args.validation_fraction * n)
    perm = rng.permutation(n)
    valid_rows, train_rows = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    arrays = {}
    for m in ds.names:
        arrays[f"train__{m}"] = ds.train[m][train_rows]
        arrays[f"valid__{m}"] = ds.train[m][valid_rows]
        arrays[f"test__{m}"] = ds.test[m]
    data_path, cfg_path, prefix = workdir / f"{ds.name}.npz", workdir / f"{ds.name}.json", workdir / f"{ds.name}_peer"
    np.savez(data_path, **arrays)
    cfg = {
        "names": ds.names,
        "latent_dim": args.latent_dim,
        "batch_size": REFERENCE_DEFAULTS["batch_size"] if args.at_defaults else args.batch_size,
        "lr": REFERENCE_DEFAULTS["lr"] if args.at_defaults else args.lr,
        "joint_epochs": REFERENCE_DEFAULTS["joint_epochs"] if args.at_defaults else args.joint_epochs,
        "flow_epochs": REFERENCE_DEFAULTS["flow_epochs"] if args.at_defaults else args.flow_epochs,
        "likelihood_scale": reference_scales(ds, args),
        "seed": args.seed,
        "threads": args.threads,
        "repeats": args.repeats,
        "fit_repeats": args.repeats,
        "n_chains": N_CHAINS_REFERENCE,
        "nll_K": args.nll_k,
        "floor_chunks": list(FLOOR_CHUNKS),
        "hmc_kwargs": {"mcmc_steps": args.peer_mcmc_steps} if args.peer_mcmc_steps else {},
    }
    cfg_path.write_text(json.dumps(cfg))
    log_path = workdir / f"{ds.name}_peer.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [args.peer_python, str(HERE / "_peer.py"), str(data_path), str(cfg_path), str(prefix)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        print(f"[peer] {ds.name}: failed (exit {proc.returncode}); log tail:\n{tail}", file=sys.stderr)
        return None, None
    out = json.loads(Path(str(prefix) + ".json").read_text())
    flat = np.load(str(prefix) + ".npz")
    preds: dict[str, dict] = {}
    for name in flat.files:
        _, subset, m = name.split("__")
        preds.setdefault(subset, {})[m] = flat[name]
    return out, preds


# ------------------------------------------------------------------------------- quality
def median_over_repeats(side: dict | None, cond: str | None = None) -> float | None:
    """Median over the fit repeats of the joint log-likelihood (cond None) or of one MSE."""
    repeats = (side or {}).get("repeat_quality")
    if not repeats:
        return None
    return float(np.median([r["joint_ll"] if cond is None else r["mse"][cond] for r in repeats]))


def quality(ds: Dataset, ours_preds: dict, peer_preds: dict | None, ours=None, peer=None) -> list[dict]:
    """Cross-modal MSE of the held-out modalities per conditioning set (self-reconstruction for all).

    One / all modalities: median over the fit repeats (when recorded); 2 of 3 (expensive for the
    reference's HMC): the last fitted model of each implementation.
    """
    names, rows = ds.names, []
    for subset in subsets_of(names, range(1, len(names) + 1)):
        targets = [m for m in names if m not in subset] or names
        row = {"cond": key(subset), "targets": key(targets), "ours": mse(ours_preds[key(subset)], ds.test, targets)}
        cheap = len(subset) in (1, len(names))
        if cheap and median_over_repeats(ours, key(subset)) is not None:
            row["ours_last"], row["ours"] = row["ours"], median_over_repeats(ours, key(subset))
        if peer_preds is not None:
            if cheap:
                row["peer"] = mse(peer_preds[key(subset)], ds.test, targets)
                if median_over_repeats(peer, key(subset)) is not None:
                    row["peer_last"], row["peer"] = row["peer"], median_over_repeats(peer, key(subset))
            else:
                draw, mean10 = peer_preds[key(subset) + "@draw"], peer_preds[key(subset) + f"@mean{N_CHAINS_REFERENCE}"]
                row["peer_draw"] = mse(draw, ds.test, targets)
                row["peer_mean10"] = mse(mean10, ds.test, targets)
                row["peer_draw_nonfinite"] = nonfinite_rows(draw, targets)
                row["peer_mean10_nonfinite"] = nonfinite_rows(mean10, targets)
                row["peer"] = float(np.nanmin([row["peer_draw"], row["peer_mean10"]]))
        if ds.gaussian is not None and len(subset) < len(names):
            row["bayes"] = mse(gaussian_predict(ds, ds.test, subset), ds.test, targets)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- scaling
def scaling_worker(n_rows: int, args) -> dict:
    """One size, in a fresh process so that peak RSS is this size's alone."""
    import torch
    from _data import nonlinear

    torch.set_num_threads(args.threads)
    ds = nonlinear(n_rows, 0 if n_rows <= 0 else n_rows // 10)
    X = ds.train
    est = make_ours(args, joint_epochs=args.scaling_epochs, flow_epochs=args.scaling_epochs)
    result = {"n_rows": n_rows, "epochs": f"{args.scaling_epochs}+{args.scaling_epochs}"}

    def measure(label, fn):
        base = _rss_kb()
        _reset_peak()
        w, c = time.perf_counter(), time.process_time()
        fn()
        result[label] = {
            "wall": time.perf_counter() - w,
            "cpu": time.process_time() - c,
            "peak_mib": (_peak_kb() - base) / 1024,
        }

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure("fit", lambda: est.fit(X))
        measure("latent_all", lambda: est.transform(X))
        measure("latent_one", lambda: est.transform(X, cond_mod="a"))
        if n_rows <= args.scaling_hmc_max:
            measure("latent_subset", lambda: est.transform(X, cond_mod=["a", "b"]))
    return result


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss_kb() -> int:
    return _status_kb("VmRSS")


def _peak_kb() -> int:
    return _status_kb("VmHWM")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not Linux: the peak then covers the whole process
        pass


def run_scaling(args) -> list[dict]:
    rows = []
    for n in args.scaling_sizes:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--scaling-worker",
            str(n),
            "--scaling-epochs",
            str(args.scaling_epochs),
            "--scaling-hmc-max",
            str(args.scaling_hmc_max),
            "--threads",
            str(args.threads),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[scaling] n={n} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[scaling] n={n}: {rows[-1]}", flush=True)
    return rows


# ------------------------------------------------------------------------------- report
def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def ratio(peer, ours):
    if peer is None or ours is None or ours <= 0:
        return None
    return peer / ours


def timing_table(name: str, o: dict, p: dict | None, args) -> list[str]:
    p = p or {}
    ep = (
        f"{args.joint_epochs}+{args.joint_epochs}"
        if args.joint_epochs == args.flow_epochs
        else f"{args.joint_epochs}+{args.flow_epochs}"
    )
    if args.at_defaults:
        run = o.get("epochs_run", ["?", "?"])
        ref = f"{REFERENCE_DEFAULTS['joint_epochs']}+{REFERENCE_DEFAULTS['flow_epochs']}"
        ep = f"each at its defaults: skjnf {run[0]}+{run[1]} (early stopping), reference {ref}"
    lines = [
        f"#### {name}: time (s; median of {args.repeats} after a warm-up; ratio = reference / skjnf)",
        "",
        "| figure | skjnf wall | reference wall | ratio (wall) | ratio (CPU) |",
        "|---|---|---|---|---|",
    ]

    def row(label, ours, peer, ours_cpu=None, peer_cpu=None):
        lines.append(
            f"| {label} | {fmt(ours)} | {fmt(peer)} | {fmt(ratio(peer, ours))} | {fmt(ratio(peer_cpu, ours_cpu))} |"
        )

    def timed_row(label, ours: dict, peer: str):
        """A figure timed on both sides: ours {"wall", "cpu"}; the reference's ``{peer}_s`` / ``{peer}_cpu_s``."""
        row(label, ours["wall"], p.get(f"{peer}_s"), ours["cpu"], p.get(f"{peer}_cpu_s"))

    timed_row(f"fit, {ep} epochs", o["fit"], "fit")
    row("  per epoch, stage 1 (joint VAE)", o.get("epoch_joint_s"), p.get("epoch_joint_s"))
    row("  per epoch, stage 2 (flows)", o.get("epoch_flow_s"), p.get("epoch_flow_s"))
    timed_row("latent, all modalities", o["latent_all"], "encode_all")
    timed_row("latent, one modality", o["latent_one"], "encode_one")
    if "latent_subset" in o:
        timed_row("latent, 2 of 3: skjnf mean vs reference one draw", o["latent_subset"], "encode_subset_draw")
        timed_row(
            f"latent, 2 of 3: skjnf mean vs reference mean of {N_CHAINS_REFERENCE} chains",
            o["latent_subset"],
            "encode_subset_mean",
        )
    timed_row(f"joint log-likelihood, K = {args.nll_k}", o["joint_ll"], "nll")
    floor, peer_floor = o["joint_ll_floor"]["wall"], p.get("decoder_floor_s")
    note = f"skjnf / its floor = {fmt(o['joint_ll']['wall'] / floor)}"
    if peer_floor and p.get("nll_s"):
        note += f"; reference / its floor = {fmt(p['nll_s'] / peer_floor)}"
    lines.append(
        "| decoder floor: K·n passes through each implementation's own decoders | "
        f"{fmt(floor)} | {fmt(peer_floor)} | {note} | |"
    )
    if p.get("n_parameters"):
        lines.append(f"| parameters (count) | {o['n_parameters']:,} | {p['n_parameters']:,} | | |")
    if o.get("stage_parameters") and o.get("gflops"):
        epochs = (o["epochs_run"], [REFERENCE_DEFAULTS[k] for k in ("joint_epochs", "flow_epochs")])
        if not args.at_defaults:
            epochs = ([args.joint_epochs, args.flow_epochs],) * 2
        floors = [
            compute_floor_s(side.get("stage_parameters"), o["train_rows"], ep, o["gflops"])
            for side, ep in zip((o, p), epochs)
        ]
        fits = (o["fit"]["wall"], p.get("fit_s"))
        lines.append(
            "| fit / compute floor: 6 × parameters each stage trains × rows × epochs ÷ matmul rate | "
            + " | ".join(fmt(f / floor) if f and floor else "-" for f, floor in zip(fits, floors))
            + f" | floors {fmt(floors[0])} s and {fmt(floors[1])} s | |"
        )
    return lines


def compute_floor_s(stage_parameters, rows: int, epochs, gflops: float) -> float | None:
    """Seconds a fit would take at the measured matmul rate doing only 6 FLOP per trained parameter
    per row (2 forward, 4 backward) in every epoch of each stage; None when a count is missing."""
    if not stage_parameters:
        return None
    return sum(6 * n * rows * e for n, e in zip(stage_parameters, epochs)) / (gflops * 1e9)


def joint_ll(side: dict | None) -> float | None:
    """The held-out joint log-likelihood: median over fit repeats, else the last model's."""
    if not side:
        return None
    median = median_over_repeats(side)
    return side["joint_ll_mean"] if median is None else median


def quality_table(name: str, ds: Dataset, res: dict) -> list[str]:
    gauss = ds.gaussian is not None
    lines = [f"#### {name}: held-out quality ({len(next(iter(ds.test.values())))} test rows)", ""]
    o, p = res["ours"], res.get("peer") or {}
    ours_ll, peer_ll = joint_ll(o), joint_ll(p)
    runs = lambda side: ", ".join(f"{r['joint_ll']:.1f}" for r in side.get("repeat_quality", []))  # noqa: E731
    median = ", median over the fits" if o.get("repeat_quality") else ""
    ll_line = f"Joint log-likelihood per row (K = {res['nll_k']}{median}): skjnf **{ours_ll:.2f}**"
    if o.get("repeat_quality"):
        ll_line += f" (fits: {runs(o)})"
    if p:
        ll_line += f", reference {peer_ll:.2f}" + (f" (fits: {runs(p)})" if p.get("repeat_quality") else "")
    if gauss:
        ll_line += f", exact {res['exact_ll']:.2f} (skjnf gap {res['exact_ll'] - ours_ll:.2f} nats)"
    scales = res.get("reference_scales")
    if scales and p:
        ll_line += ". Reference decoder scales: " + ", ".join(f"{m} {v:.3g}" for m, v in scales.items())
    lines += [ll_line + ".", ""]
    if o.get("repeat_quality"):
        lines += [
            f"MSE per feature; one and all modalities: median over the {len(o['repeat_quality'])} fits (one seed "
            "each); 2 of 3: the last fit.",
            "",
        ]
    head = "| conditioning → predicted | skjnf MSE | reference MSE (1 draw / 10-chain mean) |"
    sep = "|---|---|---|"
    if gauss:
        head += " Bayes MSE | skjnf / Bayes |"
        sep += "---|---|"
    lines += [head, sep]
    for r in res["quality"]:
        if "peer_draw" in r:
            cells = []
            for k in ("peer_draw", "peer_mean10"):
                bad = r.get(k + "_nonfinite", 0)
                cells.append(fmt(r[k], 4) + (f" ({bad} NaN row{'s' if bad > 1 else ''} left out)" if bad else ""))
            peer = " / ".join(cells)
        else:
            peer = fmt(r.get("peer"), 4)
        line = f"| {r['cond']} → {r['targets']} | {fmt(r['ours'], 4)} | {peer} |"
        if gauss:
            line += f" {fmt(r.get('bayes'), 4)} | {fmt(r['ours'] / r['bayes']) if r.get('bayes') else '—'} |"
        lines.append(line)
    return lines


def targets(results: list[dict]) -> list[str]:
    lines = ["#### Targets", ""]
    for res in results:
        o, p, name = res["ours"], res.get("peer"), res["dataset"]
        if not p:
            continue
        checks = []
        if "latent_subset" in o and p.get("encode_subset_draw_s"):
            speed = p["encode_subset_draw_s"] / o["latent_subset"]["wall"]
            subset_rows = [r for r in res["quality"] if "peer_mean10" in r]
            ours_mse = np.mean([r["ours"] for r in subset_rows])
            ref_mse = np.nanmean([r["peer_mean10"] for r in subset_rows])
            checks.append(
                (f"subset inference ≥ 10× faster than the reference's one-draw call: {speed:.1f}×", speed >= 10)
            )
            checks.append(
                (f"subset MSE ≤ reference 10-chain mean: {ours_mse:.4f} vs {ref_mse:.4f}", ours_mse <= ref_mse)
            )
        ll_speed = p["nll_s"] / o["joint_ll"]["wall"]
        floor_ratio = o["joint_ll"]["wall"] / o["joint_ll_floor"]["wall"]
        checks.append((f"joint LL ≥ 5× faster: {ll_speed:.1f}×", ll_speed >= 5))
        checks.append((f"joint LL within 1.5× of the decoder floor: {floor_ratio:.2f}×", floor_ratio <= 1.5))
        fit_speed = p["fit_s"] / o["fit"]["wall"]
        checks.append((f"fit no slower (aim 1.5× faster): {fit_speed:.2f}×", fit_speed >= 1))
        worse = [r["cond"] for r in res["quality"] if "peer" in r and r["ours"] > r["peer"]]
        checks.append((f"held-out LL no worse: {joint_ll(o):.2f} vs {joint_ll(p):.2f}", joint_ll(o) >= joint_ll(p)))
        checks.append(
            (
                "cross-modal MSE no worse for every conditioning set"
                + (f" (worse for {', '.join(worse)})" if worse else ""),
                not worse,
            )
        )
        lines.append(f"- **{name}**")
        lines += [f"  - {'MET' if ok else 'MISSED'}: {text}" for text, ok in checks]
    return lines


def scaling_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        f"#### Scaling (skjnf only, nonlinear data, {rows[0]['epochs']} epochs; wall s / peak MiB above the start)",
        "",
        "| rows | fit | latent, all | latent, one | latent, 2 of 3 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for k in ("fit", "latent_all", "latent_one", "latent_subset"):
            cells.append(f"{fmt(r[k]['wall'])} s / {max(r[k]['peak_mib'], 0):.0f} MiB" if k in r else "not run")
        lines.append(f"| {r['n_rows']:,} | " + " | ".join(cells) + " |")
    return lines


def calibrate(threads: int) -> dict:
    """Matmul throughput (128x512 @ 512x512, float32) at the run's thread count, and at 1 thread.

    A loaded 2-core machine can make 2-thread torch far slower than 1-thread torch (threads wait
    at barriers for a sibling that is descheduled); this records what the machine gave this run.
    """
    import torch

    out = {}
    a, w = torch.randn(128, 512), torch.randn(512, 512)
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        a @ w
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            a @ w
            count += 1
        out[f"gflops_{n}_threads"] = count * 2 * 128 * 512 * 512 / (time.perf_counter() - start) / 1e9
    torch.set_num_threads(threads)
    return out


def skjnf_version() -> dict:
    """The skjnf code that ran: git commit, whether skjnf/ had uncommitted changes, key defaults."""
    info = {}
    try:
        root = HERE.parent
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "skjnf"], cwd=root, capture_output=True, text=True).stdout
        info["skjnf_dirty"] = bool(dirty.strip())
    except OSError:
        pass
    from skjnf import JNFEstimator

    defaults = JNFEstimator().get_params()
    info["defaults"] = {
        k: defaults[k]
        for k in ("likelihood_scale", "n_mcmc_steps", "n_leapfrog", "n_posterior_samples", "step_size")
        if k in defaults
    }
    return info


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}, load average at the end {load}"


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
        for ds in make_datasets(args.n_train, args.n_test, args.datasets):
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
            if ds.gaussian is not None:
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


def render(args, results, scaling, cmd, machine_text, minutes, gflops, version=None) -> str:
    """The markdown report (also rebuilt from a saved JSON by ``--render``)."""
    version = version or {}
    code = (
        f"skjnf at commit {version.get('commit', '?')}"
        + (" plus uncommitted changes" if version.get("skjnf_dirty") else "")
        + f"; its defaults used here: {version.get('defaults', 'not recorded')}."
    )
    lines = [
        "### Results",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {machine_text}.",
        code,
        f"Torch threads: {args.threads} in both processes. Total run time: {minutes:.1f} min.",
        f"Matmul throughput (128×512 @ 512×512, float32) measured by the run — {gflops}.",
        "",
        (
            "Setting: **each implementation at its own defaults** (`--at-defaults`): skjnf `JNFEstimator("
            f"latent_dim={args.latent_dim})` (early stopping, hidden 256, batch 128, lr 2e-3, calibrated 'auto' "
            "scale); reference: MultiVae 1.0.3's defaults (10+90 epochs, batch 64, lr 1e-4, decoder scale 1.0). "
            "The layer and objective notes below describe the matched setting and do not apply.\n\n"
            if args.at_defaults
            else ""
        )
        + f"Setting: latent {args.latent_dim}, batch {args.batch_size}, lr {args.lr}, "
        f"{args.joint_epochs}+{args.flow_epochs} epochs, validation fraction {args.validation_fraction}. "
        "skjnf: hidden_sizes=(512, 512), MAF 2 × (128, 128, 128), "
        "likelihood_scale='auto' (its default), its default subset posterior; "
        + (
            "**matched architecture**: per-modality trunks d→512→512→latent (the reference's joint-encoder branches) "
            "and decoders latent→512→d ending in a sigmoid, i.e. the reference's layers (through `networks`). "
            if getattr(args, "architecture", "default") == "matched"
            else "its default architecture (trunks d→512→512, decoders latent→512→512→d). "
        )
        + "Reference (MultiVae 1.0.3 JNF, MultistageTrainer): default networks (encoders 2×512, joint encoder 2×512 "
        "over the encoders' mean heads, decoders 1×512 + sigmoid, MAF 2 × 3×128), fixed normal decoder scale "
        + (
            "**equal to skjnf's 'auto' scale** of each modality (so both optimise the same objective; its default "
            "1.0 collapses the latent on [0, 1] data), "
            if getattr(args, "reference_scale", "0.1") == "auto"
            else f"**{args.reference_scale}** for every modality "
            "(its default 1.0 collapses the latent on [0, 1] data), "
        )
        + (
            "default HMC (100 steps × 10 leapfrog, ε = 0.01)."
            if not args.peer_mcmc_steps
            else f"HMC with **{args.peer_mcmc_steps} steps** (reduced for --quick)."
        ),
        "",
    ]
    for res in results:
        ds_args = args
        lines += timing_table(res["dataset"], res["ours"], res["peer"], ds_args) + [""]
    ds_by_name = {d.name: d for d in make_datasets(args.n_train, args.n_test, args.datasets)}
    for res in results:
        lines += quality_table(res["dataset"], ds_by_name[res["dataset"]], res) + [""]
    lines += targets(results) + [""]
    lines += scaling_table(scaling)
    return "\n".join(lines)


def render_saved(path: str) -> int:
    """``--render PATH``: rebuild the markdown report from a saved (possibly partial) results JSON."""
    saved = json.loads(Path(path).read_text())
    args = argparse.Namespace(**saved["args"])
    calibration = saved.get("calibration", {})
    gflops = (
        "; ".join(
            f"{when}: " + ", ".join(f"{v:.1f} GFLOP/s at {k.split('_')[1]} thread(s)" for k, v in c.items())
            for when, c in calibration.items()
        )
        or "not recorded"
    )
    report = render(
        args,
        saved["results"],
        saved.get("scaling", []),
        saved.get("command", "python benchmarks/run.py"),
        saved.get("machine", machine()),
        saved.get("minutes", float("nan")),
        gflops,
        saved.get("skjnf"),
    )
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
