"""Run qemu-img and vdkit-img side by side on every read-only view of an image.

Built on ``conftest.assert_same`` (which shows a unified diff of what differs).
Environment overrides (``TZ``) apply to both programs alike (``conftest.tool_env``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Result, assert_same, qemu_img, tool_env, vdkit_img

INFO_VARIANTS: tuple[tuple[str, ...], ...] = (
    ("info",),
    ("info", "--output=json"),
    ("info", "--backing-chain"),
    ("info", "--backing-chain", "--output=json"),
)


def run_qemu(args: list[str] | tuple[str, ...], cwd: Path | str, env: dict[str, str] | None = None) -> Result:
    return qemu_img(*args, cwd=cwd, env=tool_env(env))


def run_vdkit(args: list[str] | tuple[str, ...], cwd: Path | str, env: dict[str, str] | None = None) -> Result:
    return vdkit_img(*args, cwd=cwd, env=tool_env(env))


def same(args: list[str] | tuple[str, ...], cwd: Path | str, env: dict[str, str] | None = None) -> Result:
    """qemu-img and vdkit-img agree on stdout, stderr (modulo program name) and exit code (``assert_same``)."""
    return assert_same(args, cwd, env=env or {})


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
