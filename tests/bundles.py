"""Small real model bundles for the tests, built with the pipeline's own functions on a few dozen real photos."""
from dataclasses import replace
from pathlib import Path

import numpy as np

from catdog_nb.bundle import CLASSES, predict_proba, save_bundle
from catdog_nb.core import load_params
from catdog_nb.data import read_image
from catdog_nb.features import FeatureExtractor, feature_settings
from catdog_nb.metrics import classification_metrics
from catdog_nb.train import fit_linear, train_booster


def tiny_bundle(photos: list[Path], out_dir: Path, params: dict | None = None, sets: list[str] | None = None,
                backbones: dict | None = None, rounds: int = 60) -> Path:
    """A bundle trained on `photos` (each in a `cat/` or `dog/` folder) with `sets` (default classic only; `backbones`
    as `save_bundle`'s), booster and linear head; returns `out_dir`. With so few photos the leaf size is lowered: it
    only has to fit what it saw."""
    params = params or load_params()
    sets = list(sets or ["classic"])
    settings = feature_settings(params, sets)
    extractor = FeatureExtractor(sets, settings, backbones)
    X = extractor.transform([read_image(p) for p in photos]).astype(np.float32)
    y = np.array([CLASSES.index(Path(p).parent.name) for p in photos])
    cfg = {**params["train"], "num_boost_round": rounds, "early_stopping_rounds": rounds, "learning_rate": 0.3,
           "min_data_in_leaf": 2, "feature_fraction": 1.0, "bagging_fraction": 1.0, "bagging_freq": 0}
    booster, _ = train_booster(X, y, X, y, cfg, params["seed"], list(extractor.feature_names))
    # weighted half and half whatever the photos say: so that the tests see both parts of the model at work
    head = replace(fit_linear(X, y, X, y, booster, params["train"]["linear_c"]), weight=0.5)
    save_bundle(out_dir, booster, sets, settings, backbones, data_version="tiny", head=head,
                metrics=classification_metrics(y, predict_proba(booster, X, head)), name=params["train"]["registered_model"])
    return Path(out_dir)
