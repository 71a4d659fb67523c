"""A job: a coroutine doing long work, and QEMU's life cycle around it.

The work is :meth:`Job.run`, a coroutine on the daemon's main loop (nodes can be used from
any loop, and the state machine, its events and the QMP commands all live on the main loop,
so nothing here needs a lock). A job gives the user control only where it says so:

- :meth:`Job.pause_point` (and :meth:`Job.checkpoint`, which also stops a cancelled job):
  a ``job-pause`` or a drain of a node the job uses takes effect there, never in the middle
  of a request;
- :meth:`Job.sleep`: a wait the user can cut short (cancel, a faster speed, a pause).

When :meth:`run` returns (or raises), the job goes the way QEMU's does: ``waiting``,
``pending``, then (at once with ``auto-finalize``, else on ``job-finalize``) :meth:`prepare`,
:meth:`commit` or :meth:`abort`, :meth:`clean`, and ``concluded`` (then, with
``auto-dismiss``, ``null`` and gone). A failed or cancelled job goes through ``aborting``
instead. Each state change is a ``JOB_STATUS_CHANGE`` event; the hooks ``on_*`` let block jobs
add their ``BLOCK_JOB_*`` events at QEMU's places.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

from qsd_py.errors import QMPError
from qsd_py.jobs import state as st

if TYPE_CHECKING:
    from qsd_py.jobs.registry import JobRegistry

log = logging.getLogger(__name__)

CANCELED_TEXT = os.strerror(errno.ECANCELED)  # QEMU's error of a cancelled job


class JobCancelled(Exception):
    """Raised by :meth:`Job.checkpoint` in a cancelled job: the work stops there."""


def error_text(err: BaseException) -> str:
    """The text QEMU would give for an exception ending a job's work."""
    if isinstance(err, QMPError):
        return err.desc
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class Job:
    """One job; subclasses set ``job_type`` (QAPI's JobType) and implement :meth:`run`."""

    job_type: ClassVar[str] = ""

    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
    ) -> None:
        self.registry = registry
        self.id = job_id
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = "undefined"
        self.pause_count = 1  # a job is created paused; start() lets it go
        self.user_paused = False
        self.paused = False  # sitting in a pause point
        self.busy = False  # running (not yielded at a pause point or in a sleep)
        self.cancelled = False  # cancel requested
        self.force_cancel = False  # ... and not a soft cancel (mirror: complete, no pivot)
        self.deferred = False  # run() has ended: the rest happens outside the coroutine
        self.error: str | None = None
        self.current_progress = 0
        self.total_progress = 0
        self._task: asyncio.Task[None] | None = None
        self._waker: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        #: The group of a ``transaction`` with ``completion-mode: grouped`` (QEMU's JobTxn);
        #: None: the job completes alone.
        self.txn: JobTxn | None = None

    # --- what a job kind implements -------------------------------------------------------
    async def run(self) -> None:
        """The work. Raise to fail the job (the exception's text becomes its error)."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """First step of finalizing a job whose work succeeded; raising aborts it."""

    async def commit(self) -> None:
        """The job succeeded: make its result take effect (a pivot, a graph change)."""

    async def abort(self) -> None:
        """The job failed or was cancelled: undo what it prepared."""

    async def clean(self) -> None:
        """After commit or abort, either way: let go of nodes and buffers."""

    def cancel_hook(self, force: bool) -> bool:
        """A cancel request arrived; returns whether it is a hard one. Jobs that can finish
        early on a soft cancel (mirror in ``ready``) override this."""
        return True

    def can_complete(self) -> bool:
        """Whether ``job-complete`` means anything to this job kind."""
        return False

    def do_complete(self) -> None:
        """``job-complete`` in ``ready``: finish the work (mirror: pivot)."""

    def do_change(self, opts: dict[str, Any]) -> None:
        """``block-job-change`` with options of this job's type."""

    # Event hooks: plain jobs send only JOB_STATUS_CHANGE, block jobs add their own.
    def on_ready(self) -> None: ...

    def on_pending(self) -> None: ...

    def on_completed(self) -> None: ...

    def on_cancelled(self) -> None: ...

    # --- state ----------------------------------------------------------------------------
    def transition(self, new: str) -> None:
        """Change state by QEMU's table and announce a change (not a repeat)."""
        old = self.status
        if old != "undefined":
            st.check_transition(old, new)
        self.status = new
        if new != old:
            self.registry.emit_event("JOB_STATUS_CHANGE", {"status": new, "id": self.id})

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def is_cancelled(self) -> bool:
        """Hard-cancelled: the job must stop and fail."""
        return self.cancelled and self.force_cancel

    @property
    def is_ready(self) -> bool:
        return self.status in (st.READY, st.STANDBY)

    def info(self) -> dict[str, Any]:
        """QAPI's JobInfo (query-jobs)."""
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status,
            "current-progress": self.current_progress,
            "total-progress": self.total_progress,
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    # --- progress -------------------------------------------------------------------------
    def progress_update(self, done: int) -> None:
        self.current_progress += done

    def set_remaining(self, remaining: int) -> None:
        self.total_progress = self.current_progress + remaining

    # --- running --------------------------------------------------------------------------
    def start(self) -> None:
        """Run the job's coroutine (QEMU's job_start)."""
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        self.transition(st.RUNNING)
        self._task = asyncio.get_running_loop().create_task(self._co_entry())

    async def _co_entry(self) -> None:
        try:
            await self.pause_point()  # a job paused before it started pauses here first
            await self.run()
        except JobCancelled:
            pass
        except Exception as err:  # noqa: BLE001 - any failure of the work fails the job
            if not isinstance(err, (QMPError, OSError)):
                log.exception("job %s failed", self.id)
            self.error = error_text(err)
        self.deferred = True
        self._set_busy(False)
        await self._completed()

    def transition_to_ready(self) -> None:
        """The work caught up (mirror): ``ready``, then the job kind's event."""
        self.transition(st.READY)
        self.on_ready()

    async def pause_point(self) -> None:
        """Stay here while the job is asked to pause (user or drain), unless cancelled."""
        if self.pause_count > 0 and not self.is_cancelled:
            status = self.status
            self.transition(st.STANDBY if status == st.READY else st.PAUSED)
            self.paused = True
            await self._yield()
            self.paused = False
            self.transition(status)

    async def checkpoint(self) -> None:
        """A pause point that also ends the work of a cancelled job."""
        await self.pause_point()
        if self.is_cancelled:
            raise JobCancelled

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` unless woken (cancel, pause, speed change), then a pause point;
        a cancelled job does not wait at all."""
        if self.is_cancelled:
            return
        if self.pause_count == 0 and seconds > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(seconds, self.enter)
            try:
                await self._yield()
            finally:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
        await self.pause_point()

    async def _yield(self) -> None:
        self._waker = asyncio.get_running_loop().create_future()
        self._set_busy(False)
        try:
            await self._waker
        finally:
            self._waker = None
            self.busy = True

    def enter(self) -> None:
        """Wake the coroutine if it waits in a pause point or a sleep."""
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    @property
    def timer_pending(self) -> bool:
        return self._timer is not None

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        if not busy:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def wait_not_busy(self) -> None:
        """Return once the job's coroutine sits in a pause point or sleep, or has ended
        (what a drain waits for after pausing the job)."""
        while self.busy and not self.deferred:
            fut = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            await fut

    # --- pausing, as QEMU counts it -------------------------------------------------------
    def pause(self) -> None:
        """One more reason to pause (user, drain): the job stops at its next pause point."""
        self.pause_count += 1
        if not self.paused:
            self.enter()

    def resume(self) -> None:
        """One reason less; with none left the job goes on."""
        if self.pause_count == 0:
            return
        self.pause_count -= 1
        if self.pause_count == 0 and not self.timer_pending:  # a sleep ends by its timer
            self.enter()

    async def drain_begin(self) -> bool:
        """A drained section of every node begins (QEMU's drain_all): one more reason to
        pause, and wait until the job sits in a pause point. A job sleeping off its speed is
        woken for it, so a running job says ``paused`` (``standby`` when ready) at each such
        section, as QEMU's do. False: the job is not running work (not started, or done)."""
        if not self.started or self.deferred:
            return False
        self.pause()
        await self.wait_paused()
        return True

    async def wait_paused(self) -> None:
        """After :meth:`pause`: return once the job sits in a pause point, or its work has
        ended (a cancelled job does not pause). A job woken from a sleep is not busy until
        its coroutine runs again, so that is waited for too."""
        while not self.paused and not self.deferred and self.started:
            if self.busy:
                await self.wait_not_busy()
            else:
                await asyncio.sleep(0)

    async def drain_end(self) -> None:
        """The section ends: let the job go on, and wait until it has left its pause point
        (its ``running``/``ready`` comes before the command's reply, as in QEMU, where the
        job runs at once)."""
        self.resume()
        await self.wait_unpaused()

    async def wait_unpaused(self) -> None:
        """Once nothing holds the job any more: return when it has left its pause point."""
        while self.paused and self.pause_count == 0 and not self.deferred:
            await asyncio.sleep(0)

    # --- user verbs (QMP) -----------------------------------------------------------------
    def user_pause(self) -> None:
        st.check_verb(self.id, self.status, "pause")
        if self.user_paused:
            raise QMPError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise QMPError("Can't resume a job that was not paused")
        st.check_verb(self.id, self.status, "resume")
        self.user_paused = False
        self.resume()

    async def user_cancel(self, force: bool) -> None:
        st.check_verb(self.id, self.status, "cancel")
        await self.cancel(force)

    def user_complete(self) -> None:
        st.check_verb(self.id, self.status, "complete")
        if self.cancelled or not self.can_complete():
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        self.do_complete()

    async def user_finalize(self) -> None:
        st.check_verb(self.id, self.status, "finalize")
        await self._do_finalize()

    def user_dismiss(self) -> None:
        st.check_verb(self.id, self.status, "dismiss")
        self._dismiss()

    def user_change(self, opts: dict[str, Any]) -> None:
        st.check_verb(self.id, self.status, "change")
        self.do_change(opts)

    # --- cancelling -----------------------------------------------------------------------
    async def cancel(self, force: bool) -> None:
        """QEMU's job_cancel: a concluded job is dismissed, a running one told to stop, one
        that finished its work but is not finalized yet aborted here and now (with its
        group)."""
        if self.status == st.CONCLUDED:
            self._dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            await self._completed()
        elif self.deferred:
            if self.is_cancelled:
                await self._abort_all()
        else:
            self.enter()

    async def _abort_all(self) -> None:
        """This job failed or was cancelled: it ends, and its group with it."""
        if self.txn is not None:
            await self.txn.abort(self)
        else:
            await self._finalize_single()

    @property
    def is_completed(self) -> bool:
        """QEMU's job_is_completed: the work is over (the job waits or is ending)."""
        return self.status in (st.WAITING, st.PENDING, st.ABORTING, st.CONCLUDED, st.NULL)

    def _cancel_async(self, force: bool) -> None:
        force = self.cancel_hook(force)
        if self.user_paused:  # cancelling resumes a job the user paused
            self.user_paused = False
            self.pause_count -= 1
        if force or not self.deferred:  # a soft cancel after the work ended is ignored
            self.cancelled = True
            self.force_cancel |= force

    # --- the end of the work --------------------------------------------------------------
    def _update_rc(self) -> None:
        if self.error is None and self.is_cancelled:
            self.error = CANCELED_TEXT
        if self.error is not None:
            self.transition(st.ABORTING)

    async def _completed(self) -> None:
        self._update_rc()
        if self.error is not None:
            await self._abort_all()
            return
        if self.txn is not None:
            await self.txn.success(self)
            return
        self.transition(st.WAITING)
        self.transition(st.PENDING)
        if not self.auto_finalize:
            self.on_pending()
            return
        await self._do_finalize()

    async def _do_finalize(self) -> None:
        if self.txn is not None:
            await self.txn.finalize(self)
            return
        try:
            await self.prepare()
        except Exception as err:  # noqa: BLE001 - a failed prepare aborts the job
            self.error = error_text(err)
        await self._finalize_single()

    async def _finalize_single(self) -> None:
        self._update_rc()
        try:
            if self.error is None:
                await self.commit()
            else:
                await self.abort()
        finally:
            await self.clean()
        if self.started:
            await self.ending_drains()
            if self.is_cancelled:
                self.on_cancelled()
            else:
                self.on_completed()
        if self.txn is not None:
            self.txn.jobs.remove(self)
        self.transition(st.CONCLUDED)
        if self.auto_dismiss or not self.started:
            self._dismiss()
            if self.started:
                await self.gone_drains()

    async def ending_drains(self) -> None:
        """The drained sections of every node QEMU goes through as a job of this kind ends,
        before its COMPLETED/CANCELLED event (block jobs: :class:`BlockJob`)."""

    async def gone_drains(self) -> None:
        """The same once the job is gone (``null``)."""

    def drop(self) -> None:
        """A job that could not start (its nodes refused it): ``null`` and gone."""
        self._dismiss()

    def _dismiss(self) -> None:
        self.busy = self.paused = False
        self.deferred = True
        self.transition(st.NULL)
        self.registry.remove(self)

    async def wait_finished(self) -> None:
        """Until the job's coroutine and what follows it have ended."""
        if self._task is not None:
            await asyncio.shield(self._task)


class JobTxn:
    """Jobs that complete or fail together (QEMU's JobTxn, a ``transaction`` with
    ``completion-mode: grouped``): a job whose work succeeded waits for the others; when
    all did, all go pending and are finalized together (by the user's job-finalize of any
    of them when one is not auto-finalized); one that fails or is cancelled cancels the
    others, and all end so."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []  # newest first, as QEMU's list
        self.aborting = False

    def add(self, job: Job) -> None:
        self.jobs.insert(0, job)
        job.txn = self

    async def success(self, job: Job) -> None:
        """``job``'s work succeeded (QEMU's job_completed_txn_success)."""
        job.transition(st.WAITING)
        if not all(other.is_completed for other in self.jobs):
            return
        for other in list(self.jobs):
            other.transition(st.PENDING)
            if not other.auto_finalize:
                other.on_pending()
        if all(other.auto_finalize for other in self.jobs):
            await self.finalize(job)

    async def finalize(self, job: Job) -> None:
        """Prepare every job, then commit each; a failed prepare aborts the group."""
        for other in list(self.jobs):
            try:
                await other.prepare()
            except Exception as err:  # noqa: BLE001 - a failed prepare aborts the group
                other.error = error_text(err)
                await self.abort(job)
                return
        for other in list(self.jobs):
            await other._finalize_single()

    async def abort(self, job: Job) -> None:
        """``job`` failed or was cancelled (QEMU's job_completed_txn_abort): the others are
        cancelled, each waited for, and all end, newest first."""
        if self.aborting:
            return
        self.aborting = True
        for other in self.jobs:
            if other is not job:
                other._cancel_async(True)
                if other.started and not other.deferred:
                    other.enter()
        while self.jobs:
            other = self.jobs[0]
            if not other.is_completed:
                if other.started:
                    await other.wait_finished()
                else:
                    other._update_rc()
            await other._finalize_single()
