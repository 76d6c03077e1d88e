"""Peer process of ``benchmarks/run.py``: trains and evaluates the reference JNF (MultiVae 1.0.3).

Runs in its own virtual environment (see ``benchmarks/README.md``), never imported by skjnf.
It only *calls* MultiVae's public API; no MultiVae or pythae code is copied here.

Usage (run.py does this)::

    ../peer-venv/bin/python benchmarks/_peer.py DATA.npz CONFIG.json OUT_PREFIX

Input: ``DATA.npz`` with ``train__<m>``, ``valid__<m>``, ``test__<m>`` float32 arrays in [0, 1]
(one per modality, in the order given by the config's ``names``), ``CONFIG.json`` (see run.py,
``peer_config``). Output: ``OUT_PREFIX.json`` (timings, log-likelihoods, HMC settings) and
``OUT_PREFIX.npz`` (predictions ``pred__<S>__<m>`` of modality m from conditioning set S, with
S written as names joined by ``+``; ``<S>@draw`` / ``<S>@mean10`` for the two subset protocols).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import types
import warnings

from _timing import fastest_chunking, timed  # benchmarks/ is this script's directory


def _stub_torchvision() -> None:
    """Register an empty ``torchvision`` package before MultiVae imports it.

    The torchvision wheel that pip resolves next to CPU torch 2.13.0 fails to load its C
    extension. JNF never uses torchvision (only MultiVae's image datasets, FID and image logging
    do), so every ``torchvision.*`` import gets a module whose attributes are inert classes.
    """

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__path__ = []

            def __getattr__(attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return type(attr, (), {"__init__": lambda self, *a, **k: None})

            module.__getattr__ = __getattr__
            return module

        def exec_module(self, module):
            return None

    try:  # a working torchvision is used as is
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _Finder())


def main(data_path: str, config_path: str, out_prefix: str) -> None:
    with open(config_path) as fh:
        cfg = json.load(fh)
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    _stub_torchvision()
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)  # MultiVae logs every epoch / HMC call at INFO to the console

    from multivae.data.datasets.base import MultimodalBaseDataset
    from multivae.models import JNF, JNFConfig
    from multivae.trainers import MultistageTrainer, MultistageTrainerConfig
    from multivae.trainers.base.callbacks import TrainingCallback

    names = cfg["names"]
    data = np.load(data_path)

    def split(prefix, rows=None):
        arrays = {m: torch.from_numpy(np.ascontiguousarray(data[f"{prefix}__{m}"])) for m in names}
        if rows is not None:
            arrays = {m: x[rows] for m, x in arrays.items()}
        return MultimodalBaseDataset(data=arrays)

    train, valid, test = split("train"), split("valid"), split("test")
    n_test = len(test)
    joint_epochs, flow_epochs = cfg["joint_epochs"], cfg["flow_epochs"]

    class EpochTimer(TrainingCallback):
        """Wall time of each epoch (train step + eval step + best-model copy)."""

        def __init__(self):
            self.times, self._start = [], None

        def on_epoch_begin(self, training_config, **kwargs):
            self._start = time.perf_counter()

        def on_epoch_end(self, training_config, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    def fit(n_joint: int, n_flow: int, seed: int, out_dir: str):
        torch.manual_seed(seed)
        np.random.seed(seed)
        model_config = JNFConfig(
            n_modalities=len(names),
            latent_dim=cfg["latent_dim"],
            input_dims={m: (int(data[f"train__{m}"].shape[1]),) for m in names},
            decoders_dist={m: "normal" for m in names},
            decoder_dist_params={m: {"scale": cfg["likelihood_scale"][m]} for m in names},
            warmup=n_joint,
        )
        model = JNF(model_config)
        training_config = MultistageTrainerConfig(
            output_dir=out_dir,
            per_device_train_batch_size=cfg["batch_size"],
            per_device_eval_batch_size=cfg["batch_size"],
            num_epochs=n_joint + n_flow,
            learning_rate=cfg["lr"],
            seed=seed,
            no_cuda=True,
        )
        timer = EpochTimer()
        trainer = MultistageTrainer(model, train, valid, training_config, callbacks=[timer])
        trainer.train()
        best = trainer._best_model.eval()  # what trainer.train() saved as the final model
        return best, timer.times

    out = {"names": names, "n_test": n_test}
    tmp = tempfile.mkdtemp(prefix="jnf_peer_")

    # ---------------------------------------------------------------- fit
    fit(1, 1, cfg["seed"] + 999, os.path.join(tmp, "warmup"))  # warm-up: code paths, allocator

    def cheap_quality(model) -> dict:
        """Held-out joint log-likelihood and one / all-modality MSEs (as run.py's cheap_quality)."""
        torch.manual_seed(cfg["seed"])
        nll = model.compute_joint_nll(test, K=cfg["nll_K"], batch_size_K=cfg["nll_K"])
        result = {"joint_ll": -float(nll) / n_test, "mse": {}}
        for cond in [[m] for m in names] + [names]:
            targets = [m for m in names if m not in cond] or names
            with torch.no_grad():
                z = model.encode(test, cond_mod=cond, return_mean=True).z.detach()
                err = np.concatenate(
                    [
                        (model.decoders[m](z).reconstruction.numpy().astype(np.float64) - data[f"test__{m}"]) ** 2
                        for m in targets
                    ],
                    axis=1,
                )
            finite = np.isfinite(err).all(axis=1)
            result["mse"]["+".join(cond)] = float(err[finite].mean()) if finite.any() else float("nan")
        return result

    fit_times, fit_cpus, epoch_times, repeat_quality, model = [], [], [], [], None
    for r in range(cfg["fit_repeats"]):
        start, cpu = time.perf_counter(), time.process_time()
        model, times = fit(joint_epochs, flow_epochs, cfg["seed"] + r, os.path.join(tmp, f"fit{r}"))
        fit_times.append(time.perf_counter() - start)
        fit_cpus.append(time.process_time() - cpu)
        epoch_times.append(times)
        repeat_quality.append(cheap_quality(model))
    out["repeat_quality"] = repeat_quality
    out["fit_s"] = statistics.median(fit_times)
    out["fit_cpu_s"] = statistics.median(fit_cpus)
    out["fit_all_s"] = fit_times
    out["epoch_joint_s"] = (
        statistics.median([statistics.median(t[:joint_epochs]) for t in epoch_times if joint_epochs])
        if joint_epochs
        else None
    )
    out["epoch_flow_s"] = (
        statistics.median([statistics.median(t[joint_epochs:]) for t in epoch_times if len(t) > joint_epochs])
        if flow_epochs
        else None
    )

    # ---------------------------------------------------------------- inference
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    hmc = cfg.get("hmc_kwargs") or {}  # empty: MultiVae's defaults (100 steps x 10 leapfrog, eps 0.01)
    out["hmc_kwargs"] = hmc
    warm = split("test", slice(0, min(20, n_test)))
    preds: dict[str, np.ndarray] = {}

    def decode(z):
        with torch.no_grad():
            return {m: model.decoders[m](z).reconstruction.numpy() for m in names}

    def key(subset):
        return "+".join(subset)

    # All modalities and single modalities: MultiVae's default call (one draw) is timed;
    # the posterior-mean call (return_mean=True) gives the predictions.
    model.encode(warm)
    model.encode(warm, cond_mod=[names[0]])
    t, _ = timed(lambda: model.encode(test), cfg["repeats"])
    out["encode_all_s"], out["encode_all_all_s"], out["encode_all_cpu_s"] = t["wall"], t["walls"], t["cpu"]
    z = model.encode(test, return_mean=True).z.detach()
    preds.update({f"pred__{key(names)}__{m}": x for m, x in decode(z).items()})
    one_times, one_cpus = [], []
    for m in names:
        t, _ = timed(lambda m=m: model.encode(test, cond_mod=[m]), cfg["repeats"])
        one_times.append(t["wall"])
        one_cpus.append(t["cpu"])
        z = model.encode(test, cond_mod=[m], return_mean=True).z.detach()
        preds.update({f"pred__{m}__{t_}": x for t_, x in decode(z).items()})
    out["encode_one_s"] = statistics.median(one_times)
    out["encode_one_all_s"] = one_times
    out["encode_one_cpu_s"] = statistics.median(one_cpus)

    # Subsets of 2..M-1: HMC. One timed call per subset (each is a full call on every test row).
    subsets = [list(s) for k in range(2, len(names)) for s in itertools.combinations(names, k)]
    model.encode(warm, cond_mod=subsets[0], **hmc)
    draw_times, mean_times, draw_cpus, mean_cpus = [], [], [], []
    for subset in subsets:
        start, cpu = time.perf_counter(), time.process_time()
        z = model.encode(test, cond_mod=subset, **hmc).z.detach()
        draw_times.append(time.perf_counter() - start)
        draw_cpus.append(time.process_time() - cpu)
        preds.update({f"pred__{key(subset)}@draw__{m}": x for m, x in decode(z).items()})
        start, cpu = time.perf_counter(), time.process_time()
        z = model.encode(test, cond_mod=subset, N=cfg["n_chains"], **hmc).z.detach().mean(0)
        mean_times.append(time.perf_counter() - start)
        mean_cpus.append(time.process_time() - cpu)
        preds.update({f"pred__{key(subset)}@mean{cfg['n_chains']}__{m}": x for m, x in decode(z).items()})
    out["subsets"] = [key(s) for s in subsets]
    out["encode_subset_draw_s"] = statistics.median(draw_times) if draw_times else None
    out["encode_subset_draw_all_s"] = draw_times
    out["encode_subset_mean_s"] = statistics.median(mean_times) if mean_times else None
    out["encode_subset_mean_all_s"] = mean_times
    out["encode_subset_draw_cpu_s"] = statistics.median(draw_cpus) if draw_cpus else None
    out["encode_subset_mean_cpu_s"] = statistics.median(mean_cpus) if mean_cpus else None

    # ---------------------------------------------------------------- joint log-likelihood
    K = cfg["nll_K"]
    model.compute_joint_nll(warm, K=K, batch_size_K=K)
    t, nll = timed(lambda: model.compute_joint_nll(test, K=K, batch_size_K=K), cfg["repeats"])
    out["nll_s"], out["nll_all_s"], out["nll_cpu_s"] = t["wall"], t["walls"], t["cpu"]
    out["joint_ll_mean"] = -float(nll) / n_test
    # floor: the K·n decoder forward passes alone, no_grad, the fastest of the chunkings run.py tries
    z = torch.randn(K * n_test, cfg["latent_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        floor = fastest_chunking(
            lambda rows: [model.decoders[m](z[rows]) for m in names],
            len(z),
            cfg.get("floor_chunks", [None]),
            max(cfg["repeats"], 5),
        )
    out["decoder_floor_s"] = floor["wall"]
    out["n_parameters"] = int(sum(p.numel() for p in model.parameters()))
    # what each stage trains: the joint encoder and decoders, then the unimodal encoders and flows
    out["stage_parameters"] = [
        sum(p.numel() for part in (model.joint_encoder, model.decoders) for p in part.parameters()),
        sum(p.numel() for part in (model.encoders, model.flows) for p in part.parameters()),
    ]

    np.savez(out_prefix + ".npz", **preds)
    with open(out_prefix + ".json", "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
