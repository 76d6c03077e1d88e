"""Where a warning raised inside skjnf points: the user's own call."""

from __future__ import annotations

import os
import sys

__all__ = ["user_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: scikit-learn's method wrappers (``fit``'s parameter validation, ``transform``'s set_output):
#: a warning skips their frames too.
_WRAPPER_FILES = (os.path.join("sklearn", "base.py"), os.path.join("sklearn", "utils", "_set_output.py"))


def user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning raised by this function's caller names the first
    frame outside skjnf and scikit-learn's method wrappers: the user's own call (or the
    scikit-learn meta-estimator that made it, such as a Pipeline)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename.endswith(_WRAPPER_FILES)
    ):
        frame, level = frame.f_back, level + 1
    return level
