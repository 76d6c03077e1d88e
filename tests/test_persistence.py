"""Models written by earlier versions load and answer as they did (tests/data/write_old_models.py
wrote them: 0.1.0, and the last commit before parameters were renamed)."""

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

DATA = Path(__file__).parent / "data"
VERSIONS = ["jnf_0_1", "jnf_unreleased_b42bf53"]


def _load(path: Path):
    if path.suffix == ".pkl":
        return pickle.loads(path.read_bytes())
    skops_io = pytest.importorskip("skops.io")
    return skops_io.load(path, trusted=skops_io.get_untrusted_types(file=path))


@pytest.mark.filterwarnings("ignore:HMC acceptance")
@pytest.mark.parametrize("suffix", [".pkl", ".skops"])
@pytest.mark.parametrize("version", VERSIONS)
def test_a_model_of_an_earlier_version_loads_and_answers_as_it_did(version, suffix):
    est = _load(DATA / f"{version}{suffix}")
    saved = np.load(DATA / f"{version}_outputs.npz")
    X = {m: saved[m] for m in ("a", "b", "c")}
    # renamed parameters keep their values under the new names (set to 0.7 before saving)
    params = est.get_params()
    assert params["likelihood_scale"] == 0.7 and params["likelihood"] == "normal"
    assert "decoder_scale" not in params and not hasattr(est, "decoder")
    np.testing.assert_array_equal(est.transform(X), saved["transform"])
    if version == "jnf_0_1":
        # 0.1 averaged 20 independent flow draws, their noise shared by the rows (since then:
        # antithetic pairs); its means sit 0.09 on average from a 2000-draw mean, another
        # expert's (b's) 0.28 away
        assert est.subset_posterior == "product_prior"  # 0.1's subset posterior, by HMC
        exact = copy.deepcopy(est).set_params(n_posterior_samples=2000)
        assert np.abs(exact.transform(X, cond_mod="a") - saved["transform_a"]).mean() < 0.15
    else:
        np.testing.assert_array_equal(est.transform(X, cond_mod="a"), saved["transform_a"])
    for name, block in est.predict({"a": X["a"], "b": X["b"]}).items():
        np.testing.assert_array_equal(block, saved[f"predict_{name}"])
    assert clone(est).get_params()["likelihood_scale"] == 0.7
    assert not any(p.requires_grad for p in est.module_.parameters())  # frozen, as fit leaves it
