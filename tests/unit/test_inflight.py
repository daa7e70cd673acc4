"""vdkit.io.inflight.InFlight: the writes-in-flight pool the qcow2 engine hands convert's data to.

What callers rely on, checked with jobs that finish in a random order (each job waits for a
random later event, so no timing is assumed):

* at most ``threads`` jobs run at once and at most ``max_bytes`` are submitted and not done
  (a lone job larger than the bound still goes);
* ``after(fn)`` runs ``fn`` only once every job submitted before it is done, and every ``fn``
  runs exactly once, in submission order relative to the jobs it waits for;
* ``wait_for(ranges)`` returns only when no job writing into a range is pending;
* ``wait()`` returns the failed jobs (oldest first) once nothing is pending, and ``close()`` ends
  the workers.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from vdkit.io.inflight import InFlight


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_random_completion_order_keeps_the_promises(seed: int, threads: int) -> None:
    rnd = random.Random(seed)
    max_bytes = 5 << 10
    pool = InFlight(threads, max_bytes=max_bytes)
    lock = threading.Lock()
    running: list[int] = []
    peak = [0, 0]  # jobs running at once, bytes submitted and not done
    pending_bytes = [0]
    done: set[int] = set()
    pauses = {job: rnd.random() * 0.002 for job in range(60)}  # a random completion order
    sizes = {job: rnd.choice([512, 1024, 2048, 6 << 10]) for job in range(60)}  # 6 KiB: past the bound
    log: list[int] = []

    def write(offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        job = offset // 4096
        with lock:
            running.append(job)
            peak[0] = max(peak[0], len(running))
        time.sleep(pauses[job])
        with lock:
            running.remove(job)
            done.add(job)
            pending_bytes[0] -= sizes[job]
        if job % 7 == 3:
            raise OSError(5, f"injected failure of job {job}")

    callbacks: list[int] = []
    for job in range(60):
        with lock:
            pending_bytes[0] += sizes[job]
        pool.submit(write, job * 4096, [bytes(sizes[job])], token=job)
        with lock:
            # what is submitted and not done: within the bound, or one job alone past it
            peak[1] = max(peak[1], pending_bytes[0] if pending_bytes[0] > sizes[job] else 0)
        if rnd.random() < 0.4:
            n = len(callbacks)
            before = set(range(job + 1))

            def fn(n: int = n, before: set[int] = before) -> None:
                with lock:
                    missing = before - done
                    log.append(n)
                assert not missing, f"after() callback {n} ran before jobs {sorted(missing)} were done"

            callbacks.append(n)
            pool.after(fn)
        if rnd.random() < 0.15:
            target = rnd.randrange(job + 1)
            pool.wait_for([(target * 4096 + 100, target * 4096 + 101)])
            with lock:
                assert target in done, "wait_for returned with a job writing into the range pending"
    failed = pool.wait()
    assert [j.token for j in failed] == [j for j in range(60) if j % 7 == 3]
    assert all(isinstance(j.error, OSError) for j in failed)
    assert done == set(range(60))
    assert sorted(log) == callbacks, "every after() callback runs once"
    assert peak[0] <= threads
    assert peak[1] <= max_bytes
    pool.close()
    assert not any(t.is_alive() for t in pool._workers)


def test_byte_bound_holds_submits_back() -> None:
    """A submit past ``max_bytes`` waits until enough earlier jobs are done."""
    pool = InFlight(4, max_bytes=3000)
    gate = threading.Event()
    started = threading.Semaphore(0)

    def write(offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        started.release()
        assert gate.wait(10)

    pool.submit(write, 0, [bytes(1000)])
    pool.submit(write, 1000, [bytes(1000)])
    third = threading.Thread(target=pool.submit, args=(write, 2000, [bytes(1500)]))
    third.start()
    assert started.acquire(timeout=10) and started.acquire(timeout=10)
    third.join(0.05)
    assert third.is_alive(), "the third write went past the byte bound"
    gate.set()
    third.join(10)
    assert not third.is_alive()
    assert pool.close() == []
