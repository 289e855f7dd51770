"""Time ONNX models on onnxruntime: the statistic of latency tables and model cards.

Imports only the standard library, numpy, onnxruntime and (for the host probe) onnx, so that
``onceforall.reproduce`` shares the statistic without torch, and so that ``time_onnx_isolated`` can
time models in a fresh child process that does nothing else.

    python -I onceforall/specialization/ort_timing.py < request.json   # what time_onnx_isolated runs
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

WARMUP_S = 0.2
# Rounds go on until they span this long. The host takes the second core (and sometimes the first)
# for a second at a time: one 0.34 ms model measured 0.34 in its model card and 0.47 in 8 medians
# (70 ms) a minute later; a 2-thread batch-16 model 2.1 and 3.1 ms.
WINDOW_S = 2.0
# Past the window, rounds go on while a fn is over its expected time by more than this (up to
# max_window_s); the host probe (below) is the fn that has one. On the shared 2-vCPU VMs the host's
# speed changes for seconds to minutes at a time: a 2-thread batch-16 model, measured every 0.2 s
# for 200 s, ran 2.3 ms (median) and 3.6 ms (its 1-thread time) in 12% of the measurements, in
# runs of up to 8.5 s; right after sustained torch work a whole 20 s window of a model card fell in
# one (2.63 ms, a subnet the search had measured at 1.83); and a 1-thread batch-1 model's calls had a
# median of 0.34 ms instead of 0.24 for 40 s on end. Without a reference no window is long enough.
EXPECT_TOLERANCE = 0.10  # the slow states are 1.4-1.5x; smaller drifts are what headroom_pct is for

# The host probe: a fixed workload (8 inverted-residual blocks, 1x1 / depthwise 3x3 / 1x1, 32
# channels x3, 14x14, batch 2), timed in the same interleaved rounds as the models it vouches for.
# It is what the host's speed is read from: a latency table records the probe's time when it was
# measured, a model card records it too, and a later measurement (the search's check, the card,
# onceforall.reproduce) is told that reference, goes on while the probe runs slower than it, and
# reports the probe's time next to the model's, so that a slow host shows as a slow host and not as
# a model over its budget. It is built of many small ops like the models are: a probe of two large
# convolutions barely followed the 2-thread slow state (correlation 0.26 with a model's time over
# 2 s windows on a busy host, against 0.77 for this one; 0.85 at 1 thread).
HOST_PROBE_SHAPE = (2, 32, 14, 14)


@lru_cache(maxsize=1)
def host_probe() -> bytes:
    """The host probe's ONNX model (HOST_PROBE_SHAPE input), the same bytes in every process."""
    from onnx import TensorProto, helper, numpy_helper

    c, e, h, blocks = HOST_PROBE_SHAPE[1], 3, HOST_PROBE_SHAPE[2], 8
    rng = np.random.default_rng(0)
    nodes, weights = [], []

    def conv(x: str, c_in: int, c_out: int, k: int, groups: int, name: str) -> str:
        w = rng.standard_normal((c_out, c_in // groups, k, k)) / np.sqrt(c_in // groups * k * k)
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [name], pads=[k // 2] * 4, group=groups))
        return name

    x = "input"
    for b in range(blocks):  # (2, c, h, h) -> (2, c*e, h, h) -> depthwise -> (2, c, h, h), + x
        y = conv(x, c, c * e, 1, 1, f"b{b}.expand")
        nodes.append(helper.make_node("Relu", [y], [f"{y}.act"]))
        y = conv(f"{y}.act", c * e, c * e, 3, c * e, f"b{b}.depthwise")
        nodes.append(helper.make_node("Relu", [y], [f"{y}.act"]))
        y = conv(f"{y}.act", c * e, c, 1, 1, f"b{b}.project")
        nodes.append(helper.make_node("Add", [x, y], [f"b{b}"]))
        x = f"b{b}"
    graph = helper.make_graph(
        nodes, "host-probe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, c, h, h])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def ort_session(model: bytes | str | Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def time_many(fns: Sequence[Callable[[], Any]], *, warmup: int, repeats: int, rounds: int,
              warmup_s: float = WARMUP_S, window_s: float = WINDOW_S, settle: int = 2,
              expect_ms: Sequence[float | None] | None = None, max_window_s: float = 0.0,
              tolerance: float = EXPECT_TOLERANCE) -> np.ndarray:
    """(len(fns),) milliseconds per call of each: the smallest of ``rounds`` medians of ``repeats``
    calls, the rounds interleaved (every fn once per round, ``settle`` calls before its median),
    and more rounds until they span ``window_s`` seconds; then, while some fn is more than
    ``tolerance`` over its ``expect_ms`` (None: no expectation), more rounds until they span
    ``max_window_s``. The expectation only decides how long to measure, never the value.

    Interleaving spreads each fn's measurement over the whole run, so a slow second of the host
    costs one round of a few fns instead of every round of one: measured on 2 cores at 2 threads,
    12 subnets timed one after another differed by 11-14% (MAPE) from one pass to the next,
    interleaved in 3 rounds by 1-4%. Warm-up: every fn ``warmup`` times, then all of them in turn
    until ``warmup_s`` seconds have passed. On these 2-core VMs a core that sat idle (during an
    export, say) runs a 2-thread runtime up to 40% slow for a while after it wakes; a fixed 10-20
    calls of a 0.3 ms model did not cover that (the same subnets measured twice differed by 11-39%,
    against 1-5% after 0.1 s). One median shrugs off single spikes; the smallest of several also
    shrugs off a second or two of another process, which slows every call of a 2-thread run.
    """
    fns = list(fns)
    t_end = time.perf_counter() + warmup_s
    for fn in fns:
        for _ in range(warmup):
            fn()
    while time.perf_counter() < t_end:
        for fn in fns:
            fn()
    best = np.full(len(fns), np.inf)
    t_window = time.perf_counter() + window_s
    done = 0
    limit = np.array([np.inf if e is None else e * (1 + tolerance)
                      for e in (expect_ms if expect_ms is not None else [None] * len(fns))])
    t_max = t_window - window_s + max(window_s, max_window_s)
    while (done < max(rounds, 1) or time.perf_counter() < t_window
           or ((best > limit).any() and time.perf_counter() < t_max)):
        done += 1
        for i, fn in enumerate(fns):
            for _ in range(settle):
                fn()
            samples = []
            for _ in range(repeats):
                t = time.perf_counter_ns()
                fn()
                samples.append((time.perf_counter_ns() - t) / 1e6)
            best[i] = min(best[i], statistics.median(samples))
    return best


def time_onnx(models: Sequence[bytes | str | Path], shapes: Sequence[Sequence[int]], *, threads: int,
              probe: bool = False, probe_expect_ms: float | None = None, **timing: Any) -> np.ndarray:
    """(len(models),) ms per call of each ONNX model on a random float32 input of its shape
    (batch included), measured together with ``time_many(**timing)``, in this process.

    With ``probe``, the host probe (host_probe) is timed in the same rounds and its time comes
    last, (len(models) + 1,); ``probe_expect_ms``, the probe's time when the reference was measured,
    is its expectation: past the window, rounds go on (up to max_window_s) while the probe runs
    more than ``tolerance`` slower, i.e. while the host is slower than it was then.
    """
    if probe:
        models, shapes = [*models, host_probe()], [*shapes, HOST_PROBE_SHAPE]
        timing = {**timing, "expect_ms": [None] * (len(models) - 1) + [probe_expect_ms]}
    rng = np.random.default_rng(0)
    fns = []
    for model, shape in zip(models, shapes, strict=True):
        sess = ort_session(model, threads)
        feed = {sess.get_inputs()[0].name: rng.standard_normal(tuple(shape), dtype=np.float32)}
        fns.append(lambda sess=sess, feed=feed: sess.run(None, feed))
    return time_many(fns, **timing)


def time_onnx_isolated(models: Sequence[bytes], shapes: Sequence[Sequence[int]], *, threads: int,
                       probe: bool = False, probe_expect_ms: float | None = None,
                       **timing: Any) -> np.ndarray:
    """``time_onnx`` in a fresh Python process that imports only numpy and onnxruntime.

    A model card's 2-thread measurement inside the pipeline's export stage came out ~1.5x in 5 of
    6 runs (2.67-4.45 ms against 1.8-2.9 measured by the search and by a fresh reproduce process),
    even after waiting 20 s; the same export called from a plain script measured 1.80 three times
    in three. Whatever else the stage process runs, a child that only times does not.
    """
    with tempfile.TemporaryDirectory(prefix="ofa-timing-") as tmp:
        paths = []
        for i, model in enumerate(models):
            path = os.path.join(tmp, f"{i}.onnx")
            with open(path, "wb") as f:
                f.write(model)
            paths.append(path)
        request = {"models": paths, "shapes": [list(s) for s in shapes], "threads": threads,
                   "probe": probe, "probe_expect_ms": probe_expect_ms, "timing": timing}
        # -I: no script folder on sys.path (this package's modules must not shadow others), no
        # user site, no PYTHON* variables; the interpreter's own site-packages stay.
        proc = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)],
                              input=json.dumps(request), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"onnxruntime timing process failed (exit {proc.returncode}): {tail}")
    return np.asarray(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=float)


def _main() -> int:
    request = json.load(sys.stdin)
    ms = time_onnx(request["models"], request["shapes"], threads=request["threads"],
                   probe=request["probe"], probe_expect_ms=request["probe_expect_ms"], **request["timing"])
    print(json.dumps([float(v) for v in ms]))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
