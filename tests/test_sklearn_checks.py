"""scikit-learn's estimator checks, on the one-modality configuration (modalities=None)."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skjnf import JNFEstimator


def _small():
    return JNFEstimator(
        latent_dim=2, hidden_sizes=(8,), flow_hidden_sizes=(8,), n_flow_blocks=1,
        joint_epochs=2, flow_epochs=2, n_importance_samples=8, random_state=0,
    )


@parametrize_with_checks([_small()])
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
