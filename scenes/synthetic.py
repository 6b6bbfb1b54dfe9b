"""Synthetic driving logs with ground truth, rendered by the analytic street ray caster.

``generate_log(SyntheticConfig(...))`` returns a ``LogSegment`` like a reader would:
cameras (PandaSet names and rig), frames at 10 Hz with JPEG-recorded images, a spinning
multi-beam LiDAR with per-point time, tracked vehicle boxes, and a ``GroundTruth`` that a
real log cannot have: z-depth for every image and lane-shifted copies of the held-out
(odd) frames. Pixels and sweeps are rendered lazily on first access and cached, so
building a log is instant and a writer or a benchmark forces the work.

The generator's own world is the road frame of ``scenes.street`` placed somewhere on a
"map" by a seeded rigid transform (thousands of metres away, like real global
coordinates), then re-centred at the first ego position as every reader does.

Seeds: evaluation and training seeds are disjoint and named here, once.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from scenes.geometry import invert_pose, make_pose, rot_z
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
from scenes.street import _REFLECTIVITY, SKY, Hits, Street, build_street

#: Seeds reserved for evaluation; training must never use them.
EVAL_SEEDS: tuple[int, ...] = tuple(range(0, 1000))
#: Training seeds start here (disjoint from EVAL_SEEDS).
TRAIN_SEED_START = 100_000


def train_seeds(n: int, start: int = TRAIN_SEED_START) -> list[int]:
    """``n`` training seeds, never overlapping ``EVAL_SEEDS``."""
    if start < max(EVAL_SEEDS) + 1:
        raise ValueError(f"training seeds must start above {max(EVAL_SEEDS)}")
    return list(range(start, start + n))


#: Camera rig in the ego frame (x forward, y left, z up; origin at the LiDAR):
#: name -> (position [3], yaw rad, horizontal field of view deg). PandaSet names.
CAMERA_RIG: dict[str, tuple[tuple[float, float, float], float, float]] = {
    "front_camera": ((0.3, 0.0, -0.35), 0.0, 70.0),
    "front_left_camera": ((0.25, 0.35, -0.35), np.deg2rad(55.0), 70.0),
    "front_right_camera": ((0.25, -0.35, -0.35), np.deg2rad(-55.0), 70.0),
    "left_camera": ((0.0, 0.6, -0.35), np.deg2rad(90.0), 80.0),
    "right_camera": ((0.0, -0.6, -0.35), np.deg2rad(-90.0), 80.0),
    "back_camera": ((-0.8, 0.0, -0.35), np.pi, 70.0),
}
DEFAULT_CAMERAS = ("front_camera", "front_left_camera", "front_right_camera")

LIDAR_HEIGHT = 1.9  # m above the road: the ego origin
FPS = 10.0
# Extra sample offsets [4, 2] (px from the pixel centre) for pixels that change: a rotated
# grid, the pattern GPUs use for 4x supersampling.
SUBPIXEL_OFFSETS = np.array([[-0.125, -0.375], [0.375, -0.125], [0.125, 0.375],
                             [-0.375, 0.125]])
AA_CONTRAST = 0.02  # colour step (of 1) above which a pixel is supersampled


def camera_name(name: str) -> str:
    """Accept short names (``front``, ``front_left``) as well as rig names."""
    if name in CAMERA_RIG:
        return name
    full = f"{name}_camera"
    if full in CAMERA_RIG:
        return full
    raise ValueError(f"unknown synthetic camera {name!r}; choose from "
                     f"{', '.join(n.removesuffix('_camera') for n in CAMERA_RIG)}")


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Everything is deterministic given these fields.

    Attributes:
        seed: layout, traffic, appearance and sensor noise.
        frames: number of frames at 10 Hz.
        width, height: image size (px).
        cameras: rig names (or short names) to record.
        hfov_deg: horizontal field of view override for every camera (None: rig values).
        traffic: moving vehicles per 100 m per lane; also scales parked cars.
        curvature: road curvature 1/m (None: seeded, half the seeds straight, others
            gently curved with radius >= 200 m).
        speed: ego speed m/s (None: seeded in [6, 11]).
        lidar: whether to record LiDAR sweeps.
        lidar_beams, lidar_azimuths: beams and azimuth steps per revolution.
        lidar_range: max range (m); lidar_noise: range noise sigma (m).
        shifts_m: lateral shift distances for held-out ground truth (both directions
            where the shifted ego stays on the carriageway and clear of vehicles).
        jpeg_quality: images are recorded as JPEG of this quality (None: raw renders).
        antialias: supersample pixels where the image changes (outlines, texture edges),
            as a real lens integrates over the pixel; off: one ray per pixel centre.
    """

    seed: int = 0
    frames: int = 40
    width: int = 320
    height: int = 180
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    hfov_deg: float | None = None
    traffic: float = 1.5
    curvature: float | None = None
    speed: float | None = None
    lidar: bool = True
    lidar_beams: int = 32
    lidar_azimuths: int = 1024
    lidar_range: float = 80.0
    lidar_noise: float = 0.01
    shifts_m: tuple[float, ...] = (1.0, 2.0, 3.0)
    jpeg_quality: int | None = 95
    antialias: bool = True

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError("frames must be >= 1")
        if self.width < 8 or self.height < 8:
            raise ValueError("image size must be at least 8x8")
        object.__setattr__(self, "cameras", tuple(camera_name(c) for c in self.cameras))


class SyntheticRecorder:
    """Owns the street, the ego drive and the sensors; renders on demand with caching."""

    SWEEP_SECTORS = 36  # the sweep is cast as 36 bundles of 10 degrees, each at one time

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = c = config
        rng = np.random.default_rng([c.seed, 7])
        if c.curvature is None:
            kappa = 0.0 if rng.random() < 0.5 else float(rng.choice([-1, 1])
                                                         * rng.uniform(1 / 600, 1 / 200))
        else:
            kappa = float(c.curvature)
        self.speed = float(c.speed) if c.speed is not None else float(rng.uniform(6, 11))
        self.duration = (c.frames - 1) / FPS
        self.ego_s0 = 20.0
        self.ego_lane = 0
        self.street: Street = build_street(
            c.seed, length=self.speed * self.duration + 10, kappa=kappa, traffic=c.traffic,
            ego_lane=self.ego_lane, ego_s0=self.ego_s0, ego_speed=self.speed,
            duration=self.duration + 0.2)
        self.ego_d = self.street.road.lane_d(self.ego_lane)
        # Road frame -> source world: a seeded placement on the "map".
        yaw = float(rng.uniform(-np.pi, np.pi))
        t = np.array([rng.uniform(-5000, 5000), rng.uniform(-5000, 5000), rng.uniform(0, 40)])
        self.road_to_world = make_pose(rot_z(yaw), t)
        self.world_to_road = invert_pose(self.road_to_world)
        self.time_offset = 1.7e9 + c.seed * 3600.0
        self.cameras = {name: self._camera_model(name) for name in c.cameras}
        self._lock = threading.Lock()
        self._cache: dict[tuple, object] = {}

    # ------------------------------------------------------------------ poses

    def _camera_model(self, name: str) -> CameraModel:
        c = self.config
        hfov = c.hfov_deg if c.hfov_deg is not None else CAMERA_RIG[name][2]
        fx = (c.width / 2) / np.tan(np.deg2rad(hfov) / 2)
        return CameraModel.from_pinhole(name, c.width, c.height, fx, fx, c.width / 2,
                                        c.height / 2)

    def ego_to_road(self, t: float, shift_m: float = 0.0) -> np.ndarray:
        """Ego pose in the road frame at time t, optionally shifted along ego +y."""
        road = self.street.road
        s = self.ego_s0 + self.speed * t
        xy = road.to_xy(s, self.ego_d + shift_m)
        return make_pose(rot_z(road.heading(s)), [xy[0], xy[1], LIDAR_HEIGHT])

    @staticmethod
    def cam_to_ego(name: str) -> np.ndarray:
        pos, yaw, _ = CAMERA_RIG[name]
        z = np.array([np.cos(yaw), np.sin(yaw), 0.0])  # forward
        x = np.array([np.sin(yaw), -np.cos(yaw), 0.0])  # right
        y = np.cross(z, x)  # down
        return make_pose(np.stack([x, y, z], 1), pos)

    def frame_time(self, k: int) -> float:
        return k / FPS

    # ------------------------------------------------------------------ rendering

    def render(self, cam_to_road: np.ndarray, cam: CameraModel, t: float
               ) -> tuple[np.ndarray, np.ndarray]:
        """Render one pinhole view.

        Without antialiasing one ray samples each pixel centre. With it, pixels where the
        image changes (an outline, a texture edge) get four more rays on a rotated grid
        and average all five, the way a lens integrates light over the pixel; flat pixels
        keep their centre sample. Depth is always the pixel centre's.

        Returns:
            rgb [H, W, 3] uint8 and z-depth [H, W] float32 (inf = sky).
        """
        W, H = cam.width, cam.height
        u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
        u, v = u.reshape(-1), v.reshape(-1)
        hits, norm = self._cast_pixels(cam_to_road, cam, t, u, v)
        depth = (hits.t / norm).astype(np.float32).reshape(H, W)  # z = distance * cos
        colour = hits.rgb
        if self.config.antialias:
            idx = np.flatnonzero(_changing_pixels(colour.reshape(H, W, 3),
                                                  hits.kind.reshape(H, W),
                                                  hits.instance.reshape(H, W), depth))
            off = SUBPIXEL_OFFSETS
            sub, _ = self._cast_pixels(cam_to_road, cam, t,
                                       (u[idx][None] + off[:, :1]).reshape(-1),
                                       (v[idx][None] + off[:, 1:]).reshape(-1))
            colour = colour.copy()
            colour[idx] = (colour[idx] + sub.rgb.reshape(len(off), len(idx), 3).sum(0)) / (
                len(off) + 1)
        rgb = (colour.reshape(H, W, 3) * 255.0 + 0.5).astype(np.uint8)
        return rgb, depth

    def _cast_pixels(self, cam_to_road: np.ndarray, cam: CameraModel, t: float,
                     u: np.ndarray, v: np.ndarray) -> tuple[Hits, np.ndarray]:
        """Cast one ray through each image point (u [M], v [M] in px) at time t.

        Returns:
            the hits and each ray's length per unit of camera z [M].
        """
        rays_cam = np.stack([(u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones_like(u)], -1)
        norm = np.linalg.norm(rays_cam, axis=1)
        dirs = (rays_cam / norm[:, None]) @ cam_to_road[:3, :3].T
        return self.street.cast(cam_to_road[:3, 3], dirs, t), norm

    def _record(self, rgb: np.ndarray) -> tuple[bytes | None, np.ndarray]:
        """What the camera delivers: JPEG bytes (and their decoded pixels) or raw pixels."""
        q = self.config.jpeg_quality
        if q is None:
            return None, rgb
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=q, subsampling=0)
        data = buf.getvalue()
        return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def view(self, frame: int, camera: str, shift_m: float = 0.0
             ) -> tuple[bytes | None, np.ndarray, np.ndarray]:
        """(jpeg bytes or None, pixels [H, W, 3] uint8, depth [H, W]) of a view, cached."""
        key = (frame, camera, float(shift_m))
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            t = self.frame_time(frame)
            pose = self.ego_to_road(t, shift_m) @ self.cam_to_ego(camera)
            rgb, depth = self.render(pose, self.cameras[camera], t)
            data, pixels = self._record(rgb)
            hit = (data, pixels, depth)
            with self._lock:
                self._cache[key] = hit
        return hit

    def lidar_sweep(self, frame: int) -> LidarSweep:
        """A spinning LiDAR sweep centred on the frame time, in the source world frame.

        The revolution (0.1 s) is cast as sectors, each from the ego position at that
        sector's time with vehicles placed at that time; a point's time is its sector's.
        """
        key = ("lidar", frame)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        c = self.config
        rng = np.random.default_rng([c.seed, 11, frame])
        elev = np.deg2rad(np.linspace(-25.0, 15.0, c.lidar_beams))
        n_sec = self.SWEEP_SECTORS
        per = int(np.ceil(c.lidar_azimuths / n_sec))
        t_frame = self.frame_time(frame)
        pts, inten, times = [], [], []
        for j in range(n_sec):
            az = -np.pi + (j * per + np.arange(per) + 0.5) * (2 * np.pi / (per * n_sec))
            t = t_frame - 0.05 + (j + 0.5) * 0.1 / n_sec
            A, E = np.meshgrid(az, elev)
            d_ego = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)],
                             -1).reshape(-1, 3)
            ego = self.ego_to_road(t)
            dirs = d_ego @ ego[:3, :3].T
            hits = self.street.cast(ego[:3, 3], dirs, t, max_dist=c.lidar_range + 5)
            r = hits.t + rng.normal(0.0, c.lidar_noise, len(hits.t))
            ok = (hits.kind != SKY) & (hits.t > 2.0) & (hits.t < c.lidar_range)
            p = ego[:3, 3] + r[ok, None] * dirs[ok]
            cos_inc = np.abs(np.sum(hits.normal[ok] * dirs[ok], 1))
            lum = hits.rgb[ok].mean(1)  # painted markings reflect more
            refl = _REFLECTIVITY[hits.kind[ok]] * (0.6 + 0.8 * lum) * (0.3 + 0.7 * cos_inc)
            pts.append(p)
            inten.append(np.clip(refl * 255.0, 0, 255))
            times.append(np.full(int(ok.sum()), t))
        P = np.concatenate(pts)
        Pw = P @ self.road_to_world[:3, :3].T + self.road_to_world[:3, 3]
        sweep = LidarSweep(Pw, np.concatenate(inten).astype(np.float32), np.concatenate(times),
                           np.zeros(len(P), dtype=np.int8))
        with self._lock:
            self._cache[key] = sweep
        return sweep

    # ------------------------------------------------------------------ log assembly

    def tracks(self) -> dict[str, Track]:
        """Vehicle tracks (source world), keyed at frames where within 80 m of the ego."""
        out = {}
        times = np.array([self.frame_time(k) for k in range(self.config.frames)])
        ego_xy = np.stack([self.ego_to_road(t)[:2, 3] for t in times])
        for v in self.street.vehicles:
            poses = v.pose(self.street.road, times)
            near = np.linalg.norm(poses[:, :2, 3] - ego_xy, axis=1) < 80.0
            if not near.any():
                continue
            world = self.road_to_world @ poses[near]
            out[v.track_id] = Track(v.track_id, v.label, v.size.copy(), times[near], world,
                                    np.nonzero(near)[0])
        return out

    def shifted_views(self) -> list[ShiftedView]:
        """Lane-shifted ground truth for odd frames, where the shift is sensible."""
        c = self.config
        road = self.street.road
        views = []
        shifts = sorted({s * sign for s in c.shifts_m for sign in (1, -1)})
        for k in range(1, c.frames, 2):
            t = self.frame_time(k)
            for shift in shifts:
                # Stay on the carriageway and out of every vehicle.
                if abs(self.ego_d + shift) > road.half_width - 0.9:
                    continue
                ego = self.ego_to_road(t, shift)
                if self.street.inside_vehicle(ego[:3, 3], t, margin=0.6):
                    continue
                for cam in c.cameras:
                    pose = ego @ self.cam_to_ego(cam)
                    views.append(ShiftedView(
                        k, cam, shift, self.road_to_world @ pose, t,
                        ImageSource(load_array=self._pixels_loader(k, cam, shift),
                                    describe=f"synthetic seed {c.seed} frame {k} {cam} "
                                             f"shift {shift:+g} m"),
                        self._depth_loader(k, cam, shift)))
        return views

    def _pixels_loader(self, k: int, cam: str, shift: float) -> Callable[[], np.ndarray]:
        return lambda: self.view(k, cam, shift)[1]

    def _depth_loader(self, k: int, cam: str, shift: float) -> Callable[[], np.ndarray]:
        return lambda: self.view(k, cam, shift)[2]

    def _image_source(self, k: int, cam: str) -> ImageSource:
        where = f"synthetic seed {self.config.seed} frame {k} {cam}"
        if self.config.jpeg_quality is None:
            return ImageSource(load_array=self._pixels_loader(k, cam, 0.0), describe=where)
        return ImageSource(load_bytes=lambda: self.view(k, cam)[0], describe=where)

    def log(self) -> LogSegment:
        c = self.config
        frames = []
        for k in range(c.frames):
            t = self.frame_time(k)
            ego_w = self.road_to_world @ self.ego_to_road(t)
            images = {
                cam: CameraImage(cam, ego_w @ self.cam_to_ego(cam), t, self._image_source(k, cam))
                for cam in c.cameras
            }
            loader = (lambda k=k: self.lidar_sweep(k)) if c.lidar else None
            frames.append(Frame(k, t, ego_w, images, loader))
        gt = GroundTruth(
            depth={(k, cam): self._depth_loader(k, cam, 0.0)
                   for k in range(c.frames) for cam in c.cameras},
            shifted=self.shifted_views(),
            shifts_m=tuple(float(s) for s in c.shifts_m),
        )
        meta = {"seed": c.seed, "generator": "drivesplat.synthetic", "width": c.width,
                "height": c.height, "curvature": self.street.road.kappa,
                "lanes": self.street.road.lanes, "parking": self.street.road.parking,
                "ego_speed": self.speed, "traffic": c.traffic}
        return recentre(f"synthetic-{c.seed:05d}", "synthetic", dict(self.cameras), frames,
                        self.tracks(), time_offset=self.time_offset, ground_truth=gt, meta=meta)


def generate_log(config: SyntheticConfig | None = None, **overrides) -> LogSegment:
    """Build a synthetic driving log (pixels and sweeps render lazily on access).

    ``generate_log(seed=3, frames=20)`` is shorthand for ``generate_log(SyntheticConfig(...))``.
    """
    if config is None:
        config = SyntheticConfig(**overrides)
    elif overrides:
        raise TypeError("pass either a SyntheticConfig or keyword overrides, not both")
    return SyntheticRecorder(config).log()


def render_all(log: LogSegment, *, ground_truth: bool = True,
               progress: Callable[[int, int], None] | None = None, workers: int = 1) -> int:
    """Force every lazy image, depth map, sweep (and ground-truth view) of a log.

    ``workers`` > 1 renders items on that many threads (numpy releases the GIL in the
    ray caster's array work; each item's result is the same as when rendered alone).
    Returns the number of items rendered; ``progress(done, total)`` is called as it goes.
    """
    jobs: list[Callable[[], object]] = []
    for f in log.frames:
        jobs += [im.image for im in f.images.values()]
        if f.has_lidar:
            jobs.append(f.lidar)
    if ground_truth and log.ground_truth is not None:
        jobs += list(log.ground_truth.depth.values())
        jobs += [v.image.load for v in log.ground_truth.shifted]
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(workers) as pool:
            for i, fut in enumerate(as_completed([pool.submit(j) for j in jobs])):
                fut.result()
                if progress is not None:
                    progress(i + 1, len(jobs))
        return len(jobs)
    for i, job in enumerate(jobs):
        job()
        if progress is not None:
            progress(i + 1, len(jobs))
    return len(jobs)


def cameras_arg(names: Sequence[str] | str) -> tuple[str, ...]:
    """Parse a comma-separated camera list (short or rig names)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return tuple(camera_name(n) for n in names)


def _changing_pixels(rgb: np.ndarray, kind: np.ndarray, instance: np.ndarray,
                     depth: np.ndarray) -> np.ndarray:
    """Pixels whose centre sample may not stand for the whole pixel: a 4-neighbour shows
    another surface (kind or instance), a depth step (> 5 %) or a colour step
    (> AA_CONTRAST).

    Args:
        rgb: [H, W, 3] float colour in [0, 1]; kind, instance: [H, W] surface ids;
        depth: [H, W] z-depth.

    Returns:
        [H, W] bool; both pixels of a changing pair are marked.
    """
    with np.errstate(invalid="ignore"):  # inf - inf between two sky pixels
        def steps(a: slice, b: slice) -> np.ndarray:
            za, zb = depth[a], depth[b]
            return ((kind[a] != kind[b]) | (instance[a] != instance[b])
                    | (np.abs(rgb[a] - rgb[b]).max(-1) > AA_CONTRAST)
                    | (np.abs(za - zb) > 0.05 * np.minimum(za, zb)))
        out = np.zeros(kind.shape, dtype=bool)
        for a, b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                     ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
            step = steps(a, b)
            out[a] |= step
            out[b] |= step
    return out
