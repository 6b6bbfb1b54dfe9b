"""Synthetic driving logs: conventions proven by geometry, determinism, ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from scenes.geometry import invert_pose
from scenes.street import Road
from scenes.synthetic import (
    EVAL_SEEDS,
    SyntheticConfig,
    SyntheticRecorder,
    generate_log,
    train_seeds,
)

SMALL = dict(frames=6, width=96, height=64)


@pytest.fixture(scope="module")
def log():
    # A curved road with traffic: exercises the arc geometry and moving actors.
    return generate_log(SyntheticConfig(seed=3, frames=8, width=160, height=96,
                                        curvature=1 / 250, traffic=2.5))


def _project(points: np.ndarray, cam_to_world: np.ndarray, K: np.ndarray, W: int, H: int):
    T = invert_pose(cam_to_world)
    p = points.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    front = p[:, 2] > 0.5
    uv = p[front] @ K.T
    uv = uv[:, :2] / uv[:, 2:]
    inb = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
    return uv[inb], p[front][inb, 2]


def test_lidar_agrees_with_camera_depth(log):
    """Camera intrinsics, camera poses and LiDAR frame agree: projected LiDAR depth
    matches the independently rendered ground-truth depth."""
    for k in (0, 5):
        sweep = log.frames[k].lidar()
        for name, cam in log.cameras.items():
            uv, z = _project(sweep.points, log.frames[k].images[name].cam_to_world, cam.K,
                             cam.width, cam.height)
            assert len(z) > 500, name
            depth = log.ground_truth.depth[(k, name)]()
            d = depth[uv[:, 1].astype(int), uv[:, 0].astype(int)]
            rel = np.abs(d - z) / z
            assert np.median(rel) < 0.02, (k, name, np.median(rel))


def test_lidar_points_fall_on_image_content(log):
    """A wrong pixel convention or flipped axis puts sky pixels under ground points."""
    k = 2
    sweep = log.frames[k].lidar()
    cam = log.cameras["front_camera"]
    uv, _ = _project(sweep.points, log.frames[k].images["front_camera"].cam_to_world, cam.K,
                     cam.width, cam.height)
    depth = log.ground_truth.depth[(k, "front_camera")]()
    assert np.isfinite(depth[uv[:, 1].astype(int), uv[:, 0].astype(int)]).mean() > 0.98


def test_world_is_recentred_at_first_ego_position(log):
    assert np.allclose(log.frames[0].ego_to_world[:3, 3], 0.0)
    assert np.linalg.norm(log.world_offset) > 100.0  # the generator places streets far away
    pts = log.frames[0].lidar().points
    assert pts.dtype == np.float32
    assert np.abs(pts).max() < 200.0


def test_ego_and_camera_axes(log):
    """Ego x points along the drive; camera z looks along ego x, camera y points down."""
    f0, f1 = log.frames[0], log.frames[-1]
    travel = f1.ego_to_world[:3, 3] - f0.ego_to_world[:3, 3]
    assert travel @ f0.ego_to_world[:3, 0] > 0.9 * np.linalg.norm(travel)
    front = f0.images["front_camera"].cam_to_world
    assert front[:3, 2] @ f0.ego_to_world[:3, 0] > 0.99
    assert front[:3, 1] @ np.array([0.0, 0.0, -1.0]) > 0.99
    left = f0.images["front_left_camera"].cam_to_world
    assert left[:3, 2] @ f0.ego_to_world[:3, 1] > 0.7  # looks to the left


def test_moving_actor_points_inside_boxes_at_their_time(log):
    """Points on moving vehicles lie inside the track box at the point's own timestamp
    (per-point time and track interpolation agree), and not at a wrong time."""
    moving = log.moving_tracks
    assert moving
    pts = np.concatenate([log.frames[k].lidar().points for k in range(len(log.frames))])
    times = np.concatenate([log.frames[k].lidar().time for k in range(len(log.frames))])
    checked = 0
    for tr in moving:
        L, W, H = tr.size
        T = invert_pose(tr.pose_at(times))
        local = np.einsum("nij,nj->ni", T[:, :3, :3], pts) + T[:, :3, 3]
        # Above the road (no ground points), within half a metre of the footprint.
        near = (np.abs(local[:, 0]) < L / 2 + 0.5) & (np.abs(local[:, 1]) < W / 2 + 0.5) & \
            (local[:, 2] > -H / 2 + 0.2) & (local[:, 2] < H / 2 + 0.5)
        if near.sum() < 30:
            continue
        checked += 1
        inside = tr.contains(pts[near], times[near], margin=0.05)
        assert inside.mean() > 0.97, (tr.id, inside.mean())
        # The same points against the box 0.5 s later: most fall outside.
        late = tr.contains(pts[near], times[near] + 0.5, margin=0.05)
        assert late.mean() < 0.7, (tr.id, late.mean())
    assert checked >= 1


def test_per_point_time_spans_the_sweep(log):
    sweep = log.frames[4].lidar()
    t = log.frames[4].timestamp
    assert sweep.time.min() >= t - 0.05 - 1e-9 and sweep.time.max() <= t + 0.05 + 1e-9
    assert len(np.unique(sweep.time)) >= 30
    assert sweep.intensity.min() >= 0 and sweep.intensity.max() <= 255
    assert sweep.intensity.std() > 1.0


def test_deterministic_per_seed():
    a = generate_log(seed=11, **SMALL)
    b = generate_log(seed=11, **SMALL)
    c = generate_log(seed=12, **SMALL)
    for k in (0, 3):
        ia = a.frames[k].images["front_camera"].source.encoded()
        assert ia == b.frames[k].images["front_camera"].source.encoded()
        np.testing.assert_array_equal(a.frames[k].lidar().points, b.frames[k].lidar().points)
    assert set(a.tracks) == set(b.tracks)
    for tid in a.tracks:
        np.testing.assert_array_equal(a.tracks[tid].poses, b.tracks[tid].poses)
    assert not np.array_equal(a.frames[0].images["front_camera"].image(),
                              c.frames[0].images["front_camera"].image())


def test_parameters_are_honoured():
    log = generate_log(SyntheticConfig(seed=4, frames=5, width=80, height=48,
                                       cameras=("front", "back", "left"), lidar=False))
    assert len(log.frames) == 5
    assert list(log.cameras) == ["front_camera", "back_camera", "left_camera"]
    img = log.frames[0].images["back_camera"].image()
    assert img.shape == (48, 80, 3) and img.dtype == np.uint8
    assert not log.frames[0].has_lidar
    assert log.duration_s == pytest.approx(0.4)
    with pytest.raises(ValueError, match="unknown synthetic camera"):
        SyntheticConfig(cameras=("roof",))


def test_traffic_density_controls_vehicle_count():
    quiet = SyntheticRecorder(SyntheticConfig(seed=21, traffic=0.3, **SMALL))
    busy = SyntheticRecorder(SyntheticConfig(seed=21, traffic=4.0, **SMALL))
    assert len(busy.street.vehicles) > len(quiet.street.vehicles)


def test_images_show_a_street():
    """Road below the horizon, sky above, and real texture (not flat colour)."""
    log = generate_log(seed=2, frames=2, width=160, height=96, jpeg_quality=None)
    img = log.frames[0].images["front_camera"].image().astype(np.float64)
    depth = log.ground_truth.depth[(0, "front_camera")]()
    assert np.isfinite(depth[-10:]).all()  # bottom rows hit the ground
    assert not np.isfinite(depth[:5, 60:100]).all()  # some sky straight ahead up top
    sky = ~np.isfinite(depth)
    assert img[sky][:, 2].mean() > img[sky][:, 0].mean()  # sky is blue-ish
    assert img[~sky].std() > 20.0


def test_held_out_ground_truth_lane_shifts(log):
    gt = log.ground_truth
    assert gt.shifts_m == (1.0, 2.0, 3.0)
    assert gt.shifted and all(v.frame_index % 2 == 1 for v in gt.shifted)
    assert {abs(v.shift_m) for v in gt.shifted} == {1.0, 2.0, 3.0}
    by_frame = {f.index: f for f in log.frames}
    for v in gt.shifted[:6]:
        f = by_frame[v.frame_index]
        base = f.images[v.camera].cam_to_world
        # The camera moved shift_m along the ego's +y, orientation unchanged.
        expected = base[:3, 3] + v.shift_m * f.ego_to_world[:3, 1]
        np.testing.assert_allclose(v.cam_to_world[:3, 3], expected, atol=1e-6)
        np.testing.assert_allclose(v.cam_to_world[:3, :3], base[:3, :3], atol=1e-9)
        shifted_img = v.image.load()
        assert shifted_img.shape == f.images[v.camera].image().shape
        assert np.abs(shifted_img.astype(int) - f.images[v.camera].image()).mean() > 2.0
        assert v.depth().shape == shifted_img.shape[:2]


def test_shifted_views_stay_on_the_road():
    """A one-lane road has no room to the right: only leftward shifts are generated."""
    rec = SyntheticRecorder(SyntheticConfig(seed=1, **SMALL))
    assert rec.street.road.lanes == 1 and not rec.street.road.parking
    shifts = {v.shift_m for v in rec.log().ground_truth.shifted}
    assert shifts and all(s > 0 for s in shifts)


@pytest.mark.parametrize("kappa", [0.0, 1 / 250, -1 / 300])
def test_road_coordinates_round_trip(kappa):
    road = Road(kappa=kappa, lanes=2, parking=True, sidewalk=4.0, s_min=-50, s_max=300)
    s = np.linspace(-40, 280, 50)
    d = np.linspace(-12, 12, 50)
    xy = road.to_xy(s, d)
    s2, d2 = road.to_sd(xy[:, 0], xy[:, 1])
    np.testing.assert_allclose(s2, s, atol=1e-6)
    np.testing.assert_allclose(d2, d, atol=1e-6)
    # Rays from the centre line meet the facade surface at lateral offset exactly d0.
    o = np.array([*road.to_xy(30.0, 0.0), 1.5])
    dirs = np.array([[np.cos(a), np.sin(a), 0.0] for a in np.linspace(0.6, 2.5, 20)])
    t = road.ray_to_d(o, dirs, road.facade_d)
    assert np.isfinite(t).all()
    hit = o + t[:, None] * dirs
    _, dh = road.to_sd(hit[:, 0], hit[:, 1])
    np.testing.assert_allclose(dh, road.facade_d, atol=1e-6)


def test_eval_and_train_seeds_are_disjoint():
    seeds = train_seeds(50)
    assert not set(seeds) & set(EVAL_SEEDS)
    with pytest.raises(ValueError):
        train_seeds(3, start=5)


def test_antialiased_camera_integrates_over_the_pixel():
    """The camera's pixels approach the pixel-area average (a 4x4-supersampled render,
    box-filtered) far more closely than point samples do; depth stays the centre's."""
    cfg = dict(seed=0, frames=2, width=96, height=54, jpeg_quality=None, lidar=False)
    aa = SyntheticRecorder(SyntheticConfig(**cfg))
    point = SyntheticRecorder(SyntheticConfig(**cfg, antialias=False))
    fine = SyntheticRecorder(SyntheticConfig(**{**cfg, "width": 384, "height": 216},
                                             antialias=False))
    _, img_aa, depth_aa = aa.view(0, "front_camera")
    _, img_pt, depth_pt = point.view(0, "front_camera")
    _, img_fine, _ = fine.view(0, "front_camera")
    area = img_fine.astype(np.float64).reshape(54, 4, 96, 4, 3).mean((1, 3))

    def err(img: np.ndarray) -> float:
        return float(((img.astype(np.float64) - area) ** 2).mean())

    assert err(img_aa) < 0.3 * err(img_pt)
    np.testing.assert_array_equal(depth_aa, depth_pt)
