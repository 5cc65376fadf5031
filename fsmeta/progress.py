"""Progress lines for long loops: count, rate and ETA, printed at most every few seconds.

Plain log lines rather than a redrawing bar, because the same loops run inside
``ray job submit`` where the output is a log, not a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    def __init__(self, total: int, label: str, start: int = 0, every: float = 5.0, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.label, self.done = total, label, start
        self.start_done = start
        self.every = every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, n: int = 1, detail: str = "", force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        per = f"{1 / rate:.2f} s/it" if rate > 0 else "-"
        line = f"[{self.label}] {self.done}/{self.total}  {per}  elapsed {format_seconds(elapsed)}  ETA {format_seconds(eta)}"
        print(f"{line}  {detail}".rstrip(), file=self.stream, flush=True)
