"""Waymo v1 TFRecord reader/writer: framing, the real frame, synthetic round trips."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenes.errors import LogFormatError
from scenes.geometry import invert_pose, make_pose, rot_z
from scenes.log import CameraImage, CameraModel, Frame, ImageSource, LidarSweep, LogSegment, Track
from scenes.tfrecord import TFRecordFile, TFRecordWriter, _update_py, crc32c, frame_record

REAL = Path(os.environ.get("DRIVESPLAT_WAYMO_FRAME",
                           "/work/shared/data/waymo/pvps_data_one_frame.tfrecord"))
if not REAL.exists():  # the repo's sibling shared/ checkout
    REAL = Path(__file__).resolve().parents[2] / "shared/data/waymo/pvps_data_one_frame.tfrecord"

try:
    from waymo_open_dataset import dataset_pb2  # noqa: F401

    HAVE_PROTOS = True
except ImportError:
    HAVE_PROTOS = False

needs_protos = pytest.mark.skipif(
    not HAVE_PROTOS, reason="waymo-open-dataset-tf-2-12-0 (installed --no-deps by `make "
    "setup`) is not importable")
needs_real = pytest.mark.skipif(not REAL.exists(), reason=f"real Waymo frame missing: {REAL}")

# Panoptic semantic classes that are vehicles (CameraSegmentation.Type).
VEHICLE_CLASSES = [2, 3, 4, 5, 8]  # CAR, TRUCK, BUS, OTHER_LARGE_VEHICLE, TRAILER


# ------------------------------------------------------------------------ CRC / framing


def test_crc32c_known_values() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_crc32c_blocked_matches_bytewise() -> None:
    rng = np.random.default_rng(0)
    for n in (4096, 4097, 70_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _update_py(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def test_tfrecord_write_read(tmp_path: Path) -> None:
    recs = [b"", b"a", os.urandom(10_000)]
    with TFRecordWriter(tmp_path / "x.tfrecord") as w:
        for r in recs:
            w.write(r)
    f = TFRecordFile(tmp_path / "x.tfrecord")
    assert list(f) == recs
    assert [p.name for p in tmp_path.iterdir()] == ["x.tfrecord"]  # no temp file left


def test_tfrecord_writer_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "x.tfrecord"
    target.write_bytes(frame_record(b"old"))
    with pytest.raises(RuntimeError):
        with TFRecordWriter(target) as w:
            w.write(b"new")
            raise RuntimeError("crash mid-write")
    assert list(TFRecordFile(target)) == [b"old"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.tfrecord"]


def _records(path: Path, recs: list[bytes]) -> Path:
    path.write_bytes(b"".join(frame_record(r) for r in recs))
    return path


def test_framing_errors_name_file_and_record(tmp_path: Path) -> None:
    good = [b"first record", b"second record", b"third"]
    # data checksum
    p = _records(tmp_path / "crc.tfrecord", good)
    b = bytearray(p.read_bytes())
    b[len(frame_record(good[0])) + 12 + 3] ^= 0x01
    p.write_bytes(bytes(b))
    f = TFRecordFile(p)  # index only reads headers
    assert f.read(0) == good[0]
    with pytest.raises(LogFormatError, match=r"record 1 .*data checksum mismatch") as e:
        f.read(1)
    assert e.value.path == str(p)
    # length checksum of record 2
    p = _records(tmp_path / "len.tfrecord", good)
    b = bytearray(p.read_bytes())
    b[len(frame_record(good[0])) + len(frame_record(good[1])) + 9] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(LogFormatError, match=r"corrupt: record 2 .*length checksum"):
        TFRecordFile(p)
    # truncated data
    p = _records(tmp_path / "trunc.tfrecord", good)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(LogFormatError, match=r"record 2 .*truncated"):
        TFRecordFile(p)
    # truncated header
    p = _records(tmp_path / "trunc_header.tfrecord", good)
    p.write_bytes(p.read_bytes() + b"\x05\x00")
    with pytest.raises(LogFormatError, match=r"record 3 .*truncated.*12-byte record header"):
        TFRecordFile(p)
    # not a TFRecord at all
    p = tmp_path / "notes.tfrecord"
    p.write_text("this is a plain text file, not a TFRecord file at all\n")
    with pytest.raises(LogFormatError, match=r"notes.tfrecord: is not a TFRecord file: record 0"):
        TFRecordFile(p)


# ------------------------------------------------------------------------ real frame


def _project(cam: CameraModel, cam_to_world: np.ndarray, X: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV projection with the camera's (k1, k2, p1, p2, k3).

    Returns (uv [N, 2], valid [N]): valid where the point is in front and inside the
    region where the radial polynomial is monotonic (beyond it the model folds points
    far outside the field of view back into the image).
    """
    w2c = invert_pose(cam_to_world)
    Xc = X @ w2c[:3, :3].T + w2c[:3, 3]
    z = Xc[:, 2]
    x, y = Xc[:, 0] / z, Xc[:, 1] / z
    k1, k2, p1, p2, k3 = cam.distortion
    s = np.linspace(0, 4, 40001)
    bad = np.nonzero(1 + 3 * k1 * s + 5 * k2 * s**2 + 7 * k3 * s**3 <= 0)[0]
    r2_max = s[bad[0]] if len(bad) else np.inf
    r2 = x * x + y * y
    rad = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
    xd = x * rad + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * rad + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    uv = np.stack([cam.fx * xd + cam.cx, cam.fy * yd + cam.cy], -1)
    return uv, (z > 0) & (r2 < r2_max)


@pytest.fixture(scope="module")
def real_log():
    from scenes.waymo import read_waymo

    return read_waymo(REAL)


@pytest.fixture(scope="module")
def real_proto():
    from scenes.waymo import WaymoFile

    return WaymoFile(REAL).frame(0)


@needs_protos
@needs_real
def test_real_frame_cameras_frames_tracks(real_log: LogSegment) -> None:
    log = real_log
    assert log.source_format == "waymo"
    assert log.name == "1024360143612057520_3580_000_3600_000"
    assert list(log.cameras) == ["FRONT", "FRONT_LEFT", "FRONT_RIGHT", "SIDE_LEFT", "SIDE_RIGHT"]
    sizes = {c: (m.width, m.height) for c, m in log.cameras.items()}
    assert sizes == {"FRONT": (1920, 1280), "FRONT_LEFT": (1920, 1280),
                     "FRONT_RIGHT": (1920, 1280), "SIDE_LEFT": (1920, 886),
                     "SIDE_RIGHT": (1920, 886)}
    front = log.cameras["FRONT"]
    np.testing.assert_allclose([front.fx, front.fy, front.cx, front.cy],
                               [2044.5083584358413, 2044.5083584358413, 949.5746451352071,
                                633.2422462156501])
    np.testing.assert_allclose(front.distortion, [0.040358363932006036, -0.33001662226602974,
                                                  0.0010402702690110032,
                                                  -0.0015669020781401406, 0.0])
    assert len(log.frames) == 1
    f = log.frames[0]
    assert f.timestamp == 0.0 and log.time_offset == pytest.approx(1553735853.462203)
    np.testing.assert_allclose(log.world_offset, [-25211.25891195526, 42391.08132860608, -160.618])
    np.testing.assert_allclose(f.ego_to_world[:3, 3], 0.0, atol=1e-9)
    assert not f.has_lidar  # this record's range images are empty
    assert f.images["FRONT"].image().shape == (1280, 1920, 3)
    assert f.images["SIDE_RIGHT"].image().shape == (886, 1920, 3)
    assert f.images["SIDE_LEFT"].source.is_encoded
    # image times: per-image pose timestamps, a few tens of ms after the sweep start
    assert 0.0 < f.images["SIDE_LEFT"].timestamp < f.images["FRONT"].timestamp < 0.1
    labels = [t.label for t in log.tracks.values()]
    assert len(log.tracks) == 75
    assert {k: labels.count(k) for k in set(labels)} == {
        "TYPE_VEHICLE": 37, "TYPE_PEDESTRIAN": 12, "TYPE_SIGN": 25, "TYPE_CYCLIST": 1}
    sign = log.tracks["-uZgRjAOvgiK1-0dUx_4Sg"]
    np.testing.assert_allclose(sign.size, [0.12923822353497522, 0.58208972809431281, 0.54])
    # cameras sit about 2.1 m above the vehicle origin, looking out (OpenCV z) horizontally
    for c, im in f.images.items():
        cam_in_ego = invert_pose(f.ego_to_world) @ im.cam_to_world
        assert cam_in_ego[2, 3] == pytest.approx(2.11, abs=0.02), c
        assert abs(cam_in_ego[2, 2]) < 0.05 and cam_in_ego[2, 1] < -0.99, c  # y down


@needs_protos
@needs_real
def test_real_frame_boxes_match_waymo_projected_labels(real_log: LogSegment,
                                                       real_proto) -> None:
    """Our cameras reproduce Waymo's own projection of its 3D boxes (projected_lidar_labels
    = 2D extent of the projected box corners) to a fraction of a pixel."""
    from scenes.waymo import CAMERA_NAMES

    f = real_log.frames[0]
    errs = []
    for cl in real_proto.projected_lidar_labels:
        cam_name = CAMERA_NAMES[cl.name - 1]
        cam, im = real_log.cameras[cam_name], f.images[cam_name]
        for lb in cl.labels:
            tr = real_log.tracks[lb.id.rsplit("_" + cam_name, 1)[0]]
            X = tr.corners() @ tr.poses[0][:3, :3].T + tr.poses[0][:3, 3]
            uv, ok = _project(cam, im.cam_to_world, X)
            if not ok.all():
                continue
            u = uv[:, 0].clip(0, cam.width)
            v = uv[:, 1].clip(0, cam.height)
            errs.append([(u.min() + u.max()) / 2 - lb.box.center_x,
                         (v.min() + v.max()) / 2 - lb.box.center_y,
                         u.max() - u.min() - lb.box.length, v.max() - v.min() - lb.box.width])
    errs = np.abs(np.array(errs))
    assert len(errs) >= 50
    assert np.median(errs) < 0.5 and np.percentile(errs, 90) < 2.0


def _panoptic_vehicle_fraction(log: LogSegment, proto, axes: np.ndarray) -> tuple[int, int]:
    from scenes.waymo import CAMERA_NAMES

    f = log.frames[0]
    hits = total = 0
    for im in proto.images:
        cam_name = CAMERA_NAMES[im.name - 1]
        seg = im.camera_segmentation_label
        semantic = (np.asarray(Image.open(io.BytesIO(seg.panoptic_label)))
                    // seg.panoptic_label_divisor)
        cam = log.cameras[cam_name]
        centres = np.array([t.poses[0][:3, 3] for t in log.tracks.values()
                            if t.label == "TYPE_VEHICLE"])
        uv, ok = _project(cam, f.images[cam_name].cam_to_world @ axes, centres)
        inside = ok & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) \
            & (uv[:, 1] < cam.height)
        px = np.floor(uv[inside]).astype(int)
        hits += int(np.isin(semantic[px[:, 1], px[:, 0]], VEHICLE_CLASSES).sum())
        total += int(inside.sum())
    return hits, total


@needs_protos
@needs_real
def test_real_frame_vehicle_centres_land_on_panoptic_vehicles(real_log, real_proto) -> None:
    """Labelled vehicle box centres projected into the cameras land on pixels the frame's
    panoptic labels call vehicles (13 of 22 = 0.59; the misses are vehicles behind
    buildings or vegetation), well above what wrong axis conventions give."""
    hits, total = _panoptic_vehicle_fraction(real_log, real_proto, np.eye(4))
    print(f"panoptic vehicle fraction: {hits}/{total} = {hits / total:.2f}")
    assert total >= 20 and hits / total >= 0.5
    wrong = {"mirror x": np.diag([-1.0, 1, 1, 1]), "flip y": np.diag([1.0, -1, 1, 1]),
             "Waymo axes as OpenCV": np.array([[0.0, -1, 0, 0], [0, 0, -1, 0],
                                               [1, 0, 0, 0], [0, 0, 0, 1]])}
    for name, axes in wrong.items():
        h, n = _panoptic_vehicle_fraction(real_log, real_proto, axes)
        assert h / max(n, 1) < 0.3, name


@needs_protos
@needs_real
def test_real_frame_write_read_back(real_log: LogSegment, tmp_path: Path) -> None:
    from scenes.waymo import read_waymo, write_waymo

    out = tmp_path / "again.tfrecord"
    assert write_waymo(real_log, out) == {c: c for c in real_log.cameras}
    with pytest.raises(FileExistsError):
        write_waymo(real_log, out)
    write_waymo(real_log, out, overwrite=True)
    back = read_waymo(out)
    np.testing.assert_allclose(back.world_offset, real_log.world_offset)
    assert back.time_offset == pytest.approx(real_log.time_offset, abs=1e-6)
    for c, m in real_log.cameras.items():
        b = back.cameras[c]
        assert (b.width, b.height) == (m.width, m.height)
        np.testing.assert_allclose(b.K, m.K)
        np.testing.assert_allclose(b.distortion, m.distortion)
        im0, im1 = real_log.frames[0].images[c], back.frames[0].images[c]
        assert im1.source.encoded() == im0.source.encoded()  # JPEG copied verbatim
        np.testing.assert_allclose(im1.cam_to_world, im0.cam_to_world, atol=1e-9)
        assert im1.timestamp == pytest.approx(im0.timestamp, abs=1e-6)
    assert set(back.tracks) == set(real_log.tracks)
    for k, t in real_log.tracks.items():
        np.testing.assert_allclose(back.tracks[k].poses, t.poses, atol=1e-6)
        np.testing.assert_allclose(back.tracks[k].size, t.size)
        assert back.tracks[k].label == t.label


@needs_protos
@needs_real
def test_real_file_corruptions(tmp_path: Path) -> None:
    from scenes.waymo import read_waymo

    data = REAL.read_bytes()
    p = tmp_path / "corrupt.tfrecord"
    b = bytearray(data)
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))
    with pytest.raises(LogFormatError, match=r"corrupt.tfrecord: record 0 .*checksum mismatch"):
        read_waymo(p)
    p = tmp_path / "short.tfrecord"
    p.write_bytes(data[:-1000])
    with pytest.raises(LogFormatError, match=r"short.tfrecord: record 0 .*truncated"):
        read_waymo(p)
    p = tmp_path / "image.tfrecord"
    with io.BytesIO() as buf:
        Image.new("RGB", (8, 8)).save(buf, format="JPEG")
        p.write_bytes(buf.getvalue())
    with pytest.raises(LogFormatError, match=r"image.tfrecord: is not a TFRecord file"):
        read_waymo(p)
    # a real frame followed by records that are not Frames
    for bad in (b"hello, I am not a protobuf Frame", frame_record(b"nested")):
        p = tmp_path / "mixed.tfrecord"
        p.write_bytes(data + frame_record(bad))
        with pytest.raises(LogFormatError, match=r"mixed.tfrecord: record 1 is not a Waymo Frame"):
            read_waymo(p)
    p = tmp_path / "empty.tfrecord"
    p.write_bytes(b"")
    with pytest.raises(LogFormatError, match="no records"):
        read_waymo(p)
    with pytest.raises(LogFormatError, match=r"no calibration for camera\(s\) \['REAR'\]"):
        read_waymo(REAL, cameras=["REAR"])
    with pytest.raises(LogFormatError, match="outside the file's 1 frames"):
        read_waymo(REAL, frames=(0, 2))


# ------------------------------------------------------------------------ hand-built range image


@needs_protos
def test_decode_side_laser_uniform_rows_nlz_and_second_return(tmp_path: Path) -> None:
    """A SIDE_LEFT laser (mounted looking left) with uniform rows: a pixel whose column
    faces the vehicle's left must decode to a point straight to the left."""
    import zlib

    from waymo_open_dataset import dataset_pb2 as pb

    from scenes.waymo import read_waymo

    H, W = 4, 6  # column 1 faces vehicle azimuth +90 deg: ((6 - 1 - 0.5) / 6 * 2 - 1) * pi
    mount = make_pose(rot_z(np.pi / 2), np.array([3.245, 1.025, 0.979]))
    frame_pose = make_pose(rot_z(0.3), np.array([100.0, 200.0, 5.0]))

    def matrix(a: np.ndarray) -> bytes:
        m = pb.MatrixFloat()
        m.shape.dims.extend(a.shape)
        m.data.extend(a.ravel().tolist())
        return zlib.compress(m.SerializeToString())

    r1 = np.zeros((H, W, 4), np.float32)
    r1[..., 0], r1[..., 3] = -1, -1
    r1[0, 1] = [10.0, 0.25, 0, -1]  # valid
    r1[1, 1] = [5.0, 0.5, 0, 1]  # in a no-label zone: dropped
    r1[2, 4] = [0.0, 0.5, 0, -1]  # no return
    r2 = np.zeros((H, W, 4), np.float32)
    r2[..., 0], r2[..., 3] = -1, -1
    r2[3, 1] = [7.0, 0.75, 0, -1]  # second return
    fr = pb.Frame()
    fr.context.name = "hand"
    fr.timestamp_micros = 1_000_000
    fr.pose.transform.extend(frame_pose.ravel().tolist())
    lc = fr.context.laser_calibrations.add()
    lc.name = pb.LaserName.SIDE_LEFT
    lc.beam_inclination_min, lc.beam_inclination_max = -0.2, 0.2
    lc.extrinsic.transform.extend(mount.ravel().tolist())
    las = fr.lasers.add()
    las.name = pb.LaserName.SIDE_LEFT
    las.ri_return1.range_image_compressed = matrix(r1)
    las.ri_return2.range_image_compressed = matrix(r2)
    path = tmp_path / "hand.tfrecord"
    with TFRecordWriter(path) as w:
        w.write(fr.SerializeToString())

    log = read_waymo(path)
    sweep = log.frames[0].lidar()
    assert len(sweep) == 2
    # uniform rows, top first: 0.15, 0.05, -0.05, -0.15
    expect_vehicle = np.array([[3.245, 1.025 + 10 * np.cos(0.15), 0.979 + 10 * np.sin(0.15)],
                               [3.245, 1.025 + 7 * np.cos(-0.15), 0.979 + 7 * np.sin(-0.15)]])
    world = expect_vehicle @ frame_pose[:3, :3].T + frame_pose[:3, 3] - log.world_offset
    np.testing.assert_allclose(sweep.points, world, atol=1e-4)
    np.testing.assert_allclose(sweep.intensity, [0.25, 0.75])
    np.testing.assert_array_equal(sweep.sensor, [2, 2])  # LASER_NAMES index of SIDE_LEFT
    np.testing.assert_allclose(sweep.time, (1 + 0.5) / W * 0.1)


# ------------------------------------------------------------------------ synthetic round trip

LIDAR_TO_EGO = make_pose(rot_z(0.05), np.array([1.0, 0.0, 1.8]))
BEAMS = np.deg2rad([-15.0, -11.0, -8.0, -5.5, -3.5, -2.0, -1.0, 0.5, 2.0])


def _ego(t: np.ndarray) -> np.ndarray:
    """[N] -> [N, 4, 4]: straight line at 10 m/s with a steady yaw drift (slerp + lerp
    between frames reproduce it exactly, also beyond the last frame)."""
    t = np.asarray(t, dtype=np.float64)
    return make_pose(rot_z(0.1 + 0.2 * t), np.stack([10 * t, 2 * t, 0 * t], -1))


def _spin(t_frame: float, width: int, jitter: float, rng: np.random.Generator
          ) -> LidarSweep:
    """A spinning LiDAR in a street canyon (ground z=0, walls at y=+-12, 60 m max):
    ``width`` firings per turn, azimuth decreasing from behind the car as Waymo's do."""
    W = width
    j = np.arange(W)
    t = t_frame + (j + 0.5) / W * 0.1
    az_vehicle = ((W - j - 0.5) / W * 2 - 1) * np.pi + jitter * rng.uniform(-1, 1, W) * np.pi / W
    pose = _ego(t) @ LIDAR_TO_EGO
    az = az_vehicle - 0.05  # sensor-frame azimuth
    inc = BEAMS[:, None]
    d_s = np.stack(np.broadcast_arrays(np.cos(az) * np.cos(inc), np.sin(az) * np.cos(inc),
                                       np.sin(inc) + 0 * az), -1)  # [B, W, 3]
    d = np.einsum("wij,bwj->bwi", pose[:, :3, :3], d_s)
    o = np.broadcast_to(pose[:, :3, 3], d.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        cands = np.stack([-o[..., 2] / d[..., 2], (12 - o[..., 1]) / d[..., 1],
                          (-12 - o[..., 1]) / d[..., 1]], -1)
    cands[~(cands > 0)] = np.inf
    r = cands.min(-1)
    hit = r < 60
    tt = np.broadcast_to(t, r.shape)[hit]
    P = o[hit] + r[hit, None] * d[hit]
    # a second, weaker echo 3 m further behind one ray in ten
    echo = rng.random(len(P)) < 0.1
    P = np.concatenate([P, P[echo] + 3 * d[hit][echo]])
    tt = np.concatenate([tt, tt[echo]])
    inten = rng.random(len(P)).astype(np.float32)
    return LidarSweep(P.astype(np.float32), inten, tt)


def _hand_log(width: int = 180, jitter: float = 0.0, frames: int = 4) -> LogSegment:
    """A small log built by hand: 2 cameras, a spinning LiDAR, a moving car and a
    pedestrian seen in two frames."""
    rng = np.random.default_rng(7)
    offset = np.array([1000.0, 2000.0, 30.0])
    cams = {"front": CameraModel.from_pinhole("front", 48, 32, 40, 40, 24, 16),
            "FRONT_LEFT": CameraModel.from_pinhole("FRONT_LEFT", 48, 32, 41, 39, 23.5, 16.5,
                                                   distortion=[0.01, -0.02, 0.001, 0, 0])}
    cv_to_ego = np.array([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    mounts = {"front": make_pose(np.eye(3), [1.5, 0, 1.6]) @ cv_to_ego,
              "FRONT_LEFT": make_pose(rot_z(0.8), [1.4, 0.1, 1.6]) @ cv_to_ego}
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    jpeg_bytes = jpeg.getvalue()
    out = []
    for k in range(frames):
        tk = 0.1 * k
        ego = _ego(np.array([tk]))[0]
        arr = np.full((32, 48, 3), 40 * k, np.uint8)
        arr[8:24, 10:30] = [200, 100, 50]
        imgs = {"front": CameraImage("front", ego @ mounts["front"], tk,
                                     ImageSource.from_array(arr)),
                "FRONT_LEFT": CameraImage("FRONT_LEFT", ego @ mounts["FRONT_LEFT"], tk + 0.01,
                                          ImageSource(load_bytes=lambda: jpeg_bytes))}
        sweep = _spin(tk, width, jitter, rng)
        out.append(Frame(k, tk, ego, imgs, lambda s=sweep: s))
    ts = 0.1 * np.arange(frames)
    car = Track("car-1", "Car", [4.5, 1.9, 1.6], ts,
                make_pose(rot_z(0.3 + 0.1 * ts), np.stack([8 + 12 * ts, 3 + ts, 0.8 + 0 * ts], -1)),
                np.arange(frames))
    ped = Track("ped-1", "Pedestrian", [0.6, 0.6, 1.8], ts[1:3],
                make_pose(rot_z(np.array([1.0, 1.1])), np.array([[5, -4, 0.9], [5.1, -4, 0.9]])),
                np.array([1, 2]))
    return LogSegment("hand-log", "synthetic", offset, 0.0, cams, out,
                      {"car-1": car, "ped-1": ped}, meta={"lidar_to_ego": LIDAR_TO_EGO})


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a [N, 3]: index of and distance to the nearest row of b [M, 3]."""
    idx = np.empty(len(a), int)
    for s in range(0, len(a), 512):
        d = np.linalg.norm(a[s:s + 512, None] - b[None], axis=-1)
        idx[s:s + 512] = d.argmin(1)
    return idx, np.linalg.norm(a - b[idx], axis=1)


@needs_protos
def test_synthetic_round_trip_exact_grid(tmp_path: Path) -> None:
    """Firings on the range image's own grid: points, intensities and times come back
    to float32 precision, through ego motion (per-pixel poses) and second returns."""
    from scenes.waymo import read_waymo, write_waymo

    log = _hand_log(width=180)
    path = tmp_path / "hand.tfrecord"
    cam_map = write_waymo(log, path, lidar_width=180)
    assert cam_map == {"front": "FRONT", "FRONT_LEFT": "FRONT_LEFT"}
    back = read_waymo(path)
    assert back.source_format == "waymo" and back.name == "hand-log"
    np.testing.assert_allclose(back.world_offset, log.world_offset)
    assert len(back.frames) == len(log.frames)
    for f0, f1 in zip(log.frames, back.frames, strict=True):
        assert f1.timestamp == pytest.approx(f0.timestamp, abs=1e-6)
        np.testing.assert_allclose(f1.ego_to_world, f0.ego_to_world, atol=1e-9)
        for c, w in cam_map.items():
            np.testing.assert_allclose(f1.images[w].cam_to_world, f0.images[c].cam_to_world,
                                       atol=1e-9)
            assert f1.images[w].timestamp == pytest.approx(f0.images[c].timestamp, abs=1e-6)
        assert f1.images["FRONT_LEFT"].source.encoded() == f0.images["FRONT_LEFT"].source.encoded()
        diff = np.abs(f1.images["FRONT"].image().astype(int) - f0.images["front"].image())
        assert diff.mean() < 3
        s0, s1 = f0.lidar(), f1.lidar()
        assert len(s1) == len(s0) > 1500
        assert s1.points.dtype == np.float32
        idx, dist = _nearest(s0.points.astype(np.float64), s1.points.astype(np.float64))
        assert dist.max() < 5e-4
        assert len(np.unique(idx)) == len(s0)  # one-to-one
        # times come back from the per-pixel poses (float32 world positions)
        np.testing.assert_allclose(s1.time[idx], s0.time, atol=2e-5)
        np.testing.assert_array_equal(s1.intensity[idx], s0.intensity)
    for w, c in (("FRONT", "front"), ("FRONT_LEFT", "FRONT_LEFT")):
        m0, m1 = log.cameras[c], back.cameras[w]
        assert (m1.width, m1.height) == (m0.width, m0.height)
        np.testing.assert_allclose(m1.K, m0.K)
    np.testing.assert_allclose(back.cameras["FRONT"].distortion, 0.0)
    np.testing.assert_allclose(back.cameras["FRONT_LEFT"].distortion, [0.01, -0.02, 0.001, 0, 0])
    assert set(back.tracks) == {"car-1", "ped-1"}
    for k, label in (("car-1", "TYPE_VEHICLE"), ("ped-1", "TYPE_PEDESTRIAN")):
        t0, t1 = log.tracks[k], back.tracks[k]
        assert t1.label == label
        np.testing.assert_allclose(t1.size, t0.size)
        np.testing.assert_allclose(t1.timestamps, t0.timestamps, atol=1e-6)
        np.testing.assert_array_equal(t1.frame_indices, t0.frame_indices)
        np.testing.assert_allclose(t1.poses, t0.poses, atol=1e-9)


@needs_protos
def test_synthetic_round_trip_off_grid_within_quantisation(tmp_path: Path) -> None:
    """Firings off the column grid, written at Waymo's 2650 columns: each point moves by
    at most half a column of arc."""
    from scenes.waymo import read_waymo, write_waymo

    log = _hand_log(width=300, jitter=0.45, frames=2)
    write_waymo(log, tmp_path / "off.tfrecord")
    back = read_waymo(tmp_path / "off.tfrecord")
    for f0, f1 in zip(log.frames, back.frames, strict=True):
        s0, s1 = f0.lidar(), f1.lidar()
        assert len(s1) == len(s0)
        P0 = s0.points.astype(np.float64)
        idx, dist = _nearest(P0, s1.points.astype(np.float64))
        sensor = (_ego(s0.time) @ LIDAR_TO_EGO)[:, :3, 3]
        rng = np.linalg.norm(P0 - sensor, axis=1)
        bound = rng * np.pi / 2650 + 5e-4
        assert np.all(dist <= bound)
        assert dist.max() > 1e-3  # it really was off-grid
        assert np.all(np.abs(s1.time[idx] - s0.time) <= 2e-5)


@needs_protos
def test_frame_selection_and_streaming(tmp_path: Path) -> None:
    from scenes.waymo import WaymoFile, read_waymo, write_waymo

    log = _hand_log(width=180)
    path = tmp_path / "hand.tfrecord"
    write_waymo(log, path, lidar_width=180)
    sub = read_waymo(path, frames=(1, 3), cameras=["FRONT_LEFT"])
    assert [f.index for f in sub.frames] == [1, 2]
    assert list(sub.cameras) == ["FRONT_LEFT"] and list(sub.frames[0].images) == ["FRONT_LEFT"]
    assert sub.frames[0].timestamp == 0.0 and sub.frames[1].timestamp == pytest.approx(0.1)
    np.testing.assert_allclose(sub.frames[0].ego_to_world[:3, 3], 0.0, atol=1e-9)
    np.testing.assert_allclose(sub.world_offset,
                               log.world_offset + log.frames[1].ego_to_world[:3, 3])
    assert sub.tracks["ped-1"].frame_indices.tolist() == [1, 2]
    # images stay encoded bytes in the file until touched; one parsed frame is cached
    src = sub.frames[1].images["FRONT_LEFT"].source
    assert src.is_encoded and src.describe.endswith("record 2 camera FRONT_LEFT")
    wf = WaymoFile(path)
    wf.image_bytes(0, "FRONT")
    wf.image_bytes(3, "FRONT")
    assert wf._cached[0] == 3
    # a corrupted record is only found when that frame is read, and named
    data = bytearray(path.read_bytes())
    tf = TFRecordFile(path)
    data[tf.offsets[2] + 100] ^= 0xFF
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(bytes(data))
    read_waymo(bad, frames=(0, 2))
    with pytest.raises(LogFormatError, match=r"bad.tfrecord: record 2 .*checksum mismatch"):
        read_waymo(bad)


def test_tfrecord_header_layout(tmp_path: Path) -> None:
    """The bytes follow the TFRecord spec (little-endian u64 length + masked CRCs)."""
    rec = frame_record(b"abc")
    assert struct.unpack("<Q", rec[:8])[0] == 3 and rec[12:15] == b"abc" and len(rec) == 19
    # masked CRC of b"abc" computed by TensorFlow's implementation
    c = crc32c(b"abc")
    assert c == 0x364B3FB7
    assert struct.unpack("<I", rec[15:])[0] == ((((c >> 15) | (c << 17)) & 0xFFFFFFFF)
                                                + 0xA282EAD8) & 0xFFFFFFFF




@needs_protos
def test_synthetic_generator_log_round_trip(tmp_path: Path) -> None:
    """The project's synthetic log (sweep centred on the frame time, azimuth increasing,
    512 firings written at 2650 columns) survives a Waymo round trip."""
    synthetic = pytest.importorskip("scenes.synthetic")
    from scenes.waymo import read_waymo, write_waymo

    log = synthetic.generate_log(synthetic.SyntheticConfig(
        seed=0, frames=2, width=96, height=64, lidar_beams=16, lidar_azimuths=512))
    path = tmp_path / "synth.tfrecord"
    cam_map = write_waymo(log, path)
    assert cam_map == {"front_camera": "FRONT", "front_left_camera": "FRONT_LEFT",
                       "front_right_camera": "FRONT_RIGHT"}
    back = read_waymo(path)
    np.testing.assert_allclose(back.world_offset, log.world_offset, atol=1e-9)
    assert back.time_offset == pytest.approx(log.time_offset + log.frames[0].timestamp,
                                             abs=1e-6)
    for f0, f1 in zip(log.frames, back.frames, strict=True):
        np.testing.assert_allclose(f1.ego_to_world, f0.ego_to_world, atol=1e-6)
        for c, w in cam_map.items():
            np.testing.assert_allclose(f1.images[w].cam_to_world, f0.images[c].cam_to_world,
                                       atol=1e-6)
    for k, t0 in log.tracks.items():
        t1 = back.tracks[k]
        np.testing.assert_allclose(t1.size, t0.size)
        np.testing.assert_allclose(t1.poses, t0.poses, atol=1e-5)
        np.testing.assert_array_equal(t1.frame_indices, t0.frame_indices)
    assert set(back.tracks) == set(log.tracks)
    s0, s1 = log.frames[1].lidar(), back.frames[1].lidar()
    assert len(s1) == len(s0)
    sub = np.random.default_rng(0).choice(len(s0), 2000, replace=False)
    P0 = s0.points[sub].astype(np.float64)
    idx, dist = _nearest(P0, s1.points.astype(np.float64))
    rng = np.linalg.norm(P0 - log.frames[1].ego_to_world[:3, 3], axis=1)
    assert np.all(dist <= rng * np.pi / 2650 + 0.02)  # + ego travel within a sector
    assert np.median(np.abs(s1.time[idx] - s0.time[sub])) < 2e-3
    np.testing.assert_allclose(s1.intensity[idx], s0.intensity[sub])


@needs_protos
@needs_real
def test_drivesplat_inspect_real_frame() -> None:
    import json

    typer_testing = pytest.importorskip("typer.testing")
    from service.cli import app

    res = typer_testing.CliRunner().invoke(app, ["inspect", str(REAL), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["format"] == "waymo" and summary["frames"] == 1
    assert summary["tracks"] == 75 and summary["lidar_points"] == 0
    assert summary["cameras"]["SIDE_LEFT"]["height"] == 886
    assert summary["cameras"]["FRONT"]["fx"] == pytest.approx(2044.5083584358413)
