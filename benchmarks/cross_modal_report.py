"""Markdown tables from ``cross_modal.py``'s JSON files: one row per table and kind of
conditioning set, figures averaged over seeds, skjnf's MSE over the best baseline's.

Usage::

    python benchmarks/cross_modal_report.py results/cross_modal.json [results/other.json ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np

BASELINES = ("ridge", "pls", "knn", "mean")


def report(results: list[dict]) -> str:
    rows = defaultdict(lambda: defaultdict(list))
    probes = defaultdict(lambda: defaultdict(list))
    for result in results:
        groups = {kind: [p for p in result["pairs"] if p["kind"] == kind] for kind in ("one", "rest")}
        if len(groups["one"]) == 2:  # two views: each direction on its own row
            groups = {f"{p['cond']} → {p['target']}": [p] for p in groups["one"]}
        for kind, pairs in groups.items():
            if pairs:
                for key in ("skjnf", *BASELINES, "bayes"):
                    if key in pairs[0]:
                        rows[result["table"], kind][key].append(np.mean([p[key] for p in pairs]))
                rows[result["table"], kind]["n"] = [len(pairs)]
        for key in ("probe_latent", "probe_pca", "active_dims", "fit_s"):
            probes[result["table"]][key].append(result[key])
    lines = [
        "| table | predicted from | skjnf | RidgeCV | PLS | KNN | train mean | Bayes | skjnf / best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (table, kind), values in rows.items():
        mean = {k: float(np.mean(v)) for k, v in values.items()}
        best = min(mean[b] for b in BASELINES)
        bayes = f"{mean['bayes']:.3f}" if "bayes" in mean else "-"
        label = {"one": "one other view", "rest": "all other views"}.get(kind, kind)
        lines.append(
            f"| {table} | {label} ({int(mean['n'])}) | **{mean['skjnf']:.3f}** | {mean['ridge']:.3f} | "
            f"{mean['pls']:.3f} | {mean['knn']:.3f} | {mean['mean']:.3f} | {bayes} | {mean['skjnf'] / best:.2f} |"
        )
    lines += [
        "",
        "| table | probe on the latent | probe on PCA (same size) | active dims | fit (s) |",
        "|---|---|---|---|---|",
    ]
    for table, values in probes.items():
        mean = {k: float(np.mean(v)) for k, v in values.items()}
        lines.append(
            f"| {table} | {mean['probe_latent']:.3f} | {mean['probe_pca']:.3f} | {mean['active_dims']:.1f} | "
            f"{mean['fit_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"## {path}\n")
        with open(path) as file:
            print(report(json.load(file)))
        print()
