"""skjnf: Joint Normalizing Flows (JNF) for multimodal tabular data, as a scikit-learn estimator."""

from skorch.helper import SliceDict

from ._estimator import JNFEstimator

__all__ = ["JNFEstimator", "SliceDict"]
__version__ = "0.1.0"
