"""Imputing missing modality blocks in a Pipeline
==============================================

The breast-cancer table has three groups of ten measurements per tumour: their mean, their
standard error and their worst value. Here 30 % of the rows lose one or two of these groups
(a panel that was not measured), as whole NaN blocks. ``JNFImputer`` fills each missing block
from the groups that row has, and sits in a ``Pipeline`` in front of a classifier, in the slot
of scikit-learn's ``IterativeImputer``, ``KNNImputer`` or ``SimpleImputer``.

``examples/output/imputer_pipeline.png`` compares the imputers: the error of the filled values
on the test rows (standardised units) and the accuracy of the classifier behind each.
"""

import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _digits import output_dir
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import ExtraTreesRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.experimental import enable_iterative_imputer  # noqa: F401
from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer
from sklearn.linear_model import BayesianRidge, LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skjnf import JNFEstimator, JNFImputer

QUICK = os.environ.get("SKJNF_EXAMPLE_QUICK") == "1"  # a few seconds, for CI
OUTPUT = output_dir()
torch.set_num_threads(1)

# %%
# The table, standardised on the training rows, with whole groups hidden in 30 % of the rows.
X, y = load_breast_cancer(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
scaler = StandardScaler().fit(X_train)
X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
groups = {"mean": 10, "error": 10, "worst": 10}


def hide_groups(X, rng):
    """One or two of the three groups set to NaN in 30 % of the rows."""
    X = X.copy()
    for row in np.flatnonzero(rng.random(len(X)) < 0.3):
        for group in rng.choice(3, size=rng.integers(1, 3), replace=False):
            X[row, 10 * group : 10 * group + 10] = np.nan
    return X


rng = np.random.default_rng(0)
train_missing, test_missing = hide_groups(X_train, rng), hide_groups(X_test, rng)
hidden = np.isnan(test_missing)

# %%
# The imputers, each in front of the same classifier.
jnf = JNFEstimator(joint_epochs=3, flow_epochs=3) if QUICK else None  # None: JNFEstimator's defaults
imputers = {
    "JNFImputer": JNFImputer(groups, estimator=jnf, random_state=0),
    "Iterative\n(BayesianRidge)": IterativeImputer(BayesianRidge(), random_state=0),
    "Iterative\n(ExtraTrees)": IterativeImputer(
        ExtraTreesRegressor(n_estimators=20, min_samples_leaf=3, random_state=0), max_iter=5, random_state=0
    ),
    "KNNImputer": KNNImputer(),
    "SimpleImputer": SimpleImputer(),
}
errors, accuracies = {}, {}
for name, imputer in imputers.items():
    with warnings.catch_warnings():  # IterativeImputer warns when its rounds have not converged
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline = make_pipeline(imputer, LogisticRegression(max_iter=2000)).fit(train_missing, y_train)
    filled = pipeline[0].transform(test_missing)
    errors[name] = np.mean((filled[hidden] - X_test[hidden]) ** 2)
    accuracies[name] = pipeline.score(test_missing, y_test)
    print(f"{name.replace(chr(10), ' '):<26} MSE of filled values {errors[name]:.3f}   accuracy {accuracies[name]:.3f}")

# %%
# The figure.
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
colors = ["tab:blue"] + ["tab:gray"] * (len(imputers) - 1)
left.bar(list(errors), list(errors.values()), color=colors)
left.set(title="error of the filled values (test rows)", ylabel="mean squared error (standardised)")
right.bar(list(accuracies), list(accuracies.values()), color=colors)
right.set(title="classifier accuracy behind each imputer", ylabel="test accuracy", ylim=(0.8, 1.0))
for ax in (left, right):
    ax.tick_params(axis="x", labelsize=8)
fig.savefig(OUTPUT / "imputer_pipeline.png", dpi=100)
print(f"figure saved to {OUTPUT / 'imputer_pipeline.png'}")
