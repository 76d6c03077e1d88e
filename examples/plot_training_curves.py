"""Training curves of JNF's two stages, read from ``history_``
===========================================================

JNF trains in two stages. Stage 1 fits the joint VAE on all modalities (its loss is the
negative ELBO); stage 2 freezes it and fits one encoder with a normalizing flow per modality,
so that each matches the joint posterior. Each stage holds out ``validation_fraction`` of
the rows and keeps the weights of its epoch with the lowest validation loss.

The figure ``examples/output/training_curves.png`` plots, for each stage, the training and
validation loss per epoch from ``jnf.history_`` and marks the epoch that was kept. A
validation curve that turns up while the training curve keeps falling is over-fitting:
train fewer epochs, or set ``early_stopping=True``.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _digits import output_dir
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

from skjnf import JNFEstimator

QUICK = os.environ.get("SKJNF_EXAMPLE_QUICK") == "1"  # a few seconds, for CI
OUTPUT = output_dir()
torch.set_num_threads(1)  # small networks: one thread is fastest on a small, shared CPU

# %%
# The digits as three standardised modalities: left half, right half, ink profile.
images = load_digits().images[:300] if QUICK else load_digits().images
views = {
    "left": images[:, :, :4].reshape(len(images), -1),
    "right": images[:, :, 4:].reshape(len(images), -1),
    "profile": np.hstack([images.mean(axis=2), images.mean(axis=1)]),
}
X = {name: StandardScaler().fit_transform(block) for name, block in views.items()}

jnf = JNFEstimator(
    latent_dim=8,
    hidden_sizes=(128, 128),
    flow_hidden_sizes=(64, 64),
    joint_epochs=3 if QUICK else 60,
    flow_epochs=3 if QUICK else 40,
    validation_fraction=0.2,
    random_state=0,
)
jnf.fit(X)

stage_titles = {"joint": "stage 1: joint VAE (negative ELBO)", "flows": "stage 2: unimodal flows"}
fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
for ax, (stage, title) in zip(axes, stage_titles.items()):
    history = jnf.history_[stage]
    epochs = [row["epoch"] for row in history["epochs"]]
    train_loss = [row["train_loss"] for row in history["epochs"]]
    valid_loss = [row["valid_loss"] for row in history["epochs"]]
    best = history["best_epoch"]
    ax.plot(epochs, train_loss, label="training")
    ax.plot(epochs, valid_loss, label="validation")
    ax.axvline(best, color="gray", linestyle="--", label=f"weights kept: epoch {best}")
    ax.set(title=title, xlabel="epoch", ylabel="loss per row")
    ax.legend()
    best_loss = valid_loss[epochs.index(best)]
    print(f"{title}: best epoch {best} of {len(epochs)}, validation loss {best_loss:.2f}")
fig.savefig(OUTPUT / "training_curves.png", dpi=100)
print(f"figure saved to {OUTPUT / 'training_curves.png'}")
