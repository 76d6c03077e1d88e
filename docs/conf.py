"""Sphinx configuration of the skjnf documentation.

Build (CI: no examples run)::

    sphinx-build -W -b html -D plot_gallery=0 docs docs/_build/html

Full build, running every example in quick mode::

    SKJNF_EXAMPLE_QUICK=1 sphinx-build -W -b html docs docs/_build/html
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the examples' shared helper (_digits.py)
os.environ.setdefault("MPLBACKEND", "Agg")

import skjnf  # noqa: E402

project = "skjnf"
author = "the skjnf developers"
release = version = skjnf.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip"]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]
suppress_warnings = ["myst.xref_missing"]  # links to files outside docs/ (benchmarks/, tests/)

autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

intersphinx_mapping = {}  # no network on the build machines: plain names, no cross-project links

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"_digits\.py|__init__\.py",  # _digits.py is a helper, not an example
    "download_all_examples": False,
    "remove_config_comments": True,
}

html_theme = "alabaster"
html_static_path = []
html_title = "skjnf"
