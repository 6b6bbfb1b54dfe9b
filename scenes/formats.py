"""Which reader a log path needs, and one entry point that loads any supported log.

* PandaSet: a sequence directory holding ``camera/`` and ``lidar/``.
* Waymo Open Dataset v1: a ``.tfrecord`` file, or a directory holding ``.tfrecord`` files.
"""

from __future__ import annotations

import importlib
import inspect
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
        if e.name not in ("scenes.waymo",):
            raise
        raise RuntimeError("Waymo logs need scenes.waymo.read_waymo, which is not part of "
                           "this installation yet") from e
    read_waymo = getattr(waymo, "read_waymo", None)
    if read_waymo is None:
        raise RuntimeError("scenes.waymo has no read_waymo function")
    kwargs: dict = {"frames": frames, "cameras": cameras}
    if ground_truth:
        if "ground_truth" not in inspect.signature(read_waymo).parameters:
            raise ValueError("the Waymo reader does not read ground truth")
        kwargs["ground_truth"] = True
    return read_waymo(path, **kwargs)
