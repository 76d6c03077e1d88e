"""The README's set-up commands stay in sync with CI, and its quick start runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [block.strip() for block in _bash_blocks(readme)]
    assert len(commands) == 2, "README gives exactly two set-up commands"
    assert commands[1].endswith("python -m pytest -n 2 -q")
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "examples/plot_quickstart.py" in commands[0]
    assert (ROOT / "examples" / "plot_quickstart.py").exists()


def test_readme_python_blocks_run(monkeypatch, tmp_path):
    """Every Python block of the README runs in order (with fewer rows and epochs)."""
    readme = (ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, flags=re.S))
    code = code.replace("joint_epochs=50, flow_epochs=50", "joint_epochs=2, flow_epochs=2")
    code = code.replace("latent_dim=2, random_state=0)", "latent_dim=2, joint_epochs=2, flow_epochs=2, random_state=0)")
    code = code.replace("rng.normal(size=(500, 2))", "rng.normal(size=(120, 2))")
    code = code.replace("JNFEstimator(", "JNFEstimator(hidden_sizes=(32,), flow_hidden_sizes=(16,), ")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["Z_two"].shape == (120, 2)
    assert namespace["protein_hat"].shape == (120, 5)
    assert namespace["imputed"].shape == (100, 5)
    assert (tmp_path / "jnf.skops").exists()
