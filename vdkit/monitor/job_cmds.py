"""Block job commands: queries, the ``block-job-*`` and ``job-*`` control verbs, and the job types.

The engine (states, events, speed, pause/cancel) is :mod:`vdkit.block.jobs`;
the jobs live in ``DeviceRegistry.jobs``.  This module checks arguments in
QEMU's order and with its texts (``block-jobs.md`` §3, §4, §5) and maps
them onto the engine.  ``block-job-*`` commands name a job by ``device``
(which is the job id, QEMU's legacy naming) and report an unknown one as
``DeviceNotActive``; ``job-*`` commands take ``id`` and say ``Job not found``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdkit.errors import VdkitError
from vdkit.monitor.commands import Arg, opt
from vdkit.record import record

if TYPE_CHECKING:
    from vdkit.block.jobs import Job
    from vdkit.monitor.commands import CommandContext, CommandRegistry


class DeviceNotActiveError(VdkitError):
    qmp_class = "DeviceNotActive"


@record
class BlockJobInfo:
    """QAPI ``BlockJobInfo`` (7.2 member order)."""

    type: str
    device: str
    len: int
    offset: int
    busy: bool
    paused: bool
    speed: int
    io_status: str
    ready: bool
    status: str
    auto_finalize: bool
    auto_dismiss: bool
    error: str | None = None


@record
class JobInfo:
    """QAPI ``JobInfo`` (7.2 member order)."""

    id: str
    type: str
    status: str
    current_progress: int
    total_progress: int
    error: str | None = None


def block_job_info(job: Job) -> BlockJobInfo:
    return BlockJobInfo(type=job.type, device=job.id, len=job.len, offset=job.offset, busy=job.busy,
                        paused=job.paused, speed=job.speed, io_status=job.io_status, ready=job.ready,
                        status=job.status.value, auto_finalize=job.auto_finalize, auto_dismiss=job.auto_dismiss,
                        error=job.error)


def query_block_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[BlockJobInfo]:
    return [block_job_info(j) for j in ctx.machine.jobs.jobs]


def query_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[JobInfo]:
    return [JobInfo(id=j.id, type=j.type, status=j.status.value, current_progress=j.offset, total_progress=j.len,
                    error=j.error) for j in ctx.machine.jobs.jobs]


def _block_job(ctx: CommandContext, job_id: str) -> Job:
    job = ctx.machine.jobs.find(job_id)
    if job is None:
        raise DeviceNotActiveError(f"Block job '{job_id}' not found")
    return job


def _job(ctx: CommandContext, job_id: str) -> Job:
    job = ctx.machine.jobs.find(job_id)
    if job is None:
        raise VdkitError("Job not found")
    return job


def block_job_set_speed(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).set_speed(args["speed"])


def block_job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).pause()


def block_job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).resume()


def block_job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    job = _block_job(ctx, args["device"])
    force = args.get("force", False)
    if job.user_paused and not force:
        raise VdkitError(f"The block job for device '{job.id}' is currently paused")
    job.cancel(force=force)


def block_job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).complete()


def block_job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    _finalize(_block_job(ctx, args["id"]))


def block_job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    _dismiss(_block_job(ctx, args["id"]))


def _finalize(job: Job) -> None:
    job.check_verb("finalize")
    job.finalize()


def _dismiss(job: Job) -> None:
    job.check_verb("dismiss")
    job.dismiss()


def job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).pause()


def job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).resume()


def job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).cancel(force=True)


def job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).complete()


def job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    _finalize(_job(ctx, args["id"]))


def job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    _dismiss(_job(ctx, args["id"]))


def register(reg: CommandRegistry) -> None:
    r = reg.register
    r("query-block-jobs")(query_block_jobs)
    r("query-jobs")(query_jobs)
    r("block-job-set-speed", Arg("device"), Arg("speed", "int"))(block_job_set_speed)
    r("block-job-cancel", Arg("device"), opt("force", "bool"))(block_job_cancel)
    r("block-job-pause", Arg("device"))(block_job_pause)
    r("block-job-resume", Arg("device"))(block_job_resume)
    r("block-job-complete", Arg("device"))(block_job_complete)
    r("block-job-finalize", Arg("id"))(block_job_finalize)
    r("block-job-dismiss", Arg("id"))(block_job_dismiss)
    r("job-pause", Arg("id"))(job_pause)
    r("job-resume", Arg("id"))(job_resume)
    r("job-cancel", Arg("id"))(job_cancel)
    r("job-complete", Arg("id"))(job_complete)
    r("job-dismiss", Arg("id"))(job_dismiss)
    r("job-finalize", Arg("id"))(job_finalize)
