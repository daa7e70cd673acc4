"""The README's examples as a new user runs them: every ```python block, word for word, in a fresh
interpreter, against images this test makes under the names the examples use; and the README's local
``vdkit-img`` command lines against ``qemu-img`` with the same arguments.

What an example prints is compared with what QEMU says of the same image wherever it prints image facts
(``qemu-img info``, ``qemu-io``); a block the test has no oracle for must still run cleanly, so a new
example is never left out silently.  ``docs/*.md`` python blocks run the same way.  Set-up: a qcow2
``top.qcow2`` with an internal snapshot over ``base.qcow2`` (the chain the first example walks),
``upload.qcow2`` (an upload naming a backing file), ``disk.qcow2`` (the data/snapshot example),
``upload.img`` (a qcow2 declared raw) and ``disk.img`` (a raw image for the ``json:`` window).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_same, check_ok, qemu_img, qemu_io

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, lang: str) -> list[str]:
    """The bodies of ``path``'s fenced blocks of language ``lang``, in order."""
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    check_ok("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "64M")
    assert qemu_io("-c", "write -P 0x11 0 1M", str(d / "base.qcow2")).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    assert qemu_io("-c", "write -P 0x22 1M 64k", str(d / "top.qcow2")).returncode == 0
    check_ok("snapshot", "-c", "s1", str(d / "top.qcow2"))
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "upload.qcow2"))
    check_ok("create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "16M")
    assert qemu_io("-c", "write -P 0x33 0 64k", str(d / "disk.qcow2")).returncode == 0
    (d / "upload.img").write_bytes((d / "top.qcow2").read_bytes())
    check_ok("create", "-q", "-f", "raw", str(d / "disk.img"), "4M")
    return d


def run_example(code: str, cwd: Path, where: str = "README.md") -> str:
    """Run ``code`` as ``python -c`` would (a fresh interpreter, this checkout's vdkit); its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TZ="UTC")
    env.pop("VDKIT_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", f"{where}'s example failed:\n{code}\n{r.stderr}"
    return r.stdout


def _qemu_json(*args: str, cwd: Path) -> object:
    r = qemu_img("info", "--output=json", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def check_open_and_policy(out: str, d: Path) -> None:
    """The chain walk prints what ``qemu-img info --backing-chain`` lists; the untrusted opens print
    one layer and the policy's refusal, which is ``vdkit-img --allow-dir ... map``'s text."""
    chain = _qemu_json("--backing-chain", "top.qcow2", cwd=d)
    assert isinstance(chain, list)
    top = chain[0]
    expected = [f"{top['virtual-size']} {[s['name'] for s in top.get('snapshots', [])]}"]
    expected += [f"{layer['filename']} {layer['format']}" for layer in chain]
    expected.append("1")
    cli = subprocess.run([sys.executable, "-m", "vdkit.cli.main", "--allow-dir", "/srv/images", "map",
                          "upload.qcow2"], cwd=d, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and cli.stderr.startswith("vdkit-img: "), cli.stderr
    expected.append(cli.stderr.removeprefix("vdkit-img: ").rstrip("\n"))
    assert out.splitlines() == expected
    assert "outside the allowed folders" in expected[-1] and str((d / "base.qcow2").resolve()) in expected[-1]


def check_data_and_snapshots(out: str, d: Path) -> None:
    """A read past the end fails with qemu-io's text and EIO; afterwards QEMU sees the write, the old
    data, no snapshot left, and a clean image."""
    size = _qemu_json("disk.qcow2", cwd=d)
    assert isinstance(size, dict)
    r = qemu_io("-r", "-c", f"read {size['virtual-size']} 512", "disk.qcow2", cwd=d)
    assert out == f"{r.stdout.strip()} 5\n"
    r = qemu_io("-r", "-c", "read -P 0x78 4096 512", "-c", "read -P 0x33 0 4096", "-c", "read -P 0x33 4608 60928",
                "disk.qcow2", cwd=d)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0, r.stdout
    assert qemu_img("snapshot", "-l", "disk.qcow2", cwd=d).stdout == ""
    r = qemu_img("check", "disk.qcow2", cwd=d)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout


def check_rendering(out: str, d: Path) -> None:
    """Human text and pretty JSON byte for byte ``qemu-img info``'s; the compact line the same object."""
    human = qemu_img("info", "top.qcow2", cwd=d).stdout
    pretty = qemu_img("info", "--output=json", "top.qcow2", cwd=d).stdout
    assert out.startswith(human + pretty)
    compact = out[len(human + pretty):]
    assert compact.count("\n") == 1 and json.loads(compact) == json.loads(pretty)


def check_inspect(out: str, d: Path) -> None:
    """A qcow2 uploaded as raw: one format-mismatch reason naming the format qemu-img probes."""
    info = _qemu_json("upload.img", cwd=d)
    assert isinstance(info, dict)
    fmt = info["format"]
    assert out == repr([("format-mismatch", f"declared format 'raw', but the content is '{fmt}'")]) + "\n"


def check_options(out: str, d: Path) -> None:
    """The top image read without its backing and the raw window's size, as qemu-img reads them."""
    top = {"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}, "backing": None}
    r = qemu_img("convert", "-O", "raw", "json:" + json.dumps(top), "top-alone.raw", cwd=d)
    assert r.returncode == 0, r.stderr
    window = _qemu_json('json:{"driver": "raw", "offset": 1048576, "file": {"driver": "file", '
                        '"filename": "disk.img"}}', cwd=d)
    assert isinstance(window, dict)
    assert out == f"{(d / 'top-alone.raw').read_bytes()[1 << 20:(1 << 20) + 8].hex()} 1\n{window['virtual-size']}\n"


# a block is recognised by a call it makes; each one the README has must have its checker
CHECKERS: dict[str, Callable[[str, Path], None]] = {
    "vdkit.image_info(node, nested=True)": check_open_and_policy,
    'vdkit.open("disk.qcow2", readonly=False)': check_data_and_snapshots,
    "render_pretty(info)": check_rendering,
    "vdkit.inspect(": check_inspect,
    "vdkit.open(options=opts)": check_options,
}


def _checker(code: str) -> Callable[[str, Path], None] | None:
    found = [check for key, check in CHECKERS.items() if key in code]
    assert len(found) <= 1, f"a block matches several checkers:\n{code}"
    return found[0] if found else None


def _fresh(images: Path, tmp_path: Path) -> Path:
    """A copy of the images for one example (examples that write must not see each other's changes)."""
    d = tmp_path / "w"
    d.mkdir()
    for f in images.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


README_BLOCKS = blocks(README, "python")


def test_the_readme_has_its_examples() -> None:
    """Every checker still finds its block (a renamed call must not drop an example from the test)."""
    for key in CHECKERS:
        assert sum(key in code for code in README_BLOCKS) == 1, key


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_python_block(index: int, images: Path, tmp_path: Path) -> None:
    code = README_BLOCKS[index]
    d = _fresh(images, tmp_path)
    out = run_example(code, d)
    check = _checker(code)
    if check is not None:
        check(out, d)


DOC_BLOCKS = [(p.name, code) for p in sorted((ROOT / "docs").glob("*.md")) for code in blocks(p, "python")]


def test_docs_python_blocks(images: Path, tmp_path: Path) -> None:
    """The docs' python blocks (none today: their library calls are inline) run as the README's do."""
    for n, (doc, code) in enumerate(DOC_BLOCKS):
        d = tmp_path / str(n)
        d.mkdir()
        d = _fresh(images, d)
        out = run_example(code, d, f"docs/{doc}")
        check = _checker(code)
        if check is not None:
            check(out, d)


# Command lines of the README that need nothing but local files: compared with qemu-img's.  Not
# those: servers, system paths, syntax summaries (brackets, alternatives, FILE placeholders).
_NOT_LOCAL = ("://", "nbd:", "rbd:", "/run/", "/etc/", "[", "|", "...", "FILE")


def readme_local_commands() -> list[list[str]]:
    out = []
    for body in blocks(README, "sh"):
        for line in body.splitlines():
            if line.startswith("vdkit-img ") and not any(mark in line for mark in _NOT_LOCAL):
                out.append(shlex.split(line, comments=True)[1:])
    return out


def test_readme_local_command_lines(images: Path) -> None:
    commands = readme_local_commands()
    assert len(commands) >= 2, commands  # the json: examples (a map without backing, a raw window)
    for args in commands:
        assert_same(args, cwd=images)
