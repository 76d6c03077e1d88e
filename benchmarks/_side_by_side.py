"""``run.py``'s runner: each implementation fitted and evaluated on one unit-range set, skjnf in
this process, the reference in a subprocess of its own virtual environment (``_peer.py`` runs
there), and the scaling runs, one size per process."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _cli import floor_counts
from _tables import Table, bayes_predict
from _timing import fastest_chunking, timed

HERE = Path(__file__).resolve().parent
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


def reference_scales(ds: Table, args) -> dict[str, float]:
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


def run_ours(ds: Table, args) -> tuple[dict, dict]:
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
    out.update(floor_counts(est, len(next(iter(ds.train.values())))))
    torch.set_num_threads(args.threads)
    return out, preds


def cheap_quality(est, ds: Table, args) -> dict:
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
def run_peer(ds: Table, args, workdir: Path) -> tuple[dict, dict] | tuple[None, None]:
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


def quality(ds: Table, ours_preds: dict, peer_preds: dict | None, ours=None, peer=None) -> list[dict]:
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
        if ds.covariance is not None and len(subset) < len(names):
            row["bayes"] = mse(bayes_predict(ds, ds.test, subset), ds.test, targets)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- scaling
def scaling_worker(n_rows: int, args) -> dict:
    """One size, in a fresh process so that peak RSS is this size's alone."""
    import torch
    from _tables import nonlinear

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
            str(HERE / "run.py"),
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
