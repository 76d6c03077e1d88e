"""Training curves of JNF's two stages, read from ``history_``
===========================================================

JNF trains in two stages. Stage 1 fits the joint VAE on all modalities (its loss is the
negative ELBO); stage 2 freezes it and fits one encoder with a normalizing flow per modality,
so that each matches the joint posterior. Each stage holds out ``validation_fraction`` of
the rows and keeps the weights of its epoch with the lowest validation loss.

The figure ``examples/output/training_curves.png`` plots stage 1's training and validation
loss per epoch from ``jnf.history_`` and marks the epoch that was kept. A validation curve that
turns up while the training curve keeps falling is over-fitting: train fewer epochs, or keep
``early_stopping=True``. Stage 2's parts (one expert per modality, and the subset posterior)
have their own parameters, so each keeps its own best epoch and, with early stopping, stops
on its own: its panel plots each part's validation loss (``part_losses``) until it stopped.
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

fig, (joint_ax, flows_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
history = jnf.history_["joint"]
epochs = [row["epoch"] for row in history["epochs"]]
valid_loss = [row["valid_loss"] for row in history["epochs"]]
best = history["best_epoch"]
joint_ax.plot(epochs, [row["train_loss"] for row in history["epochs"]], label="training")
joint_ax.plot(epochs, valid_loss, label="validation")
joint_ax.axvline(best, color="gray", linestyle="--", label=f"weights kept: epoch {best}")
joint_ax.set(title="stage 1: joint VAE (negative ELBO)", xlabel="epoch", ylabel="loss per row")
joint_ax.legend()
print(f"stage 1: best epoch {best} of {len(epochs)}, validation loss {valid_loss[epochs.index(best)]:.2f}")

history = jnf.history_["flows"]
kept = dict(history["expert_best_epoch"])  # each expert's kept epoch, then the subset posterior's
if "subset_best_epoch" in history:
    kept["subset"] = history["subset_best_epoch"]
for i, (part, best) in enumerate(kept.items()):
    losses = [(row["epoch"], row["part_losses"][i]) for row in history["epochs"] if row["part_losses"][i] is not None]
    (line,) = flows_ax.plot(*zip(*losses), label=f"{part} (kept {best})")
    flows_ax.plot(best, dict(losses)[best], "o", color=line.get_color())
flows_ax.set(title="stage 2: each part's validation -log q", xlabel="epoch", ylabel="loss per row")
flows_ax.legend()
print(f"stage 2: kept epochs {kept} of {len(history['epochs'])}")
fig.savefig(OUTPUT / "training_curves.png", dpi=100)
print(f"figure saved to {OUTPUT / 'training_curves.png'}")
