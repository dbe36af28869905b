"""Small real model bundles for the tests, built with the pipeline's own functions on a few dozen real photos."""
from pathlib import Path

import numpy as np

from catdog_nb.bundle import CLASSES, save_bundle
from catdog_nb.core import load_params
from catdog_nb.data import read_image
from catdog_nb.features import FeatureExtractor, feature_settings
from catdog_nb.metrics import classification_metrics
from catdog_nb.train import predict_proba, train_booster


def tiny_bundle(photos: list[Path], out_dir: Path, params: dict | None = None, sets: list[str] | None = None,
                backbones: dict | None = None, rounds: int = 60) -> Path:
    """A bundle trained on `photos` (each in a `cat/` or `dog/` folder) with `sets` (default classic only; `backbones`
    as `save_bundle`'s); returns `out_dir`. With so few photos the leaf size is lowered: it only has to fit what it saw."""
    params = params or load_params()
    sets = list(sets or ["classic"])
    settings = feature_settings(params, sets)
    extractor = FeatureExtractor(sets, settings, backbones)
    X = extractor.transform([read_image(p) for p in photos]).astype(np.float32)
    y = np.array([CLASSES.index(Path(p).parent.name) for p in photos])
    cfg = {**params["train"], "num_boost_round": rounds, "early_stopping_rounds": rounds, "learning_rate": 0.3,
           "min_data_in_leaf": 2, "feature_fraction": 1.0, "bagging_fraction": 1.0, "bagging_freq": 0}
    booster, _ = train_booster(X, y, X, y, cfg, params["seed"], list(extractor.feature_names))
    save_bundle(out_dir, booster, sets, settings, backbones, data_version="tiny",
                metrics=classification_metrics(y, predict_proba(booster, X)), name=params["train"]["registered_model"])
    return Path(out_dir)
