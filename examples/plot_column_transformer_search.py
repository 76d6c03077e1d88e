"""JNF inside a pipeline: ColumnTransformer → JNFEstimator → LogisticRegression, tuned by GridSearchCV
===================================================================================================

The breast cancer table has three natural groups of named columns, used as modalities:
the mean of ten cell-nucleus measurements, their standard error, and their worst value.
A ``ColumnTransformer`` standardises each group; with ``set_output(transform="pandas")`` it
hands JNF a DataFrame whose columns are named ``"<group>__<column>"``, so the
``modalities`` parameter lists those names. JNF learns a joint latent representation
without the labels, and a logistic regression classifies tumours from it. ``GridSearchCV``
picks the latent dimension by cross-validated accuracy.

``examples/output/column_transformer_search.png`` plots the cross-validated accuracy for each
latent dimension next to a logistic regression on all thirty standardised columns.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _digits import output_dir
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skjnf import JNFEstimator

QUICK = os.environ.get("SKJNF_EXAMPLE_QUICK") == "1"  # a few seconds, for CI
OUTPUT = output_dir()

# %%
# The table: breast-cancer measurements in three groups (mean, standard error, worst value).
X, y = load_breast_cancer(return_X_y=True, as_frame=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
groups = {
    "mean": [column for column in X.columns if column.startswith("mean ")],
    "error": [column for column in X.columns if column.endswith(" error")],
    "worst": [column for column in X.columns if column.startswith("worst ")],
}

# %%
# The pipeline: each group scaled on its own, JNF over the three groups, a classifier on its latent.
scale = ColumnTransformer([(name, StandardScaler(), columns) for name, columns in groups.items()])
scale.set_output(transform="pandas")
# Column "mean radius" of group "mean" comes out as "mean__mean radius".
# (modalities="prefix" builds the same dict from the column names.)
modalities = {name: [f"{name}__{column}" for column in columns] for name, columns in groups.items()}
# Small networks, large batches: the search takes under a minute on two CPU cores.
jnf = JNFEstimator(
    modalities=modalities,
    hidden_sizes=(64, 64),
    flow_hidden_sizes=(32, 32),
    joint_epochs=2 if QUICK else 30,
    flow_epochs=2 if QUICK else 10,  # complete rows are encoded by the joint model (stage 1)
    batch_size=128,
    lr=2e-3,
    random_state=0,
)
pipeline = make_pipeline(scale, jnf, LogisticRegression(max_iter=1000))

latent_dims = [1, 2] if QUICK else [1, 2, 4, 8]
search = GridSearchCV(pipeline, {"jnfestimator__latent_dim": latent_dims}, cv=3)
search.fit(X_train, y_train)
baseline = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), X_train, y_train, cv=3)

results = search.cv_results_
for dim, mean, std in zip(latent_dims, results["mean_test_score"], results["std_test_score"]):
    print(f"latent_dim={dim}: cross-validated accuracy {mean:.3f} +/- {std:.3f}")
print(f"logistic regression on all 30 columns: {baseline.mean():.3f} +/- {baseline.std():.3f}")
best_dim = search.best_params_["jnfestimator__latent_dim"]
print(f"best latent_dim {best_dim}: test accuracy of the refitted pipeline {search.score(X_test, y_test):.3f}")

fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
ax.errorbar(
    latent_dims,
    results["mean_test_score"],
    results["std_test_score"],
    marker="o",
    capsize=4,
    label="JNF latent + logistic regression",
)
ax.axhline(baseline.mean(), color="gray", linestyle="--", label="logistic regression on all 30 columns")
ax.set_xscale("log", base=2)
ax.set_xticks(latent_dims, [str(dim) for dim in latent_dims])
ax.set(title="GridSearchCV over JNF's latent dimension", xlabel="latent_dim", ylabel="3-fold CV accuracy")
ax.legend(loc="lower right")
fig.savefig(OUTPUT / "column_transformer_search.png", dpi=100)
print(f"figure saved to {OUTPUT / 'column_transformer_search.png'}")
