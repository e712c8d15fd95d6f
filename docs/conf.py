"""Sphinx configuration of the foresight-sparse documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
Nothing here reaches the network: there is no intersphinx mapping, and MathJax is only
loaded by the reader's browser.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The package is normally installed (editable); this makes a plain checkout build too.
sys.path.insert(0, os.path.abspath(".."))

import foresight_sparse  # noqa: E402

project = "foresight-sparse"
author = "foresight-sparse contributors"
copyright = "foresight-sparse contributors"
version = foresight_sparse.__version__
release = foresight_sparse.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
default_role = "py:obj"
nitpicky = False

# -- autodoc and napoleon --------------------------------------------------------------------
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_preprocess_types = False
# Optional extras the docs build does not install are mocked; their users' docstrings
# are all the pages need.
autodoc_mock_imports = ["lightning", "pytorch_lightning"]

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"foresight-sparse {release}"
html_static_path: list[str] = []


# -- benchmarks.md -----------------------------------------------------------------------------
# docs/benchmarks.md is maintained by benchmarks/make_table.py. benchmarks.rst includes it
# verbatim; should the file be missing at build time, say so instead of failing the build.
_BENCHMARKS_MD = Path(__file__).with_name("benchmarks.md")
_INCLUDE = ".. literalinclude:: benchmarks.md\n   :language: markdown\n"
_MISSING = (
    ".. note::\n\n   ``docs/benchmarks.md`` was not present when this documentation was built.\n"
)


def _benchmarks_source(app, docname, source):
    if docname == "benchmarks" and not _BENCHMARKS_MD.exists():
        source[0] = source[0].replace(_INCLUDE, _MISSING)


def setup(app):
    app.connect("source-read", _benchmarks_source)
    return {"parallel_read_safe": True}
