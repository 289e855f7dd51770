"""Latency lookup tables measured on the target's own runtime, and their validation.

Every distinct block variant of the space (unit, first-or-later block, resolution, kernel, expand)
and the fixed parts (stem + first block, head) are exported and timed on the target runtime with the
target's threads and batch size, with warm-up and repeats (median), in interleaved rounds (every
model once per round, the smallest median kept) so that a slow moment of a shared host costs a
round, not a table entry. The fixed per-call overhead of the runtime (measured on a one-op graph)
is taken out of every op and added back once, so that the sum of the table is an estimate of one
end-to-end call.

A whole network runs its ops back to back, and on a CPU that is not the sum of ops timed apart:
measured here, the sums came out 6-22% high depending on threads and batch size, consistently for
every subnet. So the build also measures a few random whole subnets on the same runtime and keeps
one calibration factor, the median of measured / summed; a prediction is the calibrated sum of table
entries. A batch of configs is a few numpy gathers, fast enough for the search's inner loop.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..supernet.efficiency import head_input_size, unit_input_sizes
from ..errors import UserError
from .ort_timing import EXPECT_TOLERANCE, WARMUP_S, WINDOW_S, time_many, time_onnx, time_onnx_isolated
from ..supernet.space import SearchSpace, SubnetConfig
from ..supernet.subnet_batch import BatchLike, as_batch
from ..supernet.supernet import OFASupernet

FORMAT = "onceforall-latency-table/1"


def onnx_bytes(module: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = False,
               opset: int = 17) -> bytes:
    """Export ``module`` to an in-memory ONNX model (one file, weights inside).

    The TorchScript exporter is used: it exports a small block in ~50 ms where the dynamo exporter
    takes seconds, which matters for tables of hundreds of variants; both emit the same operators
    for these modules (Conv, BatchNorm folded, HardSwish, ReduceMean, Gemm, HardSigmoid, Mul).
    """
    import warnings

    buf = io.BytesIO()
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}
                          if dynamic_batch else None, do_constant_folding=True)
    return buf.getvalue()


class Replicas(nn.Module):
    """``copies`` independent copies of a module applied to one input, outputs summed.

    Timing K copies in one call amortises the runtime's per-call overhead over K ops, so a block
    of a few microseconds is not lost in the noise of the call itself. Each copy gets slightly
    different weights, so no graph optimizer can merge them.
    """

    def __init__(self, module: nn.Module, copies: int):
        super().__init__()
        reps = []
        for i in range(copies):
            m = copy.deepcopy(module)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1e-3 * (i + 1))
            reps.append(m)
        self.reps = nn.ModuleList(reps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reps[0](x)
        for m in self.reps[1:]:
            out = out + m(x)
        return out


@dataclasses.dataclass(frozen=True)
class Profiler:
    """Times modules on one runtime with fixed threads and batch size."""

    runtime: str = "onnxruntime"
    threads: int = 1
    batch_size: int = 1
    warmup: int = 10
    # The smallest of several medians is what stays the same from one build to the next on a
    # shared 2-core VM (one median of 50 did not: MAPE 2-10%). At 2 threads the host gives the
    # second core for seconds at a time: the same model ran 2.4-4.8 ms a median. With 8
    # interleaved rounds, 50 subnets measured twice differ by 3.1% (MAPE; 3 rounds: 10-17%) and
    # the 2-thread table's error fell from 10.8% to 7.1%.
    repeats: int = 20
    blocks: int = 8  # rounds: the smallest of that many medians (see time_many)

    warmup_s: float = WARMUP_S  # and at least this long (see time_many)
    window_s: float = WINDOW_S  # rounds until they span this long (see time_many)
    # onnxruntime: time the host probe (ort_timing.HOST_PROBE_SHAPE) in the same rounds, and past the
    # window go on for up to max_window_s while it runs slower than probe_expect_ms (the probe's time
    # when the reference was measured, e.g. the latency table's)
    probe: bool = False
    probe_expect_ms: float | None = None
    max_window_s: float = 0.0
    isolate: bool = False  # onnxruntime: time in a fresh child process (ort_timing.time_onnx_isolated)
    chunk: int = 64  # measure_many: at most this many sessions alive and interleaved at once

    @property
    def statistic(self) -> str:
        text = (f"smallest of at least {self.blocks} medians of {self.repeats} calls, as many as "
                f"span {self.window_s:g} s (interleaved rounds when several models are measured), "
                f"after {self.warmup} warm-up calls and at least {self.warmup_s:g} s of calls")
        if self.isolate and self.runtime == "onnxruntime":
            text += ", in a fresh process"
        if self.probe and self.runtime == "onnxruntime":
            text += "; the host probe timed in the same rounds (host_probe_ms)"
            if self.probe_expect_ms is not None and self.max_window_s > self.window_s:
                text += (f", and past the window, up to {self.max_window_s:g} s while it ran more than "
                         f"{EXPECT_TOLERANCE:.0%} slower than its reference (host_probe_reference_ms)")
        return text

    def measure(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        return float(self.measure_many([(module, shape)])[0])

    def measure_many(self, items: Sequence[tuple[nn.Module, tuple[int, ...]]],
                     progress: Callable[[int], None] | None = None,
                     probe_out: list[float] | None = None) -> np.ndarray:
        """(len(items),) ms per call of each (module, input shape without the batch), measured in
        interleaved rounds (time_many), ``chunk`` modules at a time; ``progress(done)`` per chunk.
        With ``probe``, the host probe's time in each chunk's rounds is appended to ``probe_out``."""
        if self.runtime not in ("onnxruntime", "torch"):
            raise UserError(f"unknown runtime {self.runtime!r}", field="runtime",
                            fix="use onnxruntime or torch")
        out = np.zeros(len(items))
        for start in range(0, len(items), self.chunk):
            chunk = items[start:start + self.chunk]
            if self.runtime == "onnxruntime":
                shapes = [shape for _, shape in chunk]
                models = [onnx_bytes(m, torch.zeros(self.batch_size, *shape)) for m, shape in chunk]
                ms, probe_ms = self.measure_onnx(models, shapes)
                out[start:start + len(chunk)] = ms
                if probe_out is not None and probe_ms is not None:
                    probe_out.append(probe_ms)
            else:
                out[start:start + len(chunk)] = self._time_torch(chunk)
            if progress:
                progress(start + len(chunk))
        return out

    def measure_onnx(self, models: Sequence[bytes],
                     shapes: Sequence[tuple[int, ...]]) -> tuple[np.ndarray, float | None]:
        """(len(models),) ms per call of each ONNX model (input shape without the batch), timed
        together in interleaved rounds (time_many); and the host probe's time in the same rounds
        (None without ``probe``)."""
        timer = time_onnx_isolated if self.isolate else time_onnx
        ms = timer(models, [(self.batch_size, *s) for s in shapes], threads=self.threads,
                   probe=self.probe, probe_expect_ms=self.probe_expect_ms, **self.protocol)
        return (ms[:-1], float(ms[-1])) if self.probe else (ms, None)

    @property
    def protocol(self) -> dict[str, Any]:
        """The timing settings as ``ort_timing.time_many`` takes them: a model card records them,
        and onceforall.reproduce measures with the card's own."""
        return dict(warmup=self.warmup, warmup_s=self.warmup_s, repeats=self.repeats,
                    rounds=self.blocks, window_s=self.window_s, max_window_s=self.max_window_s,
                    tolerance=EXPECT_TOLERANCE)

    def _time_torch(self, items: Sequence[tuple[nn.Module, tuple[int, ...]]]) -> np.ndarray:
        fns = []
        for module, shape in items:
            module, x = module.eval(), torch.randn(self.batch_size, *shape)
            fns.append(lambda module=module, x=x: module(x))
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return time_many(fns, **self.protocol)
        finally:
            torch.set_num_threads(prev)

    def overhead(self, tries: int = 5) -> float:
        """The cost of one call of a graph that does almost nothing.

        The smallest of ``tries`` times as many medians as a measurement takes, from one session
        (time_many takes the minimum): a spike from another process during one of them would
        otherwise be subtracted from every op of the table.
        """
        return dataclasses.replace(self, blocks=self.blocks * tries).measure(nn.ReLU(), (1, 4, 4))

    def measure_ops(self, items: Sequence[tuple[nn.Module, tuple[int, ...]]], overhead: float,
                    copies: int = 8, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Each op's share of a call: ``copies`` of it in one graph, less the call overhead, / copies."""
        totals = self.measure_many([(Replicas(m, copies), shape) for m, shape in items], progress)
        return np.maximum(totals - overhead, 0.0) / copies


CARD_MAX_WINDOW_S = 30.0  # a slow stretch right after a 15-minute CI run outlasted 20 s


def card_profiler(runtime: str, threads: int, batch_size: int,
                  probe_expect_ms: float | None = None) -> Profiler:
    """The model card's statistic: export measures the card with it, the search checks its picks
    with it, and onceforall.reproduce (onnxruntime alone) repeats it. The host probe is timed in the
    same rounds; given its reference (``probe_expect_ms``: the latency table's, the card's), rounds
    go on for up to 30 s while the host runs slower than it was then (ort_timing.EXPECT_TOLERANCE).
    ONNX models are timed in a fresh child process (ort_timing.time_onnx_isolated), as reproduce is."""
    onnx = runtime == "onnxruntime"
    return Profiler(runtime, threads, batch_size, warmup=20, repeats=25, blocks=8, probe=onnx,
                    probe_expect_ms=probe_expect_ms if onnx else None, max_window_s=CARD_MAX_WINDOW_S,
                    isolate=True)


@dataclasses.dataclass(frozen=True, eq=False)
class LatencyTable:
    space: SearchSpace
    runtime: str
    threads: int
    batch_size: int
    overhead_ms: float
    fixed_ms: np.ndarray  # (R,) stem + first block + head + one call overhead
    block_ms: np.ndarray  # (S, R, K, E) one block at each slot/resolution/kernel/expand
    device: str = ""
    build_s: float = 0.0
    scale: float = 1.0  # measured whole subnets / summed table entries (median), see build
    calibration_n: int = 0
    # the host probe's time when the table was measured (reference_probe; onnxruntime): the
    # reference later measurements on this target are checked against (card_profiler)
    probe_ms: float | None = None
    # where the numbers come from when not measured here: an imported table (official_tables) says
    # so, and that its latencies are the published ones (a phone's, say), not this host's
    source: dict[str, Any] | None = None

    def predict(self, cfgs: BatchLike) -> np.ndarray:
        """(N,) predicted milliseconds per call (a batch of ``batch_size``)."""
        return self.scale * self.summed(cfgs)

    def summed(self, cfgs: BatchLike) -> np.ndarray:
        """(N,) the uncalibrated sum of table entries."""
        r_idx, k_idx, e_idx, act = as_batch(cfgs).indices(self.space)
        slots = np.arange(self.space.num_slots)[None, :]
        per_slot = self.block_ms[slots, r_idx[:, None], k_idx, e_idx]  # (N, S)
        return self.fixed_ms[r_idx] + np.where(act, per_slot, 0.0).sum(axis=1)

    def predict_one(self, cfg: SubnetConfig) -> float:
        return float(self.predict([cfg])[0])

    # -- persistence: plain JSON, nothing to unpickle -----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "space": self.space.to_dict(), "runtime": self.runtime,
                "threads": self.threads, "batch_size": self.batch_size,
                "overhead_ms": self.overhead_ms, "fixed_ms": self.fixed_ms.tolist(),
                "block_ms": self.block_ms.tolist(), "device": self.device, "build_s": self.build_s,
                "scale": self.scale, "calibration_n": self.calibration_n, "probe_ms": self.probe_ms,
                **({"source": self.source} if self.source is not None else {})}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path, space: SearchSpace) -> "LatencyTable":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read latency table ({exc})", source=str(path),
                            fix="re-run the profile stage for this target") from None
        if raw.get("format") != FORMAT:
            raise UserError(f"unknown format {raw.get('format')!r}", source=str(path),
                            field="format", fix="re-run the profile stage for this target")
        if raw.get("space") != space.to_dict():
            raise UserError(f"was measured for space {raw.get('space', {}).get('name')!r}, not "
                            f"{space.name!r}", source=str(path), field="space",
                            fix="profile the target again for this search space")
        block = np.asarray(raw["block_ms"], dtype=np.float64)
        expected = (space.num_slots, len(space.resolutions), len(space.kernels), len(space.expands))
        if block.shape != expected:
            raise UserError(f"block_ms has shape {block.shape}, expected {expected}",
                            source=str(path), field="block_ms", fix="re-run the profile stage")
        return cls(space, raw["runtime"], raw["threads"], raw["batch_size"], raw["overhead_ms"],
                   np.asarray(raw["fixed_ms"], dtype=np.float64), block, raw.get("device", ""),
                   raw.get("build_s", 0.0), float(raw.get("scale", 1.0)), int(raw.get("calibration_n", 0)),
                   raw.get("probe_ms"), raw.get("source"))


CALIBRATION_SEED = 2_147_483_647  # the calibration subnets: not the validation's (seeded 0, 1, ...)


def build_latency_table(space: SearchSpace, profiler: Profiler, *, device: str = "",
                        copies: int = 8, calibrate: int = 20,
                        progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """Measure every distinct variant once (interleaved, see Profiler.measure_many) and lay the
    numbers out per block slot; then measure ``calibrate`` random whole subnets (0: none) for the
    table's calibration factor."""
    t0 = time.monotonic()
    torch.manual_seed(0)
    net = OFASupernet(space).eval()
    res, ks, es = sorted(space.resolutions), sorted(space.kernels), sorted(space.expands)
    overhead = profiler.overhead()
    # (module, input shape, where its time goes): "fixed" parts per resolution, or block slots
    items: list[tuple[nn.Module, tuple[int, ...], tuple]] = []
    for ri, r in enumerate(res):
        unit_sizes, h_head = unit_input_sizes(space, r), head_input_size(space, r)
        items.append((nn.Sequential(net.stem, net.first_block), (space.in_channels, r, r), ("fixed", ri)))
        items.append((net.head, (space.units[-1].width, h_head, h_head), ("fixed", ri)))
        for u, spec in enumerate(space.units):
            later = -(-unit_sizes[u] // spec.stride)
            for i, h_in in ((0, unit_sizes[u]), (1, later)):
                if i >= space.max_depth:
                    continue
                # every later block of the unit has the same shapes: one measurement serves them all
                slots = (slice(u * space.max_depth, u * space.max_depth + 1) if i == 0 else
                         slice(u * space.max_depth + 1, (u + 1) * space.max_depth))
                c_in = space.block_in_channels(u, i)
                for ki, k in enumerate(ks):
                    for ei, e in enumerate(es):
                        items.append((net.units[u][i].extract(k, e), (c_in, h_in, h_in),
                                      ("block", slots, ri, ki, ei)))
    n_steps = len(items) + max(calibrate, 0)

    def report(done: int) -> None:
        if progress:
            progress(done, n_steps)

    ms = profiler.measure_ops([(m, shape) for m, shape, _ in items], overhead, copies, report)
    fixed = np.full(len(res), overhead)
    block = np.zeros((space.num_slots, len(res), len(ks), len(es)))
    for (_, _, where), t in zip(items, ms):
        if where[0] == "fixed":
            fixed[where[1]] += t
        else:
            block[where[1:]] = t
    table = LatencyTable(space, profiler.runtime, profiler.threads, profiler.batch_size, overhead,
                         fixed, block, device)
    scale = 1.0
    if calibrate > 0:
        cfgs = space.sample_many(np.random.default_rng(CALIBRATION_SEED), calibrate)
        measured = measure_configs(profiler, net, cfgs, lambda done: report(len(items) + done))
        scale = float(np.median(measured / table.summed(cfgs)))
    probe = reference_probe(profiler)
    return dataclasses.replace(table, scale=scale, calibration_n=max(calibrate, 0),
                               probe_ms=None if probe is None else round(probe, 5),
                               build_s=round(time.monotonic() - t0, 2))


def reference_probe(profiler: Profiler) -> float | None:
    """The host probe alone, timed as a model card is (card_profiler: a fresh process, the card's
    rounds and window), on the profiler's runtime and threads; None where it is not onnxruntime.
    A table takes it right after its own measurements."""
    if profiler.runtime != "onnxruntime":
        return None
    return card_profiler(profiler.runtime, profiler.threads, profiler.batch_size).measure_onnx([], [])[1]


WHOLE_SUBNET_BLOCKS = 8


def measure_configs(profiler: Profiler, net: OFASupernet, cfgs: Sequence[SubnetConfig],
                    progress: Callable[[int], None] | None = None,
                    probe_out: list[float] | None = None) -> np.ndarray:
    """End-to-end milliseconds of one call of each subnet, extracted from ``net`` (its weights do
    not matter for latency, so a randomly initialised supernet serves), interleaved as in
    Profiler.measure_many (``probe_out``: the host probe's times, see there). The smallest of at
    least eight medians, as for a model card: calibration, validation and the search's check
    compare like with like."""
    whole = dataclasses.replace(profiler, blocks=max(profiler.blocks, WHOLE_SUBNET_BLOCKS))
    return whole.measure_many([(net.get_active_subnet(c).eval(), (net.space.in_channels, c.r, c.r))
                               for c in cfgs], progress, probe_out)


def validate_latency_table(table: LatencyTable, profiler: Profiler, n: int = 50, seed: int = 0,
                           net: OFASupernet | None = None) -> dict[str, Any]:
    """Measure ``n`` random whole subnets end to end; MAPE and Kendall tau of the table's sums."""
    from scipy.stats import kendalltau

    space = table.space
    net = net or OFASupernet(space).eval()
    cfgs = space.sample_many(np.random.default_rng(seed), n)
    predicted = table.predict(cfgs)
    measured = measure_configs(profiler, net, cfgs)
    ape = np.abs(predicted - measured) / measured
    tau = kendalltau(predicted, measured).statistic
    return {"n": n, "mape_pct": round(float(100 * ape.mean()), 3),
            "max_ape_pct": round(float(100 * ape.max()), 3), "kendall_tau": round(float(tau), 4),
            "measured_ms": [round(float(v), 5) for v in measured],
            "predicted_ms": [round(float(v), 5) for v in predicted],
            "configs": [c.to_dict() for c in cfgs]}
