"""A dependency-free progress bar for long commands, written to stderr.

On a terminal it redraws one line per task in place (``\\r``)::

    zclip            [##############----------]   600/1000  loss 0.0123

and ends it with the task's wall time. When the stream is not a terminal (a log file, CI, a
pipe) it prints a plain line at every quarter of each task instead, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Call it as ``bar(task, step, total, loss)`` (``loss`` a float or a 0-d tensor, read here).

    Args:
        stream: where to write (default ``sys.stderr``, looked up at each call).
        width: the number of cells of the bar.
        interactive: draw in place; default: whether ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 24, interactive: bool | None = None) -> None:
        self._stream = stream
        self.width = width
        self._interactive = interactive
        self._started: dict[str, float] = {}
        self._quarter: dict[str, int] = {}
        self._width_drawn = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def __call__(self, task: str, step: int, total: int, loss: Any = None) -> None:
        now = time.perf_counter()
        started = self._started.setdefault(task, now)
        done = step >= total
        status = f"{step:>{len(str(total))}}/{total}"
        if loss is not None:
            status += f"  loss {float(loss):.4g}"
        if done:
            status += f"  {now - started:.1f} s"
        if self.interactive:
            filled = self.width * min(step, total) // max(total, 1)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"{task:<16} [{bar}] {status}"
            pad = " " * max(self._width_drawn - len(line), 0)  # wipe a longer previous line
            self._width_drawn = 0 if done else len(line)
            self.stream.write(f"\r{line}{pad}" + ("\n" if done else ""))
        else:
            quarter = 4 * min(step, total) // max(total, 1)
            if quarter <= self._quarter.get(task, 0):
                return
            self._quarter[task] = quarter
            self.stream.write(f"{task:<16} {status}\n")
        self.stream.flush()
