"""Hardware targets: what to specialize for, read from YAML and validated.

```yaml
targets:
  - name: edge-cpu-1t          # [a-z0-9-], unique; names the model folder and metric labels
    runtime: onnxruntime       # onnxruntime | torch
    threads: 1                 # intra-op threads the model gets on the device
    batch_size: 1
    constraint: {kind: latency_ms, budget: 2.0}   # latency_ms | macs | params
    # latency_ms only, optional: the search plans for budget * (1 - headroom_pct / 100), so that
    # the card and a later reproduction, measured at other moments of a noisy host, stay in budget
    #   constraint: {kind: latency_ms, budget: 2.0, headroom_pct: 5}
    # latency_ms only, instead of budget: a fraction of the slowest subnet's latency (the max
    # subnet, as this target's own latency table predicts it), resolved to ms once the table is
    # measured and recorded so in search.json and the model card ("budget" beside it)
    #   constraint: {kind: latency_ms, budget_of_max: 0.5, headroom_pct: 5}
    placement:                 # where the profile/export pods run on the cluster (optional)
      node_selector: {kubernetes.io/arch: arm64}
      tolerations: [{key: edge, operator: Exists, effect: NoSchedule}]
```
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError

RUNTIMES = ("onnxruntime", "torch")
CONSTRAINTS = ("latency_ms", "macs", "params")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


@dataclass(frozen=True)
class Constraint:
    kind: str
    budget: float | None  # None: budget_of_max, not resolved yet
    # latency_ms: the search plans for search_budget, this much under the budget; the card and a
    # reproduction are judged against the budget itself
    headroom_pct: float = 0.0
    # latency_ms: the budget as a fraction of the max subnet's latency on the target's own table.
    # A latency in ms holds for one kind of hardware only; a fraction binds alike on a slow and a
    # fast host (the example targets' hosts differed 2-4x: a budget that bound on one let 72 of 81
    # uniform subnets fit on the other, or none)
    budget_of_max: float | None = None

    @property
    def search_budget(self) -> float:
        if self.budget is None:
            raise UserError(f"the latency budget is {self.budget_of_max:g} of the max subnet's latency "
                            "and not resolved to ms yet", field="constraint.budget",
                            fix="resolve it against the target's latency table (resolve_budget) first")
        return self.budget * (1.0 - self.headroom_pct / 100.0)

    def resolved(self, max_ms: float) -> "Constraint":
        """A budget_of_max budget in ms, for a table whose max subnet takes ``max_ms``."""
        if self.budget_of_max is None:
            return self
        return replace(self, budget=float(f"{self.budget_of_max * max_ms:.6g}"))  # 6 digits

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **({"budget": self.budget} if self.budget is not None else {}),
                **({"budget_of_max": self.budget_of_max} if self.budget_of_max is not None else {}),
                **({"headroom_pct": self.headroom_pct} if self.headroom_pct else {})}


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str
    threads: int
    batch_size: int
    constraint: Constraint
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "runtime": self.runtime, "threads": self.threads,
                "batch_size": self.batch_size, "description": self.description,
                "constraint": self.constraint.to_dict(),
                "placement": {"node_selector": dict(self.node_selector),
                              "tolerations": [dict(t) for t in self.tolerations]}}

    @classmethod
    def from_dict(cls, raw: Any, source: str | None = None, where: str = "target") -> "Target":
        """A target spec, or one as search.json and a model card record it: with a budget_of_max
        budget resolved to ms beside it (``budget`` then holds)."""
        return _parse_target(raw, source, where, resolved_ok=True)


def load_targets(path: str | Path) -> list[Target]:
    import yaml

    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise UserError("targets file not found", source=src, field="targets",
                        fix="give a YAML file like examples/targets.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise UserError(f"not valid YAML ({where}: {getattr(exc, 'problem', exc)})", source=src,
                        fix="correct the YAML syntax") from None
    return parse_targets(raw, src)


def parse_targets(raw: Any, source: str | None = None) -> list[Target]:
    if not isinstance(raw, dict) or "targets" not in raw:
        raise UserError("must be a mapping with a `targets:` list", source=source, field="targets",
                        fix="start the file with `targets:` and list one mapping per target")
    items = raw["targets"]
    if not isinstance(items, list) or not items:
        raise UserError("must be a non-empty list", source=source, field="targets",
                        fix="list at least one target")
    targets = [_parse_target(item, source, f"targets[{i}]") for i, item in enumerate(items)]
    seen: set[str] = set()
    for i, t in enumerate(targets):
        if t.name in seen:
            raise UserError(f"duplicate target name {t.name!r}", source=source,
                            field=f"targets[{i}].name", fix="give every target its own name")
        seen.add(t.name)
    return targets


def _parse_target(raw: Any, source: str | None, where: str, resolved_ok: bool = False) -> Target:
    def err(f: str, what: str, fix: str) -> UserError:
        return UserError(what, source=source, field=f"{where}.{f}" if f else where, fix=fix)

    if not isinstance(raw, dict):
        raise err("", "each target must be a mapping", "write name, runtime, threads, batch_size, "
                                                        "constraint")
    known = {"name", "runtime", "threads", "batch_size", "constraint", "placement", "description"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise err(unknown[0], "unknown key", f"known keys are {sorted(known)}")
    for key in ("name", "runtime", "constraint"):
        if key not in raw:
            raise err(key, "missing", "every target needs name, runtime and constraint")
    name = raw["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise err("name", f"{name!r} is not a valid name",
                  "use lower-case letters, digits and '-', at most 63 characters")
    runtime = raw["runtime"]
    if runtime not in RUNTIMES:
        raise err("runtime", f"unknown runtime {runtime!r}", f"use one of {list(RUNTIMES)}")
    ints = {}
    for key, default in (("threads", 1), ("batch_size", 1)):
        v = raw.get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON through protobuf (KFP parameters) turns every number into a double
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise err(key, f"must be a positive integer, got {v!r}", "use e.g. 1 or 2")
        ints[key] = v
    c = raw["constraint"]
    keys = {"kind", "budget", "budget_of_max", "headroom_pct"}
    if (not isinstance(c, dict) or "kind" not in c or not set(c) <= keys
            or not {"budget", "budget_of_max"} & set(c)):
        raise err("constraint", f"must be {{kind, budget}} (and for latency_ms, optionally "
                                f"headroom_pct; or budget_of_max instead of budget), got {c!r}",
                  "write constraint: {kind: latency_ms, budget: 2.0}")
    if c["kind"] not in CONSTRAINTS:
        raise err("constraint.kind", f"unknown constraint kind {c['kind']!r}",
                  f"use one of {list(CONSTRAINTS)}")
    for key in ("headroom_pct", "budget_of_max"):
        if key in c and c["kind"] != "latency_ms":
            raise err(f"constraint.{key}", f"applies to latency_ms budgets only, not {c['kind']}",
                      "remove it: MACs and parameter counts are exact, not measured, and the same "
                      "on every host")
    if "budget" in c and "budget_of_max" in c and not resolved_ok:
        raise err("constraint.budget_of_max", "give budget or budget_of_max, not both",
                  "keep budget (ms, for one kind of hardware) or budget_of_max (a fraction of the "
                  "max subnet's latency on the target's table)")
    budget = c.get("budget")
    if "budget" in c and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                          or not math.isfinite(budget) or budget <= 0):
        raise err("constraint.budget", f"must be a positive number, got {budget!r}",
                  "give the budget in the kind's unit (ms, MACs or parameters)")
    of_max = c.get("budget_of_max")
    if "budget_of_max" in c and (not isinstance(of_max, (int, float)) or isinstance(of_max, bool)
                                 or not math.isfinite(of_max) or not 0 < of_max <= 1):
        raise err("constraint.budget_of_max", f"must be a fraction in (0, 1], got {of_max!r}",
                  "give e.g. 0.5: half the latency of the max subnet on this target")
    headroom = c.get("headroom_pct", 0.0)
    if (not isinstance(headroom, (int, float)) or isinstance(headroom, bool)
            or not math.isfinite(headroom) or not 0 <= headroom < 50):
        raise err("constraint.headroom_pct", f"must be a percentage in [0, 50), got {headroom!r}",
                  "give e.g. 5: the search then plans for 95% of the budget")
    placement = raw.get("placement") or {}
    if not isinstance(placement, dict) or set(placement) - {"node_selector", "tolerations"}:
        raise err("placement", "must be a mapping with node_selector and/or tolerations",
                  "write placement: {node_selector: {...}, tolerations: [...]}")
    selector, tolerations = check_placement(placement.get("node_selector") or {},
                                            placement.get("tolerations") or [], err)
    return Target(name, runtime, ints["threads"], ints["batch_size"],
                  Constraint(c["kind"], None if budget is None else float(budget), float(headroom),
                             None if of_max is None else float(of_max)), dict(selector),
                  tuple(dict(t) for t in tolerations), str(raw.get("description", "")))


def check_placement(selector: Any, tolerations: Any, err=None) -> tuple[dict[str, str], list[dict]]:
    """A node selector (label -> string) and a list of Kubernetes tolerations, checked."""
    err = err or (lambda f, what, fix: UserError(what, field=f, fix=fix))
    if not isinstance(selector, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in selector.items()):
        raise err("placement.node_selector", "must map label names to string values",
                  'write e.g. {kubernetes.io/arch: "arm64"} (quote numbers)')
    if not isinstance(tolerations, list):
        raise err("placement.tolerations", "must be a list", "write a list of toleration mappings")
    for i, tol in enumerate(tolerations):
        if not isinstance(tol, dict) or not set(tol) <= TOLERATION_KEYS or not tol:
            raise err(f"placement.tolerations[{i}]", f"not a Kubernetes toleration: {tol!r}",
                      f"use the keys {sorted(TOLERATION_KEYS)}")
    return dict(selector), [dict(t) for t in tolerations]


EXAMPLE_TARGETS = Path(__file__).parent.parent / "resources" / "targets.yaml"
#: the example targets for an ImageNet supernet: the specialize-only pipeline's defaults
IMAGENET_TARGETS = Path(__file__).parent.parent / "resources" / "targets-imagenet.yaml"


def pipeline_items(targets: list[Target]) -> list[dict[str, Any]]:
    """Targets as the pipeline's ``targets`` parameter: one item per ParallelFor iteration, with the
    placement at the top level, because a loop item's fields can be read one level deep only."""
    return [{"name": t.name, "spec": t.to_dict(), "node_selector": dict(t.node_selector),
             "tolerations": [dict(x) for x in t.tolerations]} for t in targets]
