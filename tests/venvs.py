"""Fresh venvs built as the Dockerfile's builder stages build theirs: from a copy of the files those stages copy, with the
pinned sets they install and then the package without its dependencies (`pip install --no-deps .`; uv here, for speed)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from dockerfile import stage

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def outside_env() -> dict[str, str]:
    "The environment without the developer's venv and PYTHONPATH, which would import the work tree's catdog_nb/."
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}


def build_venv(tmp: Path, stages: list[str], requirements: str) -> Path:
    "`tmp/venv` with `requirements/<requirements>` and the package, installed from a copy of what `stages` COPY."
    context = tmp / "context"
    for name in stages:
        for flags, sources, _ in stage(name).copies():
            for source in sources if not flags else []:  # COPY --from=... copies from a stage, not the context
                src, dest = ROOT / source, context / source
                dest.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir(): shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
                else: shutil.copy(src, dest)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    for args in (["-r", context / "requirements" / requirements], ["--no-deps", context]):
        subprocess.run([BIN / "uv", "pip", "install", "--quiet", "--python", venv / "bin" / "python", *args],
                       check=True, env=outside_env(), timeout=600)
    return venv


def run_in(venv: Path, *cmd) -> subprocess.CompletedProcess:
    "Run outside the work tree, so `python -c` cannot import the repository's catdog_nb/ instead of the installed one."
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, cwd=venv.parent,
                          env=outside_env())


def installed(venv: Path) -> set[str]:
    frozen = run_in(venv, BIN / "uv", "pip", "freeze", "--python", venv / "bin" / "python").stdout
    return {re.split(r"==| @ ", line)[0].lower() for line in frozen.splitlines() if line.strip()}


def pinned(requirements: str) -> set[str]:
    return {line.split("==")[0].strip().lower() for line in (ROOT / "requirements" / requirements).read_text().splitlines()
            if "==" in line and not line.lstrip().startswith("#")}
