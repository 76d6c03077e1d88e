"""The documentation covers the package: every public name in the API reference, every example
in the gallery (a sphinx-gallery script with a title), every User Guide page in the index."""

import ast
import re
from pathlib import Path

import skjnf

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^   (\w+)$", api, flags=re.M)) | set(re.findall(r"^\.\. class:: (\w+)", api, re.M))
    assert set(skjnf.__all__) <= documented, set(skjnf.__all__) - documented


def test_every_example_is_a_gallery_script_with_a_title():
    """sphinx-gallery takes examples/plot_*.py; each needs a docstring opening with an RST title."""
    conf = (DOCS / "conf.py").read_text()
    assert '"examples_dirs": str(ROOT / "examples")' in conf and r'"filename_pattern": r"/plot_"' in conf
    for script in sorted((ROOT / "examples").glob("plot_*.py")):
        docstring = ast.get_docstring(ast.parse(script.read_text()))
        assert docstring, script.name
        title, underline = docstring.splitlines()[:2]
        assert underline == "=" * len(title), f"{script.name}: the docstring's first line needs an '=' underline"
        assert "\n# %%\n" in script.read_text(), f"{script.name}: no sphinx-gallery section comment ('# %%')"
    assert (ROOT / "examples" / "README.txt").exists()  # the gallery's header


def test_every_user_guide_page_is_in_the_index():
    index = (DOCS / "index.rst").read_text()
    for page in (DOCS / "user_guide").glob("*.md"):
        assert f"user_guide/{page.stem}" in index, page.name
