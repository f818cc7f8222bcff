"""Sphinx configuration: ``pip install ".[docs]" && sphinx-build docs docs/_build``."""
project = "parmap"
author = "the parmap developers"
extensions: list[str] = []
html_static_path = ["_static"]
exclude_patterns = ["_build"]
