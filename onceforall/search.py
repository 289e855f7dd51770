"""Evolutionary search for the best subnet under a hard budget (OFA paper, Sec. 3.4), vectorised.

The reference code builds one dict per candidate and rejects infeasible ones in ``while True`` loops,
which hangs forever on a tight budget. Here the whole population is a :class:`SubnetBatch` (integer
arrays), each generation is a handful of numpy operations plus one batched call of the score and
constraint functions, and infeasible candidates are resampled a bounded number of times before falling
back to a feasible parent, and a config seen before is not scored again. A population of 100 for 500
generations takes well under a second.

Algorithm (reference ``EvolutionFinder``): start from ``population`` random feasible configs; every
generation keep the top ``parent_ratio`` as parents and breed ``population`` children, a
``mutation_ratio`` share by mutation (each resolution, depth, kernel and expand gene redrawn with
probability ``mutate_prob``) and the rest by uniform crossover of two distinct parents; the next
population is parents + children (elitist). Skipped blocks keep their genes (latent), so a depth
mutation wakes a block with its own choices, as in the reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import UserError
from .space import SearchSpace, SubnetConfig
from .subnet_batch import SubnetBatch

BatchFn = Callable[[SubnetBatch], np.ndarray]  # (N configs) -> (N,) values


@dataclass(frozen=True)
class EvolutionConfig:
    """Settings of the evolution; the defaults are the paper's."""

    population: int = 100
    generations: int = 500
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    # Tries per infeasible child before it falls back to a (feasible) parent: bounds every loop.
    max_resample: int = 10
    # Random configs evaluated (with the min config) to find the smallest achievable metric value.
    feasibility_samples: int = 1000

    def __post_init__(self) -> None:
        def bad(name: str, what: str, fix: str) -> UserError:
            return UserError(f"{what}, got {getattr(self, name)!r}", field=name, fix=fix)

        if self.population < 2:
            raise bad("population", "must be at least 2", "use e.g. 100")
        if self.generations < 1:
            raise bad("generations", "must be at least 1", "use e.g. 500")
        if not 0 < self.parent_ratio <= 1 or self.n_parents < 1:
            raise bad("parent_ratio", "must leave at least one parent, in (0, 1]", "use e.g. 0.25")
        if not 0 <= self.mutation_ratio <= 1:
            raise bad("mutation_ratio", "must be in [0, 1]", "use e.g. 0.5")
        if not 0 <= self.mutate_prob <= 1:
            raise bad("mutate_prob", "must be in [0, 1]", "use e.g. 0.1")
        if self.max_resample < 0:
            raise bad("max_resample", "must be >= 0", "use e.g. 10")
        if self.feasibility_samples < 0:
            raise bad("feasibility_samples", "must be >= 0", "use e.g. 1000")

    @property
    def n_parents(self) -> int:
        return int(round(self.parent_ratio * self.population))

    @property
    def n_mutations(self) -> int:
        return int(round(self.mutation_ratio * self.population))


@dataclass(frozen=True)
class ParetoPoint:
    metric: float
    score: float
    config: SubnetConfig

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "score": self.score, "config": self.config.to_dict()}


@dataclass(frozen=True)
class SearchResult:
    """The best feasible config and what the search saw on the way."""

    best: SubnetConfig
    best_score: float  # predicted accuracy (%) of ``best``
    best_metric: float  # its constraint value (<= budget)
    budget: float
    metric_name: str
    pareto: tuple[ParetoPoint, ...]  # non-dominated (metric, score) over all evaluated, by metric
    history: tuple[float, ...]  # best score found after each generation
    evaluated: int  # candidates considered (duplicates included; each distinct one is scored once)
    fallbacks: int  # children that stayed infeasible after max_resample tries and became a parent

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best.to_dict(), "best_score": self.best_score,
                "best_metric": self.best_metric, "budget": self.budget,
                "metric_name": self.metric_name, "pareto": [p.to_dict() for p in self.pareto],
                "history": list(self.history), "evaluated": self.evaluated,
                "fallbacks": self.fallbacks}


# ---------------------------------------------------------------------------------------------
# Operators (pure functions of a batch and the generator)


def _gene_choices(space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    return _gene_table(tuple(space.resolutions), tuple(space.depths), tuple(space.kernels),
                       tuple(space.expands), len(space.units), space.num_slots)


@functools.lru_cache(maxsize=32)
def _gene_table(resolutions: tuple, depths: tuple, kernels: tuple, expands: tuple, units: int,
                slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per gene of :meth:`SubnetBatch.genes`: its choices (G, C) padded with the last, and how many."""
    groups = [resolutions] + [depths] * units + [kernels] * slots + [expands] * slots
    width = max(len(g) for g in groups)
    table = np.array([list(g) + [g[-1]] * (width - len(g)) for g in groups], dtype=np.int64)
    return table, np.array([len(g) for g in groups], dtype=np.int64)


def mutate(space: SearchSpace, parents: SubnetBatch, prob: float,
           rng: np.random.Generator) -> SubnetBatch:
    """Redraw each gene (r; d per unit; k and e per slot) with probability ``prob``, uniformly."""
    genes = parents.genes()  # (N, G)
    table, counts = _gene_choices(space)
    pick = (rng.random(genes.shape) * counts).astype(np.int64)  # (N, G) uniform choice index
    fresh = table[np.arange(genes.shape[1]), pick]
    return SubnetBatch.from_genes(np.where(rng.random(genes.shape) < prob, fresh, genes), len(space.units))


def crossover(a: SubnetBatch, b: SubnetBatch, rng: np.random.Generator) -> SubnetBatch:
    """Uniform crossover: every gene from ``a`` or ``b`` with probability 1/2."""
    ga, gb = a.genes(), b.genes()
    return SubnetBatch.from_genes(np.where(rng.random(ga.shape) < 0.5, ga, gb), a.d.shape[1])


def pareto_indices(metric: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the non-dominated points (lower metric, higher score), sorted by metric.

    Of several points with equal (metric, score) only the first is kept.
    """
    order = np.lexsort((-score, metric))  # (N,) metric ascending, then score descending
    s = score[order]
    best_before = np.maximum.accumulate(np.concatenate([[-np.inf], s[:-1]]))  # (N,)
    return order[s > best_before], s[s > best_before]


# ---------------------------------------------------------------------------------------------
# Search


def _values(fn: BatchFn, batch: SubnetBatch, what: str) -> np.ndarray:
    out = np.asarray(fn(batch), dtype=np.float64).reshape(-1)
    if out.shape != (len(batch),):
        raise ValueError(f"the {what} function returned {out.shape} values for {len(batch)} configs")
    if what == "score" and not np.isfinite(out).all():
        raise ValueError("the score function returned NaN or infinite values")
    return out


def smallest_achievable(space: SearchSpace, constraint: BatchFn, rng: np.random.Generator,
                        samples: int = 1000) -> tuple[float, SubnetBatch, np.ndarray]:
    """Smallest metric over the min config and ``samples`` random ones (a measured latency table
    need not be monotone, so the min config alone might not be the cheapest).

    Returns the value, the probe configs and their metric values (reused as a feasible pool).
    """
    probe = SubnetBatch.concat([SubnetBatch.repeat(space.min_config(), 1),
                                SubnetBatch.sample(space, rng, samples)])
    metric = _values(constraint, probe, "constraint")
    if not np.isfinite(metric).any():
        raise ValueError("the constraint function returned no finite value for any config")
    return float(np.nanmin(metric)), probe, metric


def evolution_search(space: SearchSpace, score: BatchFn, constraint: BatchFn, budget: float,
                     rng: np.random.Generator, config: EvolutionConfig = EvolutionConfig(), *,
                     metric_name: str = "metric") -> SearchResult:
    """Best predicted-accuracy subnet with ``constraint(cfg) <= budget``; hard constraint.

    ``score`` and ``constraint`` take a :class:`SubnetBatch` and return (N,) arrays, e.g.
    ``AccuracyPredictor.predict`` and ``CostTable.macs``. ``metric_name`` names the constraint in
    error messages and the result (e.g. ``"macs"``, ``"latency_ms"``).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.number)) \
            or not math.isfinite(budget) or budget <= 0:
        raise UserError(f"the {metric_name} budget must be a positive number, got {budget!r}",
                        field="budget", fix=f"give a positive {metric_name} budget")
    budget = float(budget)
    smallest, probe, probe_metric = smallest_achievable(space, constraint, rng,
                                                        config.feasibility_samples)
    if budget < smallest:
        raise UserError(f"the {metric_name} budget {budget:g} is below the smallest achievable "
                        f"{metric_name} of this space, {smallest:g}", field="budget",
                        fix=f"raise the budget to at least {smallest:g}, or use a search space "
                            f"with smaller choices")
    pool_idx = np.flatnonzero(probe_metric <= budget)
    pool, pool_metric = probe.take(pool_idx), probe_metric[pool_idx]
    fallbacks = 0

    def feasible(make: Callable[[np.ndarray], SubnetBatch],
                 fallback: Callable[[np.ndarray], tuple[SubnetBatch, np.ndarray]],
                 n: int) -> tuple[SubnetBatch, np.ndarray]:
        """``n`` feasible candidates: ``make(rows)`` draws candidates for those rows; rows still
        infeasible after ``max_resample`` redraws take ``fallback(rows)`` (known feasible)."""
        nonlocal fallbacks
        cand = make(np.arange(n))
        if n == 0:  # e.g. mutation_ratio 1: no crossover children; never call fn on nothing
            return cand, np.zeros(0)
        metric = _values(constraint, cand, "constraint")
        for _ in range(config.max_resample):
            rows = np.flatnonzero(~(metric <= budget))  # NaN counts as infeasible
            if rows.size == 0:
                break
            redo = make(rows)
            cand, metric[rows] = cand.put(rows, redo), _values(constraint, redo, "constraint")
        rows = np.flatnonzero(~(metric <= budget))
        if rows.size:
            fallbacks += int(rows.size)
            safe, safe_metric = fallback(rows)
            cand, metric[rows] = cand.put(rows, safe), safe_metric
        return cand, metric

    def pool_fallback(rows: np.ndarray) -> tuple[SubnetBatch, np.ndarray]:
        pick = rng.integers(len(pool), size=rows.size)
        return pool.take(pick), pool_metric[pick]

    # Scores are memoised on the canonical genes (skipped blocks' latent genes do not count): as the
    # population converges most children are configs seen before, and the predictor is the cost.
    cache: dict[bytes, float] = {}
    md = space.max_depth

    def scored(batch: SubnetBatch) -> np.ndarray:
        slot = np.arange(batch.k.shape[1])
        act = (slot % md)[None, :] < batch.d[:, slot // md]
        genes = np.concatenate([batch.r[:, None], batch.d, np.where(act, batch.k, 0),
                                np.where(act, batch.e, 0)], axis=1).astype(np.int32)
        keys = [row.tobytes() for row in genes]
        new = {key: i for i, key in enumerate(keys) if key not in cache}
        if new:
            rows = np.fromiter(new.values(), dtype=np.int64, count=len(new))
            for key, value in zip(new, _values(score, batch.take(rows), "score")):
                cache[key] = float(value)
        return np.fromiter((cache[key] for key in keys), dtype=np.float64, count=len(keys))

    n_pop, n_par, n_mut = config.population, config.n_parents, config.n_mutations
    pop, pop_metric = feasible(lambda rows: SubnetBatch.sample(space, rng, rows.size),
                               pool_fallback, n_pop)
    pop_score = scored(pop)
    seen = [(pop, pop_metric, pop_score)]
    history: list[float] = []
    best = float(pop_score.max())

    for _ in range(config.generations):
        top = np.argsort(-pop_score, kind="stable")[:n_par]  # (P,)
        parents, par_metric, par_score = pop.take(top), pop_metric[top], pop_score[top]

        mum = rng.integers(n_par, size=n_mut)  # (M,) parent of each mutated child
        mutants, mut_metric = feasible(
            lambda rows: mutate(space, parents.take(mum[rows]), config.mutate_prob, rng),
            lambda rows: (parents.take(mum[rows]), par_metric[mum[rows]]), n_mut)

        n_cross = n_pop - n_mut
        a = rng.integers(n_par, size=n_cross)  # (C,) two distinct parents per child when possible
        b = (a + rng.integers(1, n_par, size=n_cross)) % n_par if n_par > 1 else a
        crossed, cross_metric = feasible(
            lambda rows: crossover(parents.take(a[rows]), parents.take(b[rows]), rng),
            lambda rows: (parents.take(a[rows]), par_metric[a[rows]]), n_cross)

        children = SubnetBatch.concat([mutants, crossed])  # (population,)
        child_metric = np.concatenate([mut_metric, cross_metric])
        child_score = scored(children)
        seen.append((children, child_metric, child_score))
        best = max(best, float(child_score.max()))
        history.append(best)

        pop = SubnetBatch.concat([parents, children])
        pop_metric = np.concatenate([par_metric, child_metric])
        pop_score = np.concatenate([par_score, child_score])

    all_configs = SubnetBatch.concat([s[0] for s in seen])
    all_metric = np.concatenate([s[1] for s in seen])
    all_score = np.concatenate([s[2] for s in seen])
    front_idx, _ = pareto_indices(all_metric, all_score)
    front_cfgs = all_configs.take(front_idx).to_configs(space)
    pareto = tuple(ParetoPoint(float(all_metric[i]), float(all_score[i]), c)
                   for i, c in zip(front_idx, front_cfgs))
    # The front's last point has the highest score, and the lowest metric among equal scores.
    top_point = pareto[-1]
    return SearchResult(best=top_point.config, best_score=top_point.score,
                        best_metric=top_point.metric, budget=budget, metric_name=metric_name,
                        pareto=pareto, history=tuple(history), evaluated=len(all_score),
                        fallbacks=fallbacks)
