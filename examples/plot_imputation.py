"""Imputing a missing modality with ``predict``
============================================

JNF is fitted on three modalities of the digits: the left half of the image, the right half,
and a tabular ink profile (mean intensity of every row and column). In half of the test
rows the right half is then hidden, by setting it to NaN. ``predict`` conditions each row on
the modalities it observes and reconstructs every modality, so the hidden halves come back
imputed; ``cond_mod`` restricts the conditioning to a chosen subset.

``examples/output/imputation.png`` plots the imputed pixels against the true ones, and the
mean squared error of the imputation given each conditioning set, next to the baseline that
fills in the training mean of every pixel. ``examples/output/imputation_digits.png`` shows a
few test digits: the true image, the observed left half, and the left half completed by JNF.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _digits import QUICK, digit_views, output_dir

from skjnf import JNFEstimator

OUTPUT = output_dir()
torch.set_num_threads(1)  # small networks: one thread is fastest on a small, shared CPU

# %%
# Three modalities of the digits, standardised per modality on the training rows.
data = digit_views(n_test_quick=60)
X_train, X_test, images, test, scalers = data.X_train, data.X_test, data.images, data.test, data.scalers

jnf = JNFEstimator(
    latent_dim=8,
    hidden_sizes=(128, 128),
    flow_hidden_sizes=(64, 64),
    joint_epochs=2 if QUICK else 30,
    flow_epochs=2 if QUICK else 30,
    n_posterior_samples=8,
    random_state=0,
)
jnf.fit(X_train)

# %%
# Hide the right half in every other test row: a missing modality is an all-NaN row.
hidden = np.arange(len(test)) % 2 == 0
X_missing = {name: block.copy() for name, block in X_test.items()}
X_missing["right"][hidden] = np.nan


def to_pixels(right_block):
    """Standardised right halves back to pixel intensities (0 to 16)."""
    return scalers["right"].inverse_transform(right_block)


true_right = to_pixels(X_test["right"][hidden])
conditionings = {"left": "left", "profile": "profile", "left + profile": None}
imputed = {
    title: to_pixels(jnf.predict(X_missing, cond_mod=cond_mod)["right"][hidden])
    for title, cond_mod in conditionings.items()
}
mse = {"training mean": np.mean((scalers["right"].mean_ - true_right) ** 2)}
mse.update({title: np.mean((block - true_right) ** 2) for title, block in imputed.items()})
for title, error in mse.items():
    print(f"MSE of the hidden right halves, {title:<14} {error:6.2f}")

fig, (scatter, bars) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
scatter.scatter(true_right.ravel(), imputed["left + profile"].ravel(), s=4, alpha=0.15)
scatter.plot([0, 16], [0, 16], color="gray", linestyle="--")
scatter.set(
    title="right halves imputed from left + profile",
    xlabel="true pixel intensity",
    ylabel="imputed pixel intensity",
)
bars.bar(list(mse), list(mse.values()), color=["gray"] + ["tab:blue"] * len(conditionings))
bars.set(
    title="imputation error of the hidden right halves",
    xlabel="conditioning",
    ylabel="mean squared error (pixel units)",
)
fig.savefig(OUTPUT / "imputation.png", dpi=100)

# %%
# A few digits: true image, observed left half only, left half + imputed right half.
rows = test[hidden][:8]
cmap = plt.get_cmap("gray_r").with_extremes(bad="lightsteelblue")  # hidden pixels in blue
fig, axes = plt.subplots(3, len(rows), figsize=(1.2 * len(rows), 4), layout="constrained")
for column, row, right in zip(axes.T, rows, imputed["left + profile"]):
    true_image = images[row]
    observed = np.hstack([true_image[:, :4], np.full((8, 4), np.nan)])
    imputed_image = np.hstack([true_image[:, :4], right.reshape(8, 4)])
    for ax, image in zip(column, [true_image, observed, imputed_image]):
        ax.imshow(image, cmap=cmap, vmin=0, vmax=16)
        ax.set_axis_off()
for ax, label in zip(axes[:, 0], ["true", "observed", "imputed"]):
    ax.text(-1, 3.5, label, ha="right", va="center")
fig.savefig(OUTPUT / "imputation_digits.png", dpi=100)
print(f"figures saved to {OUTPUT / 'imputation.png'} and {OUTPUT / 'imputation_digits.png'}")
