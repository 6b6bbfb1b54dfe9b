"""PandaSet reader/writer and format detection: round trips, selection, bad inputs."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scenes.errors import LogFormatError
from scenes.formats import detect_format, load_log
from scenes.geometry import make_pose, quat_to_matrix, rot_z
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
)
from scenes.pandaset import EGO_TO_LIDAR, read_pandaset, write_pandaset

W, H = 64, 48
N_FRAMES = 5
OFFSET = np.array([4000.0, -1200.0, 10.0])
T_ABS = 1557540000.123456
JPEG_CAMS = ("front_camera", "front_left_camera")
ARRAY_CAM = "back_camera"

# OpenCV camera (x right, y down, z fwd) in the ego frame (x fwd, y left, z up).
_CV_IN_EGO = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _ego_pose(k: int) -> np.ndarray:
    """Ego drives along +x, turning slowly; first pose at the (re-centred) origin."""
    yaw = 0.05 * k
    R = rot_z(yaw) @ np.array([[1, 0, 0], [0, math.cos(0.01 * k), -math.sin(0.01 * k)],
                               [0, math.sin(0.01 * k), math.cos(0.01 * k)]])
    return make_pose(R, np.array([1.5 * k, 0.1 * k * k, 0.02 * k]))


def _build_log(with_gt: bool = True) -> LogSegment:
    rng = np.random.default_rng(7)
    cams = {}
    cam_yaws = {"front_camera": 0.0, "front_left_camera": 0.8, ARRAY_CAM: math.pi}
    for name in (*JPEG_CAMS, ARRAY_CAM):
        cams[name] = CameraModel.from_pinhole(name, W, H, 50.0 + len(name), 51.0, 32.5, 24.25)
    frames = []
    for k in range(N_FRAMES):
        t = 0.1 * k
        ego = _ego_pose(k)
        images = {}
        for j, (name, cyaw) in enumerate(cam_yaws.items()):
            c2e = make_pose(rot_z(cyaw) @ _CV_IN_EGO, np.array([1.0, 0.2 * j, 1.6]))
            img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            if name == ARRAY_CAM:
                src = ImageSource.from_array(img)
            else:
                data = _jpeg(img)
                src = ImageSource(load_bytes=lambda d=data: d)
            images[name] = CameraImage(name, ego @ c2e, t + 0.003 * (j + 1), src)
        n = 200 + 10 * k
        pts = (rng.normal(size=(n, 3)) * 20).astype(np.float32)
        sweep = LidarSweep(pts, rng.uniform(0, 255, n).astype(np.float32).round(),
                           t + np.sort(rng.uniform(-0.05, 0.05, n)),
                           (rng.uniform(size=n) < 0.3).astype(np.int8))
        frames.append(Frame(k, t, ego, images, lambda s=sweep: s))
    times = np.array([f.timestamp for f in frames])
    moving = Track("car-moving", "Car", np.array([4.5, 1.9, 1.5]), times,
                   np.stack([make_pose(rot_z(0.3 + 0.02 * k), [10.0 + 2.0 * k, 3.0, 0.8])
                             for k in range(N_FRAMES)]), np.arange(N_FRAMES))
    parked = Track("car-parked", "Pickup Truck", np.array([5.2, 2.1, 1.9]), times[1:4],
                   np.stack([make_pose(rot_z(-2.5), [20.0, -4.0, 1.0])] * 3), np.arange(1, 4))
    gt = None
    if with_gt:
        depth = {}
        for f in frames:
            for name in cams:
                d = rng.uniform(1, 80, (H, W)).astype(np.float32)
                d[:5] = np.inf  # sky
                depth[(f.index, name)] = lambda d=d: d
        sv_img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        sv_depth = rng.uniform(1, 50, (H, W)).astype(np.float32)
        c2w = frames[1].images["front_camera"].cam_to_world.copy()
        c2w[:3, 3] += c2w[:3, :3] @ np.array([-2.0, 0.0, 0.0])
        shifted = [ShiftedView(1, "front_camera", 2.0, c2w, frames[1].timestamp,
                               ImageSource.from_array(sv_img), lambda: sv_depth),
                   ShiftedView(3, "front_left_camera", -1.0, c2w + 0.0, frames[3].timestamp,
                               ImageSource.from_array(sv_img[::-1].copy()), lambda: sv_depth)]
        gt = GroundTruth(depth=depth, shifted=shifted, shifts_m=(2.0, -1.0))
    return LogSegment("seq_test", "synthetic", OFFSET.copy(), T_ABS, cams, frames,
                      {"car-moving": moving, "car-parked": parked}, gt)


@pytest.fixture(scope="module")
def log() -> LogSegment:
    return _build_log()


@pytest.fixture(scope="module")
def written(log: LogSegment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pandaset(log, tmp_path_factory.mktemp("ps") / "001")


@pytest.fixture
def copy_seq(written: Path, tmp_path: Path) -> Path:
    """A private copy of the written sequence that a test may damage."""
    import shutil

    return Path(shutil.copytree(written, tmp_path / "001"))


# ---------------------------------------------------------------------------- helpers


def _assert_sweeps_equal(a: LidarSweep, b: LidarSweep, dt: float = 0.0) -> None:
    np.testing.assert_array_equal(a.points, b.points)
    assert b.points.dtype == np.float32
    np.testing.assert_array_equal(a.intensity, b.intensity)
    np.testing.assert_allclose(a.time, b.time + dt, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a.sensor, b.sensor)


def _assert_tracks_equal(a: Track, b: Track, shift: np.ndarray | None = None,
                         dt: float = 0.0) -> None:
    assert (a.id, a.label) == (b.id, b.label)
    np.testing.assert_allclose(a.size, b.size, atol=1e-6)
    np.testing.assert_allclose(a.timestamps, b.timestamps + dt, atol=1e-6)
    poses = b.poses.copy()
    if shift is not None:
        poses[:, :3, 3] -= shift
    np.testing.assert_allclose(a.poses, poses, atol=1e-6)
    np.testing.assert_array_equal(a.frame_indices, b.frame_indices)


def _assert_sentence(err: LogFormatError) -> None:
    assert err.reason.endswith("."), err.reason
    assert len(err.reason.split()) >= 4, err.reason


# ------------------------------------------------------------------------ round trips


def test_round_trip_is_lossless(log: LogSegment, written: Path) -> None:
    back = read_pandaset(written, ground_truth=True)
    assert back.source_format == "pandaset" and back.name == "001"
    assert back.meta["sequence_path"] == str(written.resolve())
    np.testing.assert_allclose(back.world_offset, OFFSET, atol=1e-9)
    assert back.time_offset == pytest.approx(T_ABS, abs=1e-6)
    assert list(back.cameras) == ["front_camera", "front_left_camera", "back_camera"]
    for name, cam in log.cameras.items():
        got = back.cameras[name]
        assert (got.width, got.height) == (W, H)
        np.testing.assert_allclose(got.K, cam.K, atol=1e-12)
    assert [f.index for f in back.frames] == list(range(N_FRAMES))
    for f0, f1 in zip(log.frames, back.frames, strict=True):
        assert f1.timestamp == pytest.approx(f0.timestamp, abs=1e-6)
        np.testing.assert_allclose(f1.ego_to_world, f0.ego_to_world, atol=1e-6)
        for name in log.cameras:
            i0, i1 = f0.images[name], f1.images[name]
            np.testing.assert_allclose(i1.cam_to_world, i0.cam_to_world, atol=1e-6)
            assert i1.timestamp == pytest.approx(i0.timestamp, abs=1e-6)
            if name in JPEG_CAMS:  # recorded JPEG: copied byte for byte
                assert i1.source.encoded() == i0.source.encoded()
                np.testing.assert_array_equal(i1.image(), i0.image())
            else:  # in-memory pixels: JPEG q95 without chroma subsampling
                err = np.abs(i1.image().astype(int) - i0.image().astype(int)).mean()
                assert i1.image().shape == (H, W, 3) and err < 8.0
        _assert_sweeps_equal(f1.lidar(), f0.lidar())
    assert set(back.tracks) == set(log.tracks)
    for tid, tr in log.tracks.items():
        _assert_tracks_equal(back.tracks[tid], tr)
    assert [t.id for t in back.moving_tracks] == ["car-moving"]

    gt0, gt1 = log.ground_truth, back.ground_truth
    assert gt0 is not None and gt1 is not None
    assert set(gt1.depth) == set(gt0.depth)
    for key, load in gt0.depth.items():
        np.testing.assert_array_equal(gt1.depth[key](), load())
    assert gt1.shifts_m == gt0.shifts_m
    assert len(gt1.shifted) == len(gt0.shifted)
    for v0, v1 in zip(gt0.shifted, gt1.shifted, strict=True):
        assert (v1.frame_index, v1.camera, v1.shift_m) == (v0.frame_index, v0.camera, v0.shift_m)
        np.testing.assert_allclose(v1.cam_to_world, v0.cam_to_world, atol=1e-6)
        assert v1.timestamp == pytest.approx(v0.timestamp, abs=1e-6)
        np.testing.assert_array_equal(v1.image.load(), v0.image.load())  # lossless PNG
        np.testing.assert_array_equal(v1.depth(), v0.depth())


def test_second_write_is_bit_identical(written: Path, tmp_path: Path) -> None:
    again = write_pandaset(read_pandaset(written, ground_truth=True), tmp_path / "001")
    for p in sorted(written.rglob("*")):
        if p.is_file():
            q = again / p.relative_to(written)
            if p.suffix in (".jpg", ".png", ".npy"):
                assert q.read_bytes() == p.read_bytes(), p
    for name in ("front_camera", "back_camera"):  # re-encoded JPEGs are now copied verbatim
        assert (again / "camera" / name / "03.jpg").read_bytes() == \
            (written / "camera" / name / "03.jpg").read_bytes()


def test_ground_truth_ignored_unless_asked(log: LogSegment, written: Path,
                                           tmp_path: Path) -> None:
    assert (written / "drivesplat_gt" / "shifted" / "index.json").is_file()
    assert read_pandaset(written).ground_truth is None
    bare = write_pandaset(log, tmp_path / "bare", ground_truth=False)
    assert not (bare / "drivesplat_gt").exists()
    assert read_pandaset(bare, ground_truth=True).ground_truth is None


def test_written_layout_matches_public_dataset(log: LogSegment, written: Path) -> None:
    for sub in ("camera/front_camera/00.jpg", "camera/back_camera/poses.json",
                "camera/back_camera/intrinsics.json", "camera/back_camera/timestamps.json",
                "lidar/04.pkl.gz", "lidar/poses.json", "lidar/timestamps.json",
                "annotations/cuboids/00.pkl.gz", "meta/timestamps.json"):
        assert (written / sub).is_file(), sub
    intr = json.loads((written / "camera/front_camera/intrinsics.json").read_text())
    assert set(intr) == {"fx", "fy", "cx", "cy"}
    lidar = pd.read_pickle(written / "lidar/00.pkl.gz", compression="gzip")
    assert list(lidar.columns) == ["x", "y", "z", "i", "t", "d"]
    # World coordinates and unix times are absolute again on disk.
    assert abs(lidar["x"].mean() - OFFSET[0]) < 10 and lidar["t"].min() > T_ABS - 1
    meta = json.loads((written / "meta/timestamps.json").read_text())
    assert meta == pytest.approx([T_ABS + 0.1 * k for k in range(N_FRAMES)], abs=1e-6)
    cub = pd.read_pickle(written / "annotations/cuboids/02.pkl.gz", compression="gzip")
    row = cub.set_index("uuid").loc["car-parked"]
    assert row["dimensions.y"] == pytest.approx(5.2) and row["dimensions.x"] == pytest.approx(2.1)
    assert bool(row["stationary"]) and row["cuboids.sensor_id"] == -1
    assert not bool(cub.set_index("uuid").loc["car-moving", "stationary"])
    # object_to_world = Rz(yaw + pi/2): the parked box heads at -2.5 rad.
    assert math.remainder(row["yaw"] + math.pi / 2 - (-2.5), 2 * math.pi) == pytest.approx(0)
    assert len(pd.read_pickle(written / "annotations/cuboids/00.pkl.gz")) == 1


def test_lidar_pose_axes_are_pandaset_convention(log: LogSegment, written: Path) -> None:
    """lidar/poses.json is x right, y forward, z up: its +y is the ego's forward (+x)."""
    poses = json.loads((written / "lidar/poses.json").read_text())
    for k, p in enumerate(poses):
        q = [p["heading"][a] for a in "wxyz"]
        R = quat_to_matrix(np.array(q))
        ego = log.frames[k].ego_to_world
        np.testing.assert_allclose(R[:, 1], ego[:3, 0], atol=1e-9)  # forward
        np.testing.assert_allclose(R[:, 0], -ego[:3, 1], atol=1e-9)  # right = -left
        np.testing.assert_allclose([p["position"][a] for a in "xyz"], ego[:3, 3] + OFFSET)
    np.testing.assert_allclose(EGO_TO_LIDAR[:3, :3] @ [1, 0, 0], [0, 1, 0])


# -------------------------------------------------------------------------- selection


def test_frame_range_and_camera_subset(log: LogSegment, written: Path) -> None:
    back = read_pandaset(written, frames=(1, 4), cameras=["back_camera", "front_camera"],
                         ground_truth=True)
    assert list(back.cameras) == ["back_camera", "front_camera"]
    assert [f.index for f in back.frames] == [1, 2, 3]
    assert all(list(f.images) == ["back_camera", "front_camera"] for f in back.frames)
    # Times restart at the first selected frame; the world at its ego position.
    assert back.frames[0].timestamp == 0.0
    assert back.time_offset == pytest.approx(T_ABS + 0.1, abs=1e-6)
    shift = log.frames[1].ego_to_world[:3, 3]
    np.testing.assert_allclose(back.world_offset, OFFSET + shift, atol=1e-9)
    np.testing.assert_allclose(back.frames[0].ego_to_world[:3, 3], 0.0, atol=1e-9)
    for f0, f1 in zip(log.frames[1:4], back.frames, strict=True):
        assert f1.timestamp == pytest.approx(f0.timestamp - 0.1, abs=1e-6)
        expect = f0.ego_to_world.copy()
        expect[:3, 3] -= shift
        np.testing.assert_allclose(f1.ego_to_world, expect, atol=1e-6)
        s0, s1 = f0.lidar(), f1.lidar()
        np.testing.assert_allclose(s1.points, s0.points - shift, atol=1e-4)
        np.testing.assert_allclose(s1.time, s0.time - 0.1, atol=1e-6)
    assert set(back.tracks) == {"car-moving", "car-parked"}
    _assert_tracks_equal(back.tracks["car-moving"], log.tracks["car-moving"].select_times(
        0.1, 0.3), shift=shift, dt=-0.1)
    _assert_tracks_equal(back.tracks["car-parked"], log.tracks["car-parked"], shift=shift,
                         dt=-0.1)
    gt = back.ground_truth
    assert gt is not None
    assert set(gt.depth) == {(i, c) for i in (1, 2, 3) for c in ("back_camera", "front_camera")}
    assert [(v.frame_index, v.camera) for v in gt.shifted] == [(1, "front_camera")]
    v0 = log.ground_truth.shifted[0]
    np.testing.assert_allclose(gt.shifted[0].cam_to_world[:3, 3],
                               v0.cam_to_world[:3, 3] - shift, atol=1e-6)
    assert gt.shifted[0].timestamp == pytest.approx(0.0, abs=1e-6)


def test_lidar_sensor_selection(log: LogSegment, written: Path) -> None:
    back = read_pandaset(written, lidar_sensors=(1,))
    for f0, f1 in zip(log.frames, back.frames, strict=True):
        s0 = f0.lidar()
        _assert_sweeps_equal(f1.lidar(), s0.select(s0.sensor == 1))
        assert 0 < len(f1.lidar()) < len(s0)


def test_bad_selection_is_a_value_error(written: Path) -> None:
    with pytest.raises(ValueError, match="frame range"):
        read_pandaset(written, frames=(3, 9))
    with pytest.raises(LogFormatError) as e:
        read_pandaset(written, cameras=["right_camera"])
    assert e.value.path.endswith("camera/right_camera")


def test_duplicate_cuboids_are_kept_once(log: LogSegment, copy_seq: Path) -> None:
    """Both LiDARs' boxes for one object: keep the 360 LiDAR's (sensor 0), drop sensor 1."""
    for k in (1, 2):
        path = copy_seq / f"annotations/cuboids/{k:02d}.pkl.gz"
        df = pd.read_pickle(path)
        row = df[df["uuid"] == "car-moving"].copy()
        df.loc[df["uuid"] == "car-moving", ["cuboids.sensor_id", "cuboids.sibling_id"]] = \
            [0, "front-twin"]
        same_uuid = row.assign(**{"cuboids.sensor_id": 1, "position.x": row["position.x"] + 0.7})
        sibling = row.assign(**{"uuid": "front-twin", "cuboids.sensor_id": 1,
                                "cuboids.sibling_id": "car-moving",
                                "position.y": row["position.y"] - 0.5})
        # Duplicates first, so a reader that keeps the first row per uuid fails.
        pd.concat([same_uuid, sibling, df], ignore_index=True).to_pickle(path)
    back = read_pandaset(copy_seq)
    assert set(back.tracks) == {"car-moving", "car-parked"}
    _assert_tracks_equal(back.tracks["car-moving"], log.tracks["car-moving"])

    # A frame where only the front LiDAR's twin box exists: it still joins its sibling's track.
    path = copy_seq / "annotations/cuboids/03.pkl.gz"
    df = pd.read_pickle(path)
    df.loc[df["uuid"] == "car-moving", ["uuid", "cuboids.sensor_id", "cuboids.sibling_id"]] = \
        ["front-twin", 1, "car-moving"]
    df.to_pickle(path)
    back = read_pandaset(copy_seq)
    assert set(back.tracks) == {"car-moving", "car-parked"}
    _assert_tracks_equal(back.tracks["car-moving"], log.tracks["car-moving"])


# ------------------------------------------------------------------------- bad inputs


def _expect_error(seq: Path, rel: str, match: str, **kw) -> LogFormatError:
    with pytest.raises(LogFormatError, match=match) as e:
        log = read_pandaset(seq, **kw)
        for f in log.frames:  # lazy data fails on load
            f.lidar()
            for im in f.images.values():
                im.image()
        if log.ground_truth is not None:
            for d in log.ground_truth.depth.values():
                d()
    err = e.value
    assert err.path == str(seq / rel), err.path
    _assert_sentence(err)
    return err


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError) as e:
        read_pandaset(tmp_path / "nope")
    assert e.value.path == str(tmp_path / "nope")
    _assert_sentence(e.value)


@pytest.mark.parametrize("rel", ["camera/front_camera/poses.json",
                                 "camera/back_camera/intrinsics.json",
                                 "camera/front_left_camera/timestamps.json",
                                 "lidar/poses.json", "lidar/timestamps.json"])
def test_missing_json(copy_seq: Path, rel: str) -> None:
    (copy_seq / rel).unlink()
    _expect_error(copy_seq, rel, "is missing")


def test_truncated_lidar_pickle(copy_seq: Path) -> None:
    p = copy_seq / "lidar/02.pkl.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    log = read_pandaset(copy_seq)  # lazy: the header-level read still succeeds
    log.frames[1].lidar()
    _expect_error(copy_seq, "lidar/02.pkl.gz", "truncated or corrupt")


def test_corrupt_uncompressed_lidar_pickle(copy_seq: Path) -> None:
    p = copy_seq / "lidar/01.pkl.gz"
    with gzip.open(p) as f:
        raw = f.read()
    p.unlink()
    (copy_seq / "lidar/01.pkl").write_bytes(raw[:40] + b"\x00garbage" * 10)
    _expect_error(copy_seq, "lidar/01.pkl", "truncated or corrupt")


def test_corrupt_cuboid_pickle(copy_seq: Path) -> None:
    (copy_seq / "annotations/cuboids/03.pkl.gz").write_bytes(b"not a pickle at all")
    _expect_error(copy_seq, "annotations/cuboids/03.pkl.gz", "truncated or corrupt")


def test_jpeg_that_is_not_an_image(copy_seq: Path) -> None:
    (copy_seq / "camera/front_left_camera/02.jpg").write_text("hello, I am text")
    _expect_error(copy_seq, "camera/front_left_camera/02.jpg", "not an image")


def test_truncated_jpeg_fails_on_decode(copy_seq: Path) -> None:
    p = copy_seq / "camera/front_camera/01.jpg"
    p.write_bytes(p.read_bytes()[:300])
    _expect_error(copy_seq, "camera/front_camera/01.jpg", "readable image")


def test_image_size_mismatch(copy_seq: Path) -> None:
    Image.new("RGB", (W + 2, H)).save(copy_seq / "camera/back_camera/03.jpg")
    err = _expect_error(copy_seq, "camera/back_camera/03.jpg", "same size")
    assert "66x48" in err.reason and "64x48" in err.reason


def test_image_count_mismatch(copy_seq: Path) -> None:
    (copy_seq / "camera/front_camera/04.jpg").unlink()
    err = _expect_error(copy_seq, "camera/front_camera", "4 .jpg images")
    assert "5 frames" in err.reason


def test_missing_numbered_image(copy_seq: Path) -> None:
    d = copy_seq / "camera/front_camera"
    (d / "02.jpg").rename(d / "07.jpg")
    _expect_error(copy_seq, "camera/front_camera/02.jpg", "is missing")


def test_lidar_file_count_mismatch(copy_seq: Path) -> None:
    (copy_seq / "lidar/04.pkl.gz").unlink()
    err = _expect_error(copy_seq, "lidar", "4 LiDAR sweep files")
    assert "lidar/poses.json lists 5 frames" in err.reason


@pytest.mark.parametrize("rel", ["camera/front_left_camera/poses.json",
                                 "camera/back_camera/timestamps.json", "lidar/timestamps.json"])
def test_entry_count_mismatch(copy_seq: Path, rel: str) -> None:
    p = copy_seq / rel
    data = json.loads(p.read_text())
    p.write_text(json.dumps(data + data[:1]))
    err = _expect_error(copy_seq, rel, "lists 6")
    assert "5 frames" in err.reason


@pytest.mark.parametrize("rel", ["lidar/poses.json", "camera/front_camera/poses.json"])
@pytest.mark.parametrize("bad", ["nan", "inf", "zero_quat"])
def test_bad_pose_entry(copy_seq: Path, rel: str, bad: str) -> None:
    p = copy_seq / rel
    data = json.loads(p.read_text())
    if bad == "zero_quat":
        data[3]["heading"] = {"w": 0.0, "x": 0.0, "y": 0.0, "z": 0.0}
    else:
        data[3]["position"]["y"] = float(bad)
    p.write_text(json.dumps(data))  # json writes NaN / Infinity literals
    err = _expect_error(copy_seq, rel, "entry 3")
    assert ("zero" in err.reason) == (bad == "zero_quat")


def test_missing_lidar_column(copy_seq: Path) -> None:
    p = copy_seq / "lidar/00.pkl.gz"
    pd.read_pickle(p).drop(columns=["t"]).to_pickle(p)
    err = _expect_error(copy_seq, "lidar/00.pkl.gz", "lacks column")
    assert "t;" in err.reason or " t;" in err.reason


def test_missing_cuboid_column(copy_seq: Path) -> None:
    p = copy_seq / "annotations/cuboids/02.pkl.gz"
    pd.read_pickle(p).drop(columns=["dimensions.y", "yaw"]).to_pickle(p)
    err = _expect_error(copy_seq, "annotations/cuboids/02.pkl.gz", "lacks column")
    assert "yaw" in err.reason and "dimensions.y" in err.reason


def test_bad_ground_truth_depth(copy_seq: Path) -> None:
    rel = "drivesplat_gt/depth/front_camera/02.npy"
    p = copy_seq / rel
    p.write_bytes(p.read_bytes()[:100])
    read_pandaset(copy_seq)  # ignored unless asked
    _expect_error(copy_seq, rel, "depth map", ground_truth=True)


# ------------------------------------------------------------------------ writer rules


def test_writer_refuses_non_empty_directory(log: LogSegment, tmp_path: Path) -> None:
    out = tmp_path / "seq"
    out.mkdir()
    write_pandaset(log, out)  # an empty directory is fine
    before = (out / "lidar/poses.json").read_bytes()
    with pytest.raises(FileExistsError):
        write_pandaset(log, out)
    (out / "stale.txt").write_text("x")
    write_pandaset(log, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "lidar/poses.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq"]  # no temp dirs left


def test_failed_write_leaves_nothing(log: LogSegment, tmp_path: Path) -> None:
    from dataclasses import replace

    broken = replace(log, frames=[replace(f, images={}) if f.index == 2 else f
                                  for f in log.frames])
    with pytest.raises(ValueError, match="no image"):
        write_pandaset(broken, tmp_path / "seq")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ formats


def test_detect_format(written: Path, tmp_path: Path) -> None:
    assert detect_format(written) == "pandaset"
    rec = tmp_path / "waymo" / "segment-1.tfrecord"
    rec.parent.mkdir()
    rec.write_bytes(b"")
    assert detect_format(rec) == "waymo"
    assert detect_format(rec.parent) == "waymo"
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(LogFormatError, match="expected a PandaSet") as e:
            detect_format(bad)
        assert e.value.path == str(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(LogFormatError, match="not a .tfrecord"):
        detect_format(txt)


def test_load_log_dispatches(log: LogSegment, written: Path) -> None:
    back = load_log(written, frames=(2, 5), cameras=["front_camera"], ground_truth=True)
    assert back.source_format == "pandaset" and [f.index for f in back.frames] == [2, 3, 4]
    assert list(back.cameras) == ["front_camera"] and back.ground_truth is not None
    assert load_log(written, format="pandaset").ground_truth is None
    with pytest.raises(ValueError, match="unknown log format"):
        load_log(written, format="kitti")


WAYMO_FRAME = Path(__file__).resolve().parents[2] / "shared/data/waymo/pvps_data_one_frame.tfrecord"


def test_load_log_waymo(tmp_path: Path) -> None:
    rec = tmp_path / "a.tfrecord"
    rec.write_bytes(b"")
    if importlib.util.find_spec("scenes.waymo") is None:
        with pytest.raises(RuntimeError, match="scenes.waymo"):
            load_log(rec)
        return
    (tmp_path / "b.tfrecord").write_bytes(b"")
    with pytest.raises(LogFormatError, match="holds 2 .tfrecord files") as e:
        load_log(tmp_path)
    assert e.value.path == str(tmp_path)
    from scenes.waymo import load_protos

    try:
        load_protos()
    except ImportError:
        return  # the real-frame read is covered (and skipped with a reason) in test_waymo
    if WAYMO_FRAME.is_file():
        seg = load_log(WAYMO_FRAME, cameras=["FRONT"])
        assert seg.source_format == "waymo" and list(seg.cameras) == ["FRONT"]


# --------------------------------------------------------------------- synthetic logs


def _synthetic_available() -> bool:
    return importlib.util.find_spec("scenes.synthetic") is not None


@pytest.mark.skipif(not _synthetic_available(), reason="scenes.synthetic not written yet")
def test_synthetic_round_trip(tmp_path: Path) -> None:
    from scenes.synthetic import SyntheticConfig, generate_log

    # One shift and a sparse LiDAR keep the generator's ray casting to about a second.
    syn = generate_log(SyntheticConfig(seed=0, frames=6, width=96, height=64, shifts_m=(2.0,),
                                       lidar_beams=16, lidar_azimuths=256))
    back = read_pandaset(write_pandaset(syn, tmp_path / "syn"), ground_truth=True)
    # The generator's world starts at the first ego position, so nothing moves on re-centring.
    shift = syn.frames[0].ego_to_world[:3, 3]
    np.testing.assert_allclose(back.world_offset, syn.world_offset + shift, atol=1e-6)
    assert back.time_offset == pytest.approx(syn.time_offset + syn.frames[0].timestamp, abs=1e-6)
    assert list(back.cameras) == list(syn.cameras)
    for f0, f1 in zip(syn.frames, back.frames, strict=True):
        expect = f0.ego_to_world.copy()
        expect[:3, 3] -= shift
        np.testing.assert_allclose(f1.ego_to_world, expect, atol=1e-6)
        for name, im in f0.images.items():
            np.testing.assert_array_equal(f1.images[name].image(), im.image())
            if im.source.is_encoded:
                assert f1.images[name].source.encoded() == im.source.encoded()
        if f0.has_lidar:
            s0, s1 = f0.lidar(), f1.lidar()
            np.testing.assert_allclose(s1.points, s0.points - shift, atol=1e-3)
            np.testing.assert_allclose(s1.time, s0.time - f0.timestamp + f1.timestamp, atol=1e-6)
    assert set(back.tracks) == set(syn.tracks)
    for tid, tr in syn.tracks.items():
        _assert_tracks_equal(back.tracks[tid], tr, shift=shift)
    gt0, gt1 = syn.ground_truth, back.ground_truth
    assert gt0 is not None and gt1 is not None
    assert set(gt1.depth) == set(gt0.depth) and len(gt1.shifted) == len(gt0.shifted)
    for v0, v1 in zip(gt0.shifted, gt1.shifted, strict=True):
        assert (v1.frame_index, v1.camera, v1.shift_m) == (v0.frame_index, v0.camera, v0.shift_m)
        np.testing.assert_array_equal(v1.depth(), v0.depth())
