"""A stage notebook run the way DVC runs it (catdog_nb.core.run_stage in a subprocess): its progress reaches the
terminal and stays out of the executed notebook, and the kernel starts without a warning."""
import json, os, subprocess, sys
import nbformat
import pytest

pytestmark = pytest.mark.slow  # a papermill kernel in a subprocess

STAGE = """
import time
from catdog_nb.core import Progress
bar = Progress(3, "trial", every=0.2)
for _ in range(3): time.sleep(0.3); bar.update()
print("stage done")
"""


def test_stage_progress_reaches_the_terminal_not_the_notebook(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "nbs").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("limit = None", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(STAGE)],
                                  metadata={"kernelspec": {"name": "catdog", "language": "python", "display_name": "catdog"}})
    nbformat.write(nb, tmp_path / "nbs" / "trial.ipynb")
    run = subprocess.run([sys.executable, "-c", "from catdog_nb.core import run_stage; run_stage('trial', limit=3)"],
                         cwd=tmp_path, env={**os.environ, "CATDOG_ROOT": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert any(l.startswith("trial: 0/3 images") for l in lines), run.stderr
    assert any(l.startswith("trial: 3/3 images (100%)") for l in lines), run.stderr
    assert "without encryption" not in run.stderr and "WARNING" not in run.stderr, run.stderr
    executed = json.loads((tmp_path / "reports" / "trial.ipynb").read_text())
    outputs = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert outputs == "stage done\n"
    assert "limit = 3" in "".join(executed["cells"][1]["source"])  # papermill's injected parameters
