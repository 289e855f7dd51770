"""Search space and subnet configs.

A :class:`SearchSpace` describes the supernet (fixed stem, elastic units, fixed head) and the elastic
choices. A :class:`SubnetConfig` is one architecture in it, in the canonical JSON shape
``{"r": 28, "d": [per unit], "k": [per block slot], "e": [per block slot]}``; block slots are
``len(units) * max(depths)`` long and the entries of skipped blocks carry no meaning (the canonical
form sets them to the smallest choice so equal architectures compare equal).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import UserError

ACTIVATIONS = ("relu", "hswish")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going 10% below it (MobileNet rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


@dataclass(frozen=True)
class UnitSpec:
    """One elastic unit: up to ``max(depths)`` inverted-residual blocks of the same output width."""

    width: int
    stride: int
    act: str = "relu"
    se: bool = False


@dataclass(frozen=True)
class SearchSpace:
    name: str
    in_channels: int
    num_classes: int
    stem_width: int
    stem_stride: int
    first_block_width: int
    units: tuple[UnitSpec, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expands: tuple[int, ...]
    resolutions: tuple[int, ...]
    final_expand_width: int
    feature_width: int
    dropout: float = 0.1
    first_block_stride: int = 1
    # MIT's published supernets (onceforall/supernet/official.py imports them) have no feature-mix bias, and
    # compute their pooled features as the reference code does (ops.pooled); ours differ in both.
    feature_mix_bias: bool = True
    reference_numerics: bool = False

    # -- shape of the space -------------------------------------------------------------------
    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def num_slots(self) -> int:
        return len(self.units) * self.max_depth

    def hidden_channels(self, in_channels: int, expand: int) -> int:
        return make_divisible(round(in_channels * expand), 8)

    def block_in_channels(self, unit: int, index: int) -> int:
        """Input channels of block ``index`` of ``unit`` (the first block takes the previous width)."""
        if index > 0:
            return self.units[unit].width
        return self.units[unit - 1].width if unit > 0 else self.first_block_width

    def num_architectures(self) -> int:
        """Distinct architectures (skipped blocks do not count), resolutions included."""
        per_block = len(self.kernels) * len(self.expands)
        per_unit = sum(per_block**d for d in self.depths)
        return per_unit ** len(self.units) * len(self.resolutions)

    # -- configs ------------------------------------------------------------------------------
    def max_config(self) -> "SubnetConfig":
        return self.uniform_config(max(self.depths), max(self.kernels), max(self.expands),
                                   max(self.resolutions))

    def min_config(self) -> "SubnetConfig":
        return self.uniform_config(min(self.depths), min(self.kernels), min(self.expands),
                                   min(self.resolutions))

    def uniform_config(self, d: int, k: int, e: int, r: int | None = None) -> "SubnetConfig":
        r = max(self.resolutions) if r is None else r
        cfg = SubnetConfig(r=r, d=(d,) * len(self.units), k=(k,) * self.num_slots,
                           e=(e,) * self.num_slots)
        return self.validate_config(cfg)

    def sample(self, rng: np.random.Generator) -> "SubnetConfig":
        """A uniformly random config, drawn from ``rng`` (a seeded generator the caller owns)."""
        return self.sample_many(rng, 1)[0]

    def sample_many(self, rng: np.random.Generator, n: int) -> list["SubnetConfig"]:
        r = rng.choice(np.asarray(self.resolutions), size=n)
        d = rng.choice(np.asarray(self.depths), size=(n, len(self.units)))
        k = rng.choice(np.asarray(self.kernels), size=(n, self.num_slots))
        e = rng.choice(np.asarray(self.expands), size=(n, self.num_slots))
        return [SubnetConfig(int(r[i]), tuple(map(int, d[i])), tuple(map(int, k[i])),
                             tuple(map(int, e[i]))).canonical(self) for i in range(n)]

    def restrict(self, *, depths: Sequence[int] | None = None, kernels: Sequence[int] | None = None,
                 expands: Sequence[int] | None = None,
                 resolutions: Sequence[int] | None = None) -> "SearchSpace":
        """The same supernet with fewer elastic choices (a progressive-shrinking phase samples this)."""
        changes: dict[str, Any] = {}
        for name, values in (("depths", depths), ("kernels", kernels), ("expands", expands),
                             ("resolutions", resolutions)):
            if values is None:
                continue
            allowed = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise UserError(f"choices {list(values)} are not a non-empty subset of {list(allowed)}",
                                field=name, fix=f"pick values from {list(allowed)}")
            changes[name] = tuple(sorted(set(values)))
        if "depths" in changes and max(changes["depths"]) != self.max_depth:
            # Block slots are laid out by the largest depth; dropping it would change the layout.
            raise UserError(f"a restriction must keep the largest depth {self.max_depth}",
                            field="depths", fix=f"include {self.max_depth} in the depths")
        return dataclasses.replace(self, **changes)

    def validate_config(self, cfg: "SubnetConfig", source: str | None = None) -> "SubnetConfig":
        def check(name: str, values: Iterable[int], allowed: Sequence[int], length: int | None):
            values = list(values)
            if length is not None and len(values) != length:
                raise UserError(f"has {len(values)} entries, the space {self.name!r} needs {length}",
                                source=source, field=name,
                                fix=f"give {length} values from {list(allowed)}")
            bad = sorted({v for v in values if v not in allowed})
            if bad:
                raise UserError(f"values {bad} are not in the space's choices {list(allowed)}",
                                source=source, field=name, fix=f"use only {list(allowed)}")

        check("r", [cfg.r], self.resolutions, None)
        check("d", cfg.d, self.depths, len(self.units))
        # Skipped slots are free; only active slots must hold valid choices.
        active = [i for i in range(self.num_slots) if cfg.is_active(i, self.max_depth)]
        check("k", cfg.k, self.kernels + (0,), self.num_slots)
        check("e", cfg.e, self.expands + (0,), self.num_slots)
        check("k", [cfg.k[i] for i in active], self.kernels, None)
        check("e", [cfg.e[i] for i in active], self.expands, None)
        return cfg.canonical(self)

    # -- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["units"] = [dataclasses.asdict(u) for u in self.units]
        for key in ("depths", "kernels", "expands", "resolutions"):
            out[key] = list(out[key])
        for key, default in _OPTIONAL_FLAGS.items():
            if out[key] == default:
                # Left out at its default: sidecars and space files written before the field existed
                # compare equal to the spaces they describe (checkpoint.load_checkpoint compares dicts).
                del out[key]
        return out

    def to_spec(self) -> str:
        """``json:{...}``, one line that get_space reads back."""
        return JSON_SPEC + json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Any, source: str | None = None) -> "SearchSpace":
        return _parse_space(raw, source)


@dataclass(frozen=True)
class SubnetConfig:
    r: int
    d: tuple[int, ...]
    k: tuple[int, ...]
    e: tuple[int, ...]

    def is_active(self, slot: int, max_depth: int) -> bool:
        return slot % max_depth < self.d[slot // max_depth]

    def canonical(self, space: SearchSpace) -> "SubnetConfig":
        kmin, emin = min(space.kernels), min(space.expands)
        k = tuple(v if self.is_active(i, space.max_depth) else kmin for i, v in enumerate(self.k))
        e = tuple(v if self.is_active(i, space.max_depth) else emin for i, v in enumerate(self.e))
        return SubnetConfig(self.r, tuple(self.d), k, e)

    def blocks(self, space: SearchSpace) -> list[tuple[int, int, int, int]]:
        """Active blocks as ``(unit, index, kernel, expand)``."""
        out = []
        for u, depth in enumerate(self.d):
            for i in range(depth):
                slot = u * space.max_depth + i
                out.append((u, i, self.k[slot], self.e[slot]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "d": list(self.d), "k": list(self.k), "e": list(self.e)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Any, space: SearchSpace, source: str | None = None) -> "SubnetConfig":
        if not isinstance(raw, dict):
            raise UserError("a subnet config must be an object {r, d, k, e}", source=source,
                            fix='write e.g. {"r": 28, "d": [...], "k": [...], "e": [...]}')
        missing = [key for key in ("r", "d", "k", "e") if key not in raw]
        if missing:
            raise UserError(f"missing keys {missing}", source=source, field=missing[0],
                            fix="a subnet config has the keys r, d, k, e")
        try:
            cfg = cls(int(raw["r"]), tuple(int(v) for v in raw["d"]),
                      tuple(int(v) for v in raw["k"]), tuple(int(v) for v in raw["e"]))
        except (TypeError, ValueError) as exc:
            raise UserError(f"not integers: {exc}", source=source,
                            fix="r is an integer; d, k and e are lists of integers") from None
        return space.validate_config(cfg, source)


# ---------------------------------------------------------------------------------------------
# Presets and YAML


def fashion_mnist_space() -> SearchSpace:
    """28x28 grayscale, sized so that the `standard` schedule trains on 2 CPU cores in about an hour."""
    return SearchSpace(
        name="fashion-mnist", in_channels=1, num_classes=10,
        # Full resolution only in the stem; the first block halves it (measured: +0.9 points after
        # 3 teacher epochs and 7% faster than a stride-2 stem). 28 -> 14 -> 7 -> 4 -> 4 -> 2.
        stem_width=16, stem_stride=1, first_block_width=16, first_block_stride=2,
        units=(UnitSpec(24, 2, "relu", False), UnitSpec(40, 2, "relu", True),
               UnitSpec(64, 1, "hswish", True), UnitSpec(96, 2, "hswish", True)),
        depths=(2, 3, 4), kernels=(3, 5, 7), expands=(3, 4, 6), resolutions=(20, 24, 28),
        final_expand_width=384, feature_width=512, dropout=0.1,
    )


def imagenet_mbv3_space() -> SearchSpace:
    """The OFA-MobileNetV3 space of the paper (Cai et al., 2020), exactly."""
    return SearchSpace(
        name="imagenet-mbv3", in_channels=3, num_classes=1000,
        stem_width=16, stem_stride=2, first_block_width=16,
        units=(UnitSpec(24, 2, "relu", False), UnitSpec(40, 2, "relu", True),
               UnitSpec(80, 2, "hswish", False), UnitSpec(112, 1, "hswish", True),
               UnitSpec(160, 2, "hswish", True)),
        depths=(2, 3, 4), kernels=(3, 5, 7), expands=(3, 4, 6),
        resolutions=tuple(range(128, 225, 4)),
        final_expand_width=960, feature_width=1280, dropout=0.1,
    )


def ofa_mbv3_space(width_mult: float) -> SearchSpace:
    """The space of MIT's published OFA-MobileNetV3 supernet ``ofa_mbv3_d234_e346_k357_w<mult>``:
    the paper's with every width scaled as the reference scales it, no feature-mix bias and the
    reference's numerics (onceforall/supernet/official.py imports the weights)."""
    paper = imagenet_mbv3_space()

    def scaled(width: int) -> int:
        return make_divisible(width * width_mult, 8)

    return dataclasses.replace(
        paper, name=f"ofa-mbv3-w{width_mult}", stem_width=scaled(paper.stem_width),
        first_block_width=scaled(paper.first_block_width),
        units=tuple(dataclasses.replace(u, width=scaled(u.width)) for u in paper.units),
        final_expand_width=scaled(paper.final_expand_width), feature_width=scaled(paper.feature_width),
        feature_mix_bias=False, reference_numerics=True)


PRESETS = {"fashion-mnist": fashion_mnist_space, "imagenet-mbv3": imagenet_mbv3_space,
           "ofa-mbv3-w1.0": lambda: ofa_mbv3_space(1.0), "ofa-mbv3-w1.2": lambda: ofa_mbv3_space(1.2)}


JSON_SPEC = "json:"


def get_space(name_or_path: str | Path) -> SearchSpace:
    """A preset by name, a YAML file, or ``json:`` and the space as a JSON object
    (``SearchSpace.to_spec``: what the specialize-only pipeline's open-supernet stage hands to the
    stages after it; the prefix keeps a runner from reading the text as a JSON value)."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]()
    if key.startswith(JSON_SPEC):
        try:
            raw = json.loads(key[len(JSON_SPEC):])
        except json.JSONDecodeError as exc:
            raise UserError(f"not a JSON object ({exc})", field="space",
                            fix="write json: and the space as one JSON object") from None
        return _parse_space(raw, "space")
    path = Path(key)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return load_space(path)
    raise UserError(f"unknown search space {key!r}", field="space",
                    fix=f"use one of {sorted(PRESETS)} or a path to a space YAML file")


def load_space(path: str | Path) -> SearchSpace:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", source=str(path), fix="give the path to a space YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise UserError(f"not valid YAML ({where}: {getattr(exc, 'problem', exc)})",
                        source=str(path), fix="correct the YAML syntax") from None
    return _parse_space(raw, str(path))


_INT_LISTS = ("depths", "kernels", "expands", "resolutions")
_INTS = ("in_channels", "num_classes", "stem_width", "stem_stride", "first_block_width",
         "final_expand_width", "feature_width")
_OPTIONAL_FLAGS = {"feature_mix_bias": True, "reference_numerics": False}
_OPTIONAL = {"dropout": 0.1, "first_block_stride": 1, **_OPTIONAL_FLAGS}


def _parse_space(raw: Any, source: str | None) -> SearchSpace:
    def err(field_: str, what: str, fix: str) -> UserError:
        return UserError(what, source=source, field=field_, fix=fix)

    if not isinstance(raw, dict):
        raise err("(top level)", "a search space must be a mapping", "write `key: value` lines")
    known = {f.name for f in dataclasses.fields(SearchSpace)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise err(unknown[0], "unknown key", f"remove it; known keys are {sorted(known)}")
    missing = sorted(known - set(raw) - set(_OPTIONAL))
    if missing:
        raise err(missing[0], "missing", "add it (see the fashion-mnist preset with `ofa space show`)")

    values: dict[str, Any] = {"name": str(raw["name"])}
    for key in _INTS:
        v = raw[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise err(key, f"must be a positive integer, got {v!r}", "give a positive integer")
        values[key] = v
    for key in ("stem_stride", "first_block_stride"):
        v = raw.get(key, _OPTIONAL.get(key))
        if v not in (1, 2) or isinstance(v, bool):
            raise err(key, f"must be 1 or 2, got {v!r}", "use 1 or 2")
        values[key] = v
    for key in _INT_LISTS:
        v = raw[key]
        if (not isinstance(v, list) or not v
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
            raise err(key, f"must be a non-empty list of positive integers, got {v!r}",
                      "write e.g. [3, 5, 7]")
        if len(set(v)) != len(v):
            raise err(key, f"has duplicates: {v}", "list each choice once")
        values[key] = tuple(sorted(v))
    if any(k % 2 == 0 for k in values["kernels"]):
        raise err("kernels", f"kernel sizes must be odd, got {list(values['kernels'])}",
                  "use odd sizes such as 3, 5, 7")
    dropout = raw.get("dropout", _OPTIONAL["dropout"])
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise err("dropout", f"must be in [0, 1), got {dropout!r}", "use e.g. 0.1")
    values["dropout"] = float(dropout)
    for key, default in _OPTIONAL_FLAGS.items():
        flag = raw.get(key, default)
        if not isinstance(flag, bool):
            raise err(key, f"must be true or false, got {flag!r}", "write true or false")
        values[key] = flag

    units = raw["units"]
    if not isinstance(units, list) or not units:
        raise err("units", "must be a non-empty list of {width, stride, act, se}",
                  "write e.g. - {width: 24, stride: 2, act: relu, se: false}")
    parsed = []
    for i, u in enumerate(units):
        f = f"units[{i}]"
        if not isinstance(u, dict) or "width" not in u or "stride" not in u:
            raise err(f, "each unit needs width and stride", "write {width: 24, stride: 2}")
        extra = sorted(set(u) - {"width", "stride", "act", "se"})
        if extra:
            raise err(f"{f}.{extra[0]}", "unknown key", "a unit has width, stride, act, se")
        if not isinstance(u["width"], int) or u["width"] <= 0:
            raise err(f"{f}.width", f"must be a positive integer, got {u['width']!r}",
                      "give a channel count such as 24")
        if u["stride"] not in (1, 2):
            raise err(f"{f}.stride", f"must be 1 or 2, got {u['stride']!r}", "use 1 or 2")
        act = u.get("act", "relu")
        if act not in ACTIVATIONS:
            raise err(f"{f}.act", f"unknown activation {act!r}", f"use one of {list(ACTIVATIONS)}")
        se = u.get("se", False)
        if not isinstance(se, bool):
            raise err(f"{f}.se", f"must be true or false, got {se!r}", "write true or false")
        parsed.append(UnitSpec(u["width"], u["stride"], act, se))
    values["units"] = tuple(parsed)

    space = SearchSpace(**values)
    # Consistency: the network must not shrink the image below 1 pixel at the smallest resolution.
    total_stride = (space.stem_stride * space.first_block_stride
                    * math.prod(u.stride for u in space.units))
    if min(space.resolutions) < total_stride:
        raise err("resolutions", f"smallest resolution {min(space.resolutions)} is below the "
                  f"network's total stride {total_stride}",
                  f"use resolutions >= {total_stride} or fewer stride-2 units")
    return space


def space_yaml(space: SearchSpace) -> str:
    import yaml

    return yaml.safe_dump(space.to_dict(), sort_keys=False)
