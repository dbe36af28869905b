"""Cats vs dogs as a reproducible MLOps pipeline: OpenCV features, LightGBM, a Litestar service; notebooks are the source.

Modules:

- `catdog_nb.data`: Robust image decoding into one canonical array, typed errors for what is not an image, the dataset listing and the deterministic, duplicate-aware train/val/test split (DVC stage `split`)."""

__version__ = "0.0.1"
