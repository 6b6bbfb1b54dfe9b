"""Uploaded log archives (.tar, .tar.gz/.tgz, .zip): checked before they are stored,
extracted safely by the worker.

Rejected, each with a message naming the entry: absolute paths (``/x``, ``C:\\x``),
``..`` components, links (symbolic or hard), devices and FIFOs, more than
``max_members`` entries, and content that would extract to more than ``max_bytes``
(archive bombs). The byte limit is enforced twice: on the sizes the archive declares
while scanning, and on the bytes actually written while extracting (a lying header
cannot get past it). Scanning stops at the first problem, so the work spent on a bomb
is bounded by the limit, not by the archive.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An archive is unsupported, unsafe or too large; the message says which entry."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    max_members: int


@dataclass
class ArchiveInfo:
    kind: str  # "tar" | "zip"
    members: int
    total_bytes: int
    log_root: str  # archive-relative directory or file of the log ("" = top level)


def archive_suffix(filename: str) -> str:
    """The accepted suffix of ``filename`` or ArchiveError."""
    low = filename.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return s
    raise ArchiveError(f"upload {filename!r} is not a .tar, .tar.gz, .tgz or .zip archive")


def _kind(path: Path, filename: str) -> str:
    archive_suffix(filename)
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        with tarfile.open(path, mode="r|*") as tf:
            tf.next()
        return "tar"
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"upload {filename!r} is not a readable tar or zip archive ({e})") \
            from e


def check_name(name: str) -> PurePosixPath:
    """The safe relative path of an entry, or ArchiveError naming it."""
    if "\x00" in name:
        raise ArchiveError(f"entry {name!r} has a NUL character in its name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise ArchiveError(f"entry {name!r} has an absolute path; entries must be relative")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"entry {name!r} has a '..' component (would escape the "
                           "extraction directory)")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


@dataclass
class _Entry:
    name: str
    path: PurePosixPath
    is_dir: bool
    size: int


def _tar_entries(path: Path, limits: ArchiveLimits) -> Iterator[tuple[_Entry, tarfile.TarFile,
                                                                      tarfile.TarInfo]]:
    total = 0
    count = 0
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                count += 1
                if count > limits.max_members:
                    raise ArchiveError(f"archive has more than {limits.max_members} entries")
                rel = check_name(m.name)
                if m.issym() or m.islnk():
                    raise ArchiveError(f"entry {m.name!r} is a link (to {m.linkname!r}); "
                                       "links are not allowed")
                if not (m.isfile() or m.isdir()):
                    raise ArchiveError(f"entry {m.name!r} is not a regular file or directory")
                total += max(0, m.size)
                if total > limits.max_bytes:
                    raise ArchiveError(f"archive expands to more than "
                                       f"{limits.max_bytes / 2**20:.0f} MiB (the limit); "
                                       f"stopped at entry {m.name!r}")
                yield _Entry(m.name, rel, m.isdir(), m.size), tf, m
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, ArchiveError):
            raise
        raise ArchiveError(f"archive is corrupt or truncated ({e})") from e


def _zip_entries(zf: zipfile.ZipFile, limits: ArchiveLimits) -> Iterator[tuple[_Entry,
                                                                             zipfile.ZipInfo]]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveError(f"archive has {len(infos)} entries, more than "
                           f"{limits.max_members}")
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_bytes:
        raise ArchiveError(f"archive expands to {declared / 2**20:.0f} MiB, more than "
                           f"{limits.max_bytes / 2**20:.0f} MiB (the limit)")
    for i in infos:
        rel = check_name(i.filename)
        mode = i.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArchiveError(f"entry {i.filename!r} is a symbolic link; links are not allowed")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded
            raise ArchiveError(f"entry {i.filename!r} is not a regular file or directory")
        yield _Entry(i.filename, rel, i.is_dir(), i.file_size), i


def _log_root(names: list[tuple[PurePosixPath, bool]]) -> str:
    """Archive-relative location of the one log inside, or ArchiveError."""
    dirs: set[PurePosixPath] = set()
    for p, is_dir in names:
        dirs.update(p.parents if not is_dir else [p, *p.parents])
    pandaset = sorted(d for d in dirs if d / "camera" in dirs and d / "lidar" in dirs)
    tfrecords = sorted(p for p, is_dir in names if not is_dir and ".tfrecord" in p.name)
    found = [str(d) for d in pandaset] + [str(t) for t in tfrecords]
    if not found:
        raise ArchiveError("archive holds no log: expected a PandaSet sequence directory "
                           "(camera/ and lidar/) or a Waymo .tfrecord file")
    if len(found) > 1:
        raise ArchiveError(f"archive holds {len(found)} logs ({', '.join(found[:5])}); upload "
                           "one log per job")
    return "" if found[0] == "." else found[0]


def scan(path: Path, filename: str, limits: ArchiveLimits) -> ArchiveInfo:
    """Check every entry of an archive without extracting it.

    Raises:
        ArchiveError: unsupported type, unsafe entry, too large, or no / several logs.
    """
    kind = _kind(path, filename)
    names: list[tuple[PurePosixPath, bool]] = []
    total = 0
    if kind == "tar":
        for e, _tf, _m in _tar_entries(path, limits):
            names.append((e.path, e.is_dir))
            total += e.size
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                for e, _i in _zip_entries(zf, limits):
                    names.append((e.path, e.is_dir))
                    total += e.size
        except zipfile.BadZipFile as e:
            raise ArchiveError(f"archive is corrupt ({e})") from e
    return ArchiveInfo(kind, len(names), total, _log_root(names))


def _copy_limited(src, dest: Path, budget: list[int], name: str, max_bytes: int) -> None:
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            budget[0] += len(chunk)
            if budget[0] > max_bytes:
                raise ArchiveError(f"archive expands to more than {max_bytes / 2**20:.0f} MiB "
                                   f"(the limit); stopped in entry {name!r}")
            out.write(chunk)


def extract(path: Path, filename: str, dest: Path, limits: ArchiveLimits) -> Path:
    """Extract an archive into ``dest`` (created) and return the log's path inside it.

    Every check of :func:`scan` applies again, and the bytes written are counted.
    """
    info = scan(path, filename, limits)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written = [0]

    def target(rel: PurePosixPath) -> Path:
        out = (root / rel).resolve()
        if out != root and root not in out.parents:  # belt and braces after check_name
            raise ArchiveError(f"entry {str(rel)!r} would escape the extraction directory")
        return out

    try:
        if info.kind == "tar":
            for e, tf, m in _tar_entries(path, limits):
                out = target(e.path)
                if e.is_dir:
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:
                    raise ArchiveError(f"entry {e.name!r} has no data")
                _copy_limited(src, out, written, e.name, limits.max_bytes)
        else:
            with zipfile.ZipFile(path) as zf:
                for e, i in _zip_entries(zf, limits):
                    out = target(e.path)
                    if e.is_dir:
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(i) as src:
                        _copy_limited(src, out, written, e.name, limits.max_bytes)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"archive is corrupt ({e})") from e
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return root / info.log_root if info.log_root else root
