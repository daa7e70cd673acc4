"""Differential checks shared by the read-only format tests (bochs, cloop, dmg).

qemu-img cannot create these formats, so the tests build images with
:mod:`tests.formats.images` and compare every read-side command of the two
tools on them, plus a seeded damage sweep run under an address-space limit.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from tests.conftest import Result, qemu_img, require_tool, vdkit_img
from tests.conftest import assert_same as same
from tests.helpers.limited import run_limited
from tests.helpers.patching import damage_at

# stderr lines Debian's qemu-img prints for its uninstalled dmg modules (not QEMU's: vdkit prints none)
_DEBIAN_NOISE = ("qemu: module block-block-dmg-",)


def _clean(err: str) -> str:
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith(_DEBIAN_NOISE))


READ_COMMANDS: list[list[str]] = [
    ["info"], ["info", "--output=json"], ["info", "--backing-chain"], ["map"], ["map", "--output=json"],
    ["check"], ["check", "--output=json"], ["snapshot", "-l"],
]


def assert_same(args: list[str], cwd: Path) -> Result:
    """conftest's ``assert_same``, without the lines Debian's qemu-img adds for its missing dmg modules."""
    return same(args, cwd, mask=_clean)


def same_read_side(d: Path, name: str, fmt: str, src: str = "src.raw", *, full: bool = True) -> None:
    """info/map/check/snapshot -l with and without ``-f``, compare, and convert to raw and qcow2
    (``full=False``: info, map and compare, convert to raw only, for the variants of a layout)."""
    for args in READ_COMMANDS if full else READ_COMMANDS[:2] + READ_COMMANDS[4:5]:
        assert_same([*args, name], d)
        if full:
            assert_same([*args[:1], "-f", fmt, *args[1:], name], d)
    assert_same(["compare", src, name], d)
    if full:
        assert_same(["info", "--image-opts", f"driver={fmt},file.filename={name}"], d)
        assert_same(["info", "--image-opts", f"driver={fmt},file.filename={name},bogus=1"], d)
        assert_same(["map", "--output=json", "--image-opts", f"driver={fmt},file.filename={name}"], d)
        assert_same(["compare", "--image-opts", f"driver={fmt},file.filename={name}",
                     f"driver=raw,file.filename={src}"], d)
        assert_same(["compare", "-f", "raw", "-F", fmt, src, name], d)
        assert_same(["compare", "-s", name, name], d)
    for target in ("raw", "qcow2") if full else ("raw",):
        out = f"v_{name}.{target}"
        v = vdkit_img("convert", "-O", target, name, out, cwd=d)
        assert v.returncode == 0, v.stderr
        r = qemu_img("compare", "-f", target, "-F", "raw", out, src, cwd=d)
        assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr
        q = qemu_img("convert", "-O", target, name, f"q_{name}.{target}", cwd=d)
        assert q.returncode == 0
        if target == "raw":  # same sparse layout: zero detection alike
            assert (d / out).read_bytes() == (d / f"q_{name}.{target}").read_bytes()
        assert_same(["map", "--output=json", f"q_{name}.{target}"], d)
        assert vdkit_img("map", "--output=json", out, cwd=d).stdout == qemu_img(
            "map", "--output=json", f"q_{name}.{target}", cwd=d).stdout.replace(f"q_{name}", f"v_{name}")


def same_refusals(d: Path, name: str, fmt: str) -> None:
    """Creation refused by name; every command opening the image read-write refused ('Image is read-only')."""
    for args in (["create", "-f", fmt, "new.img", "1M"], ["convert", "-O", fmt, name, "new.img"],
                 ["snapshot", "-c", "s", name], ["snapshot", "-a", "s", name], ["snapshot", "-d", "s", name],
                 ["resize", name, "2M"], ["commit", name], ["rebase", "-u", "-b", "", name],
                 ["check", "-r", "all", name]):
        assert_same(args, d)


# -- the damage sweep ---------------------------------------------------------------------------

def damage(base: bytes, rng: random.Random, region: int) -> tuple[bytes, list[str]]:
    """Up to four changes in the first ``region`` bytes: random bytes, a byte flipped, or a u32/u64
    field set to a boundary value (either endianness)."""
    d = bytearray(base)
    desc = []
    for _ in range(rng.randint(1, 4)):
        off = rng.randrange(min(region, len(d)))
        desc.append(damage_at(d, rng, off, lambda width: (
            0, 1, 511, 512, 4096, (1 << (8 * width)) - 1, 1 << (8 * width - 1), rng.randrange(1 << (8 * width)),
            len(base), len(base) + 512), None))
    return bytes(d), desc


def sweep_case(d: Path, base: Path, fmt: str, seed: int, region: int, *, max_convert: int = 64 << 20) -> list[str]:
    """Damage ``base``; info, map and a full read (convert -O raw) must fail or succeed alike, with the
    same text, and vdkit must never print a traceback (it runs under an address-space limit:
    ``tests/helpers/limited.py``)."""
    rng = random.Random(seed)
    data, desc = damage(base.read_bytes(), rng, region)
    name = f"s{seed}{base.suffix}"
    (d / name).write_bytes(data)
    qimg = require_tool("qemu-img")
    vimg = [sys.executable, "-m", "vdkit.cli.main"]
    diffs: list[str] = []

    def both(args: list[str], q_args: list[str] | None = None) -> tuple[int, str, str]:
        q = run_limited([qimg, *(q_args or args)], d)
        v = run_limited([*vimg, *args], d, limit=True)
        q = (q[0], q[1].replace("q_out", "out"), _clean(q[2]).replace("q_out", "out"))
        v = (v[0], v[1].replace("v_out", "out"), v[2].replace("vdkit-img:", "qemu-img:").replace("v_out", "out"))
        assert "Traceback" not in v[2] and "internal error" not in v[2], f"seed {seed} {desc} {args}: {v[2]}"
        if q[0] < 0:  # qemu-img crashed (dmg without chunks): no answer to compare with; vdkit fails cleanly
            assert v[0] == 1, f"seed {seed} {desc} {args}: {v}"
            return q
        if q != v:
            diffs.append(f"seed {seed} {desc} {args}:\n  qemu:  {q}\n  vdkit: {v}")
        return q

    both(["info", "-f", fmt, "--output=json", name])
    q = both(["info", name])
    if q[0] == 0 and f"file format: {fmt}" in q[1]:
        both(["map", "--output=json", name])
        size = int(q[1].split("(")[1].split(" bytes")[0])
        if size <= max_convert:
            both(["convert", "-O", "raw", name, "v_out.raw"], ["convert", "-O", "raw", name, "q_out.raw"])
            qo, vo = d / "q_out.raw", d / "v_out.raw"
            if qo.exists() and vo.exists() and qo.read_bytes() != vo.read_bytes():
                diffs.append(f"seed {seed} {desc}: converted data differs")
            for p in (qo, vo):
                p.unlink(missing_ok=True)
    return diffs


def run_sweep(d: Path, base: Path, fmt: str, seeds: range, region: int) -> None:
    diffs: list[str] = []
    for seed in seeds:
        diffs += sweep_case(d, base, fmt, seed, region)
    assert not diffs, "\n".join(diffs)
