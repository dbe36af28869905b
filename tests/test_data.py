"""The split on the real pulled dataset: the same on two runs, and the same as on the machine that wrote dvc.lock."""
import hashlib
import yaml
from catdog_nb.core import load_params, project_root
from catdog_nb.data import assign_splits, scan_dataset, write_manifest


def locked_manifest_md5(root):
    "The md5 of data/split.csv as recorded by `dvc repro` in the committed dvc.lock."
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["split"]["outs"] if o["path"] == "data/split.csv"]
    return out["md5"]


def test_split_is_reproducible_across_runs_and_machines(tmp_path):
    root, params = project_root(), load_params()
    cfg = params["data"]
    records = scan_dataset(root / cfg["raw_dir"], root)
    assert len(records) == 12_000 and not [r for r in records if r.error]
    digests = []
    for run, recs in enumerate((records, list(reversed(records)))):  # listing order must not matter
        split_of = assign_splits(recs, cfg["val_fraction"], cfg["test_fraction"], params["seed"])
        write_manifest(records, split_of, tmp_path / f"split{run}.csv")
        digests.append(hashlib.md5((tmp_path / f"split{run}.csv").read_bytes()).hexdigest())
    assert digests[0] == digests[1] == locked_manifest_md5(root)
