"""The committed generated files are what their sources generate: catdog_nb/ from nbs/, README.md from nbs/index.ipynb."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catdog_nb.core import project_root

pytestmark = pytest.mark.slow  # nbdev-export and make in subprocesses

BIN = Path(sys.executable).parent


def copy_sources(dest: Path) -> Path:
    root = project_root()
    for name in ("nbs", "catdog_nb"): shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "params.yaml"): shutil.copy(root / name, dest / name)
    return root


def test_export_reproduces_the_committed_package(tmp_path):
    root = copy_sources(tmp_path)
    shutil.rmtree(tmp_path / "catdog_nb")
    subprocess.run([BIN / "nbdev-export"], cwd=tmp_path, check=True)
    for exported in sorted((tmp_path / "catdog_nb").glob("*.py")):
        assert exported.read_text() == (root / "catdog_nb" / exported.name).read_text(), exported.name
    assert sorted(p.name for p in (tmp_path / "catdog_nb").glob("*.py")) == sorted(p.name for p in (root / "catdog_nb").glob("*.py"))


def test_readme_is_rendered_from_index_notebook(tmp_path):
    "The README is what `make readme` renders now: the model table re-computed from compare.json and metrics.json."
    root = project_root()
    notebook = tmp_path / "index.ipynb"
    shutil.copy(root / "nbs" / "index.ipynb", notebook)
    subprocess.run(["make", "--no-print-directory", "-s", "-C", root, f"README_NB={notebook}",
                    f"README_OUT={tmp_path / 'README.md'}", "readme"], check=True,
                   env={**os.environ, "CATDOG_ROOT": str(root)})  # the copy runs outside the project tree
    assert (tmp_path / "README.md").read_text() == (root / "README.md").read_text(), "run `make readme`"
    assert (notebook.read_text() == (root / "nbs" / "index.ipynb").read_text()), "run `make readme` and commit nbs/index.ipynb"
