"""In-process executor faults: the API (and its worker threads) dies or stops mid-job."""

from __future__ import annotations

import pytest
from service_support import TINY_OPTS, TINY_SOURCE, env_for, finished, optimising, wait_for

from recon.assets import load_scene
from service.launch import LocalServer

pytestmark = pytest.mark.slow

MEDIUM_OPTS = {**TINY_OPTS, "steps": 60}  # ~2-4 s of optimising on 2 CPU cores


@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_api_restart_during_a_job_loses_nothing(tmp_path, how):
    env = env_for(tmp_path)
    srv = LocalServer(env, tmp_path / "first.log").wait_ready(120)
    try:
        job = srv.client.submit(TINY_SOURCE, **MEDIUM_OPTS)
        queued = srv.client.submit(TINY_SOURCE, **TINY_OPTS)  # waits behind the first
        wait_for(srv.client, job["id"], optimising, timeout=240, what="optimising")
    finally:
        if how == "kill":
            srv.kill()  # SIGKILL: the job's lease goes stale, the reaper re-queues it
        else:
            srv.stop()  # SIGTERM: the job stops at its next step and goes back to the queue
    if how == "terminate":
        assert "returned to the queue" in srv.output()
    again = LocalServer(env, tmp_path / "second.log", port=srv.port).wait_ready(120)
    try:
        for jid, steps in ((job["id"], 60), (queued["id"], 3)):
            done = wait_for(again.client, jid, finished, timeout=240, what="end")
            assert done["state"] == "succeeded", (done, again.output()[-3000:])
            assert done["metrics"]["iterations"] == steps
            load_scene(tmp_path / "scenes" / done["scene_id"], verify=True)
        first = again.client.job(job["id"])
        # A crash costs an attempt; a graceful stop gives the attempt back.
        assert first["attempts"] == (2 if how == "kill" else 1)
        assert not [p for p in (tmp_path / "scenes").iterdir() if p.name.startswith(".")]
        assert not list((tmp_path / "work").iterdir())  # the dead process's work dir is gone
    finally:
        again.stop()
