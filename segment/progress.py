"""Progress of one image's tiles that tells the truth: tiles done of the plan's total, tiles/s and ETA.

The band-wise predictor (:mod:`segment.stream`) knows before the first tile how many tiles an
image needs (its :class:`~segment.tiling.BandPlan`), so the total is exact, also for a single
10k x 10k micrograph. The rate is the plain average since the image's first tile batch began
(tiles done / seconds elapsed), not a smoothed recent rate, and the ETA is the
tiles left at that rate. On a terminal a tqdm bar shows it; otherwise (a log file, a batch job)
one log line every ``every_s`` seconds does. With ``report=False`` nothing is shown but the
counts are kept (for the image's summary line).
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["TileProgress", "format_seconds"]

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class TileProgress:
    """Counts the tiles of one image and reports rate and ETA.

    Args:
        desc: what is shown (the image's name).
        report: show progress at all (else only count).
        bar: a tqdm bar (True), log lines (False), or a bar only when stderr is a terminal (None).
        every_s: seconds between log lines (without a bar).
        clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, desc: str = "tiles", *, report: bool = True, bar: bool | None = None,
                 every_s: float = 30.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.desc, self.report, self.every_s, self.clock = desc, report, float(every_s), clock
        self.bar = (sys.stderr.isatty() if bar is None else bar) if report else False
        self.total = self.done = 0
        self.t0: float | None = None
        self.t_end: float | None = None
        self._last_log = 0.0
        self._tqdm: Any = None

    def start(self, total: int, detail: str = "") -> None:
        """Begin an image of ``total`` tiles (``detail``: size and tiling, for the first log line)."""
        self.total, self.done = int(total), 0
        self.t0 = self._last_log = self.clock()
        self.t_end = None
        if not self.report:
            return
        if self.bar:
            self._tqdm = tqdm(total=self.total, desc=self.desc, unit="tile", leave=False, smoothing=0)
        else:
            logger.info("%s: %d tiles%s", self.desc, self.total, f" ({detail})" if detail else "")

    def update(self, n: int) -> None:
        """``n`` more tiles are done."""
        self.done += int(n)
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.report and self.clock() - self._last_log >= self.every_s and self.done < self.total:
            self._last_log = self.clock()
            logger.info("%s", self.line())

    def close(self) -> None:
        """The image is finished (or failed): stop the clock and remove the bar."""
        if self.t0 is not None and self.t_end is None:
            self.t_end = self.clock()
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    @property
    def seconds(self) -> float:
        """Seconds since :meth:`start` (until :meth:`close`)."""
        if self.t0 is None:
            return 0.0
        return (self.t_end if self.t_end is not None else self.clock()) - self.t0

    @property
    def rate(self) -> float:
        """Tiles per second since the start (0 before any time has passed)."""
        s = self.seconds
        return self.done / s if s > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the average rate so far (None before the first tile)."""
        r = self.rate
        return (self.total - self.done) / r if r > 0 else None

    def line(self) -> str:
        """``KEY: tiles 480/961 (50 %), 12.3 tiles/s, elapsed 39 s, ETA 39 s``."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta
        return (f"{self.desc}: tiles {self.done}/{self.total} ({pct:.0f} %), {self.rate:.3g} tiles/s, "
                f"elapsed {format_seconds(self.seconds)}, ETA {'?' if eta is None else format_seconds(eta)}")
