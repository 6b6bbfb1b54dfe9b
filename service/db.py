"""Job and scene records in SQL (SQLAlchemy 2): SQLite file by default, PostgreSQL by URL.

The database is the source of truth for job state; a queue (in-process or Celery) only
says "look at job X". Workers *claim* a job with one conditional UPDATE, keep a lease
alive with heartbeats, and every later write is fenced by the claim token, so a worker
that lost its lease (presumed dead, job re-queued) can never overwrite the new owner.

Schema versioned: ``drivesplat_schema.version``; ``Store.init()`` creates or migrates
(``MIGRATIONS``) and refuses a database newer than this code.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class SchemaRow(Base):
    __tablename__ = "drivesplat_schema"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), index=True, nullable=False)
    stage: Mapped[str | None] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    request: Mapped[str] = mapped_column(Text, nullable=False)  # JSON: what to run
    metrics: Mapped[str | None] = mapped_column(Text)  # JSON
    error: Mapped[str | None] = mapped_column(Text)
    scene_id: Mapped[str | None] = mapped_column(String(32))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    token: Mapped[str | None] = mapped_column(String(32))  # claim fence
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)


class SceneRow(Base):
    __tablename__ = "scenes"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(String(32))
    method: Mapped[str | None] = mapped_column(String(32))
    summary: Mapped[str] = mapped_column(Text, nullable=False)  # JSON
    created_at: Mapped[float] = mapped_column(Float, nullable=False)


#: version -> function upgrading from version-1 (run inside the init transaction).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


class SchemaError(RuntimeError):
    """The database schema is newer than this code, or cannot be migrated."""


@dataclass
class Job:
    """A job record as the rest of the service sees it."""

    id: str
    state: str
    request: dict
    name: str | None = None
    stage: str | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    scene_id: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    worker: str | None = None
    token: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    dispatched: bool = False

    @property
    def progress(self) -> float:
        """0..1: optimisation steps done (1 once succeeded)."""
        if self.state == "succeeded":
            return 1.0
        if self.total_steps:
            return min(1.0, self.step / self.total_steps)
        return 0.0


@dataclass
class Scene:
    """A registered scene (its assets live in storage under ``scenes/<id>``)."""

    id: str
    name: str | None
    job_id: str | None
    method: str | None
    summary: dict
    created_at: float


def _job(row: Any) -> Job:
    return Job(id=row.id, state=row.state, request=json.loads(row.request), name=row.name,
               stage=row.stage, step=row.step, total_steps=row.total_steps, loss=row.loss,
               metrics=json.loads(row.metrics) if row.metrics else {}, error=row.error,
               scene_id=row.scene_id, cancel_requested=bool(row.cancel_requested),
               attempts=row.attempts, worker=row.worker, token=row.token,
               created_at=row.created_at, updated_at=row.updated_at,
               started_at=row.started_at, finished_at=row.finished_at,
               heartbeat_at=row.heartbeat_at, dispatched=bool(row.dispatched))


def _scene(row: Any) -> Scene:
    return Scene(row.id, row.name, row.job_id, row.method, json.loads(row.summary),
                 row.created_at)


def new_id() -> str:
    """A 32-hex-digit id (jobs and scenes)."""
    return uuid.uuid4().hex


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and cross-thread connections."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Store:
    """All SQL the service runs. Thread-safe (one engine, short transactions)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    # ------------------------------------------------------------------ schema

    def init(self) -> None:
        """Create the schema or migrate it to ``SCHEMA_VERSION``.

        Raises:
            SchemaError: the database was written by a newer drivesplat.
        """
        if self.url.startswith("sqlite:///"):
            from pathlib import Path

            Path(self.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # API and workers may start together
                conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
            Base.metadata.create_all(conn)
            row = conn.execute(select(SchemaRow.version).where(SchemaRow.id == 1)).first()
            if row is None:
                conn.execute(insert(SchemaRow).values(id=1, version=SCHEMA_VERSION))
                return
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise SchemaError(f"database schema version {version} is newer than this "
                                  f"drivesplat's ({SCHEMA_VERSION}); upgrade drivesplat")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                if v not in MIGRATIONS:
                    raise SchemaError(f"no migration from schema version {v - 1} to {v}")
                MIGRATIONS[v](conn)
            conn.execute(update(SchemaRow).where(SchemaRow.id == 1)
                         .values(version=SCHEMA_VERSION))

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(SchemaRow.version)).scalar_one())

    def ping(self) -> None:
        """Raises if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # ------------------------------------------------------------------ jobs

    def create_job(self, request: dict, name: str | None = None,
                   job_id: str | None = None) -> Job:
        now = time.time()
        jid = job_id or new_id()
        with self._tx() as c:
            c.execute(insert(JobRow).values(
                id=jid, name=name, state="queued", stage=None, step=0,
                request=json.dumps(request), cancel_requested=False, dispatched=False,
                attempts=0, created_at=now, updated_at=now))
        job = self.get_job(jid)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> Job | None:
        with self.engine.connect() as c:
            row = c.execute(select(JobRow).where(JobRow.id == job_id)).first()
        return None if row is None else _job(row)

    def list_jobs(self, state: str | None = None, limit: int = 100,
                  offset: int = 0) -> tuple[list[Job], int]:
        q = select(JobRow)
        cq = select(func.count()).select_from(JobRow)
        if state:
            q = q.where(JobRow.state == state)
            cq = cq.where(JobRow.state == state)
        q = q.order_by(JobRow.created_at.desc(), JobRow.id).limit(limit).offset(offset)
        with self.engine.connect() as c:
            rows = c.execute(q).all()
            total = int(c.execute(cq).scalar_one())
        return [_job(r) for r in rows], total

    def job_ids(self, state: str) -> list[str]:
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(select(JobRow.id).where(JobRow.state == state)
                                            .order_by(JobRow.created_at))]

    def mark_dispatched(self, job_id: str) -> None:
        with self._tx() as c:
            c.execute(update(JobRow).where(JobRow.id == job_id).values(dispatched=True))

    def undispatched(self, older_than_s: float) -> list[str]:
        """Queued jobs whose queue message may never have been sent."""
        cutoff = time.time() - older_than_s
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(
                select(JobRow.id).where(JobRow.state == "queued",
                                        JobRow.dispatched.is_(False),
                                        JobRow.updated_at < cutoff))]

    def claim(self, job_id: str, worker: str, lease_s: float) -> str | None:
        """Take a queued job (or a running one whose lease expired); returns the token.

        None when the job is gone, finished, cancelled, or held by a live worker.
        """
        now = time.time()
        token = new_id()
        with self._tx() as c:
            res = c.execute(update(JobRow).where(
                JobRow.id == job_id,
                (JobRow.state == "queued") | ((JobRow.state == "running")
                                              & (JobRow.heartbeat_at < now - lease_s)),
            ).values(state="running", worker=worker, token=token, attempts=JobRow.attempts + 1,
                     heartbeat_at=now, updated_at=now, stage="loading", step=0, loss=None,
                     error=None, started_at=func.coalesce(JobRow.started_at, now)))
        return token if res.rowcount == 1 else None

    def _fenced(self, job_id: str, fence: str, **values: Any) -> bool:
        """UPDATE a running job only while ``fence`` (the claim token) still holds it."""
        values.setdefault("updated_at", time.time())
        with self._tx() as c:
            res = c.execute(update(JobRow).where(JobRow.id == job_id, JobRow.token == fence,
                                                 JobRow.state == "running").values(**values))
        return res.rowcount == 1

    def heartbeat(self, job_id: str, token: str) -> tuple[bool, bool]:
        """Renew the lease. Returns (still ours, cancel requested)."""
        now = time.time()
        if not self._fenced(job_id, token, heartbeat_at=now, updated_at=now):
            return False, False
        job = self.get_job(job_id)
        return True, bool(job and job.cancel_requested)

    def set_stage(self, job_id: str, token: str, stage: str, **values: Any) -> bool:
        return self._fenced(job_id, token, stage=stage, heartbeat_at=time.time(), **values)

    def set_progress(self, job_id: str, token: str, step: int, total: int,
                     loss: float | None) -> bool:
        return self._fenced(job_id, token, step=step, total_steps=total, loss=loss,
                            heartbeat_at=time.time())

    def finish(self, job_id: str, token: str, state: str, *, error: str | None = None,
               metrics: dict | None = None, scene: Scene | None = None) -> bool:
        """Move a running job to a terminal state (and register its scene) atomically."""
        now = time.time()
        values: dict[str, Any] = {"state": state, "finished_at": now, "updated_at": now,
                                  "error": error, "token": None}
        if metrics is not None:
            values["metrics"] = json.dumps(metrics)
        if scene is not None:
            values["scene_id"] = scene.id
        with self._tx() as c:
            res = c.execute(update(JobRow).where(JobRow.id == job_id, JobRow.token == token,
                                                 JobRow.state == "running").values(**values))
            if res.rowcount != 1:
                return False
            if scene is not None:
                c.execute(SceneRow.__table__.delete().where(SceneRow.id == scene.id))
                c.execute(insert(SceneRow).values(
                    id=scene.id, name=scene.name, job_id=scene.job_id, method=scene.method,
                    summary=json.dumps(scene.summary), created_at=scene.created_at))
        return True

    def release(self, job_id: str, token: str) -> bool:
        """Give a running job back to the queue (graceful worker shutdown)."""
        # Not a failure: the attempt does not count against max_attempts.
        return self._fenced(job_id, token, state="queued", worker=None, token=None,
                            stage=None, step=0, dispatched=False, heartbeat_at=None,
                            attempts=JobRow.attempts - 1)

    def fail_if_exhausted(self, job_id: str, max_attempts: int) -> bool:
        """Fail a queued job that has been started ``max_attempts`` times already."""
        now = time.time()
        with self._tx() as c:
            res = c.execute(update(JobRow).where(
                JobRow.id == job_id, JobRow.state == "queued",
                JobRow.attempts >= max_attempts,
            ).values(state="failed", finished_at=now, updated_at=now,
                     error=f"worker lost {max_attempts} times while running this job; "
                           "giving up"))
        return res.rowcount == 1

    def requeue_stale(self, lease_s: float) -> list[str]:
        """Running jobs whose heartbeat is older than the lease go back to queued."""
        now = time.time()
        cutoff = now - lease_s
        with self.engine.connect() as c:
            ids = [r[0] for r in c.execute(select(JobRow.id).where(
                JobRow.state == "running", JobRow.heartbeat_at < cutoff))]
        out = []
        for jid in ids:
            with self._tx() as c:
                res = c.execute(update(JobRow).where(
                    JobRow.id == jid, JobRow.state == "running",
                    JobRow.heartbeat_at < cutoff,
                ).values(state="queued", worker=None, token=None, stage=None, step=0,
                         dispatched=False, updated_at=now, heartbeat_at=None))
            if res.rowcount == 1:
                out.append(jid)
        return out

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now, or ask a running one to stop. Returns the job after."""
        now = time.time()
        with self._tx() as c:
            c.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued")
                      .values(state="cancelled", finished_at=now, updated_at=now,
                              stage=None))
            c.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "running")
                      .values(cancel_requested=True, updated_at=now))
        return self.get_job(job_id)

    def state_counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            rows = c.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update({s: int(n) for s, n in rows})
        return counts

    def durations(self) -> list[tuple[str, float]]:
        """(state, seconds from first start to finish) of finished jobs."""
        with self.engine.connect() as c:
            rows = c.execute(select(JobRow.state, JobRow.started_at, JobRow.finished_at)
                             .where(JobRow.finished_at.is_not(None),
                                    JobRow.started_at.is_not(None))).all()
        return [(s, float(f - b)) for s, b, f in rows]

    # ------------------------------------------------------------------ scenes

    def get_scene(self, scene_id: str) -> Scene | None:
        with self.engine.connect() as c:
            row = c.execute(select(SceneRow).where(SceneRow.id == scene_id)).first()
        return None if row is None else _scene(row)

    def list_scenes(self, limit: int = 100, offset: int = 0) -> tuple[list[Scene], int]:
        with self.engine.connect() as c:
            rows = c.execute(select(SceneRow).order_by(SceneRow.created_at.desc(), SceneRow.id)
                             .limit(limit).offset(offset)).all()
            total = int(c.execute(select(func.count()).select_from(SceneRow)).scalar_one())
        return [_scene(r) for r in rows], total

    def delete_scene(self, scene_id: str) -> bool:
        with self._tx() as c:
            res = c.execute(SceneRow.__table__.delete().where(SceneRow.id == scene_id))
        return res.rowcount == 1

    def dispose(self) -> None:
        self.engine.dispose()
