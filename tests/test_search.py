"""Evolutionary search: determinism, hard constraint, near-optimality, budget errors, Pareto front."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onceforall.supernet.efficiency import CostTable, subnet_macs
from onceforall.errors import UserError
from onceforall.specialization.search import (
    EvolutionConfig, crossover, evolution_search, mutate, pareto_indices)
from onceforall.supernet.space import SearchSpace, UnitSpec, fashion_mnist_space
from onceforall.supernet.subnet_batch import SubnetBatch

SMALL = EvolutionConfig(population=40, generations=40)


def toy_score(space: SearchSpace):
    """Accuracy = sum of the kernel and expand choices of the active blocks."""
    def score(batch: SubnetBatch) -> np.ndarray:
        act = batch.active(space)
        return (act * (batch.k + batch.e)).sum(1).astype(np.float64)
    return score


def toy_space() -> SearchSpace:
    """Small enough to enumerate (2 resolutions x 20^4 architectures = 320,000 configs)."""
    return SearchSpace(
        name="toy", in_channels=1, num_classes=10, stem_width=8, stem_stride=1,
        first_block_width=8,
        units=(UnitSpec(16, 2), UnitSpec(24, 2, "relu", True), UnitSpec(32, 2, "hswish", True),
               UnitSpec(48, 1, "hswish", True)),
        depths=(1, 2), kernels=(3, 5), expands=(3, 6), resolutions=(20, 24),
        final_expand_width=64, feature_width=64)


def enumerate_space(space: SearchSpace) -> SubnetBatch:
    """Every canonical config of a tiny space, as one batch."""
    per_unit = []  # options of one unit: (depth, k per slot, e per slot)
    md = space.max_depth
    for d in space.depths:
        for ks in itertools.product(space.kernels, repeat=d):
            for es in itertools.product(space.expands, repeat=d):
                pad = md - d
                per_unit.append((d, ks + (min(space.kernels),) * pad,
                                 es + (min(space.expands),) * pad))
    n_opt, n_units = len(per_unit), len(space.units)
    d_opt = np.array([o[0] for o in per_unit])  # (O,)
    k_opt = np.array([o[1] for o in per_unit])  # (O, md)
    e_opt = np.array([o[2] for o in per_unit])
    grid = np.stack(np.meshgrid(*[np.arange(n_opt)] * n_units, indexing="ij"), -1).reshape(-1, n_units)
    rows = []
    for r in space.resolutions:
        rows.append(SubnetBatch(np.full(len(grid), r), d_opt[grid],
                                k_opt[grid].reshape(len(grid), -1),
                                e_opt[grid].reshape(len(grid), -1)))
    return SubnetBatch.concat(rows)


@pytest.fixture(scope="module")
def fashion():
    space = fashion_mnist_space()
    table = CostTable.build(space)
    macs = lambda cfg: int(table.macs([cfg])[0])  # noqa: E731
    budget = macs(space.min_config()) + 0.3 * (macs(space.max_config()) - macs(space.min_config()))
    return space, table, budget


def test_seeded_determinism(fashion):
    space, table, budget = fashion
    runs = [evolution_search(space, toy_score(space), table.macs, budget,
                             np.random.default_rng(seed), SMALL) for seed in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert runs[0].history != runs[2].history or runs[0].pareto != runs[2].pareto


def test_best_satisfies_constraint_and_front_is_non_dominated(fashion):
    space, table, budget = fashion
    result = evolution_search(space, toy_score(space), table.macs, budget,
                              np.random.default_rng(0), SMALL, metric_name="macs")
    assert result.best_metric <= budget
    assert subnet_macs(space, result.best) == result.best_metric
    assert space.validate_config(result.best) == result.best
    assert toy_score(space)(SubnetBatch.from_configs([result.best]))[0] == result.best_score
    assert len(result.history) == SMALL.generations
    assert all(b >= a for a, b in zip(result.history, result.history[1:]))
    assert result.history[-1] == result.best_score
    assert result.evaluated == SMALL.population * (SMALL.generations + 1)

    metric = np.array([p.metric for p in result.pareto])
    score = np.array([p.score for p in result.pareto])
    assert (np.diff(metric) > 0).all() and (np.diff(score) > 0).all()  # strictly: no dominance
    assert (metric <= budget).all() and result.pareto[-1].config == result.best
    for p in result.pareto:  # every front point's numbers belong to its config
        assert subnet_macs(space, p.config) == p.metric
    assert result.to_dict()["best"] == result.best.to_dict()


def test_pareto_indices_brute_force():
    rng = np.random.default_rng(5)
    metric, score = rng.integers(0, 20, 300).astype(float), rng.integers(0, 20, 300).astype(float)
    idx, _ = pareto_indices(metric, score)
    front = set(zip(metric[idx], score[idx]))
    expected = {(m, s) for m, s in zip(metric, score)
                if not ((metric <= m) & (score >= s) & ((metric < m) | (score > s))).any()}
    assert front == expected and len(idx) == len(front)


def test_finds_the_optimum_of_an_enumerable_space():
    space = toy_space()
    table = CostTable.build(space)
    everything = enumerate_space(space)
    assert len(everything) == 2 * 20**4
    macs, score = table.macs(everything), toy_score(space)(everything)
    budget = float(np.quantile(macs, 0.2))
    optimum = score[macs <= budget].max()
    assert optimum < score.max()  # the budget binds
    result = evolution_search(space, toy_score(space), table.macs, budget,
                              np.random.default_rng(0), EvolutionConfig(generations=150))
    assert result.best_metric <= budget
    # Near-optimal: elitist evolution may settle one gene step (k +2 or e +3) short of the optimum.
    assert result.best_score >= 0.97 * optimum


def test_tight_budget_stays_bounded_and_feasible(fashion):
    """A budget just above the min config: random and mutated children are nearly all infeasible;
    the bounded resampling falls back to parents instead of looping."""
    space, table, _ = fashion
    budget = float(table.macs([space.min_config()])[0]) * 1.01
    result = evolution_search(space, toy_score(space), table.macs, budget,
                              np.random.default_rng(0), EvolutionConfig(population=20, generations=10,
                                                                        max_resample=3))
    assert result.fallbacks > 0 and result.best_metric <= budget


@pytest.mark.parametrize("budget", [0, -5.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_budget_raises(fashion, budget):
    space, table, _ = fashion
    with pytest.raises(UserError, match="budget"):
        evolution_search(space, toy_score(space), table.macs, budget, np.random.default_rng(0), SMALL)


def test_infeasible_budget_names_the_smallest_value(fashion):
    space, table, _ = fashion
    smallest = int(table.macs([space.min_config()])[0])
    with pytest.raises(UserError) as err:
        evolution_search(space, toy_score(space), table.macs, smallest - 1,
                         np.random.default_rng(0), SMALL, metric_name="macs")
    text = str(err.value)
    assert "budget" in text and f"{smallest - 1:g}" in text and f"{smallest:g}" in text
    assert "fix" in text


def test_operators_keep_values_in_the_space():
    space = fashion_mnist_space()
    rng = np.random.default_rng(3)
    a, b = SubnetBatch.sample(space, rng, 500), SubnetBatch.sample(space, rng, 500)
    for child in (mutate(space, a, 0.5, rng), crossover(a, b, rng)):
        child.indices(space)  # raises on any value outside the space
        for cfg in child.to_configs(space)[:20]:
            space.validate_config(cfg)
    unchanged = mutate(space, a, 0.0, rng)
    assert np.array_equal(unchanged.k, a.k) and np.array_equal(unchanged.r, a.r)
    same = crossover(a, a, rng)
    assert np.array_equal(same.e, a.e)


def test_bad_evolution_config_raises():
    with pytest.raises(UserError, match="parent_ratio"):
        EvolutionConfig(population=10, parent_ratio=0.01)
    with pytest.raises(UserError, match="population"):
        EvolutionConfig(population=1)


@pytest.mark.parametrize("mutation_ratio", [0.0, 1.0])
def test_all_mutation_or_all_crossover(fashion, mutation_ratio):
    space, table, budget = fashion
    cfg = EvolutionConfig(population=10, generations=5, mutation_ratio=mutation_ratio,
                          feasibility_samples=0)
    result = evolution_search(space, toy_score(space), table.macs, budget, np.random.default_rng(0),
                              cfg)
    assert result.best_metric <= budget and result.evaluated == 60


def test_each_distinct_config_is_scored_once():
    """Scores are memoised on the canonical genes: converged populations cost no predictor calls."""
    space = toy_space()
    costs = CostTable.build(space)
    base = toy_score(space)
    seen: list[bytes] = []

    def score(batch: SubnetBatch) -> np.ndarray:
        canon = batch.canonical(space)
        genes = np.concatenate([canon.r[:, None], canon.d, canon.k, canon.e], 1)
        seen.extend(row.tobytes() for row in genes)
        return base(batch)

    budget = float(np.median(costs.macs(SubnetBatch.sample(space, np.random.default_rng(1), 200))))
    result = evolution_search(space, score, costs.macs, budget, np.random.default_rng(0), SMALL)
    assert len(seen) == len(set(seen)), "a config was scored twice"
    assert len(seen) < result.evaluated / 2  # the population converges: most children were seen
    again = evolution_search(space, base, costs.macs, budget, np.random.default_rng(0), SMALL)
    assert again.best == result.best and again.best_score == result.best_score
