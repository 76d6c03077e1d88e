"""Quickstart: one shared latent space for three views of the digits
=================================================================

Each 8x8 digit image is split into three modalities: the left half of the image, the right
half, and a small tabular "ink profile" (mean intensity of every row and every column).
JNF is fitted on the training digits without ever seeing the labels. The test digits are
then encoded from every modality together, from each modality alone, and from the pair
(left, right), through JNF's amortised subset posterior.

The figure ``examples/output/quickstart_latent.png`` shows each of these encodings in the
same 2-D view (a PCA fitted on the joint latent of the training digits), coloured by the
digit. A linear probe, a logistic regression trained on the joint latent of the training
digits, is scored on each encoding of the test digits: a high score means that a partial
view lands where the full observation would, the point of JNF's flow-enriched posteriors.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _digits import QUICK, digit_views, output_dir
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from skjnf import JNFEstimator

OUTPUT = output_dir()
torch.set_num_threads(1)  # small networks: one thread is fastest on a small, shared CPU

# %%
# Three modalities of the same digits, standardised per modality on the training rows.
data = digit_views(n_test_quick=100)
X_train, X_test, y_train, y_test = data.X_train, data.X_test, data.y_train, data.y_test

# %%
# Small networks and budgets keep the run under a minute on two CPU cores.
jnf = JNFEstimator(
    latent_dim=8,
    hidden_sizes=(128, 128),
    flow_hidden_sizes=(64, 64),
    joint_epochs=2 if QUICK else 30,
    flow_epochs=2 if QUICK else 30,
    n_posterior_samples=8,  # draws per posterior mean; HMC chains per row for a pair
    random_state=0,
)
jnf.fit(X_train)

Z_train = jnf.transform(X_train)
probe = LogisticRegression(max_iter=2000).fit(Z_train, y_train)
pca = PCA(n_components=2).fit(Z_train)
# Same axes in every panel (a few far-out test points are left off the view).
low, high = np.percentile(pca.transform(Z_train), [0.5, 99.5], axis=0)
margin = 0.1 * (high - low)
low, high = low - margin, high + margin

conditionings = {
    "all modalities": None,
    "left only": "left",
    "right only": "right",
    "profile only": "profile",
    "left + right": ["left", "right"],
}
fig, axes = plt.subplots(2, 3, figsize=(13, 8.5), layout="constrained")
accuracies = {}
for ax, (title, cond_mod) in zip(axes.flat, conditionings.items()):
    Z_test = jnf.transform(X_test, cond_mod=cond_mod)
    accuracies[title] = probe.score(Z_test, y_test)
    P = pca.transform(Z_test)
    points = ax.scatter(P[:, 0], P[:, 1], c=y_test, cmap="tab10", vmin=-0.5, vmax=9.5, s=8)
    ax.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]), xlabel="latent PC 1", ylabel="latent PC 2")
    ax.set_title(f"{title}: probe accuracy {accuracies[title]:.2f}")
    print(f"linear-probe accuracy, {title:<15} {accuracies[title]:.3f}")
fig.colorbar(points, ax=axes[0, :], ticks=range(10), label="digit")

bars = axes[1, 2]
bars.barh(list(accuracies)[::-1], list(accuracies.values())[::-1], color="tab:blue")
bars.axvline(0.1, color="gray", linestyle="--", label="chance")
bars.set(xlim=(0, 1), xlabel="linear-probe accuracy on test digits")
bars.legend(loc="lower right")
fig.suptitle("JNF latent space of the digits, encoded from different modalities (test rows)")
fig.savefig(OUTPUT / "quickstart_latent.png", dpi=100)
print(f"figure saved to {OUTPUT / 'quickstart_latent.png'}")
