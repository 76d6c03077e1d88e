"""skjnf: Joint Normalizing Flows (JNF) for multimodal tabular data, as a scikit-learn estimator."""

from skorch.helper import SliceDict

from ._estimator import JNFEstimator
from ._imputer import JNFImputer
from ._validation import modalities_from_prefix

__all__ = ["JNFEstimator", "JNFImputer", "SliceDict", "modalities_from_prefix"]
__version__ = "0.1.0"
