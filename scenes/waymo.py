"""Waymo Open Dataset v1 ``Frame`` TFRecords: reader and writer, without TensorFlow.

Protobuf classes come from the ``waymo-open-dataset-tf-2-12-0`` wheel installed with
``--no-deps`` (plus ``protobuf``). Only ``waymo_open_dataset.dataset_pb2`` and
``label_pb2`` are imported: ``waymo_open_dataset`` has no ``__init__.py`` (a namespace
package), so importing these generated modules never touches TensorFlow; the
``utils`` sub-package, which does import TensorFlow, is never used.

Conventions (DESIGN.md) and how Waymo maps onto them:

- Vehicle frame = our ego frame (x forward, y left, z up). ``Frame.pose`` is
  vehicle->world; the world is re-centred at the first frame's vehicle position
  (``LogSegment.world_offset``).
- Cameras: Waymo camera axes are x forward, y left, z up; ``cam_to_world`` is converted
  to OpenCV axes (x right, y down, z forward). Each image uses its own
  ``CameraImage.pose`` (vehicle pose at ``pose_timestamp``), falling back to the frame
  pose. Intrinsics [f_u, f_v, c_u, c_v, k1, k2, p1, p2, k3]: K from the first four,
  and the distortion (k1, k2, p1, p2, k3) is exactly OpenCV's radial-tangential model.
  **Distortion choice: images are kept as recorded (JPEG bytes untouched) and the
  coefficients travel in ``CameraModel.distortion``; whoever projects applies them.**
  Rolling shutter is not modelled (per-image pose only).
- LiDAR: range images of all five lasers, both returns, are turned into world points as
  in Waymo's ``range_image_utils`` (row 0 = highest beam; column c has vehicle-frame
  azimuth ``((W - c - 0.5) / W * 2 - 1) * pi``). The TOP laser's per-pixel vehicle pose
  (``range_image_pose_compressed``, [H, W, 6] roll, pitch, yaw, x, y, z) compensates ego
  motion; other lasers use the frame pose. Pixels with range <= 0 or inside a no-label
  zone (channel 3 == 1) are dropped.
- Per-point time: Waymo stores none. When the vehicle moves, the TOP laser's pixel pose
  (the vehicle pose when that pixel fired) dates the point: frame time + displacement of
  that pose from the frame pose along the ego velocity / speed. Otherwise (and for the
  other lasers) a column model: the frame timestamp is the start of the TOP sweep
  (azimuth +-pi, behind the car; the cameras fire as the sweep passes them), and a sweep
  lasts 0.1 s with azimuth decreasing, so a point in column c gets
  ``t_frame + (c + 0.5) / W * 0.1``.
- Labels: laser labels are boxes in the vehicle frame (heading about z from +x, length
  along x); they become tracks keyed by object id, ``label`` = Waymo type name
  (``TYPE_VEHICLE``...), size = median over frames.
- Time: seconds since the first selected frame (``time_offset`` = its absolute time in
  seconds; Waymo timestamps are microseconds).

Reading streams: opening a file indexes record offsets and parses each selected Frame
once for poses, calibrations and labels; images and LiDAR are decoded again from the
record when touched (one parsed Frame is cached), so memory stays flat for long segments.
"""

from __future__ import annotations

import os
import threading
import warnings
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from scenes.errors import LogFormatError
from scenes.geometry import invert_pose, make_pose, rot_z
from scenes.log import (
    CameraImage,
    CameraModel,
    Frame,
    ImageSource,
    LidarSweep,
    LogSegment,
    Track,
    recentre,
)
from scenes.tfrecord import TFRecordFile, TFRecordWriter

#: Waymo camera names in enum order (CameraName.Name 1..8).
CAMERA_NAMES = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT", "SIDE_LEFT", "SIDE_RIGHT",
                "REAR_LEFT", "REAR", "REAR_RIGHT")
#: Waymo laser names in enum order (LaserName.Name 1..5); ``LidarSweep.sensor`` = index.
LASER_NAMES = ("TOP", "FRONT", "SIDE_LEFT", "SIDE_RIGHT", "REAR")
#: Laser label types (Label.Type 0..4).
LABEL_TYPES = ("TYPE_UNKNOWN", "TYPE_VEHICLE", "TYPE_PEDESTRIAN", "TYPE_SIGN", "TYPE_CYCLIST")
#: Duration of one LiDAR revolution (Waymo lasers spin at 10 Hz).
SPIN_PERIOD_S = 0.1

#: OpenCV camera axes -> Waymo camera axes (x fwd, y left, z up): cv z -> x, cv x -> -y,
#: cv y -> -z. cam_to_vehicle (OpenCV) = extrinsic (Waymo) @ this.
OPENCV_TO_WAYMO_CAM = np.array([[0.0, 0.0, 1.0, 0.0],
                                [-1.0, 0.0, 0.0, 0.0],
                                [0.0, -1.0, 0.0, 0.0],
                                [0.0, 0.0, 0.0, 1.0]])

_INSTALL_HINT = ("the Waymo protobuf definitions are not installed: run `make setup`, or "
                 "`pip install protobuf && pip install --no-deps waymo-open-dataset-tf-2-12-0`")


def load_protos() -> tuple[Any, Any]:
    """(dataset_pb2, label_pb2) from the Waymo wheel; ImportError with the install line."""
    try:
        from waymo_open_dataset import dataset_pb2, label_pb2
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return dataset_pb2, label_pb2


# ----------------------------------------------------------------------------- helpers


def euler_to_matrix(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Waymo's rotation from roll, pitch, yaw (each [...]): Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    return np.stack([
        np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
        np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
        np.stack([-sp, cp * sr, cp * cr], -1),
    ], -2)


def matrix_to_euler(R: np.ndarray) -> np.ndarray:
    """Inverse of ``euler_to_matrix``: [..., 3, 3] -> [..., 3] (roll, pitch, yaw)."""
    pitch = np.arcsin(np.clip(-R[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(R[..., 2, 1], R[..., 2, 2])
    yaw = np.arctan2(R[..., 1, 0], R[..., 0, 0])
    return np.stack([roll, pitch, yaw], -1)


def uniform_inclinations(inc_min: float, inc_max: float, height: int) -> np.ndarray:
    """[H] Waymo's uniform beam inclinations, ascending (row order is the reverse)."""
    return inc_min + (0.5 + np.arange(height)) / height * (inc_max - inc_min)


def column_azimuths(width: int) -> np.ndarray:
    """[W] vehicle-frame azimuth of each range-image column (before az correction)."""
    return ((width - np.arange(width) - 0.5) / width * 2.0 - 1.0) * np.pi


def waymo_label_type(label: str) -> str:
    """Map a class name (``Car``, ``pedestrian``, ``TYPE_SIGN``...) to a Waymo type name."""
    up = label.upper()
    if up in LABEL_TYPES:
        return up
    low = label.lower()
    if any(k in low for k in ("cyclist", "bicycle", "bike", "motorcycl", "rider")):
        return "TYPE_CYCLIST"
    if any(k in low for k in ("car", "vehicle", "truck", "bus", "van", "trailer")):
        return "TYPE_VEHICLE"
    if any(k in low for k in ("pedestrian", "person", "walker")):
        return "TYPE_PEDESTRIAN"
    if "sign" in low:
        return "TYPE_SIGN"
    return "TYPE_UNKNOWN"


def _transform(values: Sequence[float], path: str, where: str) -> np.ndarray:
    if len(values) != 16:
        raise LogFormatError(path, f"{where}: transform has {len(values)} values, expected 16.")
    return np.asarray(values, dtype=np.float64).reshape(4, 4)


def _decode_matrix(blob: bytes, pb2: Any, path: str, where: str, channels: int) -> np.ndarray:
    """zlib-compressed MatrixFloat -> [H, W, C] float32 (C >= ``channels``)."""
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise LogFormatError(path, f"{where}: cannot decompress ({e}).") from e
    m = pb2.MatrixFloat()
    try:
        m.ParseFromString(raw)
    except Exception as e:  # protobuf's DecodeError
        raise LogFormatError(path, f"{where}: not a MatrixFloat ({e}).") from e
    dims = list(m.shape.dims)
    data = np.asarray(m.data, dtype=np.float32)
    if len(dims) != 3 or dims[2] < channels or int(np.prod(dims)) != data.size:
        raise LogFormatError(path, f"{where}: bad shape {dims} for {data.size} values "
                             f"(expected [H, W, >={channels}]).")
    return data.reshape(dims)


def _encode_matrix(arr: np.ndarray, pb2: Any) -> bytes:
    m = pb2.MatrixFloat()
    m.shape.dims.extend(arr.shape)
    m.data.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    return zlib.compress(m.SerializeToString(), 1)  # float noise barely compresses more


# ----------------------------------------------------------------------------- reader


class WaymoFile:
    """An open Waymo TFRecord: record index, and Frame protos parsed on demand.

    One parsed Frame is cached, so loading all cameras of a frame parses it once.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.pb2, self.label_pb2 = load_protos()
        self.path = str(path)
        self.records = TFRecordFile(path)
        self._lock = threading.Lock()
        self._cached: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def frame(self, index: int) -> Any:
        """The parsed ``dataset_pb2.Frame`` of record ``index`` (validated)."""
        with self._lock:
            if self._cached is not None and self._cached[0] == index:
                return self._cached[1]
        data = self.records.read(index)
        frame = self.pb2.Frame()
        try:
            frame.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError
            raise LogFormatError(self.path, f"record {index} is not a Waymo Frame "
                                 f"(protobuf parse failed: {e}).") from e
        # Arbitrary bytes can parse as a message made of unknown fields: insist on the
        # fields every Frame has.
        if not frame.HasField("timestamp_micros") or len(frame.pose.transform) != 16:
            raise LogFormatError(self.path, f"record {index} is not a Waymo Frame (no "
                                 "timestamp_micros or 4x4 vehicle pose).")
        with self._lock:
            self._cached = (index, frame)
        return frame

    def image_bytes(self, index: int, camera: str) -> bytes:
        frame = self.frame(index)
        cam_id = CAMERA_NAMES.index(camera) + 1
        for im in frame.images:
            if im.name == cam_id:
                return bytes(im.image)
        raise LogFormatError(self.path, f"record {index} has no {camera} image.")

    def lidar(self, index: int, calibrations: dict[str, Any], t0: float,
              velocity: np.ndarray | None = None) -> LidarSweep:
        """All lasers, both returns of record ``index`` as a world-frame sweep.

        Points come out float64 in the source world frame so that re-centring (which
        subtracts thousands of metres) happens before the cast to float32.
        """
        frame = self.frame(index)
        return decode_lidar(frame, calibrations, t0, self.pb2, self.path, index, velocity)


def decode_lidar(frame: Any, calibrations: dict[str, Any], t0: float, pb2: Any,
                 path: str, index: int, velocity: np.ndarray | None = None) -> LidarSweep:
    """World-frame points of every laser and return in ``frame``.

    Args:
        frame: a ``dataset_pb2.Frame``.
        calibrations: laser name -> ``LaserCalibration`` (from this or an earlier frame).
        t0: absolute time (s) of segment start; point times are relative to it.
        velocity: [3] world-frame ego velocity (m/s) at this frame, or None. When the
            ego moves (> 1 m/s) and the TOP laser has per-pixel poses, a point's time is
            read off its pixel pose (the vehicle pose when it fired): frame time + the
            pose's displacement along the velocity / speed. Otherwise, and for the other
            lasers, the column model ``t_frame + (c + 0.5) / W * 0.1``.

    Returns:
        LidarSweep with float64 [N, 3] source-world points, [N] intensity, [N] time,
        [N] sensor = index into ``LASER_NAMES``.
    """
    frame_pose = _transform(frame.pose.transform, path, f"record {index} pose")
    # This frame's own calibrations win (a writer may change rows between frames).
    calibrations = dict(calibrations)
    for c in frame.context.laser_calibrations:
        if 1 <= c.name <= len(LASER_NAMES):
            calibrations[LASER_NAMES[c.name - 1]] = c
    t_frame = frame.timestamp_micros * 1e-6 - t0
    pts, inten, times, sensors = [], [], [], []
    for laser in frame.lasers:
        if not 1 <= laser.name <= len(LASER_NAMES):
            raise LogFormatError(path, f"record {index}: unknown laser name {laser.name}.")
        lname = LASER_NAMES[laser.name - 1]
        where = f"record {index} laser {lname}"
        returns = [r for r in (laser.ri_return1, laser.ri_return2)
                   if len(r.range_image_compressed) > 0]
        if not returns:
            continue
        calib = calibrations.get(lname)
        if calib is None:
            raise LogFormatError(path, f"{where}: range image without a laser calibration.")
        extrinsic = _transform(calib.extrinsic.transform, path, f"{where} extrinsic")
        pixel_pose = None
        if lname == "TOP" and len(laser.ri_return1.range_image_pose_compressed) > 0:
            pixel_pose = _decode_matrix(laser.ri_return1.range_image_pose_compressed, pb2,
                                        path, f"{where} pixel pose", 6)
        for ret_i, ret in enumerate(returns):
            ri = _decode_matrix(ret.range_image_compressed, pb2, path,
                                f"{where} return {ret_i + 1}", 4)
            H, W = ri.shape[:2]
            if len(calib.beam_inclinations) > 0:
                if len(calib.beam_inclinations) != H:
                    raise LogFormatError(path, f"{where}: {len(calib.beam_inclinations)} "
                                         f"beam inclinations for a range image of {H} rows.")
                incl = np.asarray(calib.beam_inclinations, dtype=np.float64)
            else:
                incl = uniform_inclinations(calib.beam_inclination_min,
                                            calib.beam_inclination_max, H)
            incl = incl[::-1]  # row 0 is the highest beam
            az_corr = np.arctan2(extrinsic[1, 0], extrinsic[0, 0])
            azimuth = column_azimuths(W) - az_corr
            rng = ri[..., 0]
            valid = (rng > 0) & (ri[..., 3] != 1.0)  # channel 3 == 1: in a no-label zone
            rows, cols = np.nonzero(valid)
            r = rng[rows, cols].astype(np.float64)
            a, inc = azimuth[cols], incl[rows]
            p = np.stack([np.cos(a) * np.cos(inc) * r, np.sin(a) * np.cos(inc) * r,
                          np.sin(inc) * r], -1)
            p = p @ extrinsic[:3, :3].T + extrinsic[:3, 3]  # vehicle frame
            if pixel_pose is not None:
                if pixel_pose.shape[:2] != (H, W):
                    raise LogFormatError(path, f"{where}: pixel pose shape "
                                         f"{list(pixel_pose.shape)} does not match range "
                                         f"image {[H, W]}.")
                pp = pixel_pose[rows, cols].astype(np.float64)
                R = euler_to_matrix(pp[:, 0], pp[:, 1], pp[:, 2])
                p = np.einsum("nij,nj->ni", R, p) + pp[:, 3:6]
            else:
                p = p @ frame_pose[:3, :3].T + frame_pose[:3, 3]
            speed2 = float(velocity @ velocity) if velocity is not None else 0.0
            if pixel_pose is not None and speed2 > 1.0:
                t_pt = t_frame + (pp[:, 3:6] - frame_pose[:3, 3]) @ velocity / speed2
            else:
                t_pt = t_frame + (cols + 0.5) / W * SPIN_PERIOD_S
            pts.append(p)
            inten.append(ri[rows, cols, 1])
            times.append(t_pt)
            sensors.append(np.full(len(r), laser.name - 1, dtype=np.int8))
    if not pts:
        return LidarSweep(np.zeros((0, 3)), np.zeros(0, np.float32), np.zeros(0),
                          np.zeros(0, np.int8))
    return LidarSweep(np.concatenate(pts), np.concatenate(inten).astype(np.float32),
                      np.concatenate(times), np.concatenate(sensors))


def read_waymo(path: str | os.PathLike, frames: tuple[int, int] | None = None,
               cameras: Sequence[str] | None = None,
               ground_truth: bool = False) -> LogSegment:
    """Read a Waymo Open Dataset v1 segment (one ``.tfrecord`` of ``Frame`` records).

    Args:
        path: the TFRecord file.
        frames: (start, end) record positions, end-exclusive; None = all.
        cameras: Waymo camera names to keep (``FRONT``...); None = all calibrated.
        ground_truth: accepted for a uniform reader signature; real logs carry no extra
            ground truth, so ``LogSegment.ground_truth`` is always None.

    Returns:
        A re-centred LogSegment (``source_format="waymo"``) whose images and LiDAR load
        lazily from the file.
    """
    del ground_truth  # Waymo logs have no synthetic ground truth
    wf = WaymoFile(path)
    p = wf.path
    n = len(wf)
    if n == 0:
        raise LogFormatError(p, "holds no records (an empty TFRecord file).")
    start, end = (0, n) if frames is None else (int(frames[0]), int(frames[1]))
    if not 0 <= start < end <= n:
        raise LogFormatError(p, f"frame range {(start, end)} is outside the file's "
                             f"{n} frames.")

    cam_calib: dict[str, Any] = {}
    laser_calib: dict[str, Any] = {}
    raw: list[dict[str, Any]] = []
    segment = None
    stats: dict[str, str] = {}
    for i in range(start, end):
        fr = wf.frame(i)
        ctx = fr.context
        if segment is None:
            segment = ctx.name
            stats = {"location": ctx.stats.location, "time_of_day": ctx.stats.time_of_day,
                     "weather": ctx.stats.weather}
        elif ctx.name and ctx.name != segment:
            raise LogFormatError(p, f"record {i} belongs to segment {ctx.name!r}, not "
                                 f"{segment!r}: one file must hold one segment.")
        for c in ctx.camera_calibrations:
            if 1 <= c.name <= len(CAMERA_NAMES):
                cam_calib.setdefault(CAMERA_NAMES[c.name - 1], c)
        for c in ctx.laser_calibrations:
            if 1 <= c.name <= len(LASER_NAMES):
                laser_calib.setdefault(LASER_NAMES[c.name - 1], c)
        images = {}
        for im in fr.images:
            if not 1 <= im.name <= len(CAMERA_NAMES):
                raise LogFormatError(p, f"record {i}: unknown camera name {im.name}.")
            pose = (_transform(im.pose.transform, p, f"record {i} image pose")
                    if len(im.pose.transform) else None)
            images[CAMERA_NAMES[im.name - 1]] = (
                pose, im.pose_timestamp if im.HasField("pose_timestamp") else None)
        labels = [(lb.id, lb.type, lb.box.center_x, lb.box.center_y, lb.box.center_z,
                   lb.box.length, lb.box.width, lb.box.height, lb.box.heading)
                  for lb in fr.laser_labels]
        has_lidar = any(len(las.ri_return1.range_image_compressed) > 0
                        or len(las.ri_return2.range_image_compressed) > 0
                        for las in fr.lasers)
        raw.append({"index": i, "micros": fr.timestamp_micros,
                    "pose": _transform(fr.pose.transform, p, f"record {i} pose"),
                    "images": images, "labels": labels, "has_lidar": has_lidar})

    if cameras is None:
        cams = [c for c in CAMERA_NAMES if c in cam_calib]
    else:
        cams = list(cameras)
        missing = [c for c in cams if c not in cam_calib]
        if missing:
            raise LogFormatError(p, f"has no calibration for camera(s) {missing}; it has "
                                 f"{[c for c in CAMERA_NAMES if c in cam_calib]}.")
    models: dict[str, CameraModel] = {}
    extr_cv: dict[str, np.ndarray] = {}
    for c in cams:
        cal = cam_calib[c]
        if len(cal.intrinsic) != 9:
            raise LogFormatError(p, f"camera {c} has {len(cal.intrinsic)} intrinsics, "
                                 "expected 9 (f_u, f_v, c_u, c_v, k1, k2, p1, p2, k3).")
        if cal.width <= 0 or cal.height <= 0:
            raise LogFormatError(p, f"camera {c} calibration has no image size.")
        fu, fv, cu, cv, k1, k2, p1, p2, k3 = cal.intrinsic
        models[c] = CameraModel.from_pinhole(c, cal.width, cal.height, fu, fv, cu, cv,
                                             distortion=[k1, k2, p1, p2, k3])
        extr_cv[c] = _transform(cal.extrinsic.transform, p,
                                f"camera {c} extrinsic") @ OPENCV_TO_WAYMO_CAM

    t0_micros = raw[0]["micros"]
    t0 = t0_micros * 1e-6
    # Ego velocity per frame from neighbouring frames (central differences), used to
    # date LiDAR points by their per-pixel poses.
    pos = np.stack([r["pose"][:3, 3] for r in raw])
    tsec = np.array([(r["micros"] - t0_micros) * 1e-6 for r in raw])
    velocities: list[np.ndarray | None] = [None] * len(raw)
    if len(raw) > 1:
        for k in range(len(raw)):
            a, b = max(k - 1, 0), min(k + 1, len(raw) - 1)
            if tsec[b] > tsec[a]:
                velocities[k] = (pos[b] - pos[a]) / (tsec[b] - tsec[a])
    out_frames: list[Frame] = []
    per_track: dict[str, list[tuple]] = {}
    for k, r in enumerate(raw):
        i = r["index"]
        t = (r["micros"] - t0_micros) * 1e-6
        imgs = {}
        for c in cams:
            if c not in r["images"]:
                continue
            pose, pose_ts = r["images"][c]
            vehicle = pose if pose is not None else r["pose"]
            t_img = pose_ts - t0 if pose_ts is not None else t
            imgs[c] = CameraImage(
                c, vehicle @ extr_cv[c], float(t_img),
                ImageSource(load_bytes=partial(wf.image_bytes, i, c),
                            describe=f"{p} record {i} camera {c}"))
        loader = (partial(wf.lidar, i, laser_calib, t0, velocities[k]) if r["has_lidar"]
                  else None)
        out_frames.append(Frame(i, t, r["pose"], imgs, loader))
        for (oid, typ, cx, cy, cz, ln, wd, ht, hd) in r["labels"]:
            obj_to_vehicle = make_pose(rot_z(hd), np.array([cx, cy, cz]))
            per_track.setdefault(oid, []).append(
                (t, r["pose"] @ obj_to_vehicle, i, typ, (ln, wd, ht)))

    tracks: dict[str, Track] = {}
    for oid, obs in per_track.items():
        types = [o[3] for o in obs]
        typ = max(set(types), key=types.count)
        tracks[oid] = Track(
            oid, LABEL_TYPES[typ] if 0 <= typ < len(LABEL_TYPES) else "TYPE_UNKNOWN",
            np.median(np.array([o[4] for o in obs]), axis=0),
            np.array([o[0] for o in obs]), np.stack([o[1] for o in obs]),
            np.array([o[2] for o in obs]))

    meta = {"path": p, "segment": segment, "records": n, "record_range": [start, end],
            "lasers": sorted(laser_calib, key=LASER_NAMES.index),
            "distortion": "opencv k1 k2 p1 p2 k3 carried in CameraModel; images as recorded",
            **stats}
    return recentre(segment or Path(p).stem, "waymo", models, out_frames, tracks,
                    time_offset=t0, meta=meta)


# ----------------------------------------------------------------------------- writer


class _EgoTrajectory:
    """Ego pose at any time, slerp + lerp between frames (Track's interpolation)."""

    def __init__(self, log: LogSegment) -> None:
        ts = np.array([f.timestamp for f in log.frames])
        self._track = Track("ego", "ego", np.ones(3), ts,
                            np.stack([f.ego_to_world for f in log.frames]),
                            np.array([f.index for f in log.frames]))

    def at(self, t: np.ndarray) -> np.ndarray:
        """[N] times -> [N, 4, 4] ego_to_world."""
        return self._track.pose_at(np.asarray(t, dtype=np.float64).reshape(-1))


def _beam_rows(incl: np.ndarray, max_beams: int, default_rows: int
               ) -> tuple[np.ndarray, bool]:
    """Row inclinations (ascending) for points with inclinations ``incl`` [N].

    Returns (inclinations [H], explicit). Explicit when the points fall on at most
    ``max_beams`` well separated beams (a spinning LiDAR's rows): then each row is a
    real beam and vertical quantisation vanishes. Otherwise ``default_rows`` uniform rows
    spanning the data.
    """
    s = np.sort(incl)
    if len(s) > 1:
        cut = np.nonzero(np.diff(s) > 1e-3)[0] + 1
        groups = np.split(s, cut)
        if len(groups) <= max_beams:
            centres = np.array([np.median(g) for g in groups])
            spread = max(float(np.max(np.abs(g - c))) for g, c in zip(groups, centres, strict=True))
            gap = float(np.min(np.diff(centres))) if len(centres) > 1 else np.inf
            if spread < 0.1 * gap and spread < 2e-3:
                return centres, True
    lo, hi = (float(s[0]), float(s[-1])) if len(s) else (-0.3, 0.05)
    H = default_rows
    step = (hi - lo) / max(H - 1, 1) if hi > lo else 1e-3
    return uniform_inclinations(lo - step / 2, hi + step / 2, H), False


def build_top_range_images(sweep: LidarSweep, ego: _EgoTrajectory, t_frame: float,
                           lidar_to_ego: np.ndarray, world_offset: np.ndarray,
                           width: int | None = None, rows: int = 64, max_beams: int = 200
                           ) -> dict[str, Any]:
    """Encode a world-frame sweep as the TOP laser's range images.

    Each point is expressed in the sensor frame of the ego pose at the point's own time
    (written into the per-pixel pose image), so ego motion is undone exactly; the only
    loss is the snap of each ray to its pixel's (row inclination, column azimuth).
    The nearest point of a pixel goes to the first return, the next to the second;
    ``width`` grows (x2, up to 4 times) while a pixel would need a third.

    Args:
        sweep: re-centred world points [N, 3], intensity [N], time [N].
        ego: ego trajectory for per-point poses.
        t_frame: frame time (s since segment start); the empty pixels' poses use the
            column time model.
        lidar_to_ego: [4, 4] TOP extrinsic.
        world_offset: [3] added to poses (the file stores source-world poses).
        width: columns (None: 2650, Waymo's TOP width).

    Returns:
        dict with ``returns`` (list of [H, W, 4] float32), ``pose`` ([H, W, 6] float32),
        ``inclinations`` ascending [H], ``explicit`` bool, ``dropped`` int.
    """
    P = np.asarray(sweep.points, dtype=np.float64)
    t = np.asarray(sweep.time, dtype=np.float64)
    ego_t = ego.at(t) if len(P) else np.zeros((0, 4, 4))
    sensor_to_world = ego_t @ lidar_to_ego
    world_to_sensor = invert_pose(sensor_to_world)
    q = np.einsum("nij,nj->ni", world_to_sensor[:, :3, :3], P) + world_to_sensor[:, :3, 3]
    rng = np.linalg.norm(q, axis=1)
    keep = rng > 1e-3
    P, q, rng, t, ego_t = P[keep], q[keep], rng[keep], t[keep], ego_t[keep]
    inten = np.asarray(sweep.intensity, dtype=np.float32)[keep]
    incl = np.arcsin(np.clip(q[:, 2] / rng, -1.0, 1.0))
    az_corr = np.arctan2(lidar_to_ego[1, 0], lidar_to_ego[0, 0])
    az = np.arctan2(q[:, 1], q[:, 0]) + az_corr  # vehicle-frame azimuth
    az = (az + np.pi) % (2 * np.pi) - np.pi

    incl_rows, explicit = _beam_rows(incl, max_beams, rows)
    H = len(incl_rows)
    # nearest row: search in the ascending list, then flip the index
    j = np.clip(np.searchsorted(incl_rows, incl), 1, H - 1) if H > 1 else np.zeros(len(incl),
                                                                                  int)
    if H > 1:
        j = np.where(np.abs(incl - incl_rows[j - 1]) < np.abs(incl - incl_rows[j]), j - 1, j)
    row = H - 1 - j

    W = 2650 if width is None else int(width)
    for _attempt in range(5):
        col = np.floor(W - (az + np.pi) / (2 * np.pi) * W).astype(np.int64) % W
        key = row * W + col
        order = np.lexsort((rng, key))  # by pixel, nearest first
        ks = key[order]
        first = np.ones(len(ks), dtype=bool)
        first[1:] = ks[1:] != ks[:-1]
        rank = np.arange(len(ks)) - np.maximum.accumulate(np.where(first, np.arange(len(ks)), 0))
        if width is not None or not np.any(rank >= 2):
            break
        W *= 2
    dropped = int(np.sum(rank >= 2))
    if dropped:
        warnings.warn(f"{dropped} LiDAR points share a range-image pixel with two nearer "
                      "points and are not written", stacklevel=3)

    returns = []
    for ret in (0, 1):
        img = np.zeros((H, W, 4), dtype=np.float32)
        img[..., 0] = -1.0  # no return
        img[..., 3] = -1.0  # not in a no-label zone
        sel = order[rank == ret]
        if ret == 1 and len(sel) == 0:
            break
        img[row[sel], col[sel], 0] = rng[sel]
        img[row[sel], col[sel], 1] = inten[sel]
        returns.append(img)

    # Pose image: column-time ego pose everywhere, the point's own pose where the first
    # return lives (Waymo keeps one pose per pixel, shared by both returns; a second
    # return in the same pixel is a near-simultaneous echo of the same ray).
    col_t = t_frame + (np.arange(W) + 0.5) / W * SPIN_PERIOD_S
    col_pose = ego.at(col_t)
    pose_img = np.empty((H, W, 6), dtype=np.float64)
    pose_img[..., :3] = matrix_to_euler(col_pose[:, :3, :3])[None]
    pose_img[..., 3:] = (col_pose[:, :3, 3] + world_offset)[None]
    sel = order[rank == 0]
    pose_img[row[sel], col[sel], :3] = matrix_to_euler(ego_t[sel, :3, :3])
    pose_img[row[sel], col[sel], 3:] = ego_t[sel, :3, 3] + world_offset
    sel2 = order[rank == 1]
    if len(sel2):
        # A second-return point must decode with the pose of its pixel; re-express it
        # under that pose so the round trip stays exact up to quantisation.
        pix = pose_img[row[sel2], col[sel2]]
        R = euler_to_matrix(pix[:, 0], pix[:, 1], pix[:, 2])
        Tinv = invert_pose(make_pose(R, pix[:, 3:] - world_offset) @ lidar_to_ego)
        q2 = np.einsum("nij,nj->ni", Tinv[:, :3, :3], P[sel2]) + Tinv[:, :3, 3]
        returns[1][row[sel2], col[sel2], 0] = np.linalg.norm(q2, axis=1)
    return {"returns": returns, "pose": pose_img.astype(np.float32),
            "inclinations": incl_rows, "explicit": explicit, "dropped": dropped}


_CAMERA_ALIASES = {"LEFT": "SIDE_LEFT", "RIGHT": "SIDE_RIGHT", "BACK": "REAR"}


def camera_name_map(names: Sequence[str]) -> dict[str, str]:
    """Log camera name -> Waymo camera name: the upper-cased name without a ``_camera``
    suffix when that is a Waymo name (``front_left_camera`` -> ``FRONT_LEFT``; PandaSet's
    ``left``/``right``/``back`` -> ``SIDE_LEFT``/``SIDE_RIGHT``/``REAR``), else the next
    unused Waymo name."""
    out: dict[str, str] = {}
    for n in names:
        w = n.upper().removesuffix("_CAMERA")
        w = _CAMERA_ALIASES.get(w, w)
        if w in CAMERA_NAMES and w not in out.values():
            out[n] = w
    free = [c for c in CAMERA_NAMES if c not in out.values()]
    for n in names:
        if n not in out:
            if not free:
                raise ValueError(f"Waymo frames hold at most {len(CAMERA_NAMES)} cameras; "
                                 f"this log has {len(names)}")
            out[n] = free.pop(0)
    return out


def write_waymo(log: LogSegment, path: str | os.PathLike, *,
                lidar_to_ego: np.ndarray | None = None, lidar_width: int | None = None,
                lidar_rows: int = 64, jpeg_quality: int = 95,
                overwrite: bool = False) -> dict[str, str]:
    """Write ``log`` as a Waymo v1 TFRecord: one ``Frame`` per log frame.

    Cameras (JPEG bytes copied when already JPEG, else encoded at ``jpeg_quality``),
    calibrations, vehicle poses (re-centred pose + ``log.world_offset``), laser labels
    from tracks observed at each frame (box in the vehicle frame at the frame's time;
    only yaw is kept, as Waymo boxes have no roll/pitch), and LiDAR as TOP-laser range
    images with a per-pixel pose image (see ``build_top_range_images``). The file is
    written to a temporary name and renamed into place.

    Args:
        log: the segment.
        path: output ``.tfrecord``.
        lidar_to_ego: [4, 4] TOP mount; default ``log.meta["lidar_to_ego"]`` if present,
            else identity. It should be the real mount: rows are then exact beams.
        lidar_width: range-image columns (None: 2650, doubled while pixels overflow).
        lidar_rows: rows when points do not fall on distinct beams.
        overwrite: replace an existing file (else ``FileExistsError``).

    Returns:
        The camera name mapping used (log name -> Waymo name).
    """
    pb2, label_pb2 = load_protos()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    cam_map = camera_name_map(list(log.cameras))
    if lidar_to_ego is None:
        lidar_to_ego = np.asarray(log.meta.get("lidar_to_ego", np.eye(4)), dtype=np.float64)
    offset = np.asarray(log.world_offset, dtype=np.float64)
    ego = _EgoTrajectory(log)

    # Rig: camera->vehicle from the first frame that shows each camera (rigid rig); each
    # image's own pose is then chosen so that pose @ extrinsic reproduces cam_to_world.
    extr_cv: dict[str, np.ndarray] = {}
    for f in log.frames:
        for c, im in f.images.items():
            if c not in extr_cv:
                extr_cv[c] = invert_pose(f.ego_to_world) @ im.cam_to_world
    context = pb2.Context()
    context.name = log.name
    context.stats.location = str(log.meta.get("location", log.source_format))
    for c, model in log.cameras.items():
        cal = context.camera_calibrations.add()
        cal.name = CAMERA_NAMES.index(cam_map[c]) + 1
        d = np.zeros(5) if model.distortion is None else np.asarray(model.distortion)
        cal.intrinsic.extend([model.fx, model.fy, model.cx, model.cy, *map(float, d)])
        # A camera with no image at all gets a forward-looking mount at the origin.
        e_cv = extr_cv.get(c, OPENCV_TO_WAYMO_CAM)
        cal.extrinsic.transform.extend(
            (e_cv @ invert_pose(OPENCV_TO_WAYMO_CAM)).ravel().tolist())
        cal.width, cal.height = model.width, model.height
        cal.rolling_shutter_direction = cal.GLOBAL_SHUTTER

    with TFRecordWriter(path) as out:
        for f in log.frames:
            fr = pb2.Frame()
            fr.context.CopyFrom(context)
            fr.timestamp_micros = int(round((log.time_offset + f.timestamp) * 1e6))
            pose_abs = f.ego_to_world.copy()
            pose_abs[:3, 3] += offset
            fr.pose.transform.extend(pose_abs.ravel().tolist())
            for c, im in f.images.items():
                wi = fr.images.add()
                wi.name = CAMERA_NAMES.index(cam_map[c]) + 1
                wi.image = im.source.as_format("JPEG", jpeg_quality, subsampling=None)
                vpose = im.cam_to_world @ invert_pose(extr_cv[c])
                vpose[:3, 3] += offset
                wi.pose.transform.extend(vpose.ravel().tolist())
                wi.pose_timestamp = log.time_offset + im.timestamp
            for tr in log.tracks.values():
                if not tr.observed_at(f.timestamp, margin_s=1e-6):
                    continue
                box = invert_pose(f.ego_to_world) @ tr.pose_at(f.timestamp)
                lb = fr.laser_labels.add()
                lb.id = tr.id
                lb.type = LABEL_TYPES.index(waymo_label_type(tr.label))
                lb.box.center_x, lb.box.center_y, lb.box.center_z = box[:3, 3].tolist()
                lb.box.length, lb.box.width, lb.box.height = map(float, tr.size)
                lb.box.heading = float(np.arctan2(box[1, 0], box[0, 0]))
            if f.has_lidar:
                ri = build_top_range_images(f.lidar(), ego, f.timestamp, lidar_to_ego,
                                            offset, lidar_width, lidar_rows)
                laser = fr.lasers.add()
                laser.name = 1  # TOP
                laser.ri_return1.range_image_compressed = _encode_matrix(ri["returns"][0], pb2)
                laser.ri_return1.range_image_pose_compressed = _encode_matrix(ri["pose"], pb2)
                if len(ri["returns"]) > 1:
                    laser.ri_return2.range_image_compressed = _encode_matrix(
                        ri["returns"][1], pb2)
                # Rows can differ between frames; calibrations are per frame here.
                del fr.context.laser_calibrations[:]
                lc = fr.context.laser_calibrations.add()
                lc.name = 1
                lc.extrinsic.transform.extend(lidar_to_ego.ravel().tolist())
                incl = ri["inclinations"]
                H = len(incl)
                step = (incl[-1] - incl[0]) / max(H - 1, 1) if H > 1 else 1e-3
                lc.beam_inclination_min = float(incl[0] - step / 2)
                lc.beam_inclination_max = float(incl[-1] + step / 2)
                if ri["explicit"]:
                    lc.beam_inclinations.extend(incl.tolist())
            out.write(fr.SerializeToString())
    return cam_map
