"""Images with convolutional networks: generate digits from a tabular ink profile
==============================================================================

Each 8x8 digit is one modality of shape (1, 8, 8), handled by a small convolutional encoder,
decoder and joint-encoder trunk passed through ``networks``; a second, tabular modality holds its
ink profile (the mean intensity of each row and column). After fitting, images are generated
from the profile alone (cross-modal generation through the profile's flow posterior).

The figure ``examples/output/images_generation.png`` shows, for test digits, the true image,
its reconstruction from both modalities, and three images generated from the profile only.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _digits import QUICK, output_dir
from sklearn.datasets import load_digits
from torch import nn

from skjnf import JNFEstimator

OUTPUT = output_dir()
torch.set_num_threads(1)  # small networks: one thread is fastest on a small, shared CPU


# %%
# Convolutional networks for the image modality, passed through ``networks``.
class ConvEncoder(nn.Module):
    """x (n, 1, 8, 8) -> (mean, log-variance) of the latent."""

    def __init__(self, in_shape, latent_dim, channels=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_shape[0], channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels * (in_shape[1] // 2) * (in_shape[2] // 2), 2 * latent_dim),
        )

    def forward(self, x):
        return self.net(x).chunk(2, dim=-1)


class ConvTrunk(nn.Module):
    """The image's part of the joint encoder: x (n, 1, 8, 8) -> features (n, 256)."""

    def __init__(self, in_shape, channels=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_shape[0], channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()
        )

    def forward(self, x):
        return self.net(x)


class ConvDecoder(nn.Module):
    """z (..., D) -> pixel means (..., 1, 8, 8)."""

    def __init__(self, latent_dim, out_shape, channels=16):
        super().__init__()
        self.out_shape, self.channels = tuple(out_shape), channels
        self.linear = nn.Linear(latent_dim, channels * 4 * 4)
        self.net = nn.Sequential(
            nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(channels, out_shape[0], 3, padding=1)
        )

    def forward(self, z):
        h = self.linear(z).reshape(-1, self.channels, 4, 4)
        return self.net(h).reshape(*z.shape[:-1], *self.out_shape)


# %%
# The digits as (1, 8, 8) images beside their tabular ink profile; fit, reconstruct, generate.
digits = load_digits()
images = digits.images[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
profile = np.hstack([images.mean(axis=(1, 3)), images.mean(axis=(1, 2))])
n_train = 300 if QUICK else 1000
X_train = {"image": images[:n_train], "profile": profile[:n_train]}
X_test = {"image": images[-8:], "profile": profile[-8:]}

jnf = JNFEstimator(
    latent_dim=8,
    hidden_sizes=(128,),
    networks={"image": {"encoder": ConvEncoder, "decoder": ConvDecoder, "trunk": ConvTrunk}},
    joint_epochs=2 if QUICK else 30,
    flow_epochs=2 if QUICK else 20,
    lr=2e-3,
    random_state=0,
).fit(X_train)

reconstructed = jnf.predict(X_test)["image"]
generated = jnf.sample(3, X={"profile": X_test["profile"]}, random_state=0)["image"]  # (3, 8, 1, 8, 8)
mean_image_mse = np.mean((X_test["image"] - X_train["image"].mean(0)) ** 2)
print(f"reconstruction MSE {np.mean((reconstructed - X_test['image']) ** 2):.4f}  (mean image: {mean_image_mse:.4f})")
print(f"from the profile alone: MSE {np.mean((generated.mean(0) - X_test['image']) ** 2):.4f}")

# %%
# The figure: true, reconstructed and generated digits.
rows = [("true", X_test["image"]), ("reconstructed", reconstructed)] + [
    (f"from profile #{k + 1}", generated[k]) for k in range(3)
]
fig, axes = plt.subplots(len(rows), 8, figsize=(8, 1.1 * len(rows)))
for (title, batch), row in zip(rows, axes):
    row[0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    for image, ax in zip(batch, row):
        ax.imshow(np.clip(image[0], 0, 1), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
fig.suptitle("Digits generated from their ink profile (conv encoder / decoder via `networks`)")
fig.tight_layout()
fig.savefig(OUTPUT / "images_generation.png", dpi=120)
print(f"saved {OUTPUT / 'images_generation.png'}")
