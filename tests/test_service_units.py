"""Service building blocks on their own: settings, archive checks, source resolution, the
SQL job store (claim, lease, fencing, schema version), storage, metrics, scene cache."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from service.archive import ArchiveError, ArchiveLimits, extract, scan
from service.db import SchemaError, SchemaRow, Store
from service.settings import Settings, split_roots
from service.sources import SourceError, parse_synthetic, resolve_source

LIMITS = ArchiveLimits(max_bytes=10 * 2**20, max_members=100)


# --------------------------------------------------------------------------- settings


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DRIVESPLAT_HOME", str(tmp_path))
    monkeypatch.setenv("DRIVESPLAT_DATA_ROOTS", f"{tmp_path}/a:s3://bucket/logs:/b")
    monkeypatch.setenv("DATABASE_URL", "postgres://u@h/db")
    monkeypatch.setenv("DRIVESPLAT_EXECUTOR", "celery")
    monkeypatch.setenv("DRIVESPLAT_API_TOKEN", "t")
    s = Settings()
    assert s.roots == [str(tmp_path / "a"), "s3://bucket/logs", "/b"]
    assert s.db_url == "postgresql+psycopg://u@h/db"
    assert s.executor == "celery" and s.api_token == "t"
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("DRIVESPLAT_DATA_ROOTS")
    s = Settings()
    assert s.db_url == f"sqlite:///{tmp_path / 'drivesplat.db'}"
    assert s.roots == [str(tmp_path / "logs")] and s.storage == str(tmp_path)
    monkeypatch.setenv("DRIVESPLAT_EXECUTOR", "threads")
    with pytest.raises(ValueError, match="executor"):
        Settings()
    assert split_roots("/a::gs://x/y:") == ["/a", "gs://x/y"]


# --------------------------------------------------------------------------- archives


def _pandaset_like(tf_or_zip, prefix: str = "seq/") -> None:
    for name in ("camera/front_camera/00.jpg", "lidar/00.pkl.gz"):
        data = b"x" * 10
        if isinstance(tf_or_zip, tarfile.TarFile):
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf_or_zip.addfile(info, io.BytesIO(data))
        else:
            tf_or_zip.writestr(prefix + name, data)


def test_archive_scan_and_extract_good_tar_and_zip(tmp_path):
    tgz = tmp_path / "log.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        _pandaset_like(tf)
    info = scan(tgz, "log.tgz", LIMITS)
    assert info.kind == "tar" and info.log_root == "seq" and info.total_bytes == 20
    root = extract(tgz, "log.tgz", tmp_path / "x", LIMITS)
    assert root == (tmp_path / "x" / "seq").resolve() and (root / "lidar/00.pkl.gz").is_file()
    z = tmp_path / "log.zip"
    with zipfile.ZipFile(z, "w") as zf:
        _pandaset_like(zf, prefix="")
        zf.writestr("seg.tfrecord-ignored/readme", b"")  # a directory named like a record
    assert scan(z, "log.zip", LIMITS).log_root == ""


@pytest.mark.parametrize("name, message", [
    ("../x", "'..' component"), ("a/../../x", "'..' component"), ("/abs", "absolute path"),
    ("C:\\win", "absolute path"), ("a\\..\\..\\x", "'..' component"),
])
def test_archive_rejects_escaping_names(tmp_path, name, message):
    p = tmp_path / "bad.zip"
    with zipfile.ZipFile(p, "w") as zf:
        _pandaset_like(zf)
        zf.writestr(name, b"x")
    with pytest.raises(ArchiveError, match=message):
        scan(p, "bad.zip", LIMITS)
    with pytest.raises(ArchiveError):
        extract(p, "bad.zip", tmp_path / "out", LIMITS)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_archive_rejects_links_devices_and_too_many_members(tmp_path):
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE):
        p = tmp_path / f"t{kind!r}.tar"
        with tarfile.open(p, "w") as tf:
            _pandaset_like(tf)
            info = tarfile.TarInfo("seq/camera/evil")
            info.type = kind
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        with pytest.raises(ArchiveError, match="link|not a regular file"):
            scan(p, "x.tar", LIMITS)
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        _pandaset_like(zf)
        info = zipfile.ZipInfo("seq/camera/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        scan(z, "link.zip", LIMITS)
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tf:
        for i in range(150):
            info = tarfile.TarInfo(f"f{i}")
            tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(ArchiveError, match="more than 100 entries"):
        scan(many, "many.tar", LIMITS)


def test_archive_lying_zip_header_is_caught_while_extracting(tmp_path):
    """A zip whose central directory understates sizes still cannot exceed the limit."""
    p = tmp_path / "liar.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        _pandaset_like(zf)
        zf.writestr("seq/camera/big.bin", b"\0" * (12 * 2**20))
    raw = bytearray(p.read_bytes())
    # Patch the uncompressed size of the big entry in the central directory to 1 byte.
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = (1).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises((ArchiveError, zipfile.BadZipFile)):
        extract(p, "liar.zip", tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_archive_with_two_logs_or_unsupported_name(tmp_path):
    p = tmp_path / "two.tar"
    with tarfile.open(p, "w") as tf:
        _pandaset_like(tf, "a/")
        _pandaset_like(tf, "b/")
    with pytest.raises(ArchiveError, match="holds 2 logs"):
        scan(p, "two.tar", LIMITS)
    with pytest.raises(ArchiveError, match="not a .tar"):
        scan(p, "two.7z", LIMITS)


# --------------------------------------------------------------------------- sources


def test_sources_stay_inside_the_roots(tmp_path):
    root = tmp_path / "root"
    (root / "seq" / "camera").mkdir(parents=True)
    (root / "seq" / "lidar").mkdir()
    (tmp_path / "secret" / "camera").mkdir(parents=True)
    (tmp_path / "secret" / "lidar").mkdir()
    os.symlink(tmp_path / "secret", root / "link")
    os.symlink(root / "seq", root / "inner-link")  # a link that stays inside is fine
    roots = [str(root)]

    def res(uri: str, fmt: str = "auto") -> dict:
        return resolve_source({"format": fmt, "uri": uri}, roots)

    assert res("seq")["path"] == str(root / "seq") and res("seq")["format"] == "pandaset"
    assert res(str(root / "seq"))["kind"] == "path"
    assert res(f"file://{root}/seq")["path"] == str(root / "seq")
    assert res("inner-link")["path"] == str(root / "seq")
    for uri in ("link", "../secret", str(tmp_path / "secret"), "seq/../../secret",
                f"{root}/../secret", "file:///etc", "s3://b/k"):
        with pytest.raises(SourceError) as e:
            res(uri)
        assert e.value.status == 403 and "outside the configured data roots" in e.value.message
    with pytest.raises(SourceError, match="does not exist"):
        res("nope")
    with pytest.raises(SourceError, match="is a pandaset log, not waymo"):
        res("seq", "waymo")
    # An fsspec root: URLs under it, with no '..' segments.
    url_roots = ["memory://logs"]
    import fsspec

    fsspec.filesystem("memory").pipe("/logs/seg.tfrecord", b"x")
    out = resolve_source({"format": "auto", "uri": "memory://logs/seg.tfrecord"}, url_roots)
    assert out["kind"] == "url" and out["format"] == "waymo"
    with pytest.raises(SourceError, match="'..' segments"):
        resolve_source({"format": "auto", "uri": "memory://logs/../x"}, url_roots)
    with pytest.raises(SourceError, match="outside"):
        resolve_source({"format": "auto", "uri": "memory://logsx/a"}, url_roots)


def test_synthetic_specs():
    assert parse_synthetic("synthetic://?seed=3&frames=6&cameras=front,left") == {
        "seed": 3, "frames": 6, "cameras": ["front_camera", "left_camera"]}
    assert parse_synthetic("seed=1") == {"seed": 1}
    assert parse_synthetic("synthetic://") == {}
    for uri, msg in (("frames=0", "outside"), ("frames=x", "not an integer"),
                     ("cameras=roof", "unknown synthetic camera"), ("seed=1&seed=2", "twice"),
                     ("bogus=1", "unknown synthetic parameter 'bogus'")):
        with pytest.raises(SourceError, match=msg):
            parse_synthetic(uri)


# --------------------------------------------------------------------------- job store


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    s.init()
    return s


def test_claim_is_exclusive_and_leases_fence_writes(store):
    job = store.create_job({"method": "adam", "source": {}})
    tokens: list[str | None] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        tokens.append(store.claim(job.id, "w", lease_s=30))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [t for t in tokens if t]
    assert len(winners) == 1
    token = winners[0]
    assert store.heartbeat(job.id, token) == (True, False)
    assert store.set_progress(job.id, token, 2, 10, 0.5)
    assert store.get_job(job.id).progress == pytest.approx(0.2)
    # The lease expires: the reaper re-queues it and a new worker claims it ...
    assert store.requeue_stale(lease_s=30) == []
    time.sleep(0.05)
    assert store.requeue_stale(lease_s=0.01) == [job.id]
    token2 = store.claim(job.id, "w2", lease_s=30)
    assert token2 and store.get_job(job.id).attempts == 2
    # ... and the old worker, back from the dead, can change nothing.
    assert store.heartbeat(job.id, token) == (False, False)
    assert not store.finish(job.id, token, "succeeded")
    assert store.cancel(job.id).cancel_requested
    assert store.heartbeat(job.id, token2) == (True, True)
    assert store.finish(job.id, token2, "cancelled")
    assert store.get_job(job.id).state == "cancelled"
    assert store.claim(job.id, "w3", lease_s=0) is None


def test_attempts_are_capped_and_graceful_release_is_free(store):
    job = store.create_job({"method": "adam", "source": {}})
    for _ in range(3):
        token = store.claim(job.id, "w", lease_s=30)
        assert store.release(job.id, token)  # a graceful stop costs no attempt
    assert store.get_job(job.id).attempts == 0
    for _ in range(3):
        store.claim(job.id, "w", lease_s=30)
        time.sleep(0.02)
        store.requeue_stale(lease_s=0.01)
    assert store.fail_if_exhausted(job.id, max_attempts=3)
    j = store.get_job(job.id)
    assert j.state == "failed" and "worker lost 3 times" in j.error


def test_schema_version_is_checked(store):
    assert store.schema_version() == 1
    store.init()  # idempotent
    from sqlalchemy import update

    with store.engine.begin() as c:
        c.execute(update(SchemaRow).values(version=99))
    with pytest.raises(SchemaError, match="newer than this drivesplat"):
        store.init()


def test_store_on_postgres():
    from service_support import postgres_db

    url, drop = postgres_db()
    try:
        from service.settings import Settings

        s = Store(Settings(database_url=url).db_url)
        s.init()
        s.init()
        job = s.create_job({"method": "adam", "source": {}}, name="pg")
        token = s.claim(job.id, "w", lease_s=30)
        assert token and s.claim(job.id, "w2", lease_s=30) is None
        assert s.state_counts()["running"] == 1
        s.dispose()
    finally:
        drop()


# --------------------------------------------------------------------------- storage


def _fake_scene(d: Path) -> Path:
    (d / "actors").mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
    (d / "static.ply").write_bytes(b"ply")
    (d / "actors" / "a.ply").write_bytes(b"ply")
    return d


@pytest.mark.parametrize("kind", ["local", "fsspec"])
def test_storage_publish_read_delete(tmp_path, kind):
    from service.storage import open_storage

    loc = str(tmp_path / "store") if kind == "local" else "memory://drivesplat-test/store"
    st = open_storage(loc, tmp_path / "cache")
    st.check()
    st.put_scene(_fake_scene(tmp_path / "w1"), "abc")
    assert st.scene_exists("abc")
    d = st.scene_dir("abc")
    assert (d / "actors" / "a.ply").read_bytes() == b"ply" and (d / "manifest.json").is_file()
    st.put_scene(_fake_scene(tmp_path / "w2"), "abc")  # replace
    assert (st.scene_dir("abc") / "static.ply").read_bytes() == b"ply"
    (tmp_path / "up.tar").write_bytes(b"ply")
    st.put_upload("job1", tmp_path / "up.tar", "log.tar")
    assert st.fetch_upload("job1", "log.tar", tmp_path / "dl").read_bytes() == b"ply"
    st.delete_upload("job1")
    st.delete_scene("abc")
    assert not st.scene_exists("abc")


# --------------------------------------------------------------------------- metrics, cache


def test_metrics_exposition_parses():
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Histogram, bucketed, gauge_lines, histogram_lines

    h = Histogram("x_seconds", "X.", (0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = "\n".join(h.expose() + gauge_lines("jobs", "J.", {(("state", 'a"b'),): 2})
                     + histogram_lines("d", "D.", (1.0,), bucketed([("ok", 0.5)], (1.0,), "s")))
    fams = {f.name: f for f in text_string_to_metric_families(text + "\n")}
    buckets = {s.labels["le"]: s.value for s in fams["x_seconds"].samples
               if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 1, "1.0": 2, "+Inf": 3}
    assert fams["jobs"].samples[0].labels == {"state": 'a"b'}


def test_scene_cache_is_lru_bounded_and_loads_once():
    from types import SimpleNamespace

    import torch

    from service.scene_cache import SceneCache

    loads: list[str] = []

    def loader(key: str, n: int):
        def f():
            loads.append(key)
            time.sleep(0.05)
            scene = torch.nn.Module()
            scene.register_buffer("w", torch.zeros(n))
            return SimpleNamespace(scene=scene)
        return f

    cache = SceneCache(max_bytes=3000)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("a", loader("a", 500))))
               for _ in range(5)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert loads == ["a"] and len({id(g) for g in got}) == 1
    cache.get("b", loader("b", 250))
    cache.get("a", loader("a", 500))  # a is now most recent
    cache.get("c", loader("c", 250))  # 2000 + 1000 + 1000 bytes > 3000: b goes
    assert cache.bytes == 3000 and len(cache) == 2
    cache.get("b", loader("b", 250))
    assert loads == ["a", "b", "c", "b"]
