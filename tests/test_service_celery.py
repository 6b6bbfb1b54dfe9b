"""The Celery executor against the real Redis and PostgreSQL of this machine: real
``drivesplat worker`` processes, killed with SIGKILL mid-job, and an API restarted mid-job.

Each run uses its own PostgreSQL database, Redis DB number, queue name and key prefix.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from service_support import (
    TINY_OPTS,
    TINY_SOURCE,
    check_ply,
    check_png,
    env_for,
    finished,
    optimising,
    postgres_db,
    redis_url,
    start_server,
    start_worker,
    wait_for,
)

from recon.assets import load_scene
from service.launch import LocalServer

pytestmark = pytest.mark.slow

#: Enough steps that a test can interfere while the job is optimising.
MEDIUM_OPTS = {**TINY_OPTS, "steps": 60}  # ~2-4 s of optimising on 2 CPU cores


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL database + Redis queue + API server (celery executor); workers per test."""
    pg, drop = postgres_db()
    redis = redis_url()
    home = tmp_path_factory.mktemp("celery-home")
    queue = f"drivesplat-test-{uuid.uuid4().hex[:8]}"
    env = env_for(home, DATABASE_URL=pg, DRIVESPLAT_EXECUTOR="celery", REDIS_URL=redis,
                  DRIVESPLAT_QUEUE=queue)
    server = start_server(home, env)
    state = {"home": home, "env": env, "server": server, "queue": queue, "redis": redis}
    yield state
    state["server"].stop()
    drop()
    import redis as redis_lib

    r = redis_lib.Redis.from_url(redis)
    for key in r.scan_iter(f"{queue}:*"):
        r.delete(key)


@pytest.fixture
def worker(stack):
    w = start_worker(stack["home"], stack["env"])
    yield w
    w.stop()


def _assert_scene_complete(home: Path, scene_id: str) -> None:
    scenes = home / "scenes"
    assert not [p for p in scenes.iterdir() if p.name.startswith(".")], "temp dirs left"
    loaded = load_scene(scenes / scene_id, verify=True)  # sha256 of the state checked
    assert loaded.scene.num_gaussians["static"] > 0


def test_celery_end_to_end(stack, worker):
    client = stack["server"].client
    ready = client.json("GET", "/readyz")
    assert ready["status"] == "ready" and ready["executor"] == "celery"
    job = client.submit(TINY_SOURCE, **TINY_OPTS)
    job = client.wait(job["id"], timeout=240)
    assert job["state"] == "succeeded", (job, worker.output()[-3000:])
    sid = job["scene_id"]
    check_png(client.render(sid, frame=1), (96, 64))
    assert check_ply(client.asset(sid, "static.ply")) > 0
    _assert_scene_complete(stack["home"], sid)
    assert f"job {job['id']}: succeeded" in worker.output()  # worker logs carry the job id


def test_worker_killed_mid_job_is_finished_by_a_new_worker(stack):
    client = stack["server"].client
    first = start_worker(stack["home"], stack["env"], "doomed")
    try:
        job = client.submit(TINY_SOURCE, **MEDIUM_OPTS)
        job = wait_for(client, job["id"], optimising, timeout=240, what="optimising")
        first.kill()  # SIGKILL: no cleanup, message left unacknowledged
        assert client.job(job["id"])["state"] == "running"
    finally:
        first.kill()
    second = start_worker(stack["home"], stack["env"], "rescuer")
    try:
        job = wait_for(client, job["id"], finished, timeout=240, what="end")
        assert job["state"] == "succeeded", (job, second.output()[-3000:])
        assert job["attempts"] == 2 and job["metrics"]["iterations"] == 60
        _assert_scene_complete(stack["home"], job["scene_id"])
        check_png(client.render(job["scene_id"], frame=0), (96, 64))
        # The API's reaper or the new worker's re-queued it, whichever looked first.
        logs = stack["server"].output() + second.output()
        assert f"job {job['id']}: worker lost" in logs
    finally:
        second.stop()


def test_api_restart_during_a_job_loses_nothing(stack, worker):
    srv: LocalServer = stack["server"]
    job = srv.client.submit(TINY_SOURCE, **MEDIUM_OPTS)
    wait_for(srv.client, job["id"], optimising, timeout=240, what="optimising")
    srv.kill()
    restarted = LocalServer(stack["env"], stack["home"] / "server-restarted.log",
                            port=srv.port).wait_ready(120)
    stack["server"] = restarted
    job = wait_for(restarted.client, job["id"], finished, timeout=240, what="end")
    assert job["state"] == "succeeded" and job["attempts"] == 1, job
    assert job["scene_id"] in [s["id"] for s in restarted.client.json("GET", "/scenes")["scenes"]]
    _assert_scene_complete(stack["home"], job["scene_id"])


def test_worker_sigterm_gives_the_job_back(stack):
    client = stack["server"].client
    first = start_worker(stack["home"], stack["env"], "stopping")
    try:
        job = client.submit(TINY_SOURCE, **MEDIUM_OPTS)
        wait_for(client, job["id"], optimising, timeout=240, what="optimising")
    finally:
        first.stop()  # SIGTERM: warm shutdown, the job stops at its next step
    assert "returned to the queue" in first.output()
    assert client.job(job["id"])["state"] == "queued"
    second = start_worker(stack["home"], stack["env"], "next")
    try:
        job = wait_for(client, job["id"], finished, timeout=240, what="end")
        assert job["state"] == "succeeded" and job["attempts"] == 1, job
        _assert_scene_complete(stack["home"], job["scene_id"])
    finally:
        second.stop()
