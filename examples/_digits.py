"""The digits as three modalities (left half, right half, ink profile), shared by the examples."""

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

QUICK = os.environ.get("SKJNF_EXAMPLE_QUICK") == "1"  # a few seconds, for CI


def output_dir() -> Path:
    """``output/`` in the examples' folder, created if needed (found from this helper's own path:
    sphinx-gallery runs the examples without ``__file__``)."""
    folder = Path(__file__).resolve().parent / "output"
    folder.mkdir(exist_ok=True)
    return folder


def digit_views(n_test_quick: int = 100) -> SimpleNamespace:
    """Train / test modalities, each standardised on the training rows.

    Fields: ``X_train``, ``X_test`` (dicts), ``y_train``, ``y_test``, and for plotting
    ``images`` (all 8x8 digits), ``train`` / ``test`` (their row indices) and ``scalers``.
    """
    digits = load_digits()
    images, labels = digits.images, digits.target
    views = {
        "left": images[:, :, :4].reshape(len(images), -1),
        "right": images[:, :, 4:].reshape(len(images), -1),
        "profile": np.hstack([images.mean(axis=2), images.mean(axis=1)]),
    }
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)
    if QUICK:
        train, test = train[:300], test[:n_test_quick]
    scalers = {name: StandardScaler().fit(block[train]) for name, block in views.items()}
    X_train = {name: scalers[name].transform(block[train]) for name, block in views.items()}
    X_test = {name: scalers[name].transform(block[test]) for name, block in views.items()}
    return SimpleNamespace(
        X_train=X_train,
        X_test=X_test,
        y_train=labels[train],
        y_test=labels[test],
        images=images,
        train=train,
        test=test,
        scalers=scalers,
    )
