"""Shared pieces of the service tests: tiny jobs, real servers and workers, stored state."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from service.client import ApiClientError, Client
from service.launch import LocalServer, Worker

#: A log small enough for a reconstruction in a few seconds on 2 CPU cores.
TINY_URI = ("synthetic://?seed=3&frames=4&width=96&height=64&cameras=front"
            "&lidar_azimuths=256&lidar_beams=16")
TINY_SOURCE = {"format": "synthetic", "uri": TINY_URI}
TINY_OPTS = {"method": "adam", "steps": 3, "budget": 2000, "actors": "moving"}
#: The same log, but enough steps to still be optimising when a test interferes.
LONG_OPTS = {**TINY_OPTS, "steps": 100_000}

ADMIN_PG = os.environ.get("DRIVESPLAT_TEST_POSTGRES",
                          "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_REDIS = os.environ.get("DRIVESPLAT_TEST_REDIS", "redis://127.0.0.1:6379")

#: Settings the tests always set, so nothing leaks in from the developer's environment.
_KEYS = ("DRIVESPLAT_HOME", "DRIVESPLAT_DATA_ROOTS", "DATABASE_URL", "DRIVESPLAT_EXECUTOR",
         "REDIS_URL", "DRIVESPLAT_API_TOKEN", "DRIVESPLAT_QUEUE", "DRIVESPLAT_WORKERS",
         "DRIVESPLAT_LEASE_S", "DRIVESPLAT_STORAGE_URL")


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """Server/worker environment: storage and SQLite under ``home``, logs in home/logs."""
    for k in _KEYS:
        os.environ.pop(k, None)
    env = {"DRIVESPLAT_HOME": str(home), "DRIVESPLAT_DATA_ROOTS": str(home / "logs"),
           "DATABASE_URL": f"sqlite:///{home / 'jobs.db'}", "DRIVESPLAT_EXECUTOR": "inprocess",
           "DRIVESPLAT_LEASE_S": "3", "OMP_NUM_THREADS": "1",
           "DRIVESPLAT_RENDER_CONCURRENCY": "2"}
    env.update(extra)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    return env


def start_server(home: Path, env: dict[str, str], name: str = "server",
                 token: str | None = None) -> LocalServer:
    srv = LocalServer(env, home / f"{name}-{uuid.uuid4().hex[:6]}.log", token=token)
    return srv.wait_ready(120)


def start_worker(home: Path, env: dict[str, str], name: str = "worker") -> Worker:
    return Worker(env, home / f"{name}-{uuid.uuid4().hex[:6]}.log")


def wait_for(client: Client, job_id: str, pred, timeout: float = 180.0,
             what: str = "condition") -> dict:
    """Poll a job until ``pred(job)``; fails with the job JSON on timeout."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        try:
            job = client.job(job_id)
        except (OSError, ApiClientError):
            time.sleep(0.3)
            continue
        if pred(job):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id}: no {what} after {timeout} s: {job}")


def finished(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def optimising(job: dict) -> bool:
    return job["state"] == "running" and job.get("stage") == "optimising" and job["step"] >= 1


def stored_state(client: Client, home: Path) -> dict:
    """What a rejected request must not change: records and files in storage."""
    jobs = client.json("GET", "/jobs", params={"limit": 1000})
    scenes = client.json("GET", "/scenes", params={"limit": 1000})
    files = sorted(str(p.relative_to(home)) for sub in ("scenes", "uploads")
                   for p in (home / sub).rglob("*")) if home.exists() else []
    return {"jobs": sorted(j["id"] for j in jobs["jobs"]),
            "states": sorted((j["id"], j["state"]) for j in jobs["jobs"] if finished(j)),
            "scenes": sorted(s["id"] for s in scenes["scenes"]), "files": files}


def check_png(data: bytes, size: tuple[int, int]) -> None:
    import io

    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == size and img.mode == "RGB"


def check_ply(data: bytes) -> int:
    """Parse a 3DGS PLY; returns its vertex count."""
    import io

    from plyfile import PlyData

    ply = PlyData.read(io.BytesIO(data))
    names = ply["vertex"].data.dtype.names
    assert {"x", "y", "z", "f_dc_0", "opacity", "scale_0", "rot_0"} <= set(names)
    return len(ply["vertex"].data)


def postgres_db() -> tuple[str, callable]:
    """A fresh PostgreSQL database for this run: (URL, drop function); skips if unreachable."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the postgres extra) is missing")
    try:
        admin = psycopg.connect(ADMIN_PG, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL at {ADMIN_PG} is unreachable: {e}")
    name = f"drivesplat_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_PG.rsplit("/", 1)[0]

    def drop() -> None:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return f"{base}/{name}", drop


def redis_url() -> str:
    """A Redis DB for this run (queue and key prefix are unique too); skips if unreachable."""
    redis = pytest.importorskip("redis", reason="redis (the worker extra) is missing")
    pytest.importorskip("celery", reason="celery (the worker extra) is missing")
    try:
        redis.Redis.from_url(f"{TEST_REDIS}/0", socket_connect_timeout=3).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis at {TEST_REDIS} is unreachable: {e}")
    return f"{TEST_REDIS}/{1 + uuid.uuid4().int % 15}"
