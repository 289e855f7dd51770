"""Many subnet configs at once, as integer arrays.

The search scores tens of thousands of architectures; building a Python :class:`SubnetConfig` for each
one would cost more than scoring it. A :class:`SubnetBatch` holds the same four fields as arrays of
choice *values* (not indices), so it reads like the canonical JSON shape, and efficiency tables and the
accuracy predictor turn it into numbers with a few numpy gathers.

Entries of skipped blocks may hold any value (the evolution keeps them as latent genes, as the
reference does, so that a depth mutation wakes up a block with its own choices). Every consumer masks
them with :meth:`SubnetBatch.active`; :meth:`SubnetBatch.canonical` and :meth:`SubnetBatch.to_configs`
set them to the smallest choice, as :meth:`SubnetConfig.canonical` does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from ..errors import UserError
from .space import SearchSpace, SubnetConfig


@dataclass(frozen=True, eq=False)
class SubnetBatch:
    """``N`` subnet configs: ``r`` (N,), ``d`` (N, units), ``k`` and ``e`` (N, slots), all int64."""

    r: np.ndarray  # (N,)
    d: np.ndarray  # (N, U)
    k: np.ndarray  # (N, S)
    e: np.ndarray  # (N, S)

    def __post_init__(self) -> None:
        for name, ndim in (("r", 1), ("d", 2), ("k", 2), ("e", 2)):
            arr = np.asarray(getattr(self, name), dtype=np.int64)
            if arr.ndim != ndim:
                raise ValueError(f"SubnetBatch.{name} must be {ndim}-D, got shape {arr.shape}")
            object.__setattr__(self, name, arr)
        n = self.r.shape[0]
        if not self.d.shape[0] == self.k.shape[0] == self.e.shape[0] == n:
            raise ValueError(f"SubnetBatch rows disagree: r {self.r.shape}, d {self.d.shape}, "
                             f"k {self.k.shape}, e {self.e.shape}")
        if self.k.shape != self.e.shape:
            raise ValueError(f"SubnetBatch k {self.k.shape} and e {self.e.shape} differ in shape")

    @classmethod
    def _of(cls, r: np.ndarray, d: np.ndarray, k: np.ndarray, e: np.ndarray) -> "SubnetBatch":
        """A batch from arrays already int64 and consistent (row ops of valid batches): skips the
        checks of ``__init__``, which would otherwise be a good part of the search's inner loop."""
        batch = object.__new__(cls)
        for name, arr in (("r", r), ("d", d), ("k", k), ("e", e)):
            object.__setattr__(batch, name, arr)
        return batch

    def __len__(self) -> int:
        return int(self.r.shape[0])

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_configs(cls, cfgs: Sequence[SubnetConfig]) -> "SubnetBatch":
        if len(cfgs) == 0:
            raise ValueError("SubnetBatch.from_configs needs at least one config")
        return cls(np.array([c.r for c in cfgs]), np.array([c.d for c in cfgs]),
                   np.array([c.k for c in cfgs]), np.array([c.e for c in cfgs]))

    @classmethod
    def repeat(cls, cfg: SubnetConfig, n: int) -> "SubnetBatch":
        return cls(np.full(n, cfg.r), np.tile(cfg.d, (n, 1)), np.tile(cfg.k, (n, 1)),
                   np.tile(cfg.e, (n, 1)))

    @classmethod
    def sample(cls, space: SearchSpace, rng: np.random.Generator, n: int) -> "SubnetBatch":
        """``n`` uniform random configs; skipped slots keep random (latent) choices."""
        return cls(rng.choice(np.asarray(space.resolutions), size=n),
                   rng.choice(np.asarray(space.depths), size=(n, len(space.units))),
                   rng.choice(np.asarray(space.kernels), size=(n, space.num_slots)),
                   rng.choice(np.asarray(space.expands), size=(n, space.num_slots)))

    def genes(self) -> np.ndarray:
        """(N, 1 + U + 2S) every gene in one array: r, d, k, e (see :meth:`from_genes`)."""
        return np.concatenate([self.r[:, None], self.d, self.k, self.e], axis=1)

    @classmethod
    def from_genes(cls, genes: np.ndarray, units: int) -> "SubnetBatch":
        genes = np.asarray(genes, dtype=np.int64)
        slots = (genes.shape[1] - 1 - units) // 2
        return cls._of(genes[:, 0], genes[:, 1:1 + units], genes[:, 1 + units:1 + units + slots],
                       genes[:, 1 + units + slots:])

    @staticmethod
    def gene_layout(space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
        """For gene matrices (:meth:`genes`): gene ``g`` of a row is active when ``position[g] <
        row[depth_col[g]]``. r and d always are (position -1 against the first depth); k and e
        of slot ``s`` when ``s`` is within its unit's depth (as :meth:`active`)."""
        units = len(space.units)
        position, unit = _slot_layout(space.num_slots, space.max_depth)
        fixed = np.full(1 + units, -1)
        return (np.concatenate([fixed, position[0], position[0]]),
                1 + np.concatenate([np.zeros(1 + units, dtype=np.int64), unit, unit]))

    @staticmethod
    def concat(batches: Sequence["SubnetBatch"]) -> "SubnetBatch":
        return SubnetBatch._of(np.concatenate([b.r for b in batches]),
                               np.concatenate([b.d for b in batches]),
                               np.concatenate([b.k for b in batches]),
                               np.concatenate([b.e for b in batches]))

    # -- row operations -----------------------------------------------------------------------
    def take(self, idx: np.ndarray) -> "SubnetBatch":
        return SubnetBatch._of(self.r[idx], self.d[idx], self.k[idx], self.e[idx])

    # -- meaning ------------------------------------------------------------------------------
    def active(self, space: SearchSpace) -> np.ndarray:
        """(N, S) bool: slot ``s`` is active when ``s % max_depth < d[unit(s)]``."""
        position, unit = _slot_layout(self.k.shape[1], space.max_depth)
        return position < self.d[:, unit]

    def canonical(self, space: SearchSpace) -> "SubnetBatch":
        act = self.active(space)
        return SubnetBatch(self.r, self.d, np.where(act, self.k, min(space.kernels)),
                           np.where(act, self.e, min(space.expands)))

    def to_configs(self, space: SearchSpace) -> list[SubnetConfig]:
        c = self.canonical(space)
        return [SubnetConfig(int(c.r[i]), tuple(c.d[i].tolist()), tuple(c.k[i].tolist()),
                             tuple(c.e[i].tolist())) for i in range(len(c))]

    def indices(self, space: SearchSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Choice indices into the sorted choices ``(r (N,), k (N,S), e (N,S), active (N,S))``.

        Raises :class:`UserError` when a shape does not fit the space or an active entry is not one
        of the space's choices. Skipped slots may hold anything; their index is a valid one (0 where
        the value is not a choice), so it can be gathered with and masked by ``active``.
        """
        if self.d.shape[1] != len(space.units) or self.k.shape[1] != space.num_slots:
            raise UserError(f"configs have {self.d.shape[1]} units and {self.k.shape[1]} block slots, "
                            f"the space {space.name!r} has {len(space.units)} and {space.num_slots}",
                            field="d", fix=f"use configs of the space {space.name!r}")
        if choice_index(self.d, space.depths).min(initial=0) < 0:
            check_choices(self.d, space.depths, "d")
        r_idx = choice_index(self.r, space.resolutions)
        if r_idx.min(initial=0) < 0:
            check_choices(self.r, space.resolutions, "r")
        act = self.active(space)
        out = []
        # The search only ever holds valid choices, so the masked check runs only when one is not.
        for name, values, allowed in (("k", self.k, space.kernels), ("e", self.e, space.expands)):
            idx = choice_index(values, allowed)
            if idx.min(initial=0) < 0:
                bad = act & (idx < 0)
                if bad.any():
                    check_choices(values[bad], allowed, name)
                idx = np.maximum(idx, 0)
            out.append(idx)
        return r_idx, out[0], out[1], act


BatchLike = Union[SubnetBatch, SubnetConfig, Sequence[SubnetConfig]]


def as_batch(cfgs: BatchLike) -> SubnetBatch:
    if isinstance(cfgs, SubnetBatch):
        return cfgs
    if isinstance(cfgs, SubnetConfig):
        return SubnetBatch.from_configs([cfgs])
    return SubnetBatch.from_configs(list(cfgs))


@functools.lru_cache(maxsize=64)
def _slot_layout(slots: int, max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(1, S) position of each slot in its unit, (S,) its unit."""
    slot = np.arange(slots)
    return (slot % max_depth)[None, :], slot // max_depth


@functools.lru_cache(maxsize=64)
def _lut(choices: tuple[int, ...]) -> np.ndarray:
    """value -> index in sorted(choices); -1 elsewhere, and in the sentinel slot at the end."""
    ordered = np.asarray(sorted(choices), dtype=np.int64)
    if ordered[0] < 1:
        raise ValueError(f"choices must be positive integers, got {sorted(choices)}")
    lut = np.full(int(ordered[-1]) + 2, -1, dtype=np.int64)
    lut[ordered] = np.arange(len(ordered))
    lut.setflags(write=False)
    return lut


def choice_index(values: np.ndarray, choices: Sequence[int]) -> np.ndarray:
    """Index of each value in ``sorted(choices)``, -1 where it is not a choice (same shape)."""
    lut = _lut(tuple(choices))
    # Values above the largest choice clip to the sentinel slot at the end, which holds -1; values
    # below 0 clip to slot 0, which holds -1 too, as choices are positive (SearchSpace checks).
    return lut.take(values, mode="clip")


def check_choices(values: np.ndarray, choices: Sequence[int], name: str) -> None:
    bad = sorted(set(np.unique(values).tolist()) - set(choices))
    if bad:
        raise UserError(f"values {bad} are not in the space's choices {sorted(choices)}",
                        field=name, fix=f"use only {sorted(choices)}")
