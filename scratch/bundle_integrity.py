"""Prototype (phase 1) of bundle integrity for nbs/08_bundle.ipynb: `bundle.json` records the sha256 of every file of
the bundle; reading the bundle verifies names and digests before LightGBM or OpenCV parse a byte of them.

In phase 2: `file_sha256`, `plain_name`, `bundle_files` and the checks below go into `catdog_nb.bundle` (`save_bundle`
writes `sha256`, `read_bundle_meta` verifies); `Classifier.load` wraps the booster load in `BundleError` too."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from catdog_nb.predict import BundleError  # phase 2: catdog_nb.bundle.BundleError

BUNDLE_FILE = "bundle.json"


def file_sha256(path: Path) -> str:
    "Hex sha256 of a file, read 1 MiB at a time."
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20): digest.update(chunk)
    return digest.hexdigest()


def plain_name(name) -> str:
    "`name` if it is a plain file name inside the bundle folder (no folder part, no `..`, not absolute)."
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise BundleError(f"{BUNDLE_FILE} names {name!r}: not a plain file name in the bundle")
    return name


def bundle_files(meta: dict) -> list[str]:
    "The files of a bundle besides bundle.json: the booster and the backbones of its feature sets."
    return [plain_name(meta["booster"]), *map(plain_name, meta["backbones"].values())]


def file_digests(folder: Path, meta: dict) -> dict[str, str]:
    "What `save_bundle` writes as `meta['sha256']`."
    return {name: file_sha256(folder / name) for name in bundle_files(meta)}


def verify_files(folder: Path, meta: dict) -> None:
    "Every bundle file present and equal to the sha256 bundle.json records; `BundleError` names the first that is not."
    recorded = meta.get("sha256")
    names = bundle_files(meta)
    if not isinstance(recorded, dict) or set(recorded) != set(names):
        raise BundleError(f"{BUNDLE_FILE} does not record the sha256 of each bundle file ({', '.join(names)}): "
                          "re-create the bundle (`make pipeline`)")
    for name in names:
        if not (folder / name).is_file(): raise BundleError(f"{name} is missing from the bundle")
        if file_sha256(folder / name) != recorded[name]:
            raise BundleError(f"{name} does not match its sha256 in {BUNDLE_FILE}: the bundle is damaged or was edited")


def sign(folder: Path) -> dict:
    "Add the sha256 of every file to an existing bundle's bundle.json (what save_bundle does in phase 2)."
    meta = json.loads((folder / BUNDLE_FILE).read_text())
    meta["sha256"] = file_digests(folder, meta)
    (folder / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
