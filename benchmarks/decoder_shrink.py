"""Each default decoder shrunk towards its linear part after stage 1, against it kept as trained.

For every table of ``_tables.py`` and seed, ``JNFEstimator(random_state=seed)`` at the defaults is
fitted twice in one process: with the shares ``fit`` chooses (``history_["joint"]["decoder_shares"]``)
and with every share held at 1 (the decoders as stage 1 trained them; stage 1 itself is the same
fit). Printed per table: the held-out log-likelihood per row (``score``) of both, and the
reconstruction of every view from all views (mean per-feature MSE on the test rows).

Usage::

    python benchmarks/decoder_shrink.py --threads 1 --seeds 0 1 2
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import benchmark_parser, set_threads  # noqa: E402


def measure(name: str, seed: int) -> dict:
    from _tables import load_table

    import skjnf._fitting as fitting
    from skjnf import JNFEstimator

    table, chosen = load_table(name), fitting.DECODER_SHARES
    row = {"table": name, "seed": seed}
    for label, shares in (("kept", np.array([1.0])), ("shrunk", chosen)):
        fitting.DECODER_SHARES = shares
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = JNFEstimator(random_state=seed).fit(table.train)
        finally:
            fitting.DECODER_SHARES = chosen
        predicted = model.predict(table.test)
        recon = np.mean([((predicted[v] - table.test[v]) ** 2).mean() for v in table.names])
        row[label] = {"score": float(model.score(table.test)), "recon": float(recon)}
        row["shares"] = model.history_["joint"].get("decoder_shares")
    return row


def report(rows: list[dict]) -> str:
    lines = [
        "| table | held-out log-lik. per row, kept → shrunk (by seed) | mean change | "
        "reconstruction from all views, kept → shrunk | shares chosen |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["table"] for r in rows):
        runs = [r for r in rows if r["table"] == name]
        scores = " / ".join(f"{r['kept']['score']:.2f} → {r['shrunk']['score']:.2f}" for r in runs)
        change = np.mean([r["shrunk"]["score"] - r["kept"]["score"] for r in runs])
        kept, shrunk = (np.mean([r[k]["recon"] for r in runs]) for k in ("kept", "shrunk"))
        shares = [s for r in runs for s in r["shares"].values()]
        lines.append(
            f"| {name} | {scores} | {change:+.2f} | {kept:.4f} → {shrunk:.4f} | {min(shares):.1f}-{max(shares):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    from _tables import BUILT_TABLES, TABLES

    parser = benchmark_parser(__doc__, "decoder_shrink.json")
    parser.add_argument("--tables", nargs="+", default=list(BUILT_TABLES + TABLES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    set_threads(args.threads)
    rows = []
    for name in args.tables:
        for seed in args.seeds:
            rows.append(measure(name, seed))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(report(rows))


if __name__ == "__main__":
    main()
