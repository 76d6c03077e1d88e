"""``run.py``'s report: the markdown tables of a run (timings and ratios, quality, targets, scaling),
also rebuilt from a saved results JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
from _side_by_side import HERE, N_CHAINS_REFERENCE, REFERENCE_DEFAULTS, median_over_repeats
from _tables import Table, unit_range_sets


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


def quality_table(name: str, ds: Table, res: dict) -> list[str]:
    gauss = ds.covariance is not None
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
    ds_by_name = {d.name: d for d in unit_range_sets(args.n_train, args.n_test, args.datasets)}
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
