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

from ..errors import UserError
from ..supernet.space import SearchSpace, SubnetConfig
from ..supernet.subnet_batch import SubnetBatch

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


def _mutate_genes(genes: np.ndarray, table: np.ndarray, counts: np.ndarray, prob: float,
                  rng: np.random.Generator) -> np.ndarray:
    if prob <= 0:
        return genes.copy()
    # One uniform u per gene: it mutates when u < prob, and then u / prob is uniform on [0, 1) too,
    # so it also picks the new choice (one draw instead of two, in the search's inner loop).
    u = rng.random(genes.shape)  # (N, G)
    pick = np.minimum((u * (counts / prob)).astype(np.int64), counts - 1)  # (N, G) choice index
    return np.where(u < prob, table[np.arange(genes.shape[1]), pick], genes)


def _crossover_genes(ga: np.ndarray, gb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(ga.shape) < 0.5, ga, gb)


def mutate(space: SearchSpace, parents: SubnetBatch, prob: float,
           rng: np.random.Generator) -> SubnetBatch:
    """Redraw each gene (r; d per unit; k and e per slot) with probability ``prob``, uniformly."""
    table, counts = _gene_choices(space)
    return SubnetBatch.from_genes(_mutate_genes(parents.genes(), table, counts, prob, rng),
                                  len(space.units))


def crossover(a: SubnetBatch, b: SubnetBatch, rng: np.random.Generator) -> SubnetBatch:
    """Uniform crossover: every gene from ``a`` or ``b`` with probability 1/2."""
    return SubnetBatch.from_genes(_crossover_genes(a.genes(), b.genes(), rng), a.d.shape[1])


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
    # The population lives in gene matrices (N, G): r, d, k, e side by side (SubnetBatch.genes), so
    # that a row operation is one numpy call; score and constraint see SubnetBatch views of them.
    units = len(space.units)
    table, counts = _gene_choices(space)
    pool_idx = np.flatnonzero(probe_metric <= budget)
    pool, pool_metric = probe.take(pool_idx).genes(), probe_metric[pool_idx]
    fallbacks = 0

    def metric_of(genes: np.ndarray) -> np.ndarray:
        return _values(constraint, SubnetBatch.from_genes(genes, units), "constraint")

    def feasible(draw: Callable[[np.ndarray], np.ndarray],
                 fallback: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                 n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` feasible candidates. ``draw(rows)`` draws a candidate for each of ``rows`` (which
        repeat); a row gets up to 1 + max_resample draws, the first feasible one kept, and rows
        without one take ``fallback(rows)`` (known feasible). The redraws of rows still infeasible
        go in doubling batches (2, 4, ... per row, one constraint call each) and a row keeps the
        first feasible one, as drawing one at a time would: a few calls instead of up to
        max_resample."""
        nonlocal fallbacks
        genes = np.empty((n, table.shape[0]), dtype=np.int64)
        metric = np.empty(n)
        todo, left, reps = np.arange(n), 1 + config.max_resample, 1
        while todo.size and left:
            reps = min(reps, left)
            cand = draw(todo if reps == 1 else np.repeat(todo, reps))  # (T * reps, G) a row's draws together
            m = metric_of(cand)
            ok = (m <= budget).reshape(todo.size, reps)  # NaN counts as infeasible
            has = ok.any(axis=1)
            hit = np.flatnonzero(has)
            src = hit * reps + ok[hit].argmax(axis=1)  # each row's first feasible draw
            genes[todo[hit]], metric[todo[hit]] = cand[src], m[src]
            todo = todo[~has]
            left -= reps
            reps *= 2
        if todo.size:
            fallbacks += int(todo.size)
            genes[todo], metric[todo] = fallback(todo)
        return genes, metric

    def pool_fallback(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.integers(len(pool), size=rows.size)
        return pool[pick], pool_metric[pick]

    # Scores are memoised on the canonical genes (skipped blocks' latent genes do not count): as the
    # population converges most children are configs seen before, and the predictor is the cost.
    cache: dict[bytes, float] = {}
    position, depth_col = SubnetBatch.gene_layout(space)

    def scored(genes: np.ndarray) -> np.ndarray:
        canon = (genes * (position < genes[:, depth_col])).astype(np.uint16)  # skipped genes: 0
        keys = canon.view(np.dtype((np.void, canon.shape[1] * 2))).ravel().tolist()
        new: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in cache and key not in new:
                new[key] = i
        if new:
            rows = np.fromiter(new.values(), dtype=np.int64, count=len(new))
            values = _values(score, SubnetBatch.from_genes(genes[rows], units), "score")
            cache.update(zip(new, values.tolist()))
        return np.fromiter(map(cache.__getitem__, keys), dtype=np.float64, count=len(keys))

    n_pop, n_par, n_mut = config.population, config.n_parents, config.n_mutations
    n_cross = n_pop - n_mut
    pop, pop_metric = feasible(lambda rows: SubnetBatch.sample(space, rng, rows.size).genes(),
                               pool_fallback, n_pop)
    pop_score = scored(pop)
    seen = [(pop, pop_metric, pop_score)]
    history: list[float] = []
    best = float(pop_score.max())

    for _ in range(config.generations):
        top = np.argsort(-pop_score, kind="stable")[:n_par]  # (P,)
        parents, par_metric, par_score = pop[top], pop_metric[top], pop_score[top]
        # children 0..M-1 by mutation of parent mum, M.. by crossover of parents a and b (distinct
        # when possible); a child that stays infeasible falls back to its (first) parent
        mum = rng.integers(n_par, size=n_mut)  # (M,)
        a = rng.integers(n_par, size=n_cross)  # (C,)
        b = (a + rng.integers(1, n_par, size=n_cross)) % n_par if n_par > 1 else a
        first = np.concatenate([mum, a])  # (population,)

        def breed(rows: np.ndarray) -> np.ndarray:
            out = np.empty((rows.size, table.shape[0]), dtype=np.int64)
            by_mutation = rows < n_mut
            m, c = rows[by_mutation], rows[~by_mutation] - n_mut
            if m.size:
                out[by_mutation] = _mutate_genes(parents[mum[m]], table, counts, config.mutate_prob, rng)
            if c.size:
                out[~by_mutation] = _crossover_genes(parents[a[c]], parents[b[c]], rng)
            return out

        children, child_metric = feasible(
            breed, lambda rows: (parents[first[rows]], par_metric[first[rows]]), n_pop)
        child_score = scored(children)
        seen.append((children, child_metric, child_score))
        best = max(best, float(child_score.max()))
        history.append(best)

        pop = np.concatenate([parents, children])
        pop_metric = np.concatenate([par_metric, child_metric])
        pop_score = np.concatenate([par_score, child_score])

    all_configs = SubnetBatch.from_genes(np.concatenate([s[0] for s in seen]), units)
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
