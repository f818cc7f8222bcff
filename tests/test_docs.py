"""The documentation: the site builds without a warning, every example in it and in
README.rst runs and gives the output shown, and the API reference covers ``parmap.__all__``.

The site is built by Sphinx in a child process, as ``sphinx-build -W`` would be, into a
temporary folder: the HTML pages, then the ``doctest`` builder, which runs every ``>>>``
example and ``.. testcode::`` block, page by page (``docs/conf.py`` stops parmap's pools
after each page and fails it if a process, thread or /dev/shm file is left behind).
``docs/_ext/parmap_docs.py`` fails the build on a Python example that nothing runs.
"""
from __future__ import annotations

import doctest
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import parmap

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.rst"
SETUP_COMMANDS = ['pip install . && python -m parmap.demo',
                  'pip install ".[test]" && python -m pytest']
BUILD_TIMEOUT = 120  # seconds per builder; a build takes about 5 s on 2 busy cores


def load_docs_extension():
    """docs/_ext/parmap_docs.py, loaded by path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("parmap_docs", DOCS / "_ext" /
                                                  "parmap_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ API reference

def test_api_reference_documents_every_public_name():
    text = (DOCS / "api.rst").read_text()
    documented = re.findall(r"^\.\. auto(?:class|function|exception|data)::\s+"
                            r"(?:parmap\.)?(\w+)", text, flags=re.M)
    assert len(documented) == len(set(documented)), "a name is documented twice"
    missing = set(parmap.__all__) - set(documented)
    assert not missing, f"docs/api.rst lacks an autodoc entry for {sorted(missing)}"
    stale = set(documented) - set(parmap.__all__)
    assert not stale, f"docs/api.rst documents names that are not public: {sorted(stale)}"


# ------------------------------------------------------------------------------ README

def test_readme_starts_with_the_two_setup_commands():
    lines = README.read_text().splitlines()
    positions = [lines.index("    " + command) for command in SETUP_COMMANDS]
    assert positions == sorted(positions) and positions[-1] < 25, \
        "README.rst must show the two set-up commands, in this order, at the top"
    assert SETUP_COMMANDS[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_examples_run():
    text = README.read_text()
    test = doctest.DocTestParser().get_doctest(text, {"__name__": "readme"}, "README.rst",
                                               str(README), 0)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=out.write)
    assert result.attempted >= 3, "README.rst lost its example"
    assert result.failed == 0, out.getvalue()


def test_readme_shows_no_python_that_is_not_run():
    from docutils import nodes
    from docutils.core import publish_doctree

    untested_python = load_docs_extension().untested_python
    tree = publish_doctree(README.read_text(), settings_overrides={"report_level": 5})
    for block in tree.findall(nodes.literal_block):
        classes = block.get("classes", [])
        language = classes[1] if classes[:1] == ["code"] and len(classes) > 1 else None
        assert not untested_python(block.astext(), language), \
            f"README.rst shows Python that no test runs; make it a >>> example:\n" \
            f"{block.astext()}"


def test_readme_links_to_pages_that_exist():
    targets = re.findall(r"<(docs/[\w/]+\.rst)>`_", README.read_text())
    assert targets, "README.rst no longer links to the documentation"
    assert [t for t in targets if not (ROOT / t).is_file()] == []


def test_docstring_examples_of_the_public_api_run():
    """The package's docstring and those of the names in parmap.__all__ (the site runs
    the ones the API reference shows; this also covers the module docstring)."""
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    out = io.StringIO()
    attempted = 0
    for test in finder.find(parmap):
        attempted += runner.run(test, out=out.write).attempted
    assert runner.failures == 0, out.getvalue()
    assert attempted >= 1


@pytest.mark.slow
def test_demo_of_the_first_setup_command_runs():
    proc = subprocess.run([sys.executable, "-m", "parmap.demo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("done"), proc.stdout


# -------------------------------------------------------------------------------- site

@pytest.mark.parametrize("text, language, expected", [
    ("results = Parallel(n_jobs=2)(delayed(f)(x) for x in xs)", None, True),
    ("print(1)", "python", True),
    (">>> 1 + 1\n2", None, True),
    ("pip install . && python -m parmap.demo", "bash", False),
    ("print(1)", "text", False),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
     "ValueError: bad", None, False),
    ("ParmapError\n├── PoolError", None, False),
], ids=["plain block", "python block", "prompts", "shell", "text", "traceback", "tree"])
def test_untested_python_tells_code_from_text(text, language, expected):
    assert load_docs_extension().untested_python(text, language) is expected


def sphinx(builder: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / builder)],
        cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)


@pytest.mark.slow
@pytest.mark.timeout(2 * BUILD_TIMEOUT + 30)
def test_site_builds_without_warnings_and_every_example_passes(tmp_path):
    html = sphinx("html", tmp_path)
    assert html.returncode == 0, f"sphinx-build -W -b html failed:\n{html.stderr}"
    api = (tmp_path / "html" / "api.html").read_text()
    undocumented = [name for name in parmap.__all__ if f'id="parmap.{name}"' not in api]
    assert not undocumented, f"the built API page lacks {undocumented}"

    run = sphinx("doctest", tmp_path)
    report = (tmp_path / "doctest" / "output.txt").read_text() \
        if (tmp_path / "doctest" / "output.txt").exists() else ""
    assert run.returncode == 0, f"the examples failed:\n{run.stdout}\n{run.stderr}\n{report}"
    summary = dict((kind, int(n)) for n, kind in re.findall(
        r"^\s*(\d+) (tests|failures? in tests|failures? in setup code|"
        r"failures? in cleanup code)$", report, flags=re.M))
    assert summary.get("tests", 0) >= 100, f"fewer examples ran than the docs hold:\n{report}"
    assert sum(n for kind, n in summary.items() if kind != "tests") == 0, report
