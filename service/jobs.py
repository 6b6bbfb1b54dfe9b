"""``run_job(job_id)``: the one function every executor runs (worker thread or Celery task).

1. Claim the job in SQL (a conditional UPDATE; only one worker wins, and a worker whose
   lease expired has lost it). A heartbeat thread renews the lease while it runs.
2. Load the log (``service.sources``), reconstruct it with ``recon.pipeline.reconstruct``
   into a private work directory, reporting stage and step/T to SQL.
3. Publish the scene to storage (atomic), then mark the job succeeded and register the
   scene in one transaction fenced by the claim token.

A cancelled job stops at the next optimiser step and its output is discarded. A worker
told to shut down gives the job back to the queue. A worker that dies leaves a stale
lease: ``Store.requeue_stale`` (run by every executor's reaper) puts the job back in the
queue and another worker starts it again; nothing half-written is ever published.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.db import Scene, Store
from service.settings import Settings, get_settings
from service.storage import Storage, open_storage

log = logging.getLogger("drivesplat.jobs")

#: Exceptions whose message is the user's answer (bad log, bad options), not a bug.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


@dataclass
class JobContext:
    """What ``run_job`` needs: settings, the job store and the scene storage."""

    settings: Settings
    store: Store
    storage: Storage
    shutdown: threading.Event = field(default_factory=threading.Event)

    @staticmethod
    def from_settings(settings: Settings | None = None, *, init_db: bool = True) -> JobContext:
        s = settings or get_settings()
        s.home_dir.mkdir(parents=True, exist_ok=True)
        store = Store(s.db_url)
        if init_db:
            store.init()
        cleanup_work_dirs(s.home_dir)
        return JobContext(s, store, open_storage(s.storage, s.home_dir / "cache"))

    def limits(self):
        from service.archive import ArchiveLimits

        return ArchiveLimits(int(self.settings.max_extract_mb * 2**20),
                             self.settings.max_archive_members)


def cleanup_work_dirs(home: Path) -> int:
    """Remove work directories left by dead worker processes of this machine.

    Work directories are named ``<job>-<token>-<pid>``; one whose process is gone is
    garbage (the job itself was re-queued through its expired lease).
    """
    removed = 0
    for d in (home / "work").glob("*-*-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to judge)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


class _Lease:
    """Heartbeats for a claimed job; tells whether it was lost or cancelled."""

    def __init__(self, store: Store, job_id: str, token: str, lease_s: float) -> None:
        self.store, self.job_id, self.token = store, job_id, token
        self.interval = max(0.2, lease_s / 4)
        self.lost = False
        self.cancelled = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> None:
        with self._lock:
            try:
                ok, cancel = self.store.heartbeat(self.job_id, self.token)
            except Exception as e:  # DB hiccup: the lease may still be valid; retry later
                log.warning("job %s: heartbeat failed: %s", self.job_id, e)
                return
            self._last = time.monotonic()
            if not ok:
                self.lost = True
            self.cancelled = self.cancelled or cancel

    def poll(self, every_s: float = 0.5) -> None:
        """Beat now if the last beat is older than ``every_s`` (called between steps)."""
        if time.monotonic() - self._last >= every_s:
            self.beat()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _summary(scene_dir: Path) -> dict:
    from recon.assets import read_manifest

    m = read_manifest(scene_dir)
    return {"frames": len(m["frames"]), "cameras": sorted(m["cameras"]),
            "actors": len(m["actors"]), "gaussians": m.get("counts", {}),
            "source": {k: m["source"].get(k) for k in ("name", "format")},
            "recon_s": m.get("recon_s")}


def run_job(job_id: str, ctx: JobContext | None = None) -> str | None:
    """Run one job to a terminal state (or give it back). Returns the state it left in.

    Returns None when the job was not claimable (already done, cancelled, or held by a
    live worker) or the lease was lost on the way.
    """
    ctx = ctx or JobContext.from_settings()
    s, store, storage = ctx.settings, ctx.store, ctx.storage
    if store.fail_if_exhausted(job_id, s.max_attempts):
        log.error("job %s: failed: started %d times without finishing", job_id, s.max_attempts)
        return "failed"
    token = store.claim(job_id, worker_name(), s.lease_s)
    if token is None:
        log.info("job %s: not claimable (finished, cancelled or running elsewhere)", job_id)
        return None
    job = store.get_job(job_id)
    assert job is not None
    req = job.request
    log.info("job %s: started (attempt %d, worker %s)", job_id, job.attempts, worker_name())
    lease = _Lease(store, job_id, token, s.lease_s)
    work = s.home_dir / "work" / f"{job_id}-{token[:8]}-{os.getpid()}"
    t0 = time.perf_counter()
    last_progress = [0.0]

    def stop_now() -> bool:
        lease.poll()
        return lease.lost or lease.cancelled or ctx.shutdown.is_set()

    def on_stage(name: str) -> None:
        store.set_stage(job_id, token, name)
        log.info("job %s: %s", job_id, name)

    def on_step(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if step == total or step == 1 or now - last_progress[0] >= 0.5:
            last_progress[0] = now
            store.set_progress(job_id, token, step, total, float(loss))

    def discard_or_release() -> str | None:
        if lease.lost:
            log.warning("job %s: lease lost (another worker took over); output discarded",
                        job_id)
            return None
        if lease.cancelled:
            store.finish(job_id, token, "cancelled")
            log.info("job %s: cancelled; output discarded", job_id)
            return "cancelled"
        store.release(job_id, token)
        log.info("job %s: worker shutting down; job returned to the queue", job_id)
        return "queued"

    try:
        from recon.init import InitConfig
        from recon.pipeline import reconstruct
        from service.sources import load_source

        on_stage("loading")
        logseg = load_source(req["source"], work, storage=storage, job_id=job_id,
                             limits=ctx.limits())
        if stop_now():
            return discard_or_release()
        init_kw = {k: req[k] for k in ("budget", "actors") if req.get(k) is not None}
        init = InitConfig(**init_kw)
        res = reconstruct(logseg, work / "scene", method=req["method"], init=init,
                          steps=req.get("steps"), turbo=bool(req.get("turbo")),
                          stage=on_stage, progress=on_step, should_stop=stop_now,
                          device=s.device)
        if stop_now():
            return discard_or_release()
        scene_id = job_id
        summary = _summary(res.scene_dir)
        storage.put_scene(res.scene_dir, scene_id)
        metrics = {"recon_s": res.recon_s, "init_s": res.init_s, "iterations": res.iterations,
                   "total_s": time.perf_counter() - t0, "gaussians": summary["gaussians"]}
        scene = Scene(scene_id, job.name, job_id, req["method"], summary, time.time())
        if not store.finish(job_id, token, "succeeded", metrics=metrics, scene=scene):
            after = store.get_job(job_id)
            if after is not None and after.state == "cancelled" and \
                    store.get_scene(scene_id) is None:
                storage.delete_scene(scene_id)
            log.warning("job %s: finished but lost the lease; result left to the new owner",
                        job_id)
            return None
        log.info("job %s: succeeded in %.1f s (%d steps), scene %s", job_id,
                 time.perf_counter() - t0, res.iterations, scene_id)
        return "succeeded"
    except _USER_ERRORS as e:
        msg = str(e).strip('"')
        log.warning("job %s: failed: %s", job_id, msg)
        store.finish(job_id, token, "failed", error=msg)
        return "failed"
    except Exception as e:
        log.exception("job %s: failed with an internal error", job_id)
        store.finish(job_id, token, "failed", error=f"internal error: {type(e).__name__}: {e}")
        return "failed"
    finally:
        lease.stop()
        shutil.rmtree(work, ignore_errors=True)
        _drop_upload_if_finished(ctx, job_id, req)


def _drop_upload_if_finished(ctx: JobContext, job_id: str, req: dict) -> None:
    """An uploaded archive is kept while its job may still run, and deleted after."""
    if req.get("source", {}).get("kind") != "upload":
        return
    try:
        job = ctx.store.get_job(job_id)
        if job is not None and job.state in ("succeeded", "failed", "cancelled"):
            ctx.storage.delete_upload(job_id)
    except Exception as e:  # never fail a job over clean-up
        log.warning("job %s: could not delete its upload: %s", job_id, e)
