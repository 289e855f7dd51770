"""The energy and carbon a stage costs, measured by CodeCarbon's OfflineEmissionsTracker (no network).

How each figure is obtained travels with it, so nobody mistakes an estimate for a measurement:
``rapl`` (CPU package counters, where /sys/class/powercap is readable), ``nvml`` (NVIDIA GPUs),
``model`` (CodeCarbon's CPU-load x TDP model, and its RAM model), ``none`` (no such device).
On the VMs this project is developed on there are no RAPL counters: CPU energy is ``model`` there.

Carbon intensity, per run: a fixed number of grams CO2e per kWh (``"475"``, the default: a world
average), or a country as ISO 3166 alpha-3 code, optionally with a region (``"DEU"``,
``"USA:california"``), which CodeCarbon's offline tables turn into an intensity.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError

KWH_J = 3.6e6
DEFAULT_CARBON = "475"  # g CO2e / kWh: world average electricity (IEA, 2019)


@dataclass(frozen=True)
class Carbon:
    """Where the carbon intensity comes from."""

    source: str  # "fixed" | "country"
    g_per_kwh: float | None = None
    country: str | None = None
    region: str | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "Carbon":
        text = (spec or os.environ.get("OFA_CARBON") or DEFAULT_CARBON).strip()
        try:
            value = float(text)
        except ValueError:
            country, _, region = text.partition(":")
            if len(country) != 3 or not country.isalpha():
                raise UserError(f"carbon intensity {text!r} is neither a number nor a country code",
                                field="carbon", fix="give grams CO2e per kWh (e.g. 475) or an ISO 3166 "
                                                    "alpha-3 country, optionally :region (DEU, "
                                                    "USA:california)") from None
            return cls("country", country=country.upper(), region=region.lower() or None)
        if not 0 <= value < 5000:
            raise UserError(f"carbon intensity {value:g} g/kWh is out of range", field="carbon",
                            fix="give grams CO2e per kWh between 0 and 5000 (world average ~475)")
        return cls("fixed", g_per_kwh=value)

    @property
    def spec(self) -> str:
        """The string ``parse`` reads back (a pipeline parameter)."""
        if self.source == "fixed":
            return f"{self.g_per_kwh:g}"
        return self.country + (f":{self.region}" if self.region else "")


@dataclass
class Reading:
    """One stage's energy (joules), emissions (grams CO2e) and how each was obtained."""

    cpu_j: float
    gpu_j: float
    ram_j: float
    total_j: float
    emissions_g: float
    duration_s: float
    g_per_kwh: float
    methods: dict[str, str] = field(default_factory=dict)  # cpu/gpu/ram -> rapl|nvml|model|none
    carbon: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("cpu_j", "gpu_j", "ram_j", "total_j", "emissions_g", "duration_s", "g_per_kwh"):
            out[k] = round(out[k], 4)
        return out


def _cpu_method(tracker: Any) -> str:
    for hw in getattr(tracker, "_hardware", []):
        if type(hw).__name__ == "CPU":
            mode = str(getattr(hw, "_mode", ""))
            return "rapl" if "rapl" in mode else "model"
    return "model"


def _has_gpu(tracker: Any) -> bool:
    return any(type(hw).__name__ == "GPU" for hw in getattr(tracker, "_hardware", []))


class Meter:
    """``with Meter(carbon) as m: ...`` then ``m.reading``. Measures this process and its children.

    When CodeCarbon cannot start (it is missing, or the platform is unsupported), the stage still
    runs: the reading then has only the duration, and every method says ``none``.
    """

    def __init__(self, carbon: str | Carbon | None = None, *, interval_s: float = 5.0,
                 gpu_ids: list[int] | None = None):
        self.carbon = carbon if isinstance(carbon, Carbon) else Carbon.parse(carbon)
        self.interval_s = interval_s
        self.gpu_ids = gpu_ids  # None: every GPU the process sees; a rank of many: its own
        self.tracker = None
        self.reading: Reading | None = None

    def __enter__(self) -> "Meter":
        self.t0 = time.monotonic()
        try:
            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            kwargs: dict[str, Any] = {"country_iso_code": self.carbon.country or "USA"}
            if self.carbon.region:
                kwargs["region"] = self.carbon.region
            if self.gpu_ids is not None:
                kwargs["gpu_ids"] = self.gpu_ids
            self.tracker = OfflineEmissionsTracker(
                output_methods=[], log_level="error", measure_power_secs=self.interval_s,
                tracking_mode="process", project_name="onceforall", **kwargs)
            self.tracker.start()
        except Exception as exc:  # noqa: BLE001 - energy is reported, never a reason to fail a stage
            logging.getLogger(__name__).warning("energy meter unavailable: %s", exc)
            self.tracker = None
        return self

    def __exit__(self, *exc: Any) -> None:
        duration = time.monotonic() - self.t0
        carbon = {k: v for k, v in asdict(self.carbon).items() if v is not None}
        if self.tracker is None:
            self.reading = Reading(0.0, 0.0, 0.0, 0.0, 0.0, duration, self.carbon.g_per_kwh or 0.0,
                                   {"cpu": "none", "gpu": "none", "ram": "none"}, carbon)
            return
        emissions_kg = self.tracker.stop() or 0.0
        d = self.tracker.final_emissions_data
        cpu, gpu, ram = (float(getattr(d, k, 0.0) or 0.0) * KWH_J
                         for k in ("cpu_energy", "gpu_energy", "ram_energy"))
        total = cpu + gpu + ram
        if self.carbon.source == "fixed":
            g_per_kwh = float(self.carbon.g_per_kwh)
            emissions_g = total / KWH_J * g_per_kwh
        else:
            emissions_g = float(emissions_kg) * 1000.0
            g_per_kwh = emissions_g / (total / KWH_J) if total > 0 else 0.0
        methods = {"cpu": _cpu_method(self.tracker), "gpu": "nvml" if _has_gpu(self.tracker) else "none",
                   "ram": "model"}
        self.reading = Reading(cpu, gpu, ram, total, emissions_g, duration, g_per_kwh, methods, carbon)


def combine(own: Reading, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage's energy when its training ran elsewhere (a TrainJob's nodes): ``own``, the launching
    pod's reading, plus every rank's (``Reading.to_dict()``, each metering its own process and GPU).
    Joules add up by component; the emissions are the total at ``own``'s intensity; the duration is
    the stage's; a component's method is what measured it where it used energy ("model+nvml" where
    readings differ). ``parts`` keeps the launcher's and the ranks' totals apart."""
    parts = [own.to_dict(), *ranks]
    out = own.to_dict()
    for k in ("cpu_j", "gpu_j", "ram_j", "total_j"):
        out[k] = round(sum(float(p[k]) for p in parts), 4)
    out["emissions_g"] = round(out["total_j"] / KWH_J * own.g_per_kwh, 4)
    for comp in ("cpu", "gpu", "ram"):
        used = sorted({p["methods"].get(comp, "none") for p in parts if float(p[f"{comp}_j"]) > 0})
        out["methods"][comp] = "+".join(used) if used else "none"
    out["parts"] = {"launcher_j": round(own.total_j, 4), "ranks": len(ranks),
                    "ranks_j": round(sum(float(r["total_j"]) for r in ranks), 4)}
    return out
