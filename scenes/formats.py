"""Which reader a log path needs, and one entry point that loads any supported log.

* PandaSet: a sequence directory holding ``camera/`` and ``lidar/``.
* Waymo Open Dataset v1: a ``.tfrecord`` file, or a directory holding ``.tfrecord`` files.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from scenes.errors import LogFormatError
from scenes.log import LogSegment

LogFormat = Literal["pandaset", "waymo"]
FORMATS: tuple[str, ...] = ("pandaset", "waymo")

_EXPECTED = ("expected a PandaSet sequence directory (with camera/ and lidar/ inside), "
             "a Waymo .tfrecord file, or a directory of .tfrecord files.")


def _is_tfrecord(p: Path) -> bool:
    return p.is_file() and (p.suffix == ".tfrecord" or ".tfrecord" in p.name)


def detect_format(path: str | os.PathLike) -> LogFormat:
    """``"pandaset"`` or ``"waymo"`` for a log path.

    Raises:
        LogFormatError: the path does not exist or looks like neither format.
    """
    p = Path(path)
    if not p.exists():
        raise LogFormatError(p, f"does not exist; {_EXPECTED}")
    if p.is_file():
        if _is_tfrecord(p):
            return "waymo"
        raise LogFormatError(p, f"is a file that is not a .tfrecord; {_EXPECTED}")
    if (p / "camera").is_dir() and (p / "lidar").is_dir():
        return "pandaset"
    if any(_is_tfrecord(c) for c in p.iterdir()):
        return "waymo"
    raise LogFormatError(p, f"is a directory without camera/ and lidar/ or .tfrecord files; "
                            f"{_EXPECTED}")


def load_log(path: str | os.PathLike, format: str = "auto",
             frames: tuple[int, int | None] | None = None,
             cameras: Sequence[str] | None = None,
             ground_truth: bool = False) -> LogSegment:
    """Read a log segment with the reader its format needs.

    Args:
        path: a PandaSet sequence directory or a Waymo .tfrecord (or directory of them).
        format: ``auto`` (``detect_format``), ``pandaset`` or ``waymo``.
        frames: (start, end) end-exclusive frame range; None = all.
        cameras: camera names to keep; None = all.
        ground_truth: also read ground truth written alongside a synthetic log.

    Raises:
        LogFormatError: the log is missing or malformed.
        ValueError: an unknown ``format``.
        RuntimeError: the Waymo reader is not available in this installation.
    """
    if format == "auto":
        fmt = detect_format(path)
    elif format in FORMATS:
        fmt = format
    else:
        raise ValueError(f"unknown log format {format!r}; use 'auto' or one of {FORMATS}")
    if fmt == "pandaset":
        from scenes.pandaset import read_pandaset

        return read_pandaset(path, frames=frames, cameras=cameras, ground_truth=ground_truth)

    # The Waymo reader pulls in protobuf definitions; import it only when needed.
    try:
        waymo = importlib.import_module("scenes.waymo")
    except ModuleNotFoundError as e:
        if e.name != "scenes.waymo":
            raise
        raise RuntimeError("Waymo logs need scenes.waymo.read_waymo, which is not part of "
                           "this installation") from e
    return waymo.read_waymo(_single_tfrecord(Path(path)), frames=frames, cameras=cameras,
                            ground_truth=ground_truth)


def _single_tfrecord(p: Path) -> Path:
    """A Waymo segment is one file: a directory must hold exactly one ``.tfrecord``."""
    if not p.is_dir():
        return p
    records = sorted(c for c in p.iterdir() if _is_tfrecord(c))
    if len(records) != 1:
        names = ", ".join(r.name for r in records[:5]) or "none"
        raise LogFormatError(p, f"holds {len(records)} .tfrecord files ({names}); a Waymo "
                                "segment is one file, so pass the file itself.")
    return records[0]
