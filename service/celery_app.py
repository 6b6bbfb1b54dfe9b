"""The Celery app of ``drivesplat worker``: one task, ``run_job``, with Redis as broker.

Settings that make a lost worker lose nothing:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged only
  after ``run_job`` returned; a worker that dies mid-job leaves it unacknowledged.
* ``worker_prefetch_multiplier = 1`` and the solo pool: a worker holds one job at a time
  (one job per GPU) and the job runs in the worker process itself, so killing the worker
  kills the job; there is no orphaned child.
* The SQL lease (``service.jobs``) is what actually recovers the job: the reaper of the
  API or of any live worker re-queues it once its heartbeat is older than the lease, and
  ``run_job``'s conditional claim makes a late duplicate message a no-op.

No result backend: job state lives in SQL.
"""

from __future__ import annotations

import logging
import os
import socket

from celery import Celery

from service.settings import Settings, get_settings

TASK_NAME = "drivesplat.run_job"
log = logging.getLogger("drivesplat.worker")
_CTX = None


def make_celery(settings: Settings) -> Celery:
    """A Celery app for these settings (broker ``REDIS_URL``, queue ``DRIVESPLAT_QUEUE``)."""
    app = Celery("drivesplat", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_default_exchange=settings.queue,
        task_default_routing_key=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 6 * 3600,
                                  "global_keyprefix": f"{settings.queue}:"},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job_task(job_id: str) -> str | None:
        from service.jobs import run_job

        return run_job(job_id, worker_context(settings))

    return app


def worker_context(settings: Settings | None = None):
    """The worker process's JobContext (built once)."""
    global _CTX
    if _CTX is None:
        from service.jobs import JobContext

        _CTX = JobContext.from_settings(settings)
    return _CTX


def run_worker(settings: Settings | None = None, loglevel: str = "INFO") -> None:
    """Run a Celery worker for drivesplat jobs in this process (blocks).

    Also starts a reaper thread, so stale jobs are recovered even when no API runs.
    """
    from service.executors import CeleryExecutor

    settings = settings or get_settings()
    ctx = worker_context(settings)
    executor = CeleryExecutor(ctx)
    executor.reaper.start()

    from celery.signals import worker_shutting_down

    @worker_shutting_down.connect(weak=False)
    def _stop_job(**_kw) -> None:  # SIGTERM: the job stops at its next step, re-queued
        ctx.shutdown.set()

    log.info("worker %s:%d on queue %r, broker %s, database %s", socket.gethostname(),
             os.getpid(), settings.queue, settings.redis_url, settings.db_url.split("@")[-1])
    executor.app.worker_main([
        "worker", "--pool=solo", "--concurrency=1", f"--queues={settings.queue}",
        f"--loglevel={loglevel}", f"--hostname=drivesplat-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ])


#: ``celery -A service.celery_app worker`` works too (settings from the environment).
app = make_celery(get_settings())
