"""What a ``vdkit-img`` process imports (issue 14's start-up target: ``info`` within 1.5x of a bare interpreter).

Timings on a shared machine say little, so these tests hold the cause instead: the set of modules a
command imports, read from ``python -X importtime`` of the installed entry point (``scripts/vdkit-img``,
which pyproject installs as it is) and compared with a bare ``python -c pass`` of the same interpreter.
Every module costs its import (a third of a millisecond for an empty one) and every class its
creation; ``enum``, ``re``, ``typing``, ``dataclasses`` and numpy cost whole milliseconds each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT, check_ok

SCRIPT = ROOT / "scripts" / "vdkit-img"
# Standard modules an info-like command may add to a bare interpreter's: all are small or built in.
# (Not ``array``: it imports ``collections`` to register itself as a MutableSequence; see vdkit.io.tables.)
CHEAP_STDLIB = {"__future__", "atexit", "errno", "fcntl", "gc", "struct", "_struct", "zlib"}
# vdkit modules `info` of one image may import, at most (the format's own package included): raise it
# only for a module that pays for itself, and look for one to merge or defer first.
INFO_BUDGET = 23
# vdkit modules `info` has no use for: sizes and creation options (vdkit.opts), the shapes of qcow2
# bitmaps, encryption and check results (vdkit.info.extra_model); and the generic snapshot layer
# (vdkit.block.snapshot) unless the image lists snapshots.  Each module costs its import (a
# hundredth of a bare interpreter start and more), its code's unmarshalling and its classes.
NOT_FOR_INFO = {"vdkit.opts", "vdkit.info.extra_model"}
FORMATS = [("raw", []), ("qcow2", []), ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"]),
           ("vdi", []), ("vhdx", []), ("vpc", []), ("qed", []), ("parallels", [])]


def _imported(args: list[str], cwd: Path, codes: tuple[int, ...] = (0,)) -> list[str]:
    """Modules imported by ``args`` (a script and its arguments, or ``-c code``), in order."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode in codes, p.stderr[-2000:]
    return [line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")][1:]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("startup")
    for fmt, opts in FORMATS:
        check_ok("create", "-q", "-f", fmt, *opts, str(d / f"{fmt}{len(opts)}.img"), "64M")
    check_ok("snapshot", "-c", "snap", str(d / "qcow20.img"))
    return d


@pytest.fixture(scope="module")
def bare(images: Path) -> set[str]:
    return set(_imported(["-c", "pass"], images))


def _extra(args: list[str], images: Path, bare: set[str]) -> tuple[set[str], list[str]]:
    mods = [m for m in _imported([str(SCRIPT), *args], images) if m not in bare]
    return {m for m in mods if not m.startswith("vdkit")}, [m for m in mods if m.startswith("vdkit")]


@pytest.mark.parametrize(("fmt", "opts"), FORMATS, ids=[f"{f}{len(o)}" for f, o in FORMATS])
@pytest.mark.parametrize("command", [["info"], ["info", "--output=json"], ["snapshot", "-l"]])
def test_info_imports_only_what_it_needs(images: Path, bare: set[str], fmt: str, opts: list[str],
                                         command: list[str]) -> None:
    stdlib, ours = _extra([*command, f"{fmt}{len(opts)}.img"], images, bare)
    assert stdlib <= CHEAP_STDLIB, sorted(stdlib - CHEAP_STDLIB)
    assert not NOT_FOR_INFO & set(ours), sorted(NOT_FOR_INFO & set(ours))
    if command[0] == "info":  # (qcow20.img is the one image with a snapshot)
        assert ("vdkit.block.snapshot" in ours) == (f"{fmt}{len(opts)}" == "qcow20"), ours
    if command == ["info"]:  # the human renderer shares the records' QObject form, not the JSON writer
        assert "vdkit.info.render_json" not in ours, ours
    formats = {m.split(".")[2] for m in ours if m.startswith("vdkit.formats.") and m != "vdkit.formats.registry"}
    assert formats == {fmt}, "probing imported other formats' modules (registry.PROBE_GATES)"
    assert len(ours) <= INFO_BUDGET, f"{len(ours)} vdkit modules: {ours}"


@pytest.mark.parametrize(("fmt", "opts"), [("qcow2", []), ("qcow2", ["-o", "compat=0.10"]), ("raw", [])])
def test_info_without_struct(tmp_path: Path, bare: set[str], fmt: str, opts: list[str]) -> None:
    """``info`` of a plain qcow2 image (v3 with its feature table, or v2) or a raw one decodes its
    header and packs its lock requests without ``struct`` (the module and its C module cost a few
    hundredths of a bare start), and prints what qemu-img prints."""
    check_ok("create", "-q", "-f", fmt, *opts, str(tmp_path / "img"), "64M")
    for command in (["info"], ["info", "--output=json"]):
        stdlib, _ = _extra([*command, "img"], tmp_path, bare)
        assert not {"struct", "_struct"} & stdlib, sorted(stdlib)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        ours = subprocess.run([sys.executable, str(SCRIPT), *command, "img"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        theirs = subprocess.run(["qemu-img", *command, "img"], cwd=tmp_path, capture_output=True, text=True)
        assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


def test_installed_entry_points_are_the_scripts() -> None:
    """pip installs scripts/ as they are; [project.scripts] would bring back its wrapper's ``import re``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "scripts" not in project["project"]
    files = project["tool"]["setuptools"]["script-files"]
    assert {Path(f).name for f in files} == {"vdkit-img", "vdkit-daemon"}
    for f in files:
        text = (ROOT / f).read_text()
        assert text.startswith("#!python\n") and "import re" not in text
        assert os.access(ROOT / f, os.X_OK)


# Modules no command on a small image should need: numpy is ~10 bare interpreter starts, the others
# several milliseconds each (typing and dataclasses bring re, inspect, ast, dis...; enum is half a start).
HEAVY = {"numpy", "typing", "dataclasses", "inspect", "re", "enum", "ast", "ctypes", "pickle", "pathlib"}
SMALL_WORK = [
    ["map", "qcow20.img"],
    ["map", "--output=json", "qcow20.img"],
    ["compare", "qcow20.img", "raw0.img"],
    ["convert", "-O", "raw", "qcow20.img", "out.raw"],
    ["create", "-q", "-f", "raw", "new.raw", "1G"],
    ["resize", "-q", "new.raw", "2G"],
    ["check", "raw0.img"],  # exit 63: the format has no check, as qemu-img
    ["check", "qcow20.img"],  # small tables: checked on lists (vdkit.formats.qcow2.check)
    ["check", "--output=json", "qcow20.img"],
    ["rebase", "-u", "-b", "raw0.img", "-F", "raw", "top.qcow2"],
]


@pytest.mark.parametrize("args", SMALL_WORK, ids=lambda a: "-".join(a[:2]))
def test_small_work_imports_nothing_heavy(images: Path, bare: set[str], tmp_path: Path, args: list[str]) -> None:
    for name in ("qcow20.img", "raw0.img"):
        (tmp_path / name).symlink_to(images / name)
    (tmp_path / "new.raw").write_bytes(b"")
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "top.qcow2"), "64M")
    mods = [m for m in _imported([str(SCRIPT), *args], tmp_path, (0, 63)) if m not in bare]
    assert not HEAVY & set(mods), sorted(HEAVY & set(mods))


# A sitecustomize that tells whether the interpreter's teardown ran (its audit event, written to a
# copy of stderr) and, on request, leaves something the teardown must serve: an atexit callback or a
# thread that is not a daemon.
_SITE = '''
import os
import sys

def _hook(event, args, _write=os.write, _fd=os.dup(2)):
    if event == "cpython.PyInterpreterState_Clear":
        _write(_fd, b"teardown\\n")

sys.addaudithook(_hook)
mode = os.environ.get("PROBE_MODE")
if mode == "atexit":
    import atexit
    atexit.register(lambda: os.write(2, b"atexit ran\\n"))
elif mode == "thread":
    import threading
    import time
    threading.Thread(target=lambda: (time.sleep(0.2), os.write(2, b"thread joined\\n"))).start()
'''


_EXITS = [("script", "none"), ("module", "none"), ("script", "atexit"), ("module", "atexit"), ("script", "thread"),
          ("profile", "profile")]


@pytest.mark.parametrize(("entry", "mode"), _EXITS, ids=["-".join(e) for e in _EXITS])
def test_process_leaves_without_teardown_unless_needed(images: Path, tmp_path: Path, entry: str, mode: str) -> None:
    """``vdkit-img`` ends with os._exit after flushing (the teardown is a fifth of a bare start), but
    takes the ordinary exit when another party waits for it; the output and exit status are the same."""
    (tmp_path / "sitecustomize.py").write_text(_SITE)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", PROBE_MODE=mode)
    cmd = {"script": [str(SCRIPT)], "module": ["-m", "vdkit.cli.main"],
           "profile": ["-m", "cProfile", "-o", str(tmp_path / "prof"), str(SCRIPT)]}[entry]
    expected = subprocess.run(["qemu-img", "info", "qcow20.img"], cwd=images, capture_output=True, text=True)
    for args, code in ((["info", "qcow20.img"], 0), (["check", "raw0.img"], 63), (["info", "missing.img"], 1)):
        p = subprocess.run([sys.executable, *cmd, *args], cwd=images, env=env, capture_output=True, text=True)
        assert p.returncode == (0 if mode == "profile" else code), p.stderr  # cProfile swallows SystemExit
        if code == 0:
            assert p.stdout == expected.stdout
        else:
            assert p.stderr.count("vdkit-img: ") == 1, p.stderr
        if mode == "thread":  # the thread may end before the command does; either way it is never cut short
            assert "thread joined" in p.stderr
        else:
            assert ("teardown" in p.stderr) == (mode != "none"), p.stderr
        assert ("atexit ran" in p.stderr) == (mode == "atexit")
    if mode == "profile":
        assert (tmp_path / "prof").stat().st_size > 0


def test_process_exit_on_a_closed_pipe_as_the_ordinary_exit(images: Path) -> None:
    """A reader that went away makes the writes or the flush fail: status and message are what the
    ordinary exit (``sys.exit(main())``) gives."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results = []
    for code in ("from vdkit.cli.main import process_main; process_main()",
                 "import sys; from vdkit.cli.main import main; sys.exit(main())"):
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([sys.executable, "-c", code, "info", "qcow20.img"], cwd=images, env=env,
                               stdout=w, stderr=subprocess.PIPE, text=True)
        finally:
            os.close(w)
        results.append((p.returncode, p.stderr))
    assert results[0] == results[1]
    assert results[0][0] != 0
