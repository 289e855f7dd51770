"""A stage's figures as Prometheus gauges, pushed to a Pushgateway at the end of the stage.

Grouping key: ``job="onceforall"``, ``run_id``, ``stage``, ``target`` (``shared`` for stages that
serve every target), so each stage of each run owns one group and a retried stage replaces its own.
Names carry their unit (``_joules``, ``_grams``, ``_seconds``, ``_percent``); how an energy figure
was obtained is the ``method`` label (rapl, nvml, model, none).

A Pushgateway that is down never fails a stage: the push is tried a few times, then a warning is
logged and the failure is returned, for the record and the report.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

JOB = "onceforall"
SHARED = "shared"
log = logging.getLogger(__name__)

# stage metric key -> (metric name, help, labels, scale)
STAGE_FIGURES: dict[str, tuple[str, str, dict[str, str], float]] = {
    "images_per_s": ("ofa_train_images_per_second", "training throughput", {}, 1.0),
    "kendall_tau": ("ofa_predictor_kendall_tau", "accuracy predictor's Kendall tau, held-out subnets",
                    {}, 1.0),
    "rmse_pts": ("ofa_predictor_rmse_points", "accuracy predictor's RMSE in accuracy points", {}, 1.0),
    "search_s": ("ofa_search_duration_seconds", "evolutionary search time", {}, 1.0),
    "test_acc": ("ofa_model_test_accuracy_percent", "exported model's test accuracy (onnxruntime)",
                 {}, 1.0),
    "latency_ms": ("ofa_model_latency_seconds", "exported model's latency on the target", {}, 1e-3),
    "macs": ("ofa_model_macs", "exported model's multiply-accumulates per image", {}, 1.0),
    "params": ("ofa_model_params", "exported model's parameters", {}, 1.0),
}


def gateway_address(explicit: str | None = None) -> str:
    """The Pushgateway to use: the argument, else ``OFA_PUSHGATEWAY``, else none ("")."""
    return (explicit or os.environ.get("OFA_PUSHGATEWAY") or "").strip()


def build_registry(record: dict[str, Any]):
    """Every figure of one stage record as gauges in a fresh registry."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()

    def gauge(name: str, doc: str, value: float, **labels: str) -> None:
        existing = reg._names_to_collectors.get(name)  # one Gauge per name, several label sets
        g = existing or Gauge(name, doc, list(labels), registry=reg)
        (g.labels(**labels) if labels else g).set(float(value))

    energy = record.get("energy") or {}
    methods = energy.get("methods", {})
    if energy:
        for comp in ("cpu", "gpu", "ram"):
            gauge("ofa_stage_energy_joules", "energy of the stage", energy[f"{comp}_j"], component=comp,
                  method=methods.get(comp, "none"))
        measured = {m for m in methods.values() if m in ("rapl", "nvml")}
        total_method = "model" if "model" in methods.values() else (sorted(measured) or ["none"])[0]
        gauge("ofa_stage_energy_joules", "energy of the stage", energy["total_j"], component="total",
              method=total_method)
        gauge("ofa_stage_emissions_grams", "emissions of the stage, grams CO2e", energy["emissions_g"],
              intensity_source=energy.get("carbon", {}).get("source", "fixed"))
        gauge("ofa_stage_carbon_intensity_grams_per_kwh", "carbon intensity used", energy["g_per_kwh"])
    gauge("ofa_stage_duration_seconds", "wall time of the stage", record["wall_s"])
    for key, value in record.get("metrics", {}).items():
        if key.startswith("val_acc_"):
            gauge("ofa_subnet_val_accuracy_percent", "validation accuracy of a tracked subnet", value,
                  subnet=key[len("val_acc_"):])
        elif key in STAGE_FIGURES:
            name, doc, labels, scale = STAGE_FIGURES[key]
            gauge(name, doc, value * scale, **labels)
    gauge("ofa_stage_last_push_timestamp_seconds", "when the stage pushed its figures", time.time())
    return reg


def push_stage(record: dict[str, Any], run_id: str, gateway: str | None = None, *, tries: int = 3,
               timeout_s: float = 5.0, backoff_s: float = 1.0) -> str | None:
    """Push one stage's figures; returns None on success or when no gateway is set, else the error."""
    address = gateway_address(gateway)
    if not address:
        return None
    from prometheus_client import push_to_gateway

    registry = build_registry(record)
    key = {"run_id": run_id or "unknown", "stage": record["stage"], "target": record.get("target") or SHARED}
    error = None
    for attempt in range(tries):
        try:
            push_to_gateway(address, job=JOB, registry=registry, grouping_key=key, timeout=timeout_s)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure to push is reported, never raised
            error = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < tries:
                time.sleep(backoff_s * 2 ** attempt)
    log.warning("could not push %s metrics to the Pushgateway at %s after %d tries: %s",
                record["stage"], address, tries, error)
    return f"pushgateway {address}: {error}"
