"""Sphinx configuration.

Build the site with ``pip install ".[docs]" && sphinx-build -W docs docs/_build/html``;
run every example in it with ``sphinx-build -W -b doctest docs docs/_build/doctest``.
``tests/test_docs.py`` runs both (into a temporary folder) as part of the test suite.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Document (and run the examples against) this checkout's parmap, even when another copy
# is installed; the local extension lives in _ext.
sys.path[:0] = [os.path.dirname(HERE), os.path.join(HERE, "_ext")]

import parmap  # noqa: E402  (after the path is set)

project = "parmap"
author = "the parmap developers"
copyright = "the parmap developers"
release = version = parmap.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "parmap_docs",  # fails the build on a Python example that no test runs
]
# docstrings shown in the API reference are held to the same rule as the pages
parmap_docs_check_docstrings = True

# Pages are listed in the toctrees of index.rst; everything else here is not a page.
exclude_patterns = ["_build", "_ext"]
html_static_path = ["_static"]
html_theme = "alabaster"  # ships with Sphinx: nothing to download at build time
html_theme_options = {
    "description": "Fast, crash-safe parallel loops",
    "fixed_sidebar": True,
    "page_width": "1040px",
    "sidebar_width": "220px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
html_show_sourcelink = False

# Cross-references to Python objects are checked (nitpicky) except the standard library's
# and numpy's, which would need intersphinx (a download at build time).
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(typing|collections\.abc|numpy|contextvars)\..*"),
    ("py:class", r"(Any|Callable|Iterable|Iterator|Task)"),
    ("py:(class|exc|func|mod|obj)", r"(TimeoutError|pickle\..*|multiprocessing.*|"
                                    r"concurrent\..*)"),
]

autodoc_member_order = "bysource"
# Type hints go into the description of the arguments a docstring documents; most of the
# public signatures take ``Any`` (joblib's loose argument types), which says nothing.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autoclass_content = "both"  # the class docstring, then __init__'s where it has one

# Examples run with `sphinx-build -b doctest`: every page's examples share one namespace
# (a "group" per page); after each page, parmap's worker pools are stopped and the page
# must have left no process, thread or shared-memory file behind.
doctest_global_setup = "import importlib.util\nfrom parmap import Parallel, delayed"
doctest_global_cleanup = "import parmap_docs; parmap_docs.check_nothing_left()"
doctest_test_doctest_blocks = "default"
