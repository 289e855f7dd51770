"""The cost of N targets: OFA against baselines that pay their whole cost once per target.

OFA trains its supernet once (``shared``) and pays ``marginal`` per target (profile + search +
export); a baseline pays ``per_target`` N times (one architecture trained alone; a per-target NAS).
Pure arithmetic on measured figures: what goes in is metered elsewhere (energy.py) and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .energy import KWH_J

NS = (1, 2, 4, 10, 40, 100)


@dataclass(frozen=True)
class Cost:
    """Energy (J) and wall time (s) of one piece of work."""

    j: float
    wall_s: float

    def to_dict(self, g_per_kwh: float) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()} | {
            "wh": round(self.j / 3.6e3, 4), "g": round(grams(self.j, g_per_kwh), 4)}


def grams(joules: float, g_per_kwh: float) -> float:
    """CO2e (g) of ``joules`` at a carbon intensity (g CO2e / kWh)."""
    return joules / KWH_J * g_per_kwh


def break_even(shared_j: float, marginal_j: float, per_target_j: float) -> float | None:
    """The N from which OFA costs no more than the baseline: ``shared / (per_target - marginal)``;
    None when one more OFA target costs at least as much as the baseline's (never)."""
    gap = per_target_j - marginal_j
    return round(shared_j / gap, 2) if gap > 0 else None


def cost_model(shared: Cost, marginal: Cost, baselines: dict[str, Cost], g_per_kwh: float,
               ns: tuple[int, ...] = NS) -> dict[str, Any]:
    """Cost vs N for OFA and each baseline (J, Wh, g CO2e, wall), and break-even N against each."""
    rows = []
    for n in ns:
        row: dict[str, Any] = {"n": n}
        sides = {"ofa": Cost(shared.j + n * marginal.j, shared.wall_s + n * marginal.wall_s),
                 **{name: Cost(n * b.j, n * b.wall_s) for name, b in baselines.items()}}
        for name, c in sides.items():
            row |= {f"{name}_{k}": v for k, v in c.to_dict(g_per_kwh).items()}
        rows.append(row)
    return {"g_per_kwh": g_per_kwh, "shared": shared.to_dict(g_per_kwh),
            "per_target_marginal": marginal.to_dict(g_per_kwh),
            "baselines": {name: b.to_dict(g_per_kwh) for name, b in baselines.items()},
            "break_even_n": {name: break_even(shared.j, marginal.j, b.j) for name, b in baselines.items()},
            "rows": rows}
