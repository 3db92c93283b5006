"""Progress of a long loop: a bar on a terminal, a periodic log line anywhere else."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress"]


class Progress:
    """Progress of a loop, suited to where the output goes.

    On a terminal: a tqdm bar. Anywhere else (a Slurm log file, a pipe): no carriage-return
    noise, but one log line every ``every_s`` seconds and at the end, e.g.
    ``train: step 1200/5000 (24%), 812 img/s, 3.412 bits/dim, ETA 0:07:48``.
    """

    def __init__(self, total: int, initial: int = 0, *, desc: str, enabled: bool = True, unit: str = "step",
                 images_per_unit: int = 0, every_s: float = 60.0, stream=None):
        from tqdm.auto import tqdm

        self.total, self.count, self.desc, self.unit, self.every_s = total, initial, desc, unit, every_s
        self.images_per_unit = images_per_unit
        self.enabled = enabled
        stream = stream if stream is not None else sys.stderr
        self.terminal = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not self.terminal, dynamic_ncols=True,
                        mininterval=2.0, file=stream) if self.terminal else None
        self.start_count, self.start = initial, time.perf_counter()
        self.last_line = self.start
        self.fields: dict[str, str] = {}

    def update(self, n: int = 1, **fields: str) -> None:
        """Advance by ``n``; ``fields`` (e.g. bits/dim) are shown with the next report."""
        self.count += n
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix(self.fields, refresh=False)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self._line()

    def line(self) -> str:
        """The one-line report (also logged periodically off a terminal)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = self.count - self.start_count
        rate = done / elapsed
        parts = [f"{self.desc}: {self.unit} {self.count}/{self.total} ({100 * self.count / max(self.total, 1):.0f}%)"]
        if self.images_per_unit:
            parts.append(f"{rate * self.images_per_unit:.0f} img/s")
        else:
            parts.append(f"{rate:.2f} {self.unit}/s")
        parts += [f"{v} {k}" for k, v in self.fields.items()]
        if rate > 0 and self.count < self.total:
            parts.append(f"ETA {_duration((self.total - self.count) / rate)}")
        return ", ".join(parts)

    def _line(self) -> None:
        logging.getLogger("progress").info(self.line())
        self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.count > self.start_count:
            self._line()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
