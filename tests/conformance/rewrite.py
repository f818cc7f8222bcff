"""Copy joblib's ``test_parallel.py`` with its imports of the API under test swapped to
parmap's. joblib's internals that the tests use for their plumbing (``BACKENDS``, its
backend classes, ``joblib.testing``) stay joblib's."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

#: the names under test: where joblib's tests import them, parmap's are imported instead.
#: (ParallelBackendBase is not among them: parmap's backend contract is its own, see
#: docs/joblib.rst; the tests subclass joblib's to write joblib backends.)
SWAPPED = {"Parallel", "delayed", "parallel_config", "parallel_backend", "effective_n_jobs",
           "cpu_count", "register_parallel_backend", "TerminatedWorkerError"}

TEST_FILE = "test_parallel.py"


def joblib_test_file() -> Path:
    """``test_parallel.py`` of the installed joblib."""
    spec = importlib.util.find_spec("joblib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("joblib is not installed: pip install -e .[test]")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / TEST_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: this joblib was installed without its tests")
    return path


def _split(module: str, names: list[str], indent: str) -> list[str]:
    ours = [n for n in names if n in SWAPPED]
    theirs = [n for n in names if n not in SWAPPED]
    lines = []
    if theirs:
        lines.append(f"{indent}from {module} import {', '.join(theirs)}")
    if ours:
        lines.append(f"{indent}from parmap import {', '.join(ours)}")
    return lines or [f"{indent}pass"]


#: ``from joblib import Parallel, delayed`` in the source of scripts the tests run in a
#: child interpreter (inside string literals, so not seen by the AST pass)
_SCRIPT_IMPORT = re.compile(r"^from joblib import ([\w, ]+)$", re.MULTILINE)


def rewrite(source: str) -> str:
    """``source`` with every ``from joblib... import`` of a swapped name split in two."""
    lines = source.splitlines()
    edits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "joblib" and \
                any(alias.name in SWAPPED and alias.asname is None for alias in node.names):
            indent = lines[node.lineno - 1][:node.col_offset]
            names = [alias.name for alias in node.names]
            edits.append((node.lineno, node.end_lineno or node.lineno,
                          _split(node.module, names, indent)))
    for start, end, new in sorted(edits, reverse=True):
        lines[start - 1:end] = new
    text = "\n".join(lines) + "\n"
    return _SCRIPT_IMPORT.sub(
        lambda m: "\n".join(_split("joblib", [n.strip() for n in m.group(1).split(",")], "")),
        text)


def write_copy(folder: Path) -> Path:
    """The rewritten copy, written into ``folder``."""
    target = folder / TEST_FILE
    target.write_text(rewrite(joblib_test_file().read_text()))
    return target
