"""Progress bar (documents/s, tokens/s, MB/s) and the one-line summary printed when a run ends."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class Progress:
    """Counts documents, tokens and input bytes. The bar is drawn on stderr only when it is a terminal
    (or `enabled=True`), so logs and test output are not flooded with carriage returns."""

    def __init__(self, total_bytes: Optional[int] = None, enabled: Optional[bool] = None, stream: Optional[TextIO] = None):
        self.start = time.perf_counter()
        self.documents = 0
        self.tokens = 0
        self.bytes = 0
        stream = stream if stream is not None else sys.stderr
        show = stream.isatty() if enabled is None else enabled
        self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1 << 20, file=stream,
                         disable=not show, dynamic_ncols=True, desc="tokenize", smoothing=0.1)

    def update(self, documents: int, tokens: int, nbytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += nbytes
        if not self._bar.disable:
            dt = max(self.elapsed, 1e-9)
            self._bar.set_postfix_str(f"{_si(self.documents / dt)} docs/s, {_si(self.tokens / dt)} tok/s", refresh=False)
            self._bar.update(nbytes)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rates(self) -> str:
        dt = max(self.elapsed, 1e-9)
        return (f"{_si(self.documents / dt)} docs/s, {_si(self.tokens / dt)} tokens/s, "
                f"{self.bytes / dt / 1e6:.2f} MB/s")

    def close(self) -> None:
        self._bar.close()
