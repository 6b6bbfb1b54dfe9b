"""In-memory model of a driving log segment.

Conventions (DESIGN.md): metres, seconds, radians; world frame right-handed, z up,
re-centred at the first ego position (the removed translation is ``world_offset``);
cameras in OpenCV axes (x right, y down, z forward) with ``cam_to_world`` 4x4 and K in
pixels (pixel centres at +0.5); actor frame x along the box length, y left, z up, origin
at the box centre; ego frame x forward, y left, z up; time in seconds since the
segment's first timestamp (``time_offset`` keeps the absolute start).

Images and LiDAR sweeps load lazily through small loader callables, so a segment of
hundreds of frames costs little until pixels are touched. A loader that meets a bad
file raises ``LogFormatError`` naming that file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from scenes.geometry import make_pose, matrix_to_quat, quat_to_matrix, slerp

#: Distortion models a camera can carry.
DISTORTION_MODELS = ("opencv",)


@dataclass(frozen=True)
class CameraModel:
    """Intrinsics of one camera.

    Attributes:
        name: camera name, unique in the segment (``front_camera``, ``FRONT``...).
        width, height: image size in pixels.
        K: [3, 3] float64 pinhole intrinsics, pixel centres at +0.5.
        distortion: optional [5] OpenCV coefficients (k1, k2, p1, p2, k3). Images are
            stored as recorded; whoever projects must apply the model (None = pinhole).
    """

    name: str
    width: int
    height: int
    K: np.ndarray
    distortion: np.ndarray | None = None

    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    @property
    def cx(self) -> float:
        return float(self.K[0, 2])

    @property
    def cy(self) -> float:
        return float(self.K[1, 2])

    @staticmethod
    def from_pinhole(name: str, width: int, height: int, fx: float, fy: float,
                     cx: float, cy: float,
                     distortion: Sequence[float] | None = None) -> CameraModel:
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        d = None if distortion is None else np.asarray(distortion, dtype=np.float64)
        return CameraModel(name, int(width), int(height), K, d)


class ImageSource:
    """A lazily decoded camera image: JPEG/PNG bytes, a file, or an in-memory array.

    Keeping the encoded bytes lets writers copy a recorded JPEG verbatim (a log read and
    written again stays bit-identical) instead of re-encoding it.
    """

    def __init__(self, *, path: str | None = None,
                 load_bytes: Callable[[], bytes] | None = None,
                 load_array: Callable[[], np.ndarray] | None = None,
                 describe: str | None = None) -> None:
        if path is None and load_bytes is None and load_array is None:
            raise ValueError("ImageSource needs a path, a byte loader or an array loader")
        self.path = path
        self._load_bytes = load_bytes
        self._load_array = load_array
        self.describe = describe or path or "<in-memory image>"

    @staticmethod
    def from_array(img: np.ndarray) -> ImageSource:
        return ImageSource(load_array=lambda: img)

    @property
    def is_encoded(self) -> bool:
        return self._load_array is None

    def encoded(self) -> bytes:
        """The encoded bytes (JPEG or PNG); only for encoded sources."""
        from scenes.errors import LogFormatError

        if self._load_bytes is not None:
            return self._load_bytes()
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise LogFormatError(self.path, f"cannot read image file ({e.strerror}).") from e
        raise ValueError("this image is an in-memory array, not encoded bytes")

    def load(self) -> np.ndarray:
        """Decoded pixels: [H, W, 3] uint8 RGB."""
        if self._load_array is not None:
            return self._load_array()
        return decode_image(self.encoded(), self.describe)

    def as_format(self, fmt: str, quality: int = 95, subsampling: int | None = 0) -> bytes:
        """Bytes in ``fmt`` ("JPEG" or "PNG"): recorded bytes verbatim when already in that
        format (a log read and written again stays bit-identical), else encoded.

        Args:
            quality, subsampling: JPEG settings (subsampling 0 = 4:4:4; None = Pillow's
                default).
        """
        magic = _MAGIC[fmt]
        if self.is_encoded:
            data = self.encoded()
            if data.startswith(magic):
                return data
            pixels = decode_image(data, self.describe)
        else:
            pixels = self.load()
        opts: dict = {}
        if fmt == "JPEG":
            opts["quality"] = quality
            if subsampling is not None:
                opts["subsampling"] = subsampling
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format=fmt,
                                                                           **opts)
        return buf.getvalue()


_MAGIC = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode JPEG/PNG bytes to [H, W, 3] uint8; ``LogFormatError`` naming ``where``."""
    from scenes.errors import LogFormatError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise LogFormatError(where, f"is not a readable image ({e}).") from e


@dataclass
class CameraImage:
    """One camera's view at one frame.

    Attributes:
        camera: name of the camera model.
        cam_to_world: [4, 4] float64, OpenCV camera axes.
        timestamp: seconds since segment start (cameras need not be synchronised).
        source: where the pixels come from.
    """

    camera: str
    cam_to_world: np.ndarray
    timestamp: float
    source: ImageSource

    def image(self) -> np.ndarray:
        """[H, W, 3] uint8 RGB."""
        return self.source.load()


@dataclass
class LidarSweep:
    """One LiDAR sweep in the world frame.

    Attributes:
        points: [N, 3] float32 world-frame positions.
        intensity: [N] float32 return intensity (sensor units; PandaSet 0-255).
        time: [N] float64 per-point time, seconds since segment start.
        sensor: [N] int8 sensor index (PandaSet ``d``; 0 for single-LiDAR logs).
    """

    points: np.ndarray
    intensity: np.ndarray
    time: np.ndarray
    sensor: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.sensor is None:
            self.sensor = np.zeros(len(self.points), dtype=np.int8)

    def __len__(self) -> int:
        return len(self.points)

    def select(self, mask: np.ndarray) -> LidarSweep:
        return LidarSweep(self.points[mask], self.intensity[mask], self.time[mask],
                          self.sensor[mask])


@dataclass
class Frame:
    """One time step of the log.

    Attributes:
        index: frame index in the source log (stays the same after selection).
        timestamp: seconds since segment start.
        ego_to_world: [4, 4] float64, ego axes x forward, y left, z up.
        images: camera name -> CameraImage.
        lidar_loader: returns this frame's LiDAR sweep (None: no LiDAR).
    """

    index: int
    timestamp: float
    ego_to_world: np.ndarray
    images: dict[str, CameraImage]
    lidar_loader: Callable[[], LidarSweep] | None = None

    @property
    def has_lidar(self) -> bool:
        return self.lidar_loader is not None

    def lidar(self) -> LidarSweep:
        if self.lidar_loader is None:
            raise ValueError(f"frame {self.index} has no LiDAR sweep")
        return self.lidar_loader()


@dataclass
class Track:
    """A tracked object: a box of fixed size and its pose over time.

    Attributes:
        id: stable identifier (PandaSet uuid, Waymo object id...).
        label: class name (``Car``, ``TYPE_VEHICLE``...).
        size: [3] float64 (length, width, height) in metres.
        timestamps: [K] float64 increasing, seconds since segment start.
        poses: [K, 4, 4] float64 object_to_world at those times.
        frame_indices: [K] frame index of each keyframe.
    """

    id: str
    label: str
    size: np.ndarray
    timestamps: np.ndarray
    poses: np.ndarray
    frame_indices: np.ndarray

    #: A track whose box centre travels farther than this (m) counts as moving.
    MOVING_THRESHOLD_M = 1.0

    def __post_init__(self) -> None:
        order = np.argsort(self.timestamps, kind="stable")
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64)[order]
        self.poses = np.asarray(self.poses, dtype=np.float64)[order]
        self.frame_indices = np.asarray(self.frame_indices, dtype=np.int64)[order]
        self.size = np.asarray(self.size, dtype=np.float64)
        self._quats = matrix_to_quat(self.poses[:, :3, :3])

    @property
    def t_start(self) -> float:
        return float(self.timestamps[0])

    @property
    def t_end(self) -> float:
        return float(self.timestamps[-1])

    @property
    def is_moving(self) -> bool:
        c = self.poses[:, :3, 3]
        return bool(np.linalg.norm(c - c[0], axis=1).max() > self.MOVING_THRESHOLD_M)

    def observed_at(self, t: float | np.ndarray, margin_s: float = 0.0) -> np.ndarray | bool:
        """Whether ``t`` lies within the keyframe time range (widened by ``margin_s``)."""
        t = np.asarray(t, dtype=np.float64)
        out = (t >= self.t_start - margin_s) & (t <= self.t_end + margin_s)
        return bool(out) if out.ndim == 0 else out

    def pose_at(self, t: float | np.ndarray) -> np.ndarray:
        """Interpolated object_to_world at time(s) ``t``: slerp rotation, lerp position.

        Exact at keyframes. Outside the keyframe range the end segment's motion is
        continued (constant velocity); use ``observed_at`` to decide visibility.

        Args:
            t: scalar or [M] seconds since segment start.

        Returns:
            [4, 4] for a scalar, else [M, 4, 4].
        """
        t = np.asarray(t, dtype=np.float64)
        scalar = t.ndim == 0
        t = np.atleast_1d(t)
        K = len(self.timestamps)
        if K == 1:
            out = np.repeat(self.poses[:1], len(t), 0)
            return out[0] if scalar else out
        i = np.searchsorted(self.timestamps, t, side="right") - 1
        i = np.clip(i, 0, K - 2)
        t0, t1 = self.timestamps[i], self.timestamps[i + 1]
        u = (t - t0) / np.maximum(t1 - t0, 1e-12)
        p = self.poses[i, :3, 3] + u[:, None] * (self.poses[i + 1, :3, 3] - self.poses[i, :3, 3])
        q = slerp(self._quats[i], self._quats[i + 1], u)
        out = make_pose(quat_to_matrix(q), p)
        return out[0] if scalar else out

    def corners(self) -> np.ndarray:
        """[8, 3] box corners in the object frame."""
        half = self.size / 2
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        return signs * half

    def contains(self, points: np.ndarray, t: float | np.ndarray,
                 margin: float = 0.0) -> np.ndarray:
        """Which world points [N, 3] lie inside the box at time(s) ``t`` (scalar or [N])."""
        from scenes.geometry import invert_pose

        t = np.asarray(t, dtype=np.float64)
        pts = np.asarray(points, dtype=np.float64)
        if t.ndim == 0:
            T = invert_pose(self.pose_at(t))
            local = pts @ T[:3, :3].T + T[:3, 3]
        else:
            T = invert_pose(self.pose_at(t))
            local = np.einsum("nij,nj->ni", T[:, :3, :3], pts) + T[:, :3, 3]
        return np.all(np.abs(local) <= self.size / 2 + margin, axis=1)

    def select_times(self, t_min: float, t_max: float) -> Track | None:
        """Keyframes within [t_min, t_max] (None if there are none)."""
        m = (self.timestamps >= t_min - 1e-9) & (self.timestamps <= t_max + 1e-9)
        if not m.any():
            return None
        return Track(self.id, self.label, self.size, self.timestamps[m], self.poses[m],
                     self.frame_indices[m])

    def shifted(self, offset: np.ndarray, dt: float = 0.0) -> Track:
        """This track in a world translated by ``-offset`` and a clock shifted by ``-dt``."""
        poses = self.poses.copy()
        poses[:, :3, 3] -= offset
        return Track(self.id, self.label, self.size, self.timestamps - dt, poses,
                     self.frame_indices)


@dataclass
class ShiftedView:
    """Ground truth for a view the log never recorded (synthetic logs only).

    Attributes:
        frame_index: the held-out frame it copies.
        camera: camera name.
        shift_m: lateral ego shift, metres (> 0 moves left along ego +y).
        cam_to_world: [4, 4] float64 of the shifted camera.
        timestamp: seconds since segment start (that of the frame).
        image: lazily decoded [H, W, 3] uint8.
        depth: returns [H, W] float32 z-depth (inf where the ray hits sky).
    """

    frame_index: int
    camera: str
    shift_m: float
    cam_to_world: np.ndarray
    timestamp: float
    image: ImageSource
    depth: Callable[[], np.ndarray]


@dataclass
class GroundTruth:
    """Extra ground truth a synthetic log carries beyond what a real log records.

    Attributes:
        depth: (frame_index, camera) -> loader of [H, W] float32 z-depth for every
            recorded image (inf for sky).
        shifted: lane-shifted copies of held-out (odd) frames.
        shifts_m: the shift distances generated.
    """

    depth: dict[tuple[int, str], Callable[[], np.ndarray]] = field(default_factory=dict)
    shifted: list[ShiftedView] = field(default_factory=list)
    shifts_m: tuple[float, ...] = ()


@dataclass
class LogSegment:
    """A driving log segment: cameras, frames (images, LiDAR, ego poses) and tracks.

    Attributes:
        name: segment name.
        source_format: ``pandaset`` | ``waymo`` | ``synthetic``.
        world_offset: [3] float64 translation removed from the source world frame.
        time_offset: absolute time (source clock, seconds) of t = 0.
        cameras: name -> CameraModel.
        frames: in time order.
        tracks: id -> Track.
        ground_truth: extra views (synthetic logs) or None.
        meta: free-form source details (sequence path, seed, generator settings).
    """

    name: str
    source_format: str
    world_offset: np.ndarray
    time_offset: float
    cameras: dict[str, CameraModel]
    frames: list[Frame]
    tracks: dict[str, Track]
    ground_truth: GroundTruth | None = None
    meta: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        if not self.frames:
            return 0.0
        return float(self.frames[-1].timestamp - self.frames[0].timestamp)

    @property
    def moving_tracks(self) -> list[Track]:
        return [t for t in self.tracks.values() if t.is_moving]

    def lidar_point_count(self) -> int:
        return sum(len(f.lidar()) for f in self.frames if f.has_lidar)

    def select(self, frames: tuple[int, int] | slice | Iterable[int] | None = None,
               cameras: Sequence[str] | None = None) -> LogSegment:
        """A view of a frame range and/or camera subset (world frame unchanged).

        Args:
            frames: (start, end) end-exclusive positions, a slice, or explicit positions
                into ``self.frames``.
            cameras: camera names to keep, in the order given.
        """
        if frames is None:
            chosen = list(self.frames)
        elif isinstance(frames, tuple) and len(frames) == 2:
            chosen = self.frames[frames[0]:frames[1]]
        elif isinstance(frames, slice):
            chosen = self.frames[frames]
        else:
            chosen = [self.frames[i] for i in frames]
        if not chosen:
            raise ValueError(f"frame selection {frames!r} leaves no frames")
        cams = list(self.cameras) if cameras is None else list(cameras)
        unknown = [c for c in cams if c not in self.cameras]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; this log has {list(self.cameras)}")
        new_frames = [replace(f, images={c: f.images[c] for c in cams if c in f.images})
                      for f in chosen]
        t0, t1 = new_frames[0].timestamp, new_frames[-1].timestamp
        tracks = {}
        for tid, tr in self.tracks.items():
            sel = tr.select_times(t0, t1)
            if sel is not None:
                tracks[tid] = sel
        gt = None
        if self.ground_truth is not None:
            keep = {f.index for f in new_frames}
            gt = GroundTruth(
                depth={k: v for k, v in self.ground_truth.depth.items()
                       if k[0] in keep and k[1] in cams},
                shifted=[v for v in self.ground_truth.shifted
                         if v.frame_index in keep and v.camera in cams],
                shifts_m=self.ground_truth.shifts_m,
            )
        return replace(self, cameras={c: self.cameras[c] for c in cams}, frames=new_frames,
                       tracks=tracks, ground_truth=gt)


def recentre(name: str, source_format: str, cameras: dict[str, CameraModel],
             frames: list[Frame], tracks: dict[str, Track], *, time_offset: float,
             ground_truth: GroundTruth | None = None, meta: dict | None = None,
             world_offset: np.ndarray | None = None) -> LogSegment:
    """Build a LogSegment whose world origin sits at the first ego position.

    ``frames`` carry source-world poses. Every pose is translated by ``-offset`` where
    offset is the first frame's ego position (or ``world_offset`` when given). LiDAR
    loaders are wrapped so points come out re-centred; tracks and ground truth too.
    """
    if not frames:
        raise ValueError("a log segment needs at least one frame")
    offset = (np.asarray(world_offset, dtype=np.float64) if world_offset is not None
              else frames[0].ego_to_world[:3, 3].copy())

    def shift(T: np.ndarray) -> np.ndarray:
        T = T.copy()
        T[..., :3, 3] -= offset
        return T

    def shift_lidar(loader: Callable[[], LidarSweep]) -> Callable[[], LidarSweep]:
        def load() -> LidarSweep:
            s = loader()
            pts = (s.points.astype(np.float64) - offset).astype(np.float32)
            return LidarSweep(pts, s.intensity, s.time, s.sensor)
        return load

    new_frames = [
        Frame(f.index, f.timestamp, shift(f.ego_to_world),
              {c: replace(im, cam_to_world=shift(im.cam_to_world)) for c, im in f.images.items()},
              None if f.lidar_loader is None else shift_lidar(f.lidar_loader))
        for f in frames
    ]
    new_tracks = {k: t.shifted(offset) for k, t in tracks.items()}
    gt = None
    if ground_truth is not None:
        gt = GroundTruth(depth=ground_truth.depth,
                         shifted=[replace(v, cam_to_world=shift(v.cam_to_world))
                                  for v in ground_truth.shifted],
                         shifts_m=ground_truth.shifts_m)
    return LogSegment(name, source_format, offset, float(time_offset), cameras, new_frames,
                      new_tracks, gt, dict(meta or {}))
