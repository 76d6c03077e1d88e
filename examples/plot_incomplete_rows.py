"""Training on incomplete rows: use every observed modality instead of dropping rows
=================================================================================

Real multimodal tables are incomplete: here the digits in three modalities (left half, right
half, ink profile), where a growing fraction of the training rows misses one or two modalities
at random. JNF is fitted twice per fraction: on the complete rows only (``drop``, all that JNF
could do before 0.2) and on every row (``use``: ``fit`` takes rows with all-NaN modalities as
they are). ``IterativeImputer``, fitted on the same incomplete table, is what one would use
otherwise.

``examples/output/incomplete_rows.png`` plots, against the fraction of incomplete training
rows, the error of predicting each modality of complete test rows from the two others, and the
held-out log-likelihood of the test rows.
"""

import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _digits import QUICK, digit_views, output_dir
from sklearn.experimental import enable_iterative_imputer  # noqa: F401
from sklearn.impute import IterativeImputer

from skjnf import JNFEstimator

OUTPUT = output_dir()
torch.set_num_threads(1)  # small networks: one thread is fastest on a small, shared CPU

data = digit_views(n_test_quick=60)
X_train, X_test = data.X_train, data.X_test
names = list(X_train)
rng = np.random.default_rng(0)
fractions = [0.0, 0.6] if QUICK else [0.0, 0.3, 0.6, 0.85]


# %%
# The data: ``make_incomplete``.
def make_incomplete(X, fraction):
    """Each row, with probability ``fraction``, misses one or two of the three modalities."""
    X = {name: block.copy() for name, block in X.items()}
    incomplete = rng.random(len(X[names[0]])) < fraction
    for row in np.flatnonzero(incomplete):
        for j in rng.choice(3, size=rng.integers(1, 3), replace=False):
            X[names[j]][row] = np.nan
    return X, ~incomplete


# %%
# The data: ``cross_modal_mse``.
def cross_modal_mse(predict):
    """Mean per-feature MSE of each modality predicted from the two others (standardised units)."""
    return np.mean([np.mean((predict(target) - X_test[target]) ** 2) for target in names])


# %%
# The data: ``jnf``.
def jnf(X):
    params = dict(joint_epochs=2, flow_epochs=2) if QUICK else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny quick-mode fits warn that they stopped early
        return JNFEstimator(random_state=0, **params).fit(X)


widths = np.cumsum([0] + [X_test[name].shape[1] for name in names])
results = {"drop": [], "use": [], "IterativeImputer": []}
log_likelihood = {"drop": [], "use": []}
for fraction in fractions:
    X, complete = make_incomplete(X_train, fraction)
    for strategy, rows in (("drop", complete), ("use", slice(None))):
        model = jnf({name: block[rows] for name, block in X.items()})
        results[strategy].append(
            cross_modal_mse(lambda t, m=model: m.predict({o: X_test[o] for o in names if o != t})[t])
        )
        log_likelihood[strategy].append(model.score(X_test))
    imputer = IterativeImputer(max_iter=3 if QUICK else 10, random_state=0).fit(np.hstack(list(X.values())))

    def impute(target, imputer=imputer):
        x = np.hstack([np.full_like(X_test[n], np.nan) if n == target else X_test[n] for n in names])
        j = names.index(target)
        return imputer.transform(x)[:, widths[j] : widths[j + 1]]

    results["IterativeImputer"].append(cross_modal_mse(impute))
    print(
        f"{100 * fraction:3.0f} % incomplete ({complete.sum()} complete rows): MSE "
        + ", ".join(f"{k} {v[-1]:.3f}" for k, v in results.items())
    )

fig, (ax_mse, ax_ll) = plt.subplots(1, 2, figsize=(10, 4))
percent = 100 * np.asarray(fractions)
for label, style in (("use", "o-"), ("drop", "s--"), ("IterativeImputer", "^:")):
    ax_mse.plot(percent, results[label], style, label=label)
ax_mse.set(
    xlabel="incomplete training rows (%)",
    ylabel="MSE of each modality from the two others",
    title="Cross-modal prediction (test rows)",
    yscale="log",
)
ax_mse.legend()
for label, style in (("use", "o-"), ("drop", "s--")):
    ax_ll.plot(percent, log_likelihood[label], style, label=label)
ax_ll.set(xlabel="incomplete training rows (%)", ylabel="mean log p(x)", title="Held-out log-likelihood")
ax_ll.legend()
fig.tight_layout()
fig.savefig(OUTPUT / "incomplete_rows.png", dpi=120)
print(f"wrote {OUTPUT / 'incomplete_rows.png'}")
