"""The PromQL of the monitoring files, and the service's metric names it may use (shared by test_deploy and test_monitoring)."""
import json
import re
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parents[1] / "deployment" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"

# The service's metrics (catdog_nb.monitoring.ServiceMetrics), name -> Prometheus type.
SERVICE_METRICS = {
    "catdog_requests_total": "counter",
    "catdog_request_duration_seconds": "histogram",
    "catdog_inference_duration_seconds": "histogram",
    "catdog_batch_size": "histogram",
    "catdog_predictions_total": "counter",
    "catdog_prediction_confidence": "histogram",
    "catdog_prediction_animal": "histogram",
    "catdog_requests_in_flight": "gauge",
    "catdog_model_info": "gauge",
    "catdog_connections_dropped_total": "counter",
    "catdog_model_reloads_total": "counter",
    "catdog_prediction_log_failures_total": "counter",
}
# The series names those metrics expose, plus Prometheus's own `up`.
_SUFFIXES = {"counter": ("", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}
SERIES_NAMES = {"up"} | {name + suffix for name, kind in SERVICE_METRICS.items() for suffix in _SUFFIXES[kind]}

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "inf", "nan"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A whole identifier (not the tail of a number such as 1e3) that is not a function or aggregation call.
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    "The metric names a PromQL expression selects (label values, label lists, durations and functions removed)."
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels folded into a row


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, dict]]:
    "(panel title, target) for every query target of every panel."
    return [(panel["title"], target) for panel in _panels(dashboard()["panels"]) for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


_GRAFANA_INTERVALS = re.compile(r"\$\{?(__rate_interval|__interval|__range)\}?")


def as_promql(expr: str, interval: str) -> str:
    "A dashboard expression with Grafana's interval variables replaced by `interval`, ready for Prometheus's API."
    promql = _GRAFANA_INTERVALS.sub(interval, expr)
    assert "$" not in promql, f"a Grafana variable Prometheus cannot resolve is left in {promql!r}"
    return promql
