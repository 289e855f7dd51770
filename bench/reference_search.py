"""Search speed side by side: our vectorised evolution vs the reference EvolutionFinder.

The reference is MIT Han lab's PyPI package `ofa` (mit-han-lab/once-for-all), run unchanged with its
own MLP accuracy predictor (randomly initialised, 3x400, on CPU) and the same settings: population
100, 500 generations, parent ratio 0.25, mutation ratio 0.5, mutation probability 0.1, a MACs
constraint on the fashion-mnist space (both sides compute MACs with this project's exact cost table).
Ours runs in the same process, same machine, twice: with this project's predictor (a 5-member ensemble
of 2x128 MLPs, random init) and with the reference's 3x400 MLP shape, so the search code itself is
compared too. Each side: median of 3 runs.

It needs its own venv (the package imports torchvision):

    python3.11 -m venv bench/_ref/venv
    bench/_ref/venv/bin/pip install torch==2.14.1 torchvision==0.29.1 ofa==0.1.0.post202307202001 \\
        numpy scipy pyyaml safetensors tqdm
    bench/_ref/venv/bin/python bench/reference_search.py

Writes docs/results/reference_search.json, which bench/specialize.py folds into specialize.json.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onceforall.supernet.efficiency import CostTable  # noqa: E402
from onceforall.specialization.predictor import (  # noqa: E402
    HIDDEN, MEMBERS, AccuracyPredictor, PredictorMLP, encoding_size)
from onceforall.specialization.search import EvolutionConfig, evolution_search  # noqa: E402
from onceforall.supernet.space import SubnetConfig, get_space  # noqa: E402

BUDGET_MACS = 6e6
REPEATS = 3


def main() -> int:
    torch.set_num_threads(2)
    from ofa.nas.accuracy_predictor import AccuracyPredictor as RefPredictor
    from ofa.nas.accuracy_predictor import MobileNetArchEncoder
    from ofa.nas.search_algorithm import EvolutionFinder

    space = get_space("fashion-mnist")
    costs = CostTable.build(space)

    class MacsModel:  # the reference calls get_efficiency(arch_dict) once per candidate
        def get_efficiency(self, arch: dict) -> float:
            cfg = SubnetConfig(arch["image_size"], tuple(arch["d"]), tuple(arch["ks"]), tuple(arch["e"]))
            return float(costs.macs([cfg])[0])

    encoder = MobileNetArchEncoder(image_size_list=list(space.resolutions), ks_list=list(space.kernels),
                                   expand_list=list(space.expands), depth_list=list(space.depths),
                                   n_stage=len(space.units))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ref_predictor = RefPredictor(encoder, hidden_size=400, n_layers=3, device="cpu")
    finder = EvolutionFinder(MacsModel(), ref_predictor, arch_mutate_prob=0.1, resolution_mutate_prob=0.1,
                             population_size=100, max_time_budget=500, parent_ratio=0.25,
                             mutation_ratio=0.5)
    def median_s(run) -> tuple[float, object]:
        times, out = [], None
        for _ in range(REPEATS):
            t = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    with torch.no_grad():
        reference_s, (_, best) = median_s(lambda: finder.run_evolution_search(BUDGET_MACS, verbose=False))

    def ours(hidden: tuple[int, ...], members: int) -> tuple[float, object]:
        torch.manual_seed(0)
        predictor = AccuracyPredictor(space, PredictorMLP(encoding_size(space), hidden, members).eval(),
                                      hidden, {})
        return median_s(lambda: evolution_search(space, predictor.predict, costs.macs, BUDGET_MACS,
                                                 np.random.default_rng(0), EvolutionConfig()))

    ours_s, result = ours(HIDDEN, MEMBERS)  # the product's predictor
    same_s, _ = ours((400, 400, 400), 1)  # the reference's MLP shape

    out = {"ours_s": round(ours_s, 3), "reference_s": round(reference_s, 3),
           "speedup": round(reference_s / ours_s, 1),
           "ours_predictor": f"{MEMBERS} x MLP {'x'.join(map(str, HIDDEN))} (this project's default)",
           "ours_reference_mlp_s": round(same_s, 3), "speedup_reference_mlp": round(reference_s / same_s, 1),
           "statistic": f"median of {REPEATS} runs per side", "budget_macs": BUDGET_MACS,
           "reference_package": "ofa==0.1.0.post202307202001", "torch": torch.__version__,
           "reference_best_macs": best[2], "ours_best_macs": result.best_metric,
           "command": "bench/_ref/venv/bin/python bench/reference_search.py"}
    path = ROOT / "docs/results/reference_search.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
