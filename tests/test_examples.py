"""Every example script runs end to end in quick mode and writes its figures.

The scripts run at the same time, each as a subprocess on its own copy in a temporary
folder, so that their figures do not overwrite the full-size ones in ``examples/output``.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: Each example script and the figures it must write to ``output/`` next to itself.
FIGURES = {
    "plot_quickstart.py": ["quickstart_latent.png"],
    "plot_training_curves.py": ["training_curves.png"],
    "plot_imputation.py": ["imputation.png", "imputation_digits.png"],
    "plot_column_transformer_search.py": ["column_transformer_search.png"],
    "plot_dask_search.py": ["dask_search.png"],
    "plot_incomplete_rows.py": ["incomplete_rows.png"],
    "plot_imputer_pipeline.py": ["imputer_pipeline.png"],
    "plot_dask_imputation.py": ["dask_imputation.png"],
}
NEEDS = {"plot_dask_search.py": "distributed", "plot_dask_imputation.py": "distributed"}
TIMEOUT_S = 300


def _available(script):
    return script not in NEEDS or importlib.util.find_spec(NEEDS[script]) is not None


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """{script: (folder, completed process)} for every example whose dependencies are installed."""
    env = {
        **os.environ,
        "SKJNF_EXAMPLE_QUICK": "1",
        "MPLBACKEND": "Agg",
        # One thread per process: the scripts run side by side on few cores.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    running = {}
    try:
        for script in filter(_available, FIGURES):
            folder = tmp_path_factory.mktemp(Path(script).stem)
            shutil.copy(EXAMPLES / script, folder)
            shutil.copy(EXAMPLES / "_digits.py", folder)  # the examples' shared data helper
            process = subprocess.Popen(
                [sys.executable, script],
                cwd=folder,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            running[script] = (folder, process)
        runs = {}
        for script, (folder, process) in running.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
            runs[script] = (folder, completed)
        return runs
    finally:
        for _, process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("script", list(FIGURES))
def test_example_runs_and_writes_figures(script, example_runs):
    if not _available(script):
        pytest.skip(f"{script} needs {NEEDS[script]}")
    folder, run = example_runs[script]
    assert run.returncode == 0, f"{script} failed:\n{run.stdout}\n{run.stderr}"
    for name in FIGURES[script]:
        figure = folder / "output" / name
        assert figure.is_file(), f"{script} did not write output/{name}"
        assert figure.stat().st_size > 0, f"{script} wrote an empty output/{name}"


def test_dask_example_uses_the_local_cluster(example_runs):
    if not _available("plot_dask_search.py"):
        pytest.skip("plot_dask_search.py needs distributed")
    _, run = example_runs["plot_dask_search.py"]
    match = re.search(r"ran as (\d+) dask tasks on (\d+) workers", run.stdout)
    assert match, run.stdout + run.stderr
    n_tasks, n_workers = map(int, match.groups())
    assert n_tasks >= 1 and 1 <= n_workers <= 2
