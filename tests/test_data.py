"""The split on the real pulled dataset: the same on two runs, and the same as on the machine that wrote dvc.lock; a
feedback export joins train only."""
import hashlib
from pathlib import Path

import cv2
import yaml
from catdog_nb.core import load_params, project_root
from catdog_nb.data import (FEEDBACK_MANIFEST, assign_splits, make_split, read_manifest, sample_photos, scan_dataset,
                           write_manifest)


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


def feedback_export(folder, photos: dict[str, bytes]):
    "A folder as `catdog feedback export` writes it: `<label>/<file>` photos and manifest.csv listing them."
    rows = ["prediction_id,image_md5,file,true_label"]
    for i, (file, data) in enumerate(photos.items()):
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_bytes(data)
        rows.append(f"p{i},{hashlib.md5(data).hexdigest()},{file},{file.split('/')[0]}")
    (folder / FEEDBACK_MANIFEST).write_text("\n".join(rows) + "\n")
    return folder


def test_stage_adds_feedback_to_train_only_and_without_it_writes_the_locked_split(tmp_path):
    root, params = project_root(), load_params()
    cfg = params["data"]
    split = lambda out, feedback="": make_split(root / cfg["raw_dir"], out, cfg["val_fraction"], cfg["test_fraction"],
                                                params["seed"], feedback, root)
    split(tmp_path / "split.csv")
    assert hashlib.md5((tmp_path / "split.csv").read_bytes()).hexdigest() == locked_manifest_md5(root)
    base = read_manifest(tmp_path / "split.csv")
    test_row = next(r for r in base if r["split"] == "test")
    flipped = lambda p: cv2.imencode(".jpg", cv2.flip(cv2.imread(str(p)), 1))[1].tobytes()  # a new photo: a new md5
    photos = {f"{p.parent.name}/flipped-{p.name}": flipped(p) for p in sample_photos(2, raw_dir=root / cfg["raw_dir"])}
    photos[f"{test_row['label']}/seen.jpg"] = (root / test_row["path"]).read_bytes()  # a test photo sent to the service
    export = feedback_export(tmp_path / "feedback", photos)
    records = split(tmp_path / "split-feedback.csv", export)
    rows = read_manifest(tmp_path / "split-feedback.csv")
    assert rows[:len(base)] == base  # every dataset photo keeps its split: val and test are the same photos
    added = {Path(r["path"]).relative_to(export).as_posix(): (r["label"], r["split"]) for r in rows[len(base):]}
    assert added == {f: (f.split("/")[0], "train") for f in photos if "flipped" in f} and len(added) == 4
    (seen,) = [r for r in records if r.path.endswith("seen.jpg")]
    assert seen.error.startswith("in_dataset")
