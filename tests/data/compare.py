"""Run qemu-img and vdkit-img side by side and explain any difference.

``conftest.assert_same`` says *that* outputs differ; these helpers also show
a unified diff, which is what one needs when a case in a 100-case matrix
fails.  Environment overrides (``TZ``) apply to both programs alike.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path

from tests.conftest import ROOT, Result, _run, require_tool

INFO_VARIANTS: tuple[tuple[str, ...], ...] = (
    ("info",),
    ("info", "--output=json"),
    ("info", "--backing-chain"),
    ("info", "--backing-chain", "--output=json"),
)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TZ", "UTC")
    env["PYTHONPATH"] = str(ROOT)
    env.pop("VDKIT_DEBUG", None)
    if extra:
        env.update(extra)
    return env


def run_qemu(args: list[str] | tuple[str, ...], cwd: Path | str, env: dict[str, str] | None = None) -> Result:
    return _run([require_tool("qemu-img"), *args], cwd=cwd, env=_env(env))


def run_vdkit(args: list[str] | tuple[str, ...], cwd: Path | str, env: dict[str, str] | None = None) -> Result:
    return _run([sys.executable, "-m", "vdkit.cli.main", *args], cwd=cwd, env=_env(env))


def _diff(a: str, b: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "qemu-img", "vdkit-img"))


def same(args: list[str] | tuple[str, ...], cwd: Path | str, env: dict[str, str] | None = None) -> Result:
    """qemu-img and vdkit-img agree on stdout, stderr (modulo program name) and exit code."""
    q = run_qemu(args, cwd, env)
    v = run_vdkit(args, cwd, env)
    assert "Traceback" not in v.stderr, v.stderr
    assert v.stdout == q.stdout, f"stdout differs for {list(args)}:\n{_diff(q.stdout, v.stdout)}"
    assert v.normalized_stderr() == q.stderr, f"stderr differs for {list(args)}:\n{_diff(q.stderr, v.stderr)}"
    assert v.returncode == q.returncode, f"exit code differs for {list(args)}: {q.returncode} vs {v.returncode}"
    return q


def same_snapshot_json(name: str, cwd: Path | str, env: dict[str, str] | None = None,
                       extra: tuple[str, ...] = (), *, q_list: Result | None = None,
                       q_json: Result | None = None) -> None:
    """``vdkit-img snapshot -l --output=json`` equals the ``snapshots`` of ``qemu-img info --output=json``.

    With no snapshots our output is an empty array (``[`` newline ``]``),
    the way QEMU prints an empty list.  Key order must match too.  Results
    of ``qemu-img snapshot -l`` / ``info --output=json`` already at hand may
    be passed in to save running them again.
    """
    v = run_vdkit(["snapshot", "-l", "--output=json", *extra, name], cwd, env)
    assert "Traceback" not in v.stderr, v.stderr
    # snapshot -l opens the whole chain: it fails where qemu-img snapshot -l fails.
    ql = q_list or run_qemu(["snapshot", "-l", *extra, name], cwd, env)
    if ql.returncode != 0:
        assert (v.returncode, v.normalized_stderr(), v.stdout) == (ql.returncode, ql.stderr, "")
        return
    q = q_json or run_qemu(["info", "--output=json", *extra, name], cwd, env)
    assert q.returncode == 0, q.stderr
    assert v.returncode == 0, v.stderr
    expected = json.loads(q.stdout).get("snapshots", [])
    got = json.loads(v.stdout)
    assert got == expected
    assert [list(s) for s in got] == [list(s) for s in expected], "key order differs"
    if not expected:
        assert v.stdout == "[\n]\n"
    else:
        # Byte-level: the array as qemu-img prints it, re-indented to level 0.
        start = q.stdout.index('    "snapshots": [\n')
        end = q.stdout.index("\n    ]", start) + len("\n    ]")
        block = q.stdout[start + len('    "snapshots": '):end]
        assert v.stdout == "\n".join(line[4:] if line.startswith("    ") else line
                                     for line in block.split("\n")) + "\n"


def compare_image(name: str, cwd: Path | str, env: dict[str, str] | None = None,
                  extra: tuple[str, ...] = (), snapshot_json: bool = True, chain: bool | None = None) -> None:
    """Every read-only view of one image: the info variants and ``snapshot -l`` (plus its JSON form).

    The two ``--backing-chain`` variants run when the image has a backing
    file (or ``chain=True``); without one they only repeat plain ``info``.
    """
    same(["info", *extra, name], cwd, env)
    q_json = same(["info", "--output=json", *extra, name], cwd, env)
    if chain is None:
        chain = q_json.returncode != 0 or "backing-filename" in q_json.stdout
    if chain:
        same(["info", "--backing-chain", *extra, name], cwd, env)
        same(["info", "--backing-chain", "--output=json", *extra, name], cwd, env)
    q_list = same(["snapshot", "-l", *extra, name], cwd, env)
    if snapshot_json:
        same_snapshot_json(name, cwd, env, extra, q_list=q_list,
                           q_json=q_json if q_json.returncode == 0 else None)
