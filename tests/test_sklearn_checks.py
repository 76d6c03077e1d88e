"""scikit-learn's estimator checks, on the one-modality configuration (modalities=None)."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skjnf import JNFEstimator


def _small():
    return JNFEstimator(
        latent_dim=2,
        hidden_sizes=(8,),
        flow_hidden_sizes=(8,),
        n_flow_blocks=1,
        joint_epochs=2,
        flow_epochs=2,
        n_importance_samples=8,
        random_state=0,
    )


# score_samples runs float32 networks: a row's value can move by ~1e-7 (relative) with its batch's
# size (BLAS blocking), below float32 precision but above this check's fixed rtol of 1e-7.
# tests/test_scoring.py checks the same invariance at rel=1e-6.
EXPECTED_FAILED = {"check_methods_subset_invariance": "float32 BLAS rounding (~1e-7) exceeds the check's rtol"}


@parametrize_with_checks([_small()], expected_failed_checks=lambda estimator: EXPECTED_FAILED)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
