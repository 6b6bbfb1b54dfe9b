"""PandaSet sequences: reader and writer for the public on-disk layout.

Layout of one sequence directory ``<seq>/`` (exactly as the public dataset)::

    camera/<cam_name>/NN.jpg            one image per frame (NN = 00, 01, ...)
    camera/<cam_name>/poses.json        [{"position": {x,y,z}, "heading": {w,x,y,z}}], sensor->world
    camera/<cam_name>/intrinsics.json   {"fx", "fy", "cx", "cy"}
    camera/<cam_name>/timestamps.json   [unix seconds]
    lidar/NN.pkl.gz (or NN.pkl)         pandas DataFrame x, y, z, i, t, d (world frame)
    lidar/poses.json, lidar/timestamps.json
    annotations/cuboids/NN.pkl.gz       DataFrame uuid, label, yaw, position.*, dimensions.*, ...
    meta/timestamps.json                frame (LiDAR) timestamps

Conventions and choices:

* Camera poses are camera->world with OpenCV axes (x right, y down, z forward), used as
  ``cam_to_world`` directly. ``cx``/``cy`` are taken as given (PandaSet publishes no
  distortion; images are treated as pinhole). A ``distortion`` key in intrinsics.json,
  written only by ``write_pandaset`` for logs that carry one, is read back when present.
* Ego pose. PandaSet has no separate vehicle pose; ``lidar/poses.json`` is the pose of the
  Pandar64, whose axes are **x right, y forward, z up** (checked on the devkit's sample
  sequence 002: the heading is Rz(-45 deg) while the vehicle drives along world (+1, +1), i.e.
  along the pose's +y). Our ego frame is x forward, y left, z up, so::

      ego_to_world = lidar_to_world @ EGO_TO_LIDAR,   EGO_TO_LIDAR = Rz(+90 deg), no translation

  (ego +x -> LiDAR +y, ego +y -> LiDAR -x). The ego origin stays at the LiDAR origin (the
  roof); the writer stores ``ego_to_world @ inv(EGO_TO_LIDAR)`` so the round trip is exact.
* Cuboids: object_to_world rotation = Rz(yaw + pi/2); ``Track.size`` = (length, width,
  height) = (dimensions.y, dimensions.x, dimensions.z). Moving boxes in the overlap of both
  LiDARs appear twice (``cuboids.sensor_id`` 0 and 1, each naming the other's uuid in
  ``cuboids.sibling_id``; a sensor-1 box may also reuse the uuid): one box per object and
  frame is kept, preferring sensor_id -1 / 0, and a sensor-1 uuid is folded into its
  sibling's track. Track size is the per-axis median over keyframes.
* Time: seconds since the first selected frame's LiDAR timestamp (``time_offset`` keeps
  it); the world is re-centred at the first selected ego position (``scenes.log.recentre``).
* Pickles execute code when loaded: read only sequences you trust (inherent to PandaSet).
* Ground truth (drivesplat extension, synthetic logs only) lives in ``<seq>/drivesplat_gt/``::

      depth/<cam>/NN.npy                  float32 [H, W] z-depth, inf = sky
      shifted/index.json                  {"shifts_m": [...], "views": [{frame_index, camera,
                                          shift_m, cam_to_world (4x4, source world incl.
                                          offset), timestamp (unix s), image, depth}]}
      shifted/images/*.png, shifted/depth/*.npy

  The reader ignores it unless ``ground_truth=True``; a sequence without the folder then
  reads with ``ground_truth = None``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from scenes.errors import LogFormatError
from scenes.geometry import invert_pose, make_pose, matrix_to_quat, quat_to_matrix, rot_z
from scenes.log import (
    CameraImage,
    CameraModel,
    Frame,
    GroundTruth,
    ImageSource,
    LidarSweep,
    LogSegment,
    ShiftedView,
    Track,
    recentre,
)

#: Camera directories of the public dataset, in the order cameras are listed.
PANDASET_CAMERAS = ("front_camera", "front_left_camera", "front_right_camera",
                    "left_camera", "right_camera", "back_camera")

#: [4, 4] ego -> LiDAR-pose frame: ego (x fwd, y left, z up) into PandaSet (x right, y fwd, z up).
EGO_TO_LIDAR = np.array([[0.0, -1.0, 0.0, 0.0],
                         [1.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 1.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0]])

LIDAR_COLUMNS = ("x", "y", "z", "i", "t", "d")
CUBOID_COLUMNS = ("uuid", "label", "yaw", "position.x", "position.y", "position.z",
                  "dimensions.x", "dimensions.y", "dimensions.z")
_CUBOID_ATTRIBUTES = ("attributes.object_motion", "attributes.rider_status",
                      "attributes.pedestrian_behavior", "attributes.pedestrian_age")

GT_DIR = "drivesplat_gt"


# --------------------------------------------------------------------------- reading


def read_pandaset(path: str | os.PathLike, frames: tuple[int, int | None] | None = None,
                  cameras: Sequence[str] | None = None,
                  lidar_sensors: Sequence[int] | None = None,
                  ground_truth: bool = False) -> LogSegment:
    """Read one PandaSet sequence directory into a re-centred ``LogSegment``.

    Args:
        path: the sequence directory (``.../pandaset/002``).
        frames: (start, end) end-exclusive frame range (end None = to the last frame);
            None = all frames. Frame indices in the result are the source indices.
        cameras: camera directory names to keep, in that order; None = all.
        lidar_sensors: PandaSet ``d`` values to keep (0 = Pandar64 360 deg, 1 = front
            PandarGT); None = all.
        ground_truth: also read ``drivesplat_gt/`` (synthetic logs written by drivesplat).

    Raises:
        LogFormatError: a file is missing or malformed (names the file). LiDAR sweeps,
            images and depth maps are read lazily and raise it when loaded.
        ValueError: ``frames`` or ``lidar_sensors`` do not make sense for this sequence.
    """
    seq = Path(path)
    if not seq.is_dir():
        raise LogFormatError(seq, "is not a directory; expected a PandaSet sequence "
                                  "directory with camera/ and lidar/ inside.")
    lidar_dir = seq / "lidar"
    if not lidar_dir.is_dir():
        raise LogFormatError(lidar_dir, "is missing; a PandaSet sequence needs a lidar/ "
                                        "directory with poses.json, timestamps.json and sweeps.")
    lidar_poses = _read_poses(lidar_dir / "poses.json")
    n = len(lidar_poses)
    lidar_times = _read_timestamps(lidar_dir / "timestamps.json")
    _check_count(lidar_dir / "timestamps.json", len(lidar_times), "timestamps",
                 lidar_dir / "poses.json", n)
    lidar_files = _numbered_files(lidar_dir, (".pkl.gz", ".pkl"), n, "LiDAR sweep files",
                                  lidar_dir / "poses.json")

    start, end = _frame_range(frames, n)
    chosen = range(start, end)
    t0 = float(lidar_times[start])

    cam_names = _camera_names(seq, cameras)
    cam_models: dict[str, CameraModel] = {}
    cam_data: dict[str, tuple[np.ndarray, np.ndarray, dict[int, Path]]] = {}
    for name in cam_names:
        model, poses, times, images = _read_camera(seq / "camera" / name, n, lidar_dir, chosen)
        cam_models[name] = model
        cam_data[name] = (poses, times, images)

    sensors = None if lidar_sensors is None else tuple(int(s) for s in lidar_sensors)
    out_frames: list[Frame] = []
    for i in chosen:
        images = {}
        for name in cam_names:
            poses, times, files = cam_data[name]
            images[name] = CameraImage(name, poses[i], float(times[i] - t0),
                                       ImageSource(path=str(files[i])))
        out_frames.append(Frame(i, float(lidar_times[i] - t0), lidar_poses[i] @ EGO_TO_LIDAR,
                                images, _lidar_loader(lidar_files[i], t0, sensors)))

    tracks = _read_tracks(seq, n, chosen, lidar_times, t0, lidar_dir / "poses.json")
    gt = _read_ground_truth(seq, chosen, cam_names, t0) if ground_truth else None
    meta = {"sequence_path": str(seq.resolve()), "frame_range": [start, end],
            "frame_count": n, "lidar_sensors": None if sensors is None else list(sensors)}
    return recentre(seq.name, "pandaset", cam_models, out_frames, tracks, time_offset=t0,
                    ground_truth=gt, meta=meta)


def _frame_range(frames: tuple[int, int | None] | None, n: int) -> tuple[int, int]:
    if frames is None:
        return 0, n
    start, end = frames
    end = n if end is None else end
    if not 0 <= start < end <= n:
        raise ValueError(f"frame range {frames!r} is not within the sequence's {n} frames "
                         f"(need 0 <= start < end <= {n}).")
    return int(start), int(end)


def _camera_names(seq: Path, cameras: Sequence[str] | None) -> list[str]:
    cam_root = seq / "camera"
    if not cam_root.is_dir():
        raise LogFormatError(cam_root, "is missing; a PandaSet sequence needs a camera/ "
                                       "directory with one folder per camera.")
    present = sorted(p.name for p in cam_root.iterdir() if p.is_dir())
    if cameras is None:
        known = [c for c in PANDASET_CAMERAS if c in present]
        names = known + [c for c in present if c not in known]
        if not names:
            raise LogFormatError(cam_root, "has no camera directories.")
        return names
    for c in cameras:
        if c not in present:
            raise LogFormatError(cam_root / c, f"does not exist; this sequence has cameras "
                                               f"{', '.join(present) or 'none'}.")
    return list(cameras)


def _read_camera(cam_dir: Path, n: int, lidar_dir: Path, chosen: range
                 ) -> tuple[CameraModel, np.ndarray, np.ndarray, dict[int, Path]]:
    """One camera directory: model (size from JPEG headers), [n, 4, 4] poses, [n] times."""
    poses = _read_poses(cam_dir / "poses.json")
    _check_count(cam_dir / "poses.json", len(poses), "poses", lidar_dir / "poses.json", n)
    times = _read_timestamps(cam_dir / "timestamps.json")
    _check_count(cam_dir / "timestamps.json", len(times), "timestamps",
                 lidar_dir / "poses.json", n)
    intr_path = cam_dir / "intrinsics.json"
    intr = _load_json(intr_path, "a PandaSet camera directory needs intrinsics.json.")
    if not isinstance(intr, dict):
        raise LogFormatError(intr_path, "must hold an object with fx, fy, cx and cy.")
    vals = {}
    for k in ("fx", "fy", "cx", "cy"):
        v = intr.get(k)
        if not _is_finite_number(v):
            raise LogFormatError(intr_path, f"has no finite number for '{k}'; expected "
                                            "an object with fx, fy, cx and cy.")
        vals[k] = float(v)
    if vals["fx"] <= 0 or vals["fy"] <= 0:
        raise LogFormatError(intr_path, "has a non-positive focal length.")
    dist = intr.get("distortion")
    if dist is not None and (not isinstance(dist, list) or len(dist) != 5
                             or not all(_is_finite_number(d) for d in dist)):
        raise LogFormatError(intr_path, "has a 'distortion' entry that is not 5 finite "
                                        "numbers (k1, k2, p1, p2, k3).")
    images = _numbered_files(cam_dir, (".jpg",), n, ".jpg images", lidar_dir / "poses.json")
    size: tuple[int, int] | None = None
    first: Path | None = None
    for i in chosen:
        s = _image_size(images[i])
        if size is None:
            size, first = s, images[i]
        elif s != size:
            raise LogFormatError(images[i], f"is {s[0]}x{s[1]} pixels but {first.name} is "
                                            f"{size[0]}x{size[1]}; all images of one camera "
                                            "must have the same size.")
    assert size is not None
    model = CameraModel.from_pinhole(cam_dir.name, size[0], size[1], vals["fx"], vals["fy"],
                                     vals["cx"], vals["cy"], dist)
    return model, poses, times, images


def _image_size(path: Path) -> tuple[int, int]:
    """(W, H) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except UnidentifiedImageError as e:
        raise LogFormatError(path, "is not an image; Pillow cannot identify its format.") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise LogFormatError(path, f"is not a readable image ({e}).") from e


def _lidar_loader(pkl: Path, t0: float, sensors: tuple[int, ...] | None
                  ) -> Callable[[], LidarSweep]:
    """Loader of one sweep: [N, 3] float64 source-world points (``recentre`` shifts them)."""
    def load() -> LidarSweep:
        df = _read_dataframe(pkl, LIDAR_COLUMNS)
        d = df["d"].to_numpy()
        if sensors is not None:
            keep = np.isin(d, sensors)
            df, d = df[keep], d[keep]
        return LidarSweep(df[["x", "y", "z"]].to_numpy(np.float64),
                          df["i"].to_numpy(np.float32),
                          df["t"].to_numpy(np.float64) - t0,
                          d.astype(np.int8))
    return load


def _read_tracks(seq: Path, n: int, chosen: range, lidar_times: np.ndarray, t0: float,
                 lidar_poses_path: Path) -> dict[str, Track]:
    """Tracks from ``annotations/cuboids`` (none when the sequence has no cuboids)."""
    cub_dir = seq / "annotations" / "cuboids"
    if not cub_dir.is_dir():
        return {}
    files = _numbered_files(cub_dir, (".pkl.gz", ".pkl"), n, "cuboid files", lidar_poses_path)
    tables = {i: _read_dataframe(files[i], CUBOID_COLUMNS) for i in chosen}

    # A front-LiDAR (sensor 1) box names its 360-LiDAR sibling; fold it into that track.
    # Sibling ids of boxes without a twin are placeholders ("-", NaN): only ids of boxes
    # that exist count.
    known = {str(u) for df in tables.values() for u in df["uuid"]}
    alias: dict[str, str] = {}
    for df in tables.values():
        if "cuboids.sensor_id" in df and "cuboids.sibling_id" in df:
            s1 = df[df["cuboids.sensor_id"].to_numpy() == 1]
            for u, sib in zip(s1["uuid"], s1["cuboids.sibling_id"], strict=True):
                if isinstance(sib, str) and sib in known and sib != str(u):
                    alias[str(u)] = sib

    keys: dict[str, list[tuple[int, float, np.ndarray, np.ndarray, str]]] = {}
    for i, df in tables.items():
        ids = [alias.get(str(u), str(u)) for u in df["uuid"]]
        sensor = (df["cuboids.sensor_id"].to_numpy() if "cuboids.sensor_id" in df
                  else np.full(len(df), -1))
        # Rank: -1 / 0 (360 LiDAR, or no duplicate) before 1 (front LiDAR duplicate).
        rank = np.where(np.asarray(sensor) == 1, 1, 0)
        best: dict[str, int] = {}
        for r, tid in enumerate(ids):
            if tid not in best or rank[r] < rank[best[tid]]:
                best[tid] = r
        num = df[["yaw", "position.x", "position.y", "position.z", "dimensions.x",
                  "dimensions.y", "dimensions.z"]]
        try:
            num = num.to_numpy(np.float64)
        except (TypeError, ValueError) as e:
            raise LogFormatError(files[i], f"has non-numeric pose or size values ({e}).") from e
        labels = df["label"].to_numpy()
        for tid, r in best.items():
            yaw, px, py, pz, dx, dy, dz = num[r]
            if not np.all(np.isfinite(num[r])):
                raise LogFormatError(files[i], f"row {r} (uuid {tid}) has a non-finite "
                                               "position, yaw or size.")
            pose = make_pose(rot_z(yaw + math.pi / 2), np.array([px, py, pz]))
            keys.setdefault(tid, []).append((i, float(lidar_times[i] - t0), pose,
                                             np.array([dy, dx, dz]), str(labels[r])))
    tracks = {}
    for tid, ks in keys.items():
        tracks[tid] = Track(tid, ks[0][4], np.median(np.stack([k[3] for k in ks]), axis=0),
                            np.array([k[1] for k in ks]), np.stack([k[2] for k in ks]),
                            np.array([k[0] for k in ks]))
    return tracks


def _read_ground_truth(seq: Path, chosen: range, cam_names: list[str],
                       t0: float) -> GroundTruth | None:
    """``drivesplat_gt/`` with lazy loaders; poses in the source world (``recentre`` shifts)."""
    root = seq / GT_DIR
    if not root.is_dir():
        return None
    keep = set(chosen)
    depth: dict[tuple[int, str], Callable[[], np.ndarray]] = {}
    for cam in cam_names:
        for i in chosen:
            p = root / "depth" / cam / f"{i:02d}.npy"
            if p.is_file():
                depth[(i, cam)] = _depth_loader(p)
    shifted: list[ShiftedView] = []
    shifts: tuple[float, ...] = ()
    index_path = root / "shifted" / "index.json"
    if index_path.is_file():
        index = _load_json(index_path, "")
        if not isinstance(index, dict) or not isinstance(index.get("views"), list):
            raise LogFormatError(index_path, "must hold an object with a 'views' list.")
        shifts = tuple(float(s) for s in index.get("shifts_m", []))
        for k, v in enumerate(index["views"]):
            try:
                fi, cam = int(v["frame_index"]), str(v["camera"])
                c2w = np.asarray(v["cam_to_world"], dtype=np.float64)
                shift, ts = float(v["shift_m"]), float(v["timestamp"])
                img, dep = root / v["image"], root / v["depth"]
            except (KeyError, TypeError, ValueError) as e:
                raise LogFormatError(index_path, f"entry {k} is malformed ({e!r}); each view "
                                                 "needs frame_index, camera, shift_m, "
                                                 "cam_to_world, timestamp, image and depth.") from e
            if c2w.shape != (4, 4) or not np.all(np.isfinite(c2w)):
                raise LogFormatError(index_path, f"entry {k} has a cam_to_world that is not "
                                                 "a finite 4x4 matrix.")
            if fi not in keep or cam not in cam_names:
                continue
            for f in (img, dep):
                if not f.is_file():
                    raise LogFormatError(f, f"is missing; {index_path.name} entry {k} "
                                            "refers to it.")
            shifted.append(ShiftedView(fi, cam, shift, c2w, ts - t0, ImageSource(path=str(img)),
                                       _depth_loader(dep)))
    return GroundTruth(depth=depth, shifted=shifted, shifts_m=shifts)


def _depth_loader(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            d = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise LogFormatError(path, f"is not a readable .npy depth map ({e}).") from e
        if d.ndim != 2:
            raise LogFormatError(path, f"holds an array of shape {d.shape}; a depth map "
                                       "must be [H, W].")
        return d.astype(np.float32, copy=False)
    return load


# -------------------------------------------------------------- low-level file checks


def _load_json(path: Path, need: str) -> Any:
    if not path.is_file():
        raise LogFormatError(path, f"is missing; {need}" if need else "is missing.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LogFormatError(path, f"is not valid JSON ({e}).") from e


def _read_poses(path: Path) -> np.ndarray:
    """poses.json -> [N, 4, 4] float64 sensor_to_world."""
    data = _load_json(path, f"the {path.parent.name}/ directory needs its poses.json.")
    if not isinstance(data, list):
        raise LogFormatError(path, "must hold a list of poses.")
    out = np.empty((len(data), 4, 4))
    for k, e in enumerate(data):
        try:
            p = [e["position"][a] for a in "xyz"]
            q = [e["heading"][a] for a in "wxyz"]
        except (KeyError, TypeError) as err:
            raise LogFormatError(path, f"entry {k} is not a pose {{\"position\": {{x, y, z}}, "
                                       f"\"heading\": {{w, x, y, z}}}} (missing {err}).") from err
        if not all(_is_finite_number(v) for v in p + q):
            raise LogFormatError(path, f"entry {k} has a NaN, infinite or non-numeric "
                                       "position or heading.")
        qn = np.asarray(q, dtype=np.float64)
        if np.linalg.norm(qn) < 1e-9:
            raise LogFormatError(path, f"entry {k} has a zero heading quaternion.")
        out[k] = make_pose(quat_to_matrix(qn), np.asarray(p, dtype=np.float64))
    return out


def _read_timestamps(path: Path) -> np.ndarray:
    data = _load_json(path, f"the {path.parent.name}/ directory needs its timestamps.json.")
    if not isinstance(data, list):
        raise LogFormatError(path, "must hold a list of unix timestamps.")
    for k, v in enumerate(data):
        if not _is_finite_number(v):
            raise LogFormatError(path, f"entry {k} is not a finite number of seconds.")
    return np.asarray(data, dtype=np.float64)


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_count(path: Path, count: int, what: str, ref: Path, n: int) -> None:
    if count != n:
        raise LogFormatError(path, f"lists {count} {what} but {_rel(ref)} lists {n} frames; "
                                   "every sensor needs one entry per frame.")


def _rel(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def _numbered_files(folder: Path, suffixes: tuple[str, ...], n: int, what: str,
                    ref: Path) -> dict[int, Path]:
    """Files ``NN<suffix>`` in ``folder`` -> {frame index: path}; exactly frames 0..n-1."""
    names = sorted(p.name for p in folder.iterdir())
    found: dict[int, Path] = {}
    for s in suffixes:  # earlier suffixes win: NN.pkl.gz over NN.pkl
        for name in names:
            stem = name[: -len(s)]
            if name.endswith(s) and stem.isdigit():
                found.setdefault(int(stem), folder / name)
    if len(found) != n:
        raise LogFormatError(folder, f"has {len(found)} {what} but {_rel(ref)} lists {n} "
                                     "frames; every sensor needs one entry per frame.")
    for i in range(n):
        if i not in found:
            raise LogFormatError(folder / f"{i:02d}{suffixes[0]}",
                                 f"is missing; {folder.name}/ must hold frames 00 to {n - 1:02d}.")
    return found


def _read_dataframe(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Unpickle a (gzipped) DataFrame and check its columns."""
    try:
        df = pd.read_pickle(path, compression="gzip" if path.name.endswith(".gz") else None)
    except FileNotFoundError as e:
        raise LogFormatError(path, "is missing.") from e
    except Exception as e:  # noqa: BLE001 - corrupt pickles raise almost any exception type
        raise LogFormatError(path, f"is truncated or corrupt and cannot be unpickled "
                                   f"({type(e).__name__}: {e}).") from e
    if not isinstance(df, pd.DataFrame):
        raise LogFormatError(path, f"holds a {type(df).__name__}, not a pandas DataFrame.")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise LogFormatError(path, f"lacks column(s) {', '.join(missing)}; expected "
                                   f"{', '.join(required)}.")
    return df


# --------------------------------------------------------------------------- writing


def write_pandaset(log: LogSegment, out_dir: str | os.PathLike, ground_truth: bool = True,
                   overwrite: bool = False) -> Path:
    """Write ``log`` as a PandaSet sequence directory; ``read_pandaset`` gives it back.

    World coordinates are written as re-centred + ``log.world_offset`` and times as
    t + ``log.time_offset``. Frames are numbered 00, 01, ... in ``log.frames`` order
    (track keyframes and ground truth follow that numbering). JPEG images are copied
    byte for byte; anything else is encoded as JPEG quality 95 without chroma subsampling.
    A track gets a cuboid in every frame that is one of its keyframes, and an
    interpolated one in the frames between its first and last keyframe. Cuboids carry a
    yaw only: roll and pitch of track poses are not stored.

    The directory is written to a temporary sibling and renamed into place.

    Args:
        log: the segment; every frame needs an image from every camera.
        out_dir: the sequence directory to create.
        ground_truth: also write ``drivesplat_gt/`` when the log carries ground truth.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty, and ``overwrite`` is False.
        ValueError: the log cannot be expressed in the layout (a missing image).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    if not log.frames:
        raise ValueError("cannot write a log segment without frames")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuidlib.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_sequence(log, tmp, ground_truth)
        if out.is_dir():
            if any(out.iterdir()):
                if not overwrite:  # filled while we were writing
                    raise FileExistsError(f"{out} is no longer empty; pass overwrite=True "
                                          "to replace it")
                old = out.parent / f".{out.name}.old-{uuidlib.uuid4().hex[:8]}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
                return out
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_sequence(log: LogSegment, seq: Path, ground_truth: bool) -> None:
    offset = np.asarray(log.world_offset, dtype=np.float64)
    t_abs = float(log.time_offset)
    pos = {f.index: k for k, f in enumerate(log.frames)}  # source frame index -> file number

    def world(T: np.ndarray) -> np.ndarray:
        T = np.array(T, dtype=np.float64)
        T[..., :3, 3] += offset
        return T

    for name, cam in log.cameras.items():
        cdir = seq / "camera" / name
        cdir.mkdir(parents=True)
        poses, times = [], []
        for k, f in enumerate(log.frames):
            im = f.images.get(name)
            if im is None:
                raise ValueError(f"frame {f.index} has no image from camera {name}; the "
                                 "PandaSet layout needs one image per camera and frame")
            poses.append(_pose_json(world(im.cam_to_world)))
            times.append(im.timestamp + t_abs)
            (cdir / f"{k:02d}.jpg").write_bytes(im.source.as_format("JPEG"))
        intr: dict[str, Any] = {"fx": cam.fx, "fy": cam.fy, "cx": cam.cx, "cy": cam.cy}
        if cam.distortion is not None:
            intr["distortion"] = [float(d) for d in cam.distortion]
        _write_json(cdir / "poses.json", poses)
        _write_json(cdir / "intrinsics.json", intr)
        _write_json(cdir / "timestamps.json", times)

    ldir = seq / "lidar"
    ldir.mkdir()
    lidar_to_ego = invert_pose(EGO_TO_LIDAR)
    frame_times = [f.timestamp + t_abs for f in log.frames]
    _write_json(ldir / "poses.json", [_pose_json(world(f.ego_to_world) @ lidar_to_ego)
                                      for f in log.frames])
    _write_json(ldir / "timestamps.json", frame_times)
    for k, f in enumerate(log.frames):
        if f.has_lidar:
            s = f.lidar()
            p = s.points.astype(np.float64) + offset
            df = pd.DataFrame({"x": p[:, 0], "y": p[:, 1], "z": p[:, 2],
                               "i": s.intensity.astype(np.float64),
                               "t": s.time.astype(np.float64) + t_abs,
                               "d": np.asarray(s.sensor).astype(np.int64)})
        else:
            df = pd.DataFrame({c: np.zeros(0, np.int64 if c == "d" else np.float64)
                               for c in LIDAR_COLUMNS})
        df.index.name = "index"
        _write_pickle(df, ldir / f"{k:02d}.pkl.gz")

    cdir = seq / "annotations" / "cuboids"
    cdir.mkdir(parents=True)
    for k, f in enumerate(log.frames):
        _write_pickle(_cuboid_frame(log, f, offset), cdir / f"{k:02d}.pkl.gz")

    (seq / "meta").mkdir()
    _write_json(seq / "meta" / "timestamps.json", frame_times)

    if ground_truth and log.ground_truth is not None:
        _write_ground_truth(log, seq / GT_DIR, pos, world, t_abs)


def _cuboid_frame(log: LogSegment, f: Frame, offset: np.ndarray) -> pd.DataFrame:
    rows = []
    for tr in log.tracks.values():
        hit = np.flatnonzero(tr.frame_indices == f.index)
        if hit.size:
            T = tr.poses[hit[0]]
        elif tr.observed_at(f.timestamp):
            T = tr.pose_at(f.timestamp)
        else:
            continue
        R = T[:3, :3]
        # object x (length) = Rz(yaw + pi/2) x  =>  yaw = heading of object x - pi/2
        yaw = math.atan2(R[1, 0], R[0, 0]) - math.pi / 2
        yaw = (yaw + math.pi) % (2 * math.pi) - math.pi
        c = T[:3, 3] + offset
        moving = tr.is_moving
        rows.append({"uuid": tr.id, "label": tr.label, "yaw": yaw, "stationary": not moving,
                     "camera_used": -1, "position.x": c[0], "position.y": c[1],
                     "position.z": c[2], "dimensions.x": float(tr.size[1]),
                     "dimensions.y": float(tr.size[0]), "dimensions.z": float(tr.size[2]),
                     "attributes.object_motion": "Moving" if moving else "Parked",
                     "cuboids.sibling_id": "-", "cuboids.sensor_id": -1,
                     "attributes.rider_status": np.nan,
                     "attributes.pedestrian_behavior": np.nan,
                     "attributes.pedestrian_age": np.nan})
    columns = list(CUBOID_COLUMNS[:3]) + ["stationary", "camera_used"] + \
        list(CUBOID_COLUMNS[3:]) + [_CUBOID_ATTRIBUTES[0], "cuboids.sibling_id",
                                    "cuboids.sensor_id", *_CUBOID_ATTRIBUTES[1:]]
    df = pd.DataFrame(rows, columns=columns)
    if not rows:  # keep numeric dtypes for empty frames
        df = df.astype({c: np.float64 for c in ("yaw", "position.x", "position.y",
                                                "position.z", "dimensions.x", "dimensions.y",
                                                "dimensions.z")})
    return df


def _write_ground_truth(log: LogSegment, root: Path, pos: dict[int, int],
                        world: Callable[[np.ndarray], np.ndarray], t_abs: float) -> None:
    gt = log.ground_truth
    assert gt is not None
    for (fi, cam), load in sorted(gt.depth.items()):
        if fi not in pos or cam not in log.cameras:
            continue
        d = root / "depth" / cam
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{pos[fi]:02d}.npy", np.asarray(load(), dtype=np.float32))
    views = []
    (root / "shifted" / "images").mkdir(parents=True)
    (root / "shifted" / "depth").mkdir(parents=True)
    for v in gt.shifted:
        if v.frame_index not in pos or v.camera not in log.cameras:
            continue
        stem = f"{pos[v.frame_index]:02d}_{v.camera}_{len(views):03d}"
        img_rel, dep_rel = f"shifted/images/{stem}.png", f"shifted/depth/{stem}.npy"
        (root / img_rel).write_bytes(v.image.as_format("PNG"))
        np.save(root / dep_rel, np.asarray(v.depth(), dtype=np.float32))
        views.append({"frame_index": pos[v.frame_index], "camera": v.camera,
                      "shift_m": float(v.shift_m),
                      "cam_to_world": world(v.cam_to_world).tolist(),
                      "timestamp": float(v.timestamp) + t_abs,
                      "image": img_rel, "depth": dep_rel})
    _write_json(root / "shifted" / "index.json",
                {"shifts_m": [float(s) for s in gt.shifts_m], "views": views})


def _pose_json(T: np.ndarray) -> dict[str, dict[str, float]]:
    q = matrix_to_quat(T[:3, :3])
    return {"position": {"x": float(T[0, 3]), "y": float(T[1, 3]), "z": float(T[2, 3])},
            "heading": {"w": float(q[0]), "x": float(q[1]), "y": float(q[2]),
                        "z": float(q[3])}}


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _write_pickle(df: pd.DataFrame, path: Path) -> None:
    # compresslevel 6: the gzip default of 9 is several times slower for ~1 % smaller files.
    df.to_pickle(path, compression={"method": "gzip", "compresslevel": 6, "mtime": 0})
