"""The log data model: track interpolation, selection, re-centring."""

from __future__ import annotations

import numpy as np
import pytest

from scenes.geometry import make_pose, matrix_to_quat, quat_to_matrix, rot_z
from scenes.log import CameraImage, Frame, ImageSource, LidarSweep, Track, recentre


def _turning_track() -> Track:
    """A vehicle driving a circle of radius 20 m at 10 m/s, keyframes every 0.1 s."""
    t = np.arange(0, 2.01, 0.1)
    ang = t * 0.5
    pos = np.stack([20 * np.sin(ang), 20 * (1 - np.cos(ang)), np.full_like(t, 0.8)], 1)
    return Track("car", "Car", np.array([4.5, 1.8, 1.6]), t, make_pose(rot_z(ang), pos),
                 np.arange(len(t)))


def test_track_exact_at_keyframes():
    tr = _turning_track()
    np.testing.assert_allclose(tr.pose_at(tr.timestamps), tr.poses, atol=1e-12)
    np.testing.assert_allclose(tr.pose_at(float(tr.timestamps[7])), tr.poses[7], atol=1e-12)


def test_track_smooth_between_keyframes():
    tr = _turning_track()
    t = np.linspace(0, 2.0, 2001)
    P = tr.pose_at(t)
    # Rotations stay orthonormal.
    RtR = np.einsum("nji,njk->nik", P[:, :3, :3], P[:, :3, :3])
    np.testing.assert_allclose(RtR, np.broadcast_to(np.eye(3), RtR.shape), atol=1e-9)
    # No jumps: per-sample motion bounded by speed * dt (10 m/s, 1 ms), heading too.
    step = np.linalg.norm(np.diff(P[:, :3, 3], axis=0), axis=1)
    assert step.max() < 10.0 * 0.001 * 1.05
    yaw = np.unwrap(np.arctan2(P[:, 1, 0], P[:, 0, 0]))
    assert np.all(np.diff(yaw) > 0) and np.diff(yaw).max() < 0.5 * 0.001 * 1.05
    # Halfway between keyframes: the half-angle rotation (slerp), the mid position (lerp).
    mid = tr.pose_at(0.05)
    np.testing.assert_allclose(matrix_to_quat(mid[:3, :3]),
                               matrix_to_quat(rot_z(0.025)), atol=1e-9)
    np.testing.assert_allclose(mid[:3, 3], (tr.poses[0, :3, 3] + tr.poses[1, :3, 3]) / 2)


def test_track_extrapolates_at_constant_velocity_and_reports_range():
    tr = _turning_track()
    before = tr.pose_at(-0.05)
    v = (tr.poses[1, :3, 3] - tr.poses[0, :3, 3]) / 0.1
    np.testing.assert_allclose(before[:3, 3], tr.poses[0, :3, 3] - 0.05 * v, atol=1e-9)
    assert tr.observed_at(1.0) and not tr.observed_at(2.5)
    assert tr.observed_at(2.05, margin_s=0.1)


def test_track_contains_and_moving():
    tr = _turning_track()
    centre = tr.pose_at(1.23)[:3, 3]
    assert tr.contains(centre[None], 1.23)[0]
    assert not tr.contains(centre[None] + [0, 0, 2.0], 1.23)[0]
    assert tr.is_moving
    parked = Track("p", "Car", tr.size, [0.0, 1.0], np.stack([np.eye(4)] * 2), [0, 10])
    assert not parked.is_moving


def test_quaternion_matrix_round_trip():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(100, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q *= np.sign(q[:, :1])
    np.testing.assert_allclose(matrix_to_quat(quat_to_matrix(q)), q, atol=1e-9)


def _frames(n: int = 4) -> list[Frame]:
    img = np.zeros((4, 6, 3), np.uint8)
    out = []
    for k in range(n):
        ego = make_pose(np.eye(3), [1000.0 + 2 * k, -500.0, 20.0])
        sweep = LidarSweep(np.array([[1000.0 + 2 * k + 5, -500.0, 19.0]]), np.ones(1, np.float32),
                           np.array([k * 0.1]))
        out.append(Frame(k, k * 0.1, ego, {"cam": CameraImage("cam", ego, k * 0.1,
                                                              ImageSource.from_array(img))},
                         lambda s=sweep: s))
    return out


def test_recentre_and_select():
    from scenes.log import CameraModel

    cams = {"cam": CameraModel.from_pinhole("cam", 6, 4, 5, 5, 3, 2)}
    tr = Track("a", "Car", np.ones(3), [0.0, 0.1, 0.2, 0.3],
               np.stack([make_pose(np.eye(3), [1000.0 + k, -500, 20]) for k in range(4)]),
               [0, 1, 2, 3])
    log = recentre("x", "test", cams, _frames(), {"a": tr}, time_offset=5.0)
    np.testing.assert_allclose(log.world_offset, [1000.0, -500.0, 20.0])
    np.testing.assert_allclose(log.frames[0].ego_to_world[:3, 3], 0.0)
    np.testing.assert_allclose(log.frames[2].lidar().points, [[9.0, 0.0, -1.0]])
    np.testing.assert_allclose(log.tracks["a"].poses[1, :3, 3], [1.0, 0, 0])
    sub = log.select(frames=(1, 3))
    assert [f.index for f in sub.frames] == [1, 2]
    assert list(sub.tracks["a"].frame_indices) == [1, 2]
    with pytest.raises(ValueError, match="unknown camera"):
        log.select(cameras=["nope"])
    with pytest.raises(ValueError, match="no frames"):
        log.select(frames=(3, 3))
