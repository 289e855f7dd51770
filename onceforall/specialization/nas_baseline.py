"""Per-target NAS from scratch: the alternative the OFA paper compares with, run at this project's
scale and metered like every stage.

For one target: sample K architectures of the space inside the target's budget (MACs and params
directly; latency through the target's measured latency table, as the search does), train each
alone for a short proxy, pick the best on validation, train that one fully with the scratch recipe
(train.train_static: the teacher phase's recipe at the architecture's own resolution) and report
its test accuracy beside the energy and wall time of the whole search.

Why this is a fair, cheap NAS and not a strawman (the defaults, NASSettings):
  * Random search with a cheap early-stopping proxy is a strong NAS baseline: Li & Talwalkar
    (UAI 2019, "Random Search and Reproducibility for Neural Architecture Search", arXiv:1902.07638)
    found random search with early stopping at least as good as ENAS on PTB and CIFAR-10; Yang et al.
    (ICLR 2020, "NAS evaluation is frustratingly hard", arXiv:1912.12522) that many NAS methods
    struggle to beat the average randomly sampled architecture of their own space; Sciuto et al.
    (2019, "Evaluating the Search Phase of NAS", arXiv:1902.08142) that a random policy did better
    on average than the weight-sharing searches they evaluated.
  * The candidates are drawn from the top of the budget (``band``: configs that use at least 80% of
    it; the rest of the feasible configs only when fewer than K do): accuracy grows with capacity,
    and a practitioner does not spend proxies on nets that leave half the budget unused.
  * K = 10 proxies of 1 epoch on 25,000 images at the architecture's own resolution cost about
    0.45 of one full training under the `standard` recipe (10 epochs on 55,000 images): the search
    spends less than the final training, as the cheap hardware-aware searches in the OFA paper's
    Table 1 do (search / training GPU-hours per target: DARTS 96 / 250, ProxylessNAS 200 / 300,
    FBNet-C 216 / 360; docs/results/paper_table1.json), far below MnasNet's 40,000 GPU-hours of
    search. The whole NAS costs about 1.45 trainings alone per target: any cheaper is hardly a search.
  * The proxies run on the architecture's own resolution: resolution is a searched dimension (it
    sets latency and MACs), so a proxy at another resolution would rank other architectures.
  * The pick uses the validation split only; the proxies skip the test pass (train_static
    ``test=False``) so that the NAS is not charged for work it does not need.

Under a latency budget the candidates fit the table's predictions (as the evolution search's do);
unlike OFA's search stage, the pick is not then measured end to end on the target's runtime.

``run_nas`` writes every training to its own folder with its metered energy beside it; a rerun
skips what is finished (so a long run can be cut and continued) and ``nas.json`` is the result.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data import Dataset
from ..infra.energy import KWH_J
from ..errors import UserError
from .latency import LatencyTable
from ..progress import Progress, fmt_duration
from ..training.schedule import Schedule
from ..supernet.space import SearchSpace, SubnetConfig
from ..supernet.subnet_batch import SubnetBatch
from .targets import Target

NAS_RESULT = "nas.json"
ENERGY = "energy.json"  # beside each training's result.json: its metered energy


@dataclass(frozen=True)
class NASSettings:
    """K, the proxy and how candidates are drawn; the defaults are sized in the module's docstring."""

    candidates: int = 10  # K
    proxy_epochs: int = 1
    proxy_train_images: int | None = 25000  # None: all the schedule trains on
    proxy_val_images: int | None = None  # the pick's validation images (None: the whole split)
    band: float = 0.8  # draw from configs using at least this share of the budget
    pool: int = 5000  # random configs drawn to find the candidates

    def __post_init__(self) -> None:
        checks = (("candidates", self.candidates >= 1, "use e.g. 10"),
                  ("proxy_epochs", self.proxy_epochs >= 1, "use e.g. 1"),
                  ("proxy_train_images", self.proxy_train_images is None or self.proxy_train_images >= 1,
                   "give a positive number of images, or None for all"),
                  ("band", 0.0 <= self.band <= 1.0, "give a share of the budget in [0, 1], e.g. 0.8"),
                  ("pool", self.pool >= self.candidates, "draw at least as many configs as candidates"))
        for name, ok, fix in checks:
            if not ok:
                raise UserError(f"NAS setting {name} = {getattr(self, name)!r} is out of range",
                                field=name, fix=fix)

    def proxy_share(self, schedule: Schedule, train_images: int) -> float:
        """What the K proxies cost, in image passes, as a share of one full scratch training."""
        full = schedule.teacher.epochs * _cap(schedule.train_images, train_images)
        proxy = self.proxy_epochs * _cap(_min(self.proxy_train_images, schedule.train_images),
                                         train_images)
        return self.candidates * proxy / full


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _cap(limit: int | None, n: int) -> int:
    return n if limit is None else min(limit, n)


def _key(cfg: SubnetConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def sample_candidates(space: SearchSpace, target: Target, latency: LatencyTable | None,
                      settings: NASSettings, seed: int) -> tuple[Target, list[tuple[SubnetConfig, float]]]:
    """Up to K distinct configs within the target's budget, with their constraint values.

    Returns the target with its budget resolved (budget_of_max to ms on its table, as the search
    resolves it) and the candidates in the order they were drawn. Deterministic for a seed."""
    from .specialize import constraint_fn, resolve_budget

    target = resolve_budget(space, target, latency)
    budget = target.constraint.search_budget
    metric_of = constraint_fn(space, target, latency)
    rng = np.random.default_rng([seed, 22])
    batch = SubnetBatch.sample(space, rng, settings.pool)
    metric = np.asarray(metric_of(batch), dtype=np.float64)
    feasible: dict[str, tuple[SubnetConfig, float]] = {}
    idx = np.flatnonzero(metric <= budget)
    for cfg, value in zip(batch.take(idx).to_configs(space), metric[idx].tolist()):
        feasible.setdefault(_key(cfg), (cfg, value))
    if not feasible:
        raise UserError(f"none of {settings.pool} random configs fits the {target.constraint.kind} "
                        f"budget {budget:g} of target {target.name!r}", field="constraint.budget",
                        fix="raise the budget, or draw more configs (NASSettings.pool)")
    found = list(feasible.values())
    band = [c for c in found if c[1] >= settings.band * budget]
    if len(band) >= settings.candidates:
        pick = sorted(rng.choice(len(band), settings.candidates, replace=False).tolist())
        return target, [band[i] for i in pick]
    rest = sorted((c for c in found if c[1] < settings.band * budget), key=lambda c: -c[1])
    return target, (band + rest)[:settings.candidates]


def _metered(train: Callable[[], dict[str, Any]], folder: Path, carbon: str | None) -> tuple[dict, dict]:
    """One training and its metered energy; a finished folder (result and energy) is read back."""
    from ..infra.energy import Meter
    from ..training.train import RESUME_DIR

    result_path, energy_path = folder / "result.json", folder / ENERGY
    if result_path.is_file() and energy_path.is_file():
        return json.loads(result_path.read_text()), json.loads(energy_path.read_text())
    if result_path.is_file():  # finished but its energy was lost: measure it again, whole
        shutil.rmtree(folder)
    shutil.rmtree(folder / RESUME_DIR, ignore_errors=True)  # a cut run starts over, metered whole
    with Meter(carbon) as meter:
        result = train()
    energy = meter.reading.to_dict()
    energy_path.write_text(json.dumps(energy, indent=1))
    return result, energy


def _sum_energy(readings: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("cpu_j", "gpu_j", "ram_j", "total_j", "emissions_g", "duration_s")
    out: dict[str, Any] = {k: round(sum(r[k] for r in readings), 4) for k in keys}
    methods = sorted({m for r in readings for m in r["methods"].values() if m != "none"})
    rate = out["emissions_g"] / (out["total_j"] / KWH_J) if out["total_j"] > 0 else None
    return out | {"g_per_kwh": rate, "methods": methods, "estimate": "model" in methods}


def run_nas(space: SearchSpace, schedule: Schedule, target: Target, data: Dataset, out_dir: str | Path,
            *, latency: LatencyTable | None = None, settings: NASSettings = NASSettings(),
            seed: int = 0, device: str = "auto", progress: bool = True,
            carbon: str | None = None) -> dict[str, Any]:
    """The per-target NAS (module docstring), metered; writes and returns ``nas.json``."""
    from ..training.train import train_static

    out_dir = Path(out_dir)
    if (out_dir / NAS_RESULT).is_file():
        return json.loads((out_dir / NAS_RESULT).read_text())
    target, cands = sample_candidates(space, target, latency, settings, seed)
    proxy = dataclasses.replace(schedule, train_images=_min(settings.proxy_train_images,
                                                            schedule.train_images),
                                val_images=settings.proxy_val_images)
    share = settings.proxy_share(schedule, len(data.train))
    bar = Progress(f"nas {target.name}", len(cands) + 1, enabled=progress)
    bar.message(f"{len(cands)} candidates within {target.constraint.kind} <= "
                f"{target.constraint.search_budget:g}; proxies cost {share:.2f} of one full training")
    rows, walls = [], []
    for k, (cfg, metric) in enumerate(cands):
        eta = _eta(walls, len(cands) - k, share / len(cands))
        bar.message(f"candidate {k + 1}/{len(cands)}: proxy {settings.proxy_epochs} epoch(s), "
                    f"{cfg.r} px; ETA {eta}")
        t0 = time.monotonic()
        result, energy = _metered(lambda: train_static(
            space, proxy, cfg, data, out_dir / f"proxy-{k}", epochs=settings.proxy_epochs, seed=seed,
            device=device, progress=progress, test=False), out_dir / f"proxy-{k}", carbon)
        walls.append(time.monotonic() - t0)
        rows.append({"config": cfg.to_dict(), "metric": metric, "val_acc": result["val_acc"],
                     "train_wall_s": result["train_wall_s"], "energy": energy})
    picked = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -i))  # ties: the first drawn
    best = cands[picked][0]
    bar.message(f"picked candidate {picked + 1} (val {rows[picked]['val_acc']:.2f}); full training, "
                f"ETA {_eta(walls, 0, share / len(cands))}")
    final, final_energy = _metered(lambda: train_static(
        space, schedule, best, data, out_dir / "final", seed=seed, device=device, progress=progress),
        out_dir / "final", carbon)
    bar.close()
    search = _sum_energy([r["energy"] for r in rows])
    doc = {"format": "onceforall-nas/1", "target": target.to_dict(), "schedule": schedule.name,
           "seed": seed, "settings": dataclasses.asdict(settings) | {"proxy_share": round(share, 4)},
           "candidates": rows, "picked": picked,
           "final": {"config": best.to_dict(), "metric": cands[picked][1], "val_acc": final["val_acc"],
                     "test_acc": final["test_acc"], "epochs": final["epochs"],
                     "train_wall_s": final["train_wall_s"], "energy": final_energy},
           "energy": {"search": search, "final": final_energy,
                      "total": _sum_energy([*(r["energy"] for r in rows), final_energy])}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / NAS_RESULT).write_text(json.dumps(doc, indent=1))
    return doc


def _eta(walls: list[float], proxies_left: int, proxy_share_each: float) -> str:
    """Time left: the proxies' mean so far for each one left, and the full training as that many
    proxies as it is longer (image passes)."""
    if not walls:
        return "?"
    each = sum(walls) / len(walls)
    return fmt_duration(each * (proxies_left + 1 / max(proxy_share_each, 1e-9)))
