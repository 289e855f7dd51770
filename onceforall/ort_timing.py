"""Time ONNX models on onnxruntime: the statistic of latency tables and model cards.

Imports only the standard library, numpy and onnxruntime, so that ``onceforall.reproduce`` shares
the statistic without torch.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

WARMUP_S = 0.2
# Rounds go on until they span this long. The host takes the second core (and sometimes the first)
# for a second at a time: one 0.34 ms model measured 0.34 in its model card and 0.47 in 8 medians
# (70 ms) a minute later; a 2-thread batch-16 model 2.1 and 3.1 ms.
WINDOW_S = 2.0
# A model card at 2 threads or more spans this long. On the shared 2-vCPU VMs the two vCPUs at
# times give one core's throughput for seconds on end (both busy at ~190% CPU, no steal counted):
# a 2-thread batch-16 model, measured every 0.2 s for 200 s, ran 2.3 ms (median) and 3.6 ms (its
# 1-thread time) in 12% of the measurements, in runs of up to 8.5 s. A 2 s window inside such a run
# measures only the slow state: make run's server card said 3.83 ms where the search had measured
# its pick at 2.6-2.7. One thread is barely affected (3.5 ms in both states).
MULTI_THREAD_WINDOW_S = 12.0


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
              warmup_s: float = WARMUP_S, window_s: float = WINDOW_S, settle: int = 2) -> np.ndarray:
    """(len(fns),) milliseconds per call of each: the smallest of ``rounds`` medians of ``repeats``
    calls, the rounds interleaved (every fn once per round, ``settle`` calls before its median),
    and more rounds until they span ``window_s`` seconds.

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
    while done < max(rounds, 1) or time.perf_counter() < t_window:
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
              **timing: Any) -> np.ndarray:
    """(len(models),) ms per call of each ONNX model on a random float32 input of its shape
    (batch included), measured together with ``time_many(**timing)``, in this process."""
    rng = np.random.default_rng(0)
    fns = []
    for model, shape in zip(models, shapes, strict=True):
        sess = ort_session(model, threads)
        feed = {sess.get_inputs()[0].name: rng.standard_normal(tuple(shape), dtype=np.float32)}
        fns.append(lambda sess=sess, feed=feed: sess.run(None, feed))
    return time_many(fns, **timing)

