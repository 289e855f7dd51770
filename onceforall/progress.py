"""Progress reporting: a one-line bar on a terminal, periodic lines in logs, JSON lines per epoch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """``[phase] epoch 2/5 step 120/429 loss 1.234 img/s 812 ETA 3m12s``.

    On a terminal it redraws one line; elsewhere (CI, pods, pipes) it prints a line every
    ``every_s`` seconds, so logs stay readable.
    """

    def __init__(self, stage: str, total_steps: int, *, stream: TextIO | None = None,
                 enabled: bool = True, every_s: float = 15.0, start_step: int = 0):
        self.stage, self.total = stage, max(total_steps, 1)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.start_step = start_step
        self.t0 = self.last = time.monotonic()

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < self.every_s and step < self.total:
            return
        self.last = now
        done = step - self.start_step
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"[{self.stage}]", f"step {step}/{self.total}", f"{100 * step / self.total:5.1f}%"]
        for key, value in fields.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"ETA {fmt_duration(eta) if eta != float('inf') else '?'}")
        line = " ".join(parts)
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + f"[{self.stage}] {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
