"""What makes supernet training fast on 2 CPU cores: memory format, threads, torch.compile.

Images/s of one training step (forward, backward, SGD) of the fashion-mnist supernet at batch 128 and
resolution 28, for the max, a middle and the min subnet:
  * elastic supernet, NCHW vs channels-last memory format, 1 vs 2 threads, and channels-last with
    torch's own depthwise weight gradient everywhere (what onceforall/supernet/ops.py replaces where the
    kernel is larger than the feature map);
  * the extracted static max subnet, eager vs torch.compile (compile time reported separately;
    the elastic supernet changes shape every step, so compiling it recompiles per subnet).

    python bench/cpu_speed.py
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from progressive_shrinking import machine  # noqa: E402

from onceforall.supernet import ops  # noqa: E402
from onceforall.supernet.space import get_space  # noqa: E402
from onceforall.supernet.supernet import OFASupernet  # noqa: E402
from onceforall.training.train import reference_configs  # noqa: E402

BATCH, STEPS, WARMUP = 128, 8, 3


def throughput(step, x) -> float:
    for _ in range(WARMUP):
        step(x)
    t = time.perf_counter()
    for _ in range(STEPS):
        step(x)
    return BATCH * STEPS / (time.perf_counter() - t)


@contextlib.contextmanager
def onednn_depthwise_grad():
    """The elastic depthwise conv as plain F.conv2d, so its weight gradient is oneDNN's everywhere."""
    own = ops.depthwise_conv2d
    ops.depthwise_conv2d = ops.plain_depthwise_conv2d
    try:
        yield
    finally:
        ops.depthwise_conv2d = own


def main() -> int:
    space = get_space("fashion-mnist")
    refs = reference_configs(space)
    y = torch.randint(0, 10, (BATCH,))
    rows = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for layout in ("nchw", "channels_last", "channels_last, oneDNN depthwise grad"):
            torch.manual_seed(0)
            net = OFASupernet(space).train()
            fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
            net = net.to(memory_format=fmt)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
            for name in ("max", "mid", "min"):
                cfg = refs[name]
                x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=fmt)

                def step(inp, cfg=cfg):
                    F.cross_entropy(net(inp, cfg), y).backward()
                    opt.step()
                    opt.zero_grad()

                with onednn_depthwise_grad() if "oneDNN" in layout else contextlib.nullcontext():
                    rate = throughput(step, x)
                rows.append({"model": "elastic supernet", "subnet": name, "threads": threads,
                             "layout": layout, "images_per_s": round(rate, 1)})
                print(rows[-1], flush=True)

    torch.set_num_threads(2)
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        static = OFASupernet(space).get_active_subnet(refs["max"]).train()
        static = static.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(static.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        model = torch.compile(static) if mode == "compile" else static
        x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)

        def step(inp):
            F.cross_entropy(model(inp), y).backward()
            opt.step()
            opt.zero_grad()

        t = time.perf_counter()
        try:
            step(x)
            first = time.perf_counter() - t
            rate = throughput(step, x)
            rows.append({"model": "static max subnet", "subnet": "max", "threads": 2,
                         "layout": f"channels_last, {mode}", "images_per_s": round(rate, 1),
                         "first_step_s": round(first, 2)})
        except Exception as exc:  # torch.compile needs a C++ toolchain; report, don't hide
            rows.append({"model": "static max subnet", "subnet": "max", "threads": 2,
                         "layout": f"channels_last, {mode}", "error": repr(exc)[:200]})
        print(rows[-1], flush=True)

    out = ROOT / "docs/results/cpu_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Speeds belong to a host: keep the last run of each other kind of CPU (name and vector ISA).
    run = {"machine": machine(), "rows": rows}
    others = []
    if out.exists():
        old = json.loads(out.read_text())
        runs = [{"machine": old["machine"], "rows": old["rows"]}] + old.get("other_machines", [])
        kind = lambda m: (m.get("cpu"), m.get("cpu_capability"))  # noqa: E731
        others = [o for o in runs if kind(o["machine"]) != kind(run["machine"])]
    out.write_text(json.dumps({**run, "other_machines": others, "batch": BATCH, "resolution": 28,
                               "command": "python bench/cpu_speed.py"}, indent=1))
    from render import render

    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
