"""Shared test set-up: one thread (much faster on small CPU machines)."""

import torch

torch.set_num_threads(1)
