"""One monitor script run on QEMU and on vdkit-daemon, each on its own identical tree, every answer compared.

The differential machinery of the node-graph, external-snapshot and block-job suites: both processes get
the same ``-drive``/``-blockdev`` arguments and the same steps, in folders ``qemu/`` and ``vdki/`` (names of
equal length, so files that record their own path compare byte for byte once it is replaced), built by the
same ``setup``.  Answers are compared after masking the folder (``DIR``), automatic node names and times
(``normalise``), and whatever a suite says varies between runs of QEMU itself.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.daemon.conftest import Daemons, Monitor, normalise, normalise_hmp

Step = Any
"""``(name, arguments)`` a QMP command; a string an HMP line; ``("@wait", job, status)`` waits for that
job status event; a callable ``f(folder) -> str`` runs outside the daemon (another process opening an
image...) and its text is compared."""


def wait_event(m: Monitor, seen: list[int], pred: Callable[[dict[str, Any]], bool], timeout: float = 120) -> None:
    """Read until an event after position ``seen[0]`` matches (events stay in ``m.events``)."""
    deadline = time.monotonic() + timeout
    while True:
        for i in range(seen[0], len(m.events)):
            if pred(m.events[i]):
                seen[0] = i + 1
                return
        assert time.monotonic() < deadline, ("event not seen", m.events[-5:])
        line = m.read_line()
        obj = json.loads(line)
        assert "event" in obj, f"unexpected answer {line}"
        m.events.append(obj)


def status_is(job: str, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": job, "status": status}


def blank_file_sizes(text: str) -> str:
    """What the host's allocation decides (it differs by a block between runs of QEMU itself): the files'
    allocated sizes, and the virtual size of a protocol node a resize or a preallocation grows."""
    text = re.sub(r'"actual-size": \d+', '"actual-size": N', text)
    text = re.sub(r'("virtual-size": )\d+(, "filename": "[^"]*", "format": "file")', r"\1N\2", text)
    return re.sub(r"disk size: .*", "disk size: N", text)


def _event_text(e: dict[str, Any], d: Path) -> str:
    return normalise(json.dumps({"event": e["event"], "data": e.get("data")})).replace(str(d), "DIR")


def _assert_alike(q: str, v: str) -> None:
    if v != q:  # the first differing member, readable
        qs, vs = q.split(", "), v.split(", ")
        k = next((i for i, (a, b) in enumerate(zip(qs, vs, strict=False)) if a != b), min(len(qs), len(vs)))
        assert vs[max(0, k - 3):k + 3] == qs[max(0, k - 3):k + 3], q.split("\n")[0]
    assert v == q, q.split("\n")[0]


def run_script(daemons: Daemons, args: list[str], script: list[Step], *, setup: Callable[[Path], None],
               quit: bool = False, events: bool = False, qmp_filter: Callable[[str], str] | None = None,
               blank_sizes: bool = False, mask: re.Pattern[str] | None = None) -> dict[str, Path]:
    """Run ``script`` on both daemons (``DIR`` in arguments and steps = the tree) and compare; the two trees.

    ``quit`` ends both processes afterwards (images flushed and unlocked; the events sent on the way out
    are read to the end of the stream).  ``events``: the event sequences (without time stamps, whose
    interleaving with answers is not deterministic in QEMU either) are compared too.  ``qmp_filter``:
    applied to QMP answers; ``blank_sizes``: :func:`blank_file_sizes` on every text; ``mask``: what matches
    it in an answer or event becomes ``MASKED`` (timing-dependent values of QEMU's).
    """
    out: dict[str, list[str]] = {}
    seen_events: dict[str, list[str]] = {}
    trees = {}
    for who, dirname in (("qemu", "qemu"), ("vdkit", "vdki")):
        d = daemons.tmp / dirname
        trees[who] = d
        d.mkdir()
        setup(d)
        argv = [a.replace("DIR", str(d)) for a in args]
        proc, path, _ = getattr(daemons, who)(argv, d)
        m = daemons.monitor(path).negotiate()
        seen = [0]
        lines = []
        for step in script:
            if not (isinstance(step, tuple) and step[0] == "@wait"):
                seen[0] = len(m.events)  # a wait looks at what came with or after the step before it
            if callable(step):
                text = step(d)
            elif isinstance(step, str):
                text = normalise_hmp(m.hmp(step.replace("DIR", str(d))))
            elif step[0] == "@wait":
                wait_event(m, seen, status_is(step[1], step[2]))
                continue
            else:
                name, arguments = step
                arguments = json.loads(json.dumps(arguments).replace("DIR", str(d)))
                text = normalise(m.cmd_line(name, arguments))
                if qmp_filter is not None:
                    text = qmp_filter(text)
            text = text.replace(str(d), "DIR")
            if blank_sizes:
                text = blank_file_sizes(text)
            if mask is not None:
                text = mask.sub("MASKED", text)
            lines.append(f"{step!r}\n{text}")
        if quit:
            m.cmd("quit")
            try:  # the events sent on the way out (jobs cancelled at exit), up to the end of the stream
                while True:
                    obj = json.loads(m.read_line())
                    if "event" in obj:
                        m.events.append(obj)
            except (EOFError, OSError):
                pass
            proc.wait(timeout=60)
        out[who] = lines
        seen_events[who] = [_event_text(e, d) for e in m.events if e["event"] != "SHUTDOWN"]
        if mask is not None:
            seen_events[who] = [mask.sub("MASKED", e) for e in seen_events[who]]
    for q, v in zip(out["qemu"], out["vdkit"], strict=True):
        _assert_alike(q, v)
    if events:
        assert seen_events["vdkit"] == seen_events["qemu"]
    return trees
