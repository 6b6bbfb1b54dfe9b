"""Where scenes and uploaded logs live: a local directory, or an fsspec URL (s3://...).

Layout under the storage root::

    scenes/<scene_id>/...        the scene directory written by recon.assets.save_scene
    uploads/<job_id>/<file>      an uploaded log archive, as received

Publishing a scene is atomic for readers. Locally the finished directory is renamed into
place (the old one, if any, survives until the new one is there). On an object store,
which has no rename, every file but ``manifest.json`` is uploaded first and the manifest
last: a scene without its manifest does not exist for readers, and the job is marked
succeeded only after the upload completed.

Readers need files on local disk (``recon.assets.load_scene``): remote scenes are
downloaded once into ``<home>/cache/scenes/<id>`` (temp directory + rename).
"""

from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from recon.assets import MANIFEST
from service.settings import is_url

SCENES = "scenes"
UPLOADS = "uploads"


class Storage(ABC):
    """Scene and upload storage; ids are validated hex strings, file names sanitised."""

    url: str

    @abstractmethod
    def put_scene(self, local_dir: Path, scene_id: str) -> None:
        """Publish a complete local scene directory as ``scene_id`` (replacing any)."""

    @abstractmethod
    def scene_exists(self, scene_id: str) -> bool: ...

    @abstractmethod
    def scene_dir(self, scene_id: str) -> Path:
        """A local directory holding the scene (downloaded first if remote)."""

    @abstractmethod
    def delete_scene(self, scene_id: str) -> None: ...

    @abstractmethod
    def put_upload(self, job_id: str, local_file: Path, filename: str) -> None:
        """Store an uploaded archive for a job."""

    @abstractmethod
    def fetch_upload(self, job_id: str, filename: str, work_dir: Path) -> Path:
        """A local path of a job's uploaded archive (downloaded into work_dir if remote)."""

    @abstractmethod
    def delete_upload(self, job_id: str) -> None: ...

    @abstractmethod
    def check(self) -> None:
        """Raise if the storage cannot be reached or written."""


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest``; an existing ``dest`` survives until ``src`` is in place."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(dest, old)
    try:
        os.rename(src, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class LocalStorage(Storage):
    """A directory on this machine (or a shared mount)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        (self.root / SCENES).mkdir(parents=True, exist_ok=True)
        (self.root / UPLOADS).mkdir(parents=True, exist_ok=True)

    def _scene(self, scene_id: str) -> Path:
        return self.root / SCENES / scene_id

    def put_scene(self, local_dir: Path, scene_id: str) -> None:
        dest = self._scene(scene_id)
        tmp = dest.with_name(f".{scene_id}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            try:
                os.rename(local_dir, tmp)  # same file system: no copy
            except OSError:
                shutil.copytree(local_dir, tmp)
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def scene_exists(self, scene_id: str) -> bool:
        return (self._scene(scene_id) / MANIFEST).is_file()

    def scene_dir(self, scene_id: str) -> Path:
        return self._scene(scene_id)

    def delete_scene(self, scene_id: str) -> None:
        d = self._scene(scene_id)
        if d.exists():  # rename first: readers never see a half-deleted scene
            gone = d.with_name(f".{scene_id}.del-{uuid.uuid4().hex[:12]}")
            os.rename(d, gone)
            shutil.rmtree(gone, ignore_errors=True)

    def put_upload(self, job_id: str, local_file: Path, filename: str) -> None:
        d = self.root / UPLOADS / job_id
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{filename}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, d / filename)

    def fetch_upload(self, job_id: str, filename: str, work_dir: Path) -> Path:
        return self.root / UPLOADS / job_id / filename

    def delete_upload(self, job_id: str) -> None:
        shutil.rmtree(self.root / UPLOADS / job_id, ignore_errors=True)

    def check(self) -> None:
        probe = self.root / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()


class FsspecStorage(Storage):
    """Any fsspec file system (s3://, gcs://, memory://, file://); needs its driver."""

    def __init__(self, url: str, cache_dir: Path) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url)
        self.base = self.base.rstrip("/")
        self.cache_dir = Path(cache_dir)

    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def put_scene(self, local_dir: Path, scene_id: str) -> None:
        dest = self._p(SCENES, scene_id)
        self.delete_scene(scene_id)
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        for f in files:  # manifest last: it is what makes the scene exist
            if f.name != MANIFEST or f.parent != Path(local_dir):
                rel = f.relative_to(local_dir).as_posix()
                self.fs.makedirs(f"{dest}/{rel}".rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(f), f"{dest}/{rel}")
        self.fs.put_file(str(Path(local_dir) / MANIFEST), f"{dest}/{MANIFEST}")
        shutil.rmtree(self.cache_dir / SCENES / scene_id, ignore_errors=True)

    def scene_exists(self, scene_id: str) -> bool:
        return bool(self.fs.exists(self._p(SCENES, scene_id, MANIFEST)))

    def scene_dir(self, scene_id: str) -> Path:
        local = self.cache_dir / SCENES / scene_id
        if (local / MANIFEST).is_file():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{scene_id}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            src = self.fs._strip_protocol(self._p(SCENES, scene_id)).rstrip("/")
            for rpath in self.fs.find(src):
                rel = rpath[len(src):].lstrip("/")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(rpath, str(tmp / rel))
            if local.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.rename(tmp, local)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return local

    def delete_scene(self, scene_id: str) -> None:
        d = self._p(SCENES, scene_id)
        if self.fs.exists(f"{d}/{MANIFEST}"):
            self.fs.rm(f"{d}/{MANIFEST}")
        if self.fs.exists(d):
            self.fs.rm(d, recursive=True)
        shutil.rmtree(self.cache_dir / SCENES / scene_id, ignore_errors=True)

    def put_upload(self, job_id: str, local_file: Path, filename: str) -> None:
        self.fs.makedirs(self._p(UPLOADS, job_id), exist_ok=True)
        self.fs.put_file(str(local_file), self._p(UPLOADS, job_id, filename))

    def fetch_upload(self, job_id: str, filename: str, work_dir: Path) -> Path:
        work_dir.mkdir(parents=True, exist_ok=True)
        out = work_dir / filename
        self.fs.get_file(self._p(UPLOADS, job_id, filename), str(out))
        return out

    def delete_upload(self, job_id: str) -> None:
        d = self._p(UPLOADS, job_id)
        if self.fs.exists(d):
            self.fs.rm(d, recursive=True)

    def check(self) -> None:
        probe = self._p(f".probe-{uuid.uuid4().hex[:8]}")
        self.fs.pipe_file(probe, b"ok")
        self.fs.rm(probe)


def open_storage(location: str, cache_dir: Path) -> Storage:
    """LocalStorage for a path, FsspecStorage for a URL."""
    if is_url(location):
        return FsspecStorage(location, cache_dir)
    return LocalStorage(location)
