"""Scene assets: save -> load round trip, PLY contents, manifest, views, atomic writes."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from recon.assets import (
    PLY_PROPERTIES,
    SH_C0,
    LoadedScene,
    SceneFormatError,
    actor_file_names,
    load_scene,
    read_ply,
    save_scene,
)
from recon.init import InitConfig, initialise_scene
from recon.neural import NeuralScene, Splats
from recon.render import rasterize
from scenes.geometry import invert_pose
from scenes.log import LogSegment
from scenes.synthetic import SyntheticConfig, generate_log

FIELDS = ("means", "quats", "scales", "opacities", "colors")


def _perturb(scene: NeuralScene, seed: int) -> None:
    """Move states and decoder weights off their initial values (decoding not identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in scene.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def log() -> LogSegment:
    return generate_log(SyntheticConfig(seed=1, frames=4, width=64, height=48))


@pytest.fixture(scope="module")
def scene(log: LogSegment) -> NeuralScene:
    s = initialise_scene(log, InitConfig(budget=3000, actor_budget=300, sky_rows=6,
                                         sky_cols=12))
    _perturb(s, 0)
    return s


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, scene: NeuralScene, log: LogSegment
          ) -> Path:
    out = tmp_path_factory.mktemp("assets") / "scene"
    return save_scene(scene, out, log=log, metrics={"psnr": 21.5, "bad": float("nan")},
                      recon_s=12.5, extra={"note": np.float32(1.5)})


@pytest.fixture(scope="module")
def loaded(saved: Path) -> LoadedScene:
    return load_scene(saved)


def _assert_splats_equal(a: Splats, b: Splats) -> None:
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_decoders_are_not_identity(scene: NeuralScene) -> None:
    h = scene.static_state
    g = scene.static_decoder(h)
    assert (g - h[:, :14]).abs().max() > 1e-3


def test_round_trip_is_bit_identical(scene: NeuralScene, loaded: LoadedScene,
                                     log: LogSegment) -> None:
    re = loaded.scene
    assert re.actor_ids == scene.actor_ids and len(re.actor_ids) >= 1
    for k, v in scene.state_dict().items():
        assert torch.equal(v, re.state_dict()[k]), k
    ts = [f.timestamp for f in log.frames]
    for t in (ts[0], 0.5 * (ts[1] + ts[2]), ts[-1]):
        a, pa = scene.splats(t)
        b, pb = re.splats(t)
        _assert_splats_equal(a, b)
        assert pa == pb
        # The actors really are placed (they move with their track).
        assert pa.actors
    for tid in scene.actor_ids:
        ta, tb = scene.tracks[tid], re.tracks[tid]
        assert (ta.id, ta.label) == (tb.id, tb.label)
        np.testing.assert_array_equal(ta.poses, tb.poses)
        np.testing.assert_array_equal(ta.timestamps, tb.timestamps)
        np.testing.assert_array_equal(ta.size, tb.size)
    assert re.sky == scene.sky


def test_render_of_loaded_scene_equals_original(scene: NeuralScene, loaded: LoadedScene,
                                                log: LogSegment) -> None:
    f = log.frames[2]
    viewmat, K, W, H, t = loaded.view(f.index, "front_camera")
    outs = []
    for sc in (scene, loaded.scene):
        with torch.no_grad():
            s, _ = sc.splats(t)
            outs.append(rasterize(s.means, s.quats, s.scales, s.opacities, s.colors,
                                  viewmat[None], K[None], W // 2, H // 2, backend="torch"))
    assert torch.equal(outs[0].rgb, outs[1].rgb)
    assert torch.equal(outs[0].alpha, outs[1].alpha)
    assert outs[0].alpha.max() > 0.5  # something was actually drawn


def test_rasterize_mode_travels_with_the_scene(tmp_path: Path, scene: NeuralScene,
                                               log: LogSegment) -> None:
    """A scene optimised antialiased is loaded and rendered antialiased (render_view
    follows the scene); scenes without the field load as classic."""
    from recon.views import render_view, source_views

    scene.rasterize_mode = "antialiased"
    try:
        out = save_scene(scene, tmp_path / "aa", log=log)
    finally:
        scene.rasterize_mode = "classic"
    back = load_scene(out)
    assert back.manifest["rasterize_mode"] == "antialiased"
    assert back.scene.rasterize_mode == "antialiased"
    v = source_views(log)[1]
    with torch.no_grad():
        aa = render_view(back.scene, v, backend="torch").rgb
        classic = render_view(scene, v, backend="torch").rgb
        back.scene.rasterize_mode = "classic"
        assert torch.equal(render_view(back.scene, v, backend="torch").rgb, classic)
    assert not torch.equal(aa, classic)
    m = json.loads((out / "manifest.json").read_text())
    del m["rasterize_mode"]
    (out / "manifest.json").write_text(json.dumps(m))
    assert load_scene(out, verify=False).scene.rasterize_mode == "classic"


def _ply_checks(path: Path, expect: Splats, *, max_scale: float) -> None:
    ply = PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"]
    v = ply["vertex"].data
    assert tuple(v.dtype.names) == PLY_PROPERTIES
    assert all(v.dtype[n] == np.dtype("<f4") for n in PLY_PROPERTIES)
    assert len(v) == len(expect)
    cols = np.stack([v[n] for n in PLY_PROPERTIES], 1).astype(np.float64)
    assert np.isfinite(cols).all()
    np.testing.assert_array_equal(cols[:, 3:6], 0.0)
    op = 1 / (1 + np.exp(-cols[:, 9]))
    assert ((op > 0) & (op < 1)).all()
    q = cols[:, 13:17]
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    scales = np.exp(cols[:, 10:13])
    assert (scales > 0).all() and scales.max() < max_scale
    # Values are the decoded Gaussians through the PLY activations.
    back = read_ply(path)
    torch.testing.assert_close(back.means, expect.means.float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(back.scales, expect.scales, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(back.opacities, expect.opacities, rtol=0, atol=1e-6)
    torch.testing.assert_close(back.colors, expect.colors, rtol=0, atol=1e-6)
    torch.testing.assert_close(back.quats, expect.quats, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cols[:, 6:9], (expect.colors.double().numpy() - 0.5) / SH_C0,
                               atol=1e-5)


def test_ply_files(scene: NeuralScene, saved: Path, loaded: LoadedScene) -> None:
    with torch.no_grad():
        static, actors, sky = scene.decode_parts()
    _ply_checks(saved / "static.ply", static, max_scale=50.0)
    # Sky discs span a cell of a sphere hundreds of metres away.
    _ply_checks(saved / "sky.ply", sky, max_scale=scene.sky.radius)
    total = 0
    for i, entry in enumerate(loaded.manifest["actors"]):
        assert entry["id"] == scene.actor_ids[i]
        mask = scene.actor_index == i
        part = Splats(*(getattr(actors, f)[mask] for f in FIELDS))
        _ply_checks(saved / entry["file"], part, max_scale=10.0)
        assert entry["gaussians"] == int(mask.sum())
        total += entry["gaussians"]
        # Object frame: the Gaussians sit around the box centre, not out in the world.
        size = scene.tracks[entry["id"]].size
        assert np.abs(read_ply(saved / entry["file"]).means.numpy()).max() < size.max()
    assert total == len(actors)
    c = loaded.manifest["counts"]
    assert (c["static"], c["actors"], c["sky"]) == (len(static), len(actors), len(sky))
    assert c["total"] == len(static) + len(actors) + len(sky)


def test_manifest(scene: NeuralScene, saved: Path, loaded: LoadedScene, log: LogSegment
                  ) -> None:
    m = json.loads((saved / "manifest.json").read_text())
    assert m == loaded.manifest
    assert m["schema_version"] == 1 and isinstance(m["schema_version"], int)
    assert m["source"]["name"] == log.name and m["source"]["format"] == "synthetic"
    assert m["source"]["meta"]["seed"] == 1
    assert m["method"] == "adam" and m["recon_s"] == 12.5
    assert m["metrics"] == {"psnr": 21.5, "bad": None}
    assert m["extra"] == {"note": 1.5}
    assert m["checkpoint_hash"] == m["state_sha256"] and len(m["state_sha256"]) == 64
    assert m["created"].endswith("+00:00")
    assert m["latent"] == scene.latent
    assert m["sky"] == scene.sky.to_json()
    np.testing.assert_allclose(m["world_offset"], log.world_offset, rtol=0, atol=1e-12)
    assert abs(m["time_offset"] - log.time_offset) <= 1e-12
    assert len(m["frames"]) == len(log.frames)
    for fm, f in zip(m["frames"], log.frames, strict=True):
        assert fm["index"] == f.index and abs(fm["timestamp"] - f.timestamp) <= 1e-12
        np.testing.assert_allclose(fm["ego_to_world"], f.ego_to_world, rtol=0, atol=1e-12)
        assert set(fm["cameras"]) == set(f.images)
        for c, im in f.images.items():
            np.testing.assert_allclose(fm["cameras"][c]["cam_to_world"], im.cam_to_world,
                                       rtol=0, atol=1e-12)
    for name, cam in log.cameras.items():
        mc = m["cameras"][name]
        assert (mc["width"], mc["height"], mc["distortion"]) == (cam.width, cam.height, None)
        np.testing.assert_allclose(mc["K"], cam.K, rtol=0, atol=1e-12)
    assert [t["id"] for t in m["tracks"]] == scene.actor_ids
    for tm in m["tracks"]:
        tr = log.tracks[tm["id"]]
        np.testing.assert_allclose(tm["poses"], tr.poses, rtol=0, atol=1e-12)
        np.testing.assert_allclose(tm["timestamps"], tr.timestamps, rtol=0, atol=1e-12)
        np.testing.assert_allclose(tm["size"], tr.size, rtol=0, atol=1e-12)
        assert tm["label"] == tr.label


def test_view_and_lane_shift(loaded: LoadedScene, log: LogSegment) -> None:
    f = log.frames[1]
    for cam in log.cameras:
        viewmat, K, W, H, t = loaded.view(f.index, cam)
        im = f.images[cam]
        assert viewmat.dtype == torch.float32 and viewmat.shape == (4, 4)
        torch.testing.assert_close(viewmat, torch.from_numpy(invert_pose(im.cam_to_world))
                                   .float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(K, torch.from_numpy(log.cameras[cam].K).float())
        assert (W, H) == (log.cameras[cam].width, log.cameras[cam].height)
        assert t == im.timestamp
    for shift in (1.5, -2.0):
        T0 = loaded.cam_to_world(f.index, "front_camera")
        T1 = loaded.cam_to_world(f.index, "front_camera", shift)
        ego_y = f.ego_to_world[:3, 1]
        np.testing.assert_allclose(T1[:3, 3] - T0[:3, 3], shift * ego_y, atol=1e-12)
        np.testing.assert_array_equal(T1[:3, :3], T0[:3, :3])
        viewmat, *_ = loaded.view(f.index, "front_camera", shift)
        centre = -viewmat[:3, :3].double().T @ viewmat[:3, 3].double()
        np.testing.assert_allclose(centre.numpy(), T1[:3, 3], atol=1e-4)
        # In ego coordinates the camera moved sideways only (left for positive shift).
        d = invert_pose(f.ego_to_world)[:3, :3] @ (T1[:3, 3] - T0[:3, 3])
        np.testing.assert_allclose(d, [0.0, shift, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match=r"no frame 99 .*frames: \[0, 1, 2, 3\]"):
        loaded.view(99, "front_camera")
    with pytest.raises(ValueError, match="no camera 'rear'.*front_camera"):
        loaded.view(1, "rear")


def test_odd_track_ids(tmp_path: Path, scene: NeuralScene, log: LogSegment) -> None:
    """Ids with '/', spaces, dots and case clashes get distinct safe files."""
    tr = scene.tracks[scene.actor_ids[0]]
    ids = ["car/1 x", "car\\1 x", "../up", "CAR_1_X"]
    n = scene.actor_state.shape[0]
    index = torch.arange(n) % len(ids)
    odd = NeuralScene(scene.static_anchors, scene.static_state.detach(),
                      scene.actor_anchors, scene.actor_state.detach(), index,
                      {i: replace(tr, id=i) for i in ids}, scene.sky,
                      scene.sky_state.detach())
    _perturb(odd, 1)
    out = save_scene(odd, tmp_path / "odd", log=log)
    names = sorted(p.name for p in (out / "actors").iterdir())
    assert len(names) == len(ids) and len({n.lower() for n in names}) == len(ids)
    assert all(not n.startswith(".") and "/" not in n and " " not in n for n in names)
    back = load_scene(out)
    assert back.scene.actor_ids == ids
    files = {a["id"]: a["file"] for a in back.manifest["actors"]}
    assert sorted(Path(f).name for f in files.values()) == names
    for i, tid in enumerate(ids):
        assert len(read_ply(out / files[tid])) == int((odd.actor_index == i).sum())
    _assert_splats_equal(odd.splats(0.1)[0], back.scene.splats(0.1)[0])
    assert actor_file_names(["veh-000"]) == {"veh-000": "veh-000.ply"}


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_failed_overwrite_keeps_old_scene(tmp_path: Path, scene: NeuralScene,
                                          log: LogSegment) -> None:
    out = save_scene(scene, tmp_path / "scene", log=log)
    before = _snapshot(out)
    bad = copy.deepcopy(scene)
    # safetensors cannot store sparse tensors: the write fails inside the temp dir.
    bad.register_buffer("bad", torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="sparse"):
        save_scene(bad, out, log=log)
    assert _snapshot(out) == before
    assert os.listdir(tmp_path) == ["scene"]  # no temp or backup dir left behind
    _assert_splats_equal(load_scene(out).scene.splats(0.2)[0], scene.splats(0.2)[0])

    # An out_dir whose parent is a file cannot be created.
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        save_scene(scene, tmp_path / "file" / "scene", log=log)
    assert sorted(os.listdir(tmp_path)) == ["file", "scene"]

    with pytest.raises(FileExistsError):
        save_scene(scene, out, log=log, overwrite=False)
    assert _snapshot(out) == before

    # A successful overwrite replaces the scene and leaves nothing else.
    other = copy.deepcopy(scene)
    _perturb(other, 7)
    save_scene(other, out, log=log, method="other")
    assert sorted(os.listdir(tmp_path)) == ["file", "scene"]
    back = load_scene(out)
    assert back.manifest["method"] == "other"
    _assert_splats_equal(back.scene.splats(0.2)[0], other.splats(0.2)[0])


def _copy(saved: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, dst))


def test_bad_inputs_raise_scene_format_error(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(SceneFormatError, match="nope.*does not exist"):
        load_scene(tmp_path / "nope")

    d = _copy(saved, tmp_path / "a")
    (d / "manifest.json").unlink()
    with pytest.raises(SceneFormatError, match=r"manifest\.json.*missing"):
        load_scene(d)

    d = _copy(saved, tmp_path / "b")
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(SceneFormatError, match=r"manifest\.json.*not valid JSON"):
        load_scene(d)

    d = _copy(saved, tmp_path / "c")
    m = json.loads(text)
    (d / "manifest.json").write_text(json.dumps({**m, "schema_version": 99}))
    with pytest.raises(SceneFormatError, match=r"manifest\.json.*schema_version 99"):
        load_scene(d)
    (d / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "frames"}))
    with pytest.raises(SceneFormatError, match=r"manifest\.json.*'frames'"):
        load_scene(d)

    (d / "manifest.json").write_text(json.dumps({**m, "rasterize_mode": "mip"}))
    with pytest.raises(SceneFormatError, match=r"manifest\.json.*rasterize_mode 'mip'"):
        load_scene(d)

    d = _copy(saved, tmp_path / "d")
    (d / "state.safetensors").unlink()
    with pytest.raises(SceneFormatError, match=r"state\.safetensors.*missing"):
        load_scene(d)

    d = _copy(saved, tmp_path / "e")
    (d / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(SceneFormatError, match=r"state\.safetensors.*SHA-256"):
        load_scene(d)
    with pytest.raises(SceneFormatError, match=r"state\.safetensors.*not a readable"):
        load_scene(d, verify=False)

    # A valid safetensors file whose tensors do not fit the manifest's actors.
    from safetensors.torch import load_file, save_file

    d = _copy(saved, tmp_path / "f")
    st = load_file(str(d / "state.safetensors"))
    st["actor_index"] = st["actor_index"] + 5
    save_file(st, str(d / "state.safetensors"))
    with pytest.raises(SceneFormatError, match=r"state\.safetensors"):
        load_scene(d, verify=False)
