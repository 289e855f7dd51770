"""Wall time of the paper's evolution (population 100 x 500 generations) with the MLP predictor
(3 x 400, untrained: speed does not depend on the weights) and a MACs constraint.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/search_speed.py [fashion-mnist|imagenet-mbv3]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from onceforall.supernet.efficiency import CostTable
from onceforall.specialization.predictor import HIDDEN, AccuracyPredictor, PredictorMLP, encoding_size
from onceforall.specialization.search import EvolutionConfig, evolution_search
from onceforall.supernet.space import get_space


def main(space_name: str = "imagenet-mbv3") -> None:
    space = get_space(space_name)
    model = PredictorMLP(encoding_size(space))
    model.reset_parameters(torch.Generator().manual_seed(0))
    predictor = AccuracyPredictor(space, model.eval(), HIDDEN, {})
    table = CostTable.build(space)
    lo, hi = (float(table.macs([c])[0]) for c in (space.min_config(), space.max_config()))
    budget = lo + 0.3 * (hi - lo)
    start = time.perf_counter()
    result = evolution_search(space, predictor.predict, table.macs, budget,
                              np.random.default_rng(0), EvolutionConfig(), metric_name="macs")
    wall = time.perf_counter() - start
    print(f"{space.name}: population 100 x 500 generations in {wall:.2f} s wall "
          f"(torch threads {torch.get_num_threads()}), evaluated {result.evaluated}, "
          f"fallbacks {result.fallbacks}, best {result.best_score:.3f} at {result.best_metric:.4g} "
          f"MACs <= {budget:.4g}, pareto {len(result.pareto)} points")


if __name__ == "__main__":
    main(*sys.argv[1:])
