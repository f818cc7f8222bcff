"""Checks that keep the documentation honest; a Sphinx extension plus two helpers.

* While Sphinx reads each page, :func:`warn_untested_examples` looks at every literal block
  and warns about one that holds Python code no test runs: a ``code-block:: python`` or a
  plain ``::`` block whose text compiles, or a block of ``>>>`` lines that is not a doctest
  block.  Built with ``-W``, the warning fails the build, so every example stays a
  ``.. testcode::`` block or a ``>>>`` doctest that ``sphinx-build -b doctest`` runs.
  Blocks included from a source file (``literalinclude``) show code that runs elsewhere.
* In the API reference, :func:`readable_signature` shows the "not given" marker of
  ``parallel_config``'s signature as ``unset`` instead of ``<object object at 0x...>``.
* ``doctest_global_cleanup`` (see ``conf.py``) calls :func:`check_nothing_left` after each
  page's examples: it stops parmap's worker pools and fails the page if a child process,
  a thread or a parmap file in ``/dev/shm`` of this process is still there.

``tests/test_docs.py`` applies :func:`untested_python` to README.rst, which Sphinx does
not build.
"""
from __future__ import annotations

import os
import re
import threading
import time
import warnings
from typing import Any

#: languages whose blocks must be tested; Sphinx's "default" highlights as Python
PYTHON = {None, "", "default", "python", "python3", "py", "py3", "pycon"}
#: seconds a finishing worker or thread may take to go away after the pools stop
GRACE = 5.0


def untested_python(text: str, language: str | None) -> bool:
    """True when a literal block showing ``text`` in ``language`` is runnable Python."""
    if language not in PYTHON:
        return False
    if any(line.lstrip().startswith(">>>") for line in text.splitlines()):
        return True
    with warnings.catch_warnings():  # a traceback may hold invalid escape sequences
        warnings.simplefilter("ignore")
        try:
            compile(text, "<example>", "exec")
        except (SyntaxError, ValueError):
            return False  # a traceback, a table, a diagram, a message
    return True


def warn_untested_examples(app: Any, doctree: Any) -> None:
    from docutils import nodes
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    check_docstrings = app.config.parmap_docs_check_docstrings
    for node in doctree.findall(nodes.literal_block):
        if "testnodetype" in node or node.get("source"):  # testcode/doctest; literalinclude
            continue
        if not check_docstrings and "docstring of " in (node.source or ""):
            continue
        if untested_python(node.astext(), node.get("language")):
            logger.warning("a Python example that no test runs: make it a `.. testcode::` "
                           "block or a `>>>` doctest (or give the block a non-Python "
                           "language if it is not code)", location=node)


_SENTINEL = re.compile(r"<object object(?: at 0x[0-9a-fA-F]+)?>")


def readable_signature(app: Any, what: str, name: str, obj: Any, options: Any,
                       signature: str | None, return_annotation: str | None) -> Any:
    """Show a bare ``object()`` default (parmap's "not given" marker) as ``unset``."""
    if signature and _SENTINEL.search(signature):
        return _SENTINEL.sub("unset", signature), return_annotation
    return None


def check_nothing_left() -> None:
    """Stop parmap's pools; raise if this process still has children, extra threads, or
    parmap files in /dev/shm (what a page's examples must not leave behind)."""
    import parmap

    parmap._shutdown_pools()
    deadline = time.monotonic() + GRACE
    while True:
        problems = _leftovers()
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # waiting for workers to exit, not synchronising with them
    if problems:
        raise AssertionError("the examples of this page left behind: " + "; ".join(problems))


def _leftovers() -> list[str]:
    problems = []
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        problems.append(f"threads {threads}")
    children = _child_pids() - _helper_pids()
    if children:
        problems.append(f"child processes {sorted(children)}")
    try:
        prefix = f"parmap_{os.getpid()}_"
        shm = [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    except OSError:
        shm = []
    if shm:
        problems.append(f"/dev/shm files {shm}")
    return problems


def _child_pids() -> set[int]:
    me, found = str(os.getpid()), set()
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux
        import multiprocessing

        return {p.pid for p in multiprocessing.active_children()}
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = f.read().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if ppid == me:
                found.add(int(entry))
    return found


def _helper_pids() -> set[int]:
    """multiprocessing's long-lived helpers (forkserver, resource tracker): not leaks."""
    pids = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        pids.add(forkserver._forkserver._forkserver_pid)
        pids.add(resource_tracker._resource_tracker._pid)
    except (ImportError, AttributeError):
        pass
    return {pid for pid in pids if pid}


def setup(app: Any) -> dict[str, Any]:
    # Docstrings are checked too once their examples are doctests (see conf.py).
    app.add_config_value("parmap_docs_check_docstrings", True, "env")
    app.connect("doctree-read", warn_untested_examples)
    app.connect("autodoc-process-signature", readable_signature)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
