"""The README's copy-paste commands, applied as DVC applies them, keep `params.yaml` consistent; the README stays short
and says what is, not what happened."""
import json
import re
import shlex
import shutil

import pytest
import yaml
from dvc.cli import parse_args
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides

from catdog_nb.backbone import is_backbone_set
from catdog_nb.core import project_root

ROOT = project_root()
README = (ROOT / "README.md").read_text()
MAX_WORDS = 2000
HISTORY_WORDS = ("last session", "earlier session", "previous", "Xeon", "EPYC")


def shell_commands(text: str) -> list[list[str]]:
    "Each command of the README's sh blocks as its words, continuation lines joined and comments dropped."
    commands = []
    for block in re.findall(r"^```(?:sh|bash)\n(.*?)^```", text, re.S | re.M):
        commands += [words for line in block.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]
    return commands


def dvc_args(words: list[str]) -> list[str] | None:
    "The arguments of a `dvc` command (`dvc ...` or `.venv/bin/dvc ...`), or None for another program."
    return words[1:] if words[0].split("/")[-1] == "dvc" else None


def set_params(args: list[str]) -> list[str]:
    "What a dvc command's -S / --set-param options set."
    return [value for flag, value in zip(args, args[1:]) if flag in ("-S", "--set-param")]


def dvc_commands_with_params() -> list[list[str]]:
    return [args for words in shell_commands(README) if (args := dvc_args(words)) and set_params(args)]


def test_readme_dvc_commands_parse_and_name_stages():
    "Every dvc command of the README is one dvc's own parser accepts, and the stages it names are in dvc.yaml."
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # a foreach stage is named by its group
    commands = [args for words in shell_commands(README) if (args := dvc_args(words))]
    assert len(commands) >= 2
    for args in commands:
        parsed = parse_args(args)
        for target in getattr(parsed, "targets", None) or []:
            assert target.split("@")[0] in stages, f"{shlex.join(args)}: no stage {target} in dvc.yaml"


def test_readme_param_commands_keep_the_sets_consistent(tmp_path):
    """The README's `-S` lines (add a feature set, serve another model), applied in order to a copy of params.yaml by
    DVC's own override code: every candidate stays, one with a new set is added, and a compared candidate is served."""
    commands = dvc_commands_with_params()
    assert len(commands) >= 2, "the README shows how to add a feature set and how to serve another model"
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    before = yaml.safe_load(params_file.read_text())
    for args in commands:
        for path, overrides in to_path_overrides(set_params(args)).items():
            assert path == "params.yaml", shlex.join(args)
            apply_overrides(params_file, overrides)
        after = yaml.safe_load(params_file.read_text())
        assert after["compare"]["candidates"][:len(before["compare"]["candidates"])] == before["compare"]["candidates"], \
            f"{shlex.join(args)} drops a candidate: run `make readme`"
        assert all(map(is_backbone_set, after["train"]["feature_sets"])), f"{shlex.join(args)} serves a set with no backbone stage"
    weighed = lambda p: {s for candidate in p["compare"]["candidates"] for s in candidate}
    added = after["compare"]["candidates"][len(before["compare"]["candidates"]):]
    assert len(added) == 1 and set(added[0]) - weighed(before), f"the README adds one candidate with a new set, not {added}"
    assert all(map(is_backbone_set, added[0])), "the new set is a backbone set"
    assert after["train"]["feature_sets"] != before["train"]["feature_sets"], "serving another model changes the served sets"
    assert after["train"]["feature_sets"] in before["compare"]["candidates"], "the README serves a compared candidate"


def test_readme_reads_in_five_minutes():
    words = len(README.split())
    assert words < MAX_WORDS, f"README.md has {words} words"


def test_readme_says_what_is_not_what_happened():
    "No history words; a CPU's name is allowed as the measurement records under reports/ name it."
    text = README
    for record in ROOT.glob("reports/**/*.json"):
        if cpu := json.loads(record.read_text()).get("cpu"): text = text.replace(cpu, "")
    found = [w for w in HISTORY_WORDS if re.search(rf"\b{re.escape(w)}\b", text, re.I)]
    assert not found, f"README.md (nbs/index.ipynb) tells history: {found}"


@pytest.mark.parametrize("text, added", [
    ("```sh\n.venv/bin/dvc exp run x -S 'train.feature_sets=[a,b]' \\\n  -S 'y=[[a]]'  # c\n```\n", ["train.feature_sets=[a,b]", "y=[[a]]"]),
    ("```sh\nmake pipeline -S nothing\n```\n```\ndvc exp run -S not=shell\n```\n", []),
])
def test_set_params_are_read_from_sh_blocks_only(text, added):
    "The extraction the tests above rely on: continuation lines joined, comments dropped, other programs and blocks left."
    assert [v for words in shell_commands(text) if (args := dvc_args(words)) for v in set_params(args)] == added
