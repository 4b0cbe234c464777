"""The documentation holds together: the site builds with warnings as errors, nothing in the
repository names a file the repository does not contain, and the benchmark plots are drawn
from the numbers in BENCHMARKS.md.

The site is built exactly as README.md says (`mkdocs build --strict`; mkdocs and its plugins
come from docs/requirements.txt, which README's test command installs, so CI builds it).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".md", ".py", ".toml", ".yml", ".sh", ".txt"}  # raw logs (.log, .json) are records, not text
# A path-like word in backquotes, or in a docstring/comment: something/like/this.ext
PATH = re.compile(r"(?<![\w./<*~$-])((?:[\w-]+/|\.\./|\./)*[\w-]+(?:\.[\w-]+)*\.(?:md|py|json|log|sh|toml|txt|yml|svg|png))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|/work/|shared/bench")
# Names of files that a command writes (not files of the repository), as the text that names them says.
WRITTEN = {"bench.svg", "bench.png", "auto.md", "out.json", "OUT.json"}
CODE_PREFIXES = ("jnp.", "np.", "math.", "jax.", "args.",  # `jnp.log`: a function, not a file
                 "my_package/", "src/my_package/")  # the package of the reader who writes a backend


def _tracked() -> list[pathlib.Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if pathlib.Path(p).suffix in TEXT_SUFFIXES and (ROOT / p).is_file()]


def _package_roots(path: pathlib.Path) -> list[pathlib.Path]:
    """Folders a path written in `path` may be relative to: its folder, its package's root
    (the nearest folder with a pyproject.toml) and that package's import folder, the repository."""
    roots = [path.parent]
    for parent in path.parents:
        if (parent / "pyproject.toml").exists():
            roots.append(parent)
            roots.extend(d for d in (parent / "src").glob("*") if d.is_dir())
            break
    return roots + [ROOT]


def _docstrings(path: pathlib.Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return "\n".join(filter(None, (ast.get_docstring(n) for n in nodes)))


def test_nothing_names_a_file_the_repository_does_not_contain():
    """In every text file: nothing outside the repository (a design file, a shared folder); in every
    Markdown file and docstring: links, and words that look like paths, that resolve."""
    files = _tracked()
    names = {p.name for p in files} | {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts}
    problems = []
    for path in files:
        rel = path.relative_to(ROOT)
        if path != pathlib.Path(__file__):
            for found in OUTSIDE.finditer(path.read_text()):
                problems.append(f"{rel}: names {found[0]!r}, which is outside the repository")
        if path.suffix not in (".md", ".py"):
            continue
        text = path.read_text() if path.suffix == ".md" else _docstrings(path)
        targets = [t.split("#")[0] for t in LINK.findall(text) if path.suffix == ".md"]
        for target in targets:
            if target and not re.match(r"^[a-z]+:", target) and not (path.parent / target).exists():
                problems.append(f"{rel}: links to {target!r}, which does not exist")
        for word in PATH.findall(text):
            if word in WRITTEN or word.startswith(CODE_PREFIXES):
                continue
            if "/" not in word:
                if word not in names:
                    problems.append(f"{rel}: names {word!r}, and no file of the repository has that name")
            elif not any((root / word).exists() for root in _package_roots(path)):
                problems.append(f"{rel}: names {word!r}, which does not exist")
    assert not problems, "\n".join(sorted(set(problems)))


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "index.html").exists() and (tmp_path / "api" / "index.html").exists()


def test_readme_says_how_to_build_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert "mkdocs build --strict" in readme and "docs/requirements.txt" in readme
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert "-r requirements-dev.txt" in blocks[1]  # so CI (the second command) builds the docs
    assert "-r docs/requirements.txt" in (ROOT / "requirements-dev.txt").read_text()


def _plot_script():
    spec = importlib.util.spec_from_file_location("plot_benchmarks", ROOT / "bench" / "plot_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_plots_are_drawn_from_the_benchmark_tables():
    """The committed plot data is what the script reads from the BENCHMARKS.md files today
    (rerun `python bench/plot_benchmarks.py` after changing a table), and every plot is in the docs."""
    script = _plot_script()
    committed = json.loads((ROOT / "docs" / "img" / "bench" / "data.json").read_text())
    assert script.all_plot_data() == committed
    pages = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    for name in committed:
        assert (ROOT / "docs" / "img" / "bench" / f"{name}.svg").exists(), name
        assert f"img/bench/{name}.svg" in pages, f"no page shows {name}.svg"
