"""Session fixtures: the shared three-view data and one fitted model (helpers live in _helpers.py)."""

import pytest
from _helpers import make_views, small_jnf


@pytest.fixture(scope="session")
def views():
    return make_views()


@pytest.fixture(scope="session")
def fitted(views):
    """One fitted three-modality model shared by read-only tests (decoder scale = the true noise)."""
    X, _, _ = views
    # expert_weight_decay 0.2 at lr 1e-2 decays as much per step (AdamW: lr x decay) as the defaults
    return small_jnf(
        joint_epochs=40, flow_epochs=40, lr=1e-2, hidden_sizes=(32,), likelihood_scale=0.1, expert_weight_decay=0.2
    ).fit(X)
