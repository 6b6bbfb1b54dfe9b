"""Schemathesis over the OpenAPI schema of a real server: no input gives a 5xx.

The server has no worker threads (jobs the fuzzer submits stay queued) and a small
render size limit (so random sizes stay cheap); a real scene id is supplied so that the
render, asset and manifest endpoints are exercised past the 404.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_support import TINY_OPTS, TINY_SOURCE, env_for, start_server

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error(tmp_path):
    exe = Path(sys.executable).with_name("schemathesis")
    # A dev-extra dependency (`make test` installs it): missing is a broken setup, not a skip.
    assert exe.exists() or shutil.which("schemathesis"), \
        "schemathesis is not installed: run `make setup` (dev extra)"
    env = env_for(tmp_path)
    srv = start_server(tmp_path, env, "make-scene")
    try:
        job = srv.client.wait(srv.client.submit(TINY_SOURCE, **TINY_OPTS)["id"], timeout=240)
        assert job["state"] == "succeeded", job
    finally:
        srv.stop()
    env.update(DRIVESPLAT_WORKERS="0", DRIVESPLAT_RENDER_MAX_PX="128")
    srv = start_server(tmp_path, env, "fuzzed")
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(f'[parameters]\nscene_id = "{job["scene_id"]}"\n')
    try:
        proc = subprocess.run(
            [str(exe) if exe.exists() else "schemathesis", "--config-file", str(cfg), "run",
             f"{srv.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples",
             "12", "--max-time", "40", "--seed", "7", "--phases", "examples,fuzzing",
             "--workers", "2", "--generation-database", "none", "--no-color",
             "--request-timeout", "30"],
            capture_output=True, text=True, timeout=400, cwd=tmp_path)
    finally:
        srv.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "passed" in out and "Selected: 14/14" in out, out[-3000:]
    server_errors = [line for line in srv.output().splitlines()
                     if "uvicorn.access" in line and '" 5' in line]
    assert not server_errors, server_errors[:10]
