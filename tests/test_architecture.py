"""The module structure stays as docs/architecture.rst draws it (see tests/import_graph.py)."""
from __future__ import annotations

import subprocess
import sys

from . import import_graph


def test_no_cycle_no_hidden_import_pool_independent_sizes_ok():
    assert import_graph.check() == []


def test_the_checker_finds_a_cycle_and_an_in_function_import(tmp_path, monkeypatch):
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == \
        [["a", "b", "c"]]
    package = tmp_path / "parmap"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from . import two\n")
    (package / "two.py").write_text("def f():\n    from . import one\n")
    (package / "backends.py").write_text("LAZY = {}\n")
    monkeypatch.setattr(import_graph, "ROOT", package)
    problems = import_graph.check()
    assert any("cycle: parmap.one -> parmap.two" in p for p in problems), problems
    assert any("parmap.two:2 imports parmap.one inside a function" in p for p in problems)


def test_the_process_package_may_not_import_the_front_end():
    edges = {"parmap.process.pool": {"parmap._settings", "parmap._errors"}}
    assert import_graph.boundary_problems(edges) == [
        "parmap.process.pool imports parmap._settings: the pool must not depend on the "
        "front end"]


def test_import_parmap_stays_light():
    code = ("import sys, parmap\n"
            "heavy = {'multiprocessing', 'numpy', 'cloudpickle', 'tblib', 'joblib', 'dask',\n"
            "         'tqdm', 'matplotlib', 'parmap.process', 'ctypes', 'ast', 'inspect'}\n"
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_mypy_is_clean():
    """The package type-checks (configuration: setup.cfg [mypy])."""
    api = __import__("pytest").importorskip("mypy.api")
    root = import_graph.ROOT.parent
    stdout, stderr, status = api.run(["--config-file", str(root / "setup.cfg"),
                                      "--cache-dir", str(root / ".mypy_cache"),
                                      str(root / "parmap")])
    assert status == 0, stdout + stderr
