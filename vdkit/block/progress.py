"""qemu-img's ``-p`` progress lines, shared by every copy loop (convert, commit, rebase, compare).

Kept apart from the engines so a front end that only reports progress does
not import the copy engine, and so the daemon's block jobs can drive the
same arithmetic (the percentages are visible: they are printed).
"""

from __future__ import annotations

import struct
import sys


class Progress:
    """qemu-img's ``-p`` lines ``    (NN.NN/100%)\\r``, computed in C ``float`` like the original.

    A line is printed when the value moved by more than ``min_skip`` since
    the last line, and always at 0 and 100.  Values are kept as doubles that
    hold float32 numbers; every operation is rounded back to float32, which
    gives exactly the float32 result for the ``+ - * /`` used here (a double
    carries more than twice float32's precision), without importing numpy.
    """

    def __init__(self, enabled: bool, min_skip: float = 1.0) -> None:
        self.enabled = enabled
        self.min_skip = f32(min_skip)
        self.current = 0.0
        self.last = 0.0

    def set(self, value: float) -> None:
        """Absolute update (``qemu_progress_print(value, 0)``)."""
        self._update(f32(value))

    def add(self, delta: float, max_: int = 100) -> None:
        """Relative update (``qemu_progress_print(delta, max)``)."""
        self._update(f32(self.current + f32(f32(f32(delta) / 100.0) * f32(max_))))

    def _update(self, cur: float) -> None:
        if not self.enabled:
            return
        cur = min(cur, 100.0)
        self.current = cur
        if (cur > f32(self.last + self.min_skip) or cur < f32(self.last - self.min_skip)
                or cur == 0 or cur == 100):
            self.last = cur
            _write(f"    ({cur:3.2f}/100%)\r")
            sys.stdout.flush()

    def end(self) -> None:
        if self.enabled:
            _write("\n")


def _write(text: str) -> None:
    # as the CLI's write_out: bytes to stdout's buffer (the text is ASCII)
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))


_F32 = struct.Struct("=f")


def f32(x: float) -> float:
    """``x`` rounded to the nearest C ``float`` (sums, products and quotients of two of them rounded again
    are C's float arithmetic: a double holds their exact or correctly rounded value; no numpy needed)."""
    return float(_F32.unpack(_F32.pack(x))[0])
