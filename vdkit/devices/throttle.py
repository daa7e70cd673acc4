"""QEMU's I/O throttling: the limits of a drive (``ThrottleConfig``, QEMU's
``ThrottleConfig`` with ``throttle_is_valid``) and a pure token bucket
(``util/throttle.c`` semantics).

Six leaky buckets per group: ``bps``/``iops`` totals and their ``_rd``/``_wr``
halves.  Each bucket has an average rate ``avg`` and optionally a burst rate
``max`` sustained for ``length`` seconds.  A request is admitted when none
of the buckets it touches is over its size; otherwise it must wait the time
the fullest bucket needs to drain back.  Admitted requests are accounted in
full at admission (QEMU's ``throttle_account``), bytes in the ``bps``
buckets, operations in the ``iops`` buckets (``iops_size`` turns a large
request into several operations).

The class takes the clock as an argument, so the runtime supplies
``time.monotonic_ns()`` and tests supply whatever they like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vdkit.errors import VdkitError

NS = 1_000_000_000
THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
THROTTLE_MAX_KEYS = ("bps_max", "bps_rd_max", "bps_wr_max", "iops_max", "iops_rd_max", "iops_wr_max")
THROTTLE_LENGTH_KEYS = tuple(k + "_length" for k in THROTTLE_MAX_KEYS)
THROTTLE_VALUE_MAX = 1_000_000_000_000_000


@dataclass
class ThrottleConfig:
    """Limits of one backend: ``avg``/``max``/``burst length`` for six buckets, plus ``iops_size``."""

    avg: dict[str, int] = field(default_factory=lambda: dict.fromkeys(THROTTLE_KEYS, 0))
    max: dict[str, int] = field(default_factory=lambda: dict.fromkeys(THROTTLE_KEYS, 0))
    length: dict[str, int] = field(default_factory=lambda: dict.fromkeys(THROTTLE_KEYS, 1))
    iops_size: int = 0

    @property
    def enabled(self) -> bool:
        return any(self.avg.values()) or any(self.max.values())

    def validate(self) -> None:
        """QEMU's ``throttle_is_valid`` checks, in its order, with its texts."""
        a, m = self.avg, self.max
        for vals in (a, m):
            if (vals["bps"] and (vals["bps_rd"] or vals["bps_wr"])) or (
                vals["iops"] and (vals["iops_rd"] or vals["iops_wr"])
            ):
                raise VdkitError("bps/iops/max total values and read/write values cannot be used at the same time")
        if self.iops_size and not (a["iops"] or a["iops_rd"] or a["iops_wr"]):
            raise VdkitError("iops size requires an iops value to be set")
        for key in THROTTLE_KEYS:
            avg, mx, length = a[key], m[key], self.length[key]
            if avg < 0 or mx < 0 or avg > THROTTLE_VALUE_MAX or mx > THROTTLE_VALUE_MAX:
                raise VdkitError(f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
            if not length:
                raise VdkitError("the burst length cannot be 0")
            if length > 1 and not mx:
                raise VdkitError("burst length set without burst rate")
            if mx and length > THROTTLE_VALUE_MAX // mx:
                raise VdkitError("burst length too high for this burst rate")
            if mx and not avg:
                raise VdkitError("bps_max/iops_max require corresponding bps/iops values")
            if mx and mx < avg:
                raise VdkitError("bps_max/iops_max cannot be lower than bps/iops")

    def to_state(self) -> dict[str, int]:
        out = dict(self.avg)
        out.update({k + "_max": v for k, v in self.max.items()})
        out.update({k + "_max_length": v for k, v in self.length.items()})
        out["iops_size"] = self.iops_size
        return out

    @classmethod
    def from_state(cls, state: dict[str, int]) -> ThrottleConfig:
        cfg = cls()
        for k in THROTTLE_KEYS:
            cfg.avg[k] = int(state.get(k, 0))
            cfg.max[k] = int(state.get(k + "_max", 0))
            cfg.length[k] = int(state.get(k + "_max_length", 1))
        cfg.iops_size = int(state.get("iops_size", 0))
        return cfg


@dataclass
class Bucket:
    avg: float = 0.0
    max: float = 0.0
    length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_ns: int) -> None:
        self.level = max(self.level - self.avg * delta_ns / NS, 0.0)
        if self.length > 1:
            self.burst_level = max(self.burst_level - self.max * delta_ns / NS, 0.0)

    def wait_ns(self) -> int:
        """Time until this bucket admits another request (``throttle_compute_wait``)."""
        if not self.avg:
            return 0
        # without a burst rate QEMU still allows a burst of a tenth of a second of I/O
        size = self.avg / 10 if not self.max else self.max * self.length
        extra = self.level - size
        if extra > 0:
            return int(extra * NS / self.avg)
        if self.length > 1:
            extra = self.burst_level - self.max / 10
            if extra > 0:
                return int(extra * NS / self.max)
        return 0

    def add(self, amount: float) -> None:
        self.level += amount
        if self.length > 1:
            self.burst_level += amount


@dataclass
class Throttle:
    """The buckets of one throttle group."""

    buckets: dict[str, Bucket] = field(default_factory=dict)
    iops_size: int = 0
    last_ns: int | None = None

    @classmethod
    def from_config(cls, cfg: ThrottleConfig) -> Throttle:
        """From a ``ThrottleConfig`` (``avg``/``max``/``length`` dicts keyed ``bps``, ``iops_rd``, ...)."""
        return cls({k: Bucket(float(cfg.avg[k]), float(cfg.max[k]), int(cfg.length[k])) for k in cfg.avg},
                   int(cfg.iops_size))

    @staticmethod
    def _keys(is_write: bool) -> tuple[str, ...]:
        return ("bps", "iops", "bps_wr", "iops_wr") if is_write else ("bps", "iops", "bps_rd", "iops_rd")

    def _leak(self, now_ns: int) -> None:
        if self.last_ns is not None and now_ns > self.last_ns:
            for b in self.buckets.values():
                b.leak(now_ns - self.last_ns)
        if self.last_ns is None or now_ns > self.last_ns:
            self.last_ns = now_ns

    def wait_ns(self, is_write: bool, now_ns: int) -> int:
        """How long a request must still wait before it may start (0: admit now)."""
        self._leak(now_ns)
        return max((self.buckets[k].wait_ns() for k in self._keys(is_write) if k in self.buckets), default=0)

    def account(self, is_write: bool, size: int) -> None:
        units = size / self.iops_size if self.iops_size and size > self.iops_size else 1.0
        for k in self._keys(is_write):
            b = self.buckets.get(k)
            if b is not None:
                b.add(size if k.startswith("bps") else units)
