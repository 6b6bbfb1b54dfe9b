"""Executors: where ``run_job`` runs. One interface, two implementations.

* ``InProcessExecutor`` (default): worker threads inside the API process; nothing else
  to start. Jobs queued in SQL are picked up again when the process restarts.
* ``CeleryExecutor``: jobs go to a Redis queue; ``drivesplat worker`` processes on any
  number of GPU machines run them (acks late, prefetch 1, one job per worker).

Both run a ``Reaper``: it re-queues running jobs whose lease expired (their worker died)
and re-sends queued jobs whose queue message may never have been sent.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod

from service.jobs import JobContext, run_job

log = logging.getLogger("drivesplat.executor")


class Executor(ABC):
    """Accepts job ids; something eventually calls ``run_job`` for each."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.reaper = Reaper(ctx, self)

    @abstractmethod
    def submit(self, job_id: str) -> None:
        """Send a job to a worker (the job is already ``queued`` in SQL)."""

    def dispatch(self, job_id: str) -> None:
        """Submit and record that the queue message went out."""
        self.submit(job_id)
        self.ctx.store.mark_dispatched(job_id)

    def start(self) -> None:
        self.reaper.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.reaper.stop()

    @abstractmethod
    def problem(self) -> str | None:
        """None when ready to take jobs, else what is wrong (for /readyz)."""


class Reaper:
    """Periodically re-queues stale running jobs and re-sends undispatched queued ones."""

    def __init__(self, ctx: JobContext, executor: Executor) -> None:
        self.ctx, self.executor = ctx, executor
        self.interval = max(0.5, ctx.settings.lease_s / 3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[str]:
        """One pass; returns the job ids sent again."""
        store, lease = self.ctx.store, self.ctx.settings.lease_s
        sent = []
        for jid in store.requeue_stale(lease):
            log.warning("job %s: worker lost (no heartbeat for %.0f s); re-queued", jid, lease)
            sent.append(jid)
        sent += [j for j in store.undispatched(older_than_s=lease) if j not in sent]
        for jid in sent:
            try:
                self.executor.dispatch(jid)
            except Exception as e:
                log.error("job %s: could not be re-sent: %s", jid, e)
        return sent

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception as e:  # the database may be briefly unreachable
                log.warning("reaper: %s", e)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class InProcessExecutor(Executor):
    """``settings.workers`` threads in this process, fed from an in-memory queue."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.threads: list[threading.Thread] = []

    def submit(self, job_id: str) -> None:
        self.queue.put(job_id)

    def _work(self) -> None:
        while True:
            jid = self.queue.get()
            if jid is None or self.ctx.shutdown.is_set():
                return
            try:
                run_job(jid, self.ctx)
            except Exception:  # run_job records failures itself; never kill the thread
                log.exception("job %s: run_job raised", jid)

    def start(self) -> None:
        for i in range(self.ctx.settings.workers):
            t = threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        if self.ctx.settings.workers:
            # Jobs queued before a restart live only in SQL: send them again.
            for jid in self.ctx.store.job_ids("queued"):
                self.dispatch(jid)
            super().start()

    def stop(self, timeout: float = 10.0) -> None:
        """Running jobs stop at their next step and go back to the queue."""
        self.ctx.shutdown.set()
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(timeout=timeout)
        super().stop()

    def problem(self) -> str | None:
        if self.ctx.settings.workers and not any(t.is_alive() for t in self.threads):
            return "no in-process worker thread is alive"
        return None


class CeleryExecutor(Executor):
    """Jobs go to Redis; ``drivesplat worker`` processes run them."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        from service.celery_app import make_celery

        self.app = make_celery(ctx.settings)

    def submit(self, job_id: str) -> None:
        from service.celery_app import TASK_NAME

        self.app.send_task(TASK_NAME, args=[job_id], queue=self.ctx.settings.queue)

    def problem(self) -> str | None:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as e:
            return f"cannot reach the Celery broker {self.ctx.settings.redis_url}: {e}"
        return None


def make_executor(ctx: JobContext) -> Executor:
    if ctx.settings.executor == "celery":
        return CeleryExecutor(ctx)
    return InProcessExecutor(ctx)
