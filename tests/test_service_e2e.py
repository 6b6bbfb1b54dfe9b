"""The HTTP service end to end: a real ``drivesplat serve`` (uvicorn) on a loopback port,
SQLite, in-process workers; submit, follow, render, download, cancel, load, bad input."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from service_support import (
    LONG_OPTS,
    TINY_OPTS,
    TINY_SOURCE,
    check_ply,
    check_png,
    env_for,
    finished,
    optimising,
    start_server,
    stored_state,
    wait_for,
)

from service.client import ApiClientError, Client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("svc-home")


@pytest.fixture(scope="module")
def server(home):
    env = env_for(home, DRIVESPLAT_MAX_UPLOAD_MB="8", DRIVESPLAT_MAX_EXTRACT_MB="40",
                  DRIVESPLAT_MAX_ARCHIVE_MEMBERS="500")
    srv = start_server(home, env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return server.client


@pytest.fixture(scope="module")
def scene(client) -> dict:
    """One tiny scene reconstructed through the API, shared by the render tests."""
    job = client.submit(TINY_SOURCE, **TINY_OPTS, name="tiny")
    assert job["state"] in ("queued", "running") and job["method"] == "adam"
    seen: list[dict] = []
    job = client.wait(job["id"], on_update=seen.append, timeout=240)
    assert job["state"] == "succeeded", job
    return {"job": job, "updates": seen, "id": job["scene_id"]}


def test_submit_poll_render_and_download(client, scene, home):
    job = scene["job"]
    assert job["progress"] == 1.0 and job["error"] is None and job["scene_id"] == job["id"]
    assert job["metrics"]["iterations"] == 3 and job["metrics"]["recon_s"] > 0
    assert job["started_at"] <= job["finished_at"]
    # Server-sent events went through the stages, with step/T while optimising.
    stages = [u.get("stage") for u in scene["updates"]]
    assert "optimising" in stages or any(u["step"] for u in scene["updates"])
    msgs = [u["message"] for u in scene["updates"] if u.get("message")]
    assert any(m.startswith("optimising ") and "/3" in m for m in msgs) or job["step"] == 3
    sid = scene["id"]
    listed = client.json("GET", "/scenes")
    assert sid in [s["id"] for s in listed["scenes"]]
    manifest = client.json("GET", f"/scenes/{sid}")
    assert manifest["schema_version"] == 1 and list(manifest["cameras"]) == ["front_camera"]
    check_png(client.render(sid, frame=1), (96, 64))
    check_png(client.render(sid, frame=2, width=48, height=32, shift_m=1.5), (48, 32))
    jpeg = client.render(sid, frame=0, format="jpeg")
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert check_ply(client.asset(sid, "static.ply")) == manifest["counts"]["static"] > 0
    assert check_ply(client.asset(sid, "sky.ply")) > 0
    for a in manifest["actors"]:
        assert check_ply(client.asset(sid, a["file"])) == a["gaussians"]
    m = json.loads(client.asset(sid, "manifest.json"))
    assert m["state_sha256"] == manifest["state_sha256"]


def test_render_time_hide_and_post_pose(client, scene):
    sid = scene["id"]
    manifest = client.json("GET", f"/scenes/{sid}")
    actors = [a["id"] for a in manifest["actors"]]
    base = client.render(sid, frame=1)
    if actors:
        hidden = client.render(sid, frame=1, hide=",".join(actors))
        check_png(hidden, (96, 64))
    check_png(client.render(sid, frame=1, t=0.0), (96, 64))
    f1 = manifest["frames"][1]
    pose = f1["cameras"]["front_camera"]["cam_to_world"]
    body = {"cam_to_world": pose, "t": f1["cameras"]["front_camera"]["timestamp"]}
    _, headers, data = client.request("POST", f"/scenes/{sid}/render",
                                      body=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
    assert headers["content-type"] == "image/png"
    assert data == base  # the recorded camera through the arbitrary-pose path: same pixels
    body = {"cam_to_world": pose, "intrinsics": {"fx": 40, "fy": 40, "cx": 32, "cy": 24},
            "width": 64, "height": 48, "t": 0.1, "format": "jpeg",
            "edits": {a: {"offset": [0.5, 0, 0]} for a in actors[:2]}}
    _, headers, data = client.request("POST", f"/scenes/{sid}/render",
                                      body=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
    assert headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert Image.open(io.BytesIO(data)).size == (64, 48)


def test_fifty_concurrent_renders_all_succeed(client, scene):
    sid = scene["id"]
    client.render(sid, frame=0)  # loaded once, then cached
    start = threading.Barrier(50)

    def one(i: int) -> tuple[float, bytes]:
        start.wait()
        t0 = time.perf_counter()
        data = Client(client.base).render(sid, frame=i % 4, width=64, height=48)
        return time.perf_counter() - t0, data

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for _, data in results:
        check_png(data, (64, 48))
    lat = sorted(r[0] for r in results)
    assert lat[-1] < 120
    metrics = client.request("GET", "/metrics")[2].decode()
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(metrics)}
    count = [s.value for s in fams["drivesplat_render_seconds"].samples
             if s.name.endswith("_count")]
    assert count and count[0] >= 51
    jobs = {s.labels["state"]: s.value for s in fams["drivesplat_jobs"].samples}
    assert jobs["succeeded"] >= 1
    assert "drivesplat_job_duration_seconds" in fams


def test_jobs_list_and_filters(client, scene):
    res = client.json("GET", "/jobs", params={"state": "succeeded"})
    assert scene["job"]["id"] in [j["id"] for j in res["jobs"]]
    assert all(j["state"] == "succeeded" for j in res["jobs"])
    assert res["total"] >= 1
    _, headers, _ = client.request("GET", "/healthz")
    assert client.json("GET", "/readyz")["status"] == "ready"
    assert "/reconstruct" in client.json("GET", "/openapi.json")["paths"]
    assert client.request("GET", "/docs")[0] == 200


def test_location_header_and_cancel_running_job(client, home):
    before = {p.name for p in (home / "scenes").iterdir()}
    _, headers, data = client.request(
        "POST", "/reconstruct", body=json.dumps({"source": TINY_SOURCE, **LONG_OPTS}).encode(),
        headers={"Content-Type": "application/json"})
    job = json.loads(data)
    assert headers["location"] == f"/jobs/{job['id']}"
    job = wait_for(client, job["id"], optimising, what="optimising")
    assert job["total_steps"] == 100_000 and job["message"].startswith("optimising ")
    _, _, data = client.request("DELETE", f"/jobs/{job['id']}")
    assert json.loads(data)["cancel_requested"]
    job = wait_for(client, job["id"], finished, timeout=60, what="end")
    assert job["state"] == "cancelled" and job["scene_id"] is None
    assert job["step"] < 100_000
    assert {p.name for p in (home / "scenes").iterdir()} == before  # nothing published
    with pytest.raises(ApiClientError) as e:
        client.json("GET", f"/scenes/{job['id']}")
    assert e.value.status == 404
    with pytest.raises(ApiClientError) as e:  # cancelling a finished job
        client.request("DELETE", f"/jobs/{scene_id_of(client)}")
    assert e.value.status == 409 and "already succeeded" in e.value.detail


def scene_id_of(client) -> str:
    return client.json("GET", "/jobs", params={"state": "succeeded"})["jobs"][0]["id"]


def _pandaset_archive(tmp_path: Path, kind: str = "tar.gz") -> Path:
    from scenes.pandaset import write_pandaset
    from scenes.synthetic import SyntheticConfig, generate_log

    log = generate_log(SyntheticConfig(seed=4, frames=4, width=96, height=64,
                                       cameras=("front_camera",), lidar_azimuths=256,
                                       lidar_beams=16))
    seq = tmp_path / "seq"
    write_pandaset(log, seq, ground_truth=False)
    out = tmp_path / f"log.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(out, "w") as zf:
            for p in sorted(seq.rglob("*")):
                zf.write(p, f"seq/{p.relative_to(seq)}")
    else:
        with tarfile.open(out, "w:gz") as tf:
            tf.add(seq, arcname="seq")
    return out


def test_upload_archive_and_reconstruct(client, tmp_path, home):
    archive = _pandaset_archive(tmp_path, "zip")
    job = client.upload(archive, **TINY_OPTS, frames="0:3")
    assert job["source"]["uri"] == "upload:log.zip" and job["source"]["frames"] == [0, 3]
    job = client.wait(job["id"], timeout=240)
    assert job["state"] == "succeeded", job
    manifest = client.json("GET", f"/scenes/{job['scene_id']}")
    assert manifest["source"]["format"] == "pandaset" and len(manifest["frames"]) == 3
    check_png(client.render(job["scene_id"], frame=2), (96, 64))
    assert not (home / "uploads" / job["id"]).exists()  # the archive goes once the job ends
    # Deleting a scene removes its record and files.
    client.request("DELETE", f"/scenes/{job['scene_id']}")
    assert not (home / "scenes" / job["scene_id"]).exists()
    with pytest.raises(ApiClientError) as e:
        client.render(job["scene_id"], frame=0)
    assert e.value.status == 404


def test_uri_source_under_a_data_root(client, tmp_path, home):
    from scenes.pandaset import write_pandaset
    from scenes.synthetic import SyntheticConfig, generate_log

    log = generate_log(SyntheticConfig(seed=5, frames=3, width=64, height=48,
                                       cameras=("front_camera",), lidar_azimuths=256,
                                       lidar_beams=16))
    write_pandaset(log, home / "logs" / "seq5", ground_truth=False)
    job = client.submit({"format": "auto", "uri": "seq5", "cameras": ["front_camera"]},
                        **TINY_OPTS)
    assert job["source"]["format"] == "pandaset"  # detected at request time
    job = client.wait(job["id"], timeout=240)
    assert job["state"] == "succeeded", job
    # An absolute path to the same log is accepted too (cancelled right away).
    job = client.submit({"uri": str(home / "logs" / "seq5"), "frames": [0, 2]}, **TINY_OPTS)
    assert job["source"]["frames"] == [0, 2]
    client.request("DELETE", f"/jobs/{job['id']}")
    job = wait_for(client, job["id"], finished, timeout=120, what="end")
    assert job["state"] in ("cancelled", "succeeded")


# --------------------------------------------------------------------------- bad input


def _post_json(client: Client, body: bytes | dict, ctype: str = "application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.request("POST", "/reconstruct", body=data, headers={"Content-Type": ctype})


def _expect(call, status: int, *fragments: str) -> str:
    with pytest.raises(ApiClientError) as e:
        call()
    assert e.value.status == status, e.value.detail
    for f in fragments:
        assert f in e.value.detail, e.value.detail
    return e.value.detail


def _tar(tmp_path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]],
         name: str = "bad.tar.gz") -> Path:
    out = tmp_path / name
    with tarfile.open(out, "w:gz") as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tf.addfile(info, io.BytesIO(e[1]))
    return out


def test_bad_requests_answer_precise_4xx_and_store_nothing(client, home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "camera").mkdir()
    (outside / "lidar").mkdir()
    link = home / "logs" / "sneaky"
    if not link.exists():
        os.symlink(outside, link)
    before = stored_state(client, home)
    src = lambda **kw: {"source": {"format": "auto", **kw}, **TINY_OPTS}  # noqa: E731

    _expect(lambda: _post_json(client, src(uri="/etc")), 403, "outside the configured data "
            "roots")
    _expect(lambda: _post_json(client, src(uri="../../etc")), 403, "outside")
    _expect(lambda: _post_json(client, src(uri=str(home / "logs" / ".." / "jobs.db"))), 403,
            "outside")
    _expect(lambda: _post_json(client, src(uri="sneaky")), 403, "outside")  # symlink escape
    _expect(lambda: _post_json(client, src(uri="file:///etc/passwd")), 403, "outside")
    _expect(lambda: _post_json(client, src(uri="s3://bucket/log")), 403, "outside")
    _expect(lambda: _post_json(client, src(uri="no-such-log")), 400, "does not exist")
    (home / "logs" / "junk").mkdir(exist_ok=True)
    _expect(lambda: _post_json(client, src(uri="junk")), 400, "without camera/ and lidar/")
    _expect(lambda: _post_json(client, {"source": {"format": "kitti", "uri": "x"}}), 422,
            "source.format", "pandaset")
    _expect(lambda: _post_json(client, b'{"source": {"uri": '), 400, "not valid JSON")
    _expect(lambda: _post_json(client, b"{}"), 422, "source: Field required")
    _expect(lambda: _post_json(client, {**src(uri="x"), "method": "sgd"}), 422,
            "unknown method 'sgd'", "adam")
    _expect(lambda: _post_json(client, {**src(uri="x"), "steps": 0}), 422, "steps")
    _expect(lambda: _post_json(client, {**src(uri="x"), "colour": 1}), 422, "colour")
    _expect(lambda: _post_json(client, {"source": {"format": "synthetic",
                                                   "uri": "synthetic://?frames=9999"}}),
            400, "frames=9999 is outside")
    _expect(lambda: _post_json(client, {"source": {"format": "synthetic",
                                                   "uri": "synthetic://?sun=1"}}),
            400, "unknown synthetic parameter 'sun'")
    _expect(lambda: _post_json(client, b"x", "text/plain"), 415, "application/json")

    bad = {
        "dotdot": _tar(tmp_path, [("seq/camera/x", b"1"), ("seq/lidar/y", b"2"),
                                  ("../evil", b"x")], "dotdot.tar.gz"),
        "absolute": _tar(tmp_path, [("/etc/evil", b"x")], "abs.tar.gz"),
        "symlink": _tar(tmp_path, [_link("seq/camera", "/etc")], "link.tar.gz"),
        "nolog": _tar(tmp_path, [("readme.txt", b"hello")], "nolog.tar.gz"),
    }
    _expect(lambda: client.upload(bad["dotdot"]), 400, "'../evil'", "'..' component")
    _expect(lambda: client.upload(bad["absolute"]), 400, "'/etc/evil'", "absolute path")
    _expect(lambda: client.upload(bad["symlink"]), 400, "is a link")
    _expect(lambda: client.upload(bad["nolog"]), 400, "holds no log")
    # A gzip bomb: 64 MiB of zeros compress to a few KiB; the extract limit is 40 MiB.
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tf:
        info = tarfile.TarInfo("seq/camera/zeros.bin")
        info.size = 64 * 2**20
        tf.addfile(info, _Zeros(info.size))
    assert bomb.stat().st_size < 2**20
    _expect(lambda: client.upload(bomb), 400, "more than 40 MiB")
    zbomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zbomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("seq/camera/zeros.bin", b"\0" * (48 * 2**20))
    _expect(lambda: client.upload(zbomb), 400, "more than 40 MiB")
    zslip = tmp_path / "slip.zip"
    with zipfile.ZipFile(zslip, "w") as zf:
        zf.writestr("seq/../../evil.txt", b"x")
    _expect(lambda: client.upload(zslip), 400, "'..' component")
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(9 * 2**20))
    _expect(lambda: client.upload(big), 413, "larger than the limit of 8.0 MiB")
    notar = tmp_path / "x.tar.gz"
    notar.write_bytes(b"definitely not an archive")
    _expect(lambda: client.upload(notar), 400, "not a readable tar or zip")
    wrong = tmp_path / "log.rar"
    wrong.write_bytes(b"x")
    _expect(lambda: client.upload(wrong), 400, "not a .tar, .tar.gz, .tgz or .zip")
    _expect(lambda: client.upload(bad["nolog"], method="sgd"), 422, "unknown method")
    _expect(lambda: client.upload(bad["nolog"], colour="red"), 422, "unknown form field")
    assert stored_state(client, home) == before


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = b"\0" * k
        self.left -= k
        return k


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def test_bad_render_and_lookup_requests(client, scene, home):
    sid = scene["id"]
    before = stored_state(client, home)
    _expect(lambda: client.render("0" * 32, frame=0), 404, f"no scene '{'0' * 32}'")
    _expect(lambda: client.render("../../etc", frame=0), 404)
    _expect(lambda: client.render(sid, frame=99), 422, "frame 99 is not in scene", "0..3")
    _expect(lambda: client.render(sid, frame=-1), 422, "frame")
    _expect(lambda: client.render(sid, camera="roof"), 422, "no camera 'roof'",
            "front_camera")
    _expect(lambda: client.render(sid, hide="nobody"), 422, "no actor(s) ['nobody']")
    _expect(lambda: client.render(sid, width=100000), 422, "width")
    _expect(lambda: client.render(sid, shift_m="nan"), 422, "shift_m")
    _expect(lambda: client.render(sid, format="gif"), 422, "format")
    _expect(lambda: client.asset(sid, "../../jobs.db"), 404, "no asset")
    _expect(lambda: client.asset(sid, "state.json"), 404, "no asset 'state.json'")
    _expect(lambda: client.job("nope"), 404, "no job 'nope'")
    bad_pose = {"cam_to_world": [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}
    _expect(lambda: client.json("POST", f"/scenes/{sid}/render", bad_pose), 422,
            "must be a rotation")
    _expect(lambda: client.json("POST", f"/scenes/{sid}/render",
                                {"cam_to_world": [[1, 0, 0]]}), 422, "cam_to_world")
    assert stored_state(client, home) == before


def test_bearer_token(tmp_path):
    env = env_for(tmp_path, DRIVESPLAT_API_TOKEN="s3cret", DRIVESPLAT_WORKERS="0")
    srv = start_server(tmp_path, env, token=None)
    try:
        anon = srv.client
        assert anon.json("GET", "/healthz")["status"] == "ok"  # probes need no token
        assert anon.request("GET", "/readyz")[0] == 200
        _expect(lambda: anon.json("GET", "/jobs"), 401, "missing bearer token")
        wrong = Client(srv.url, token="guess")
        _expect(lambda: wrong.json("GET", "/jobs"), 401, "invalid bearer token")
        _expect(lambda: wrong.submit(TINY_SOURCE, **TINY_OPTS), 401, "invalid bearer token")
        _expect(lambda: wrong.json("GET", "/metrics"), 401, "invalid bearer token")
        ok = Client(srv.url, token="s3cret")
        assert ok.json("GET", "/jobs")["total"] == 0  # the rejected submit stored nothing
        job = ok.submit(TINY_SOURCE, **TINY_OPTS)
        assert job["state"] == "queued"  # no workers in this server: it stays queued
    finally:
        srv.stop()
