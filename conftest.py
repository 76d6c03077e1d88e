"""Test set-up for the whole repository (tests and doctests): one torch thread, much faster on small CPU machines."""

import torch

torch.set_num_threads(1)
