"""G3R: gradient lifting, one learned step, checkpoints, the pipeline and training resume."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from recon.g3r.checkpoint import (
    DEFAULT_CHECKPOINT,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from recon.g3r.lift import lift_gradient, normalise_gradient, view_groups, view_targets
from recon.g3r.model import G3RConfig, G3RModel, build_scene_graph, gamma
from recon.g3r.optimize import g3r_steps, normalised
from recon.g3r.train import TrainConfig, train, training_log_config
from recon.init import InitConfig, initialise_scene
from recon.views import source_views
from scenes.synthetic import SyntheticConfig, generate_log
from service.cli import app

TINY_INIT = InitConfig(budget=3000, actor_budget=150, sky_rows=6, sky_cols=16)
TINY_MODEL = G3RConfig(widths=(8, 12), levels=2, point_hidden=16, sky_hidden=8, steps=4,
                       turbo_steps=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small tensors: one thread is faster and keeps the results bit-reproducible.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def log():
    return generate_log(SyntheticConfig(seed=3, frames=4, width=64, height=40, traffic=2.5))


@pytest.fixture(scope="module")
def scene(log):
    return initialise_scene(log, TINY_INIT)


def test_lifted_gradient_matches_backward_on_the_summed_loss(log, scene):
    targets = view_targets(source_views(log)[:2])
    lifted = lift_gradient(scene, scene.state(), targets, backend="torch")
    # Reference: one backward through the sum of the per-view MSEs.
    from recon.g3r.lift import render_targets

    leaves = [t.detach().clone().requires_grad_(True) for t in
              (scene.static_state, scene.actor_state, scene.sky_state)]
    from recon.neural import SceneState

    st = SceneState(*leaves)
    loss = sum(torch.nn.functional.mse_loss(
        render_targets(scene, targets, scene.decode_parts(st), i, "torch"),
        targets.images[i]) for i in range(2))
    loss.backward()
    assert lifted.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for got, ref in zip((lifted.static, lifted.actors, lifted.sky), leaves, strict=True):
        assert torch.allclose(got, ref.grad, atol=1e-7, rtol=1e-4)
    assert lifted.static.abs().sum() > 0 and lifted.sky.abs().sum() > 0
    assert scene.static_state.grad is None  # the scene's parameters are untouched


def test_gradient_normalisation_is_scale_free():
    g = torch.randn(500, 6) * torch.tensor([1e-9, 1e-3, 1.0, 1e3, 0.0, 5.0])
    a, b = normalise_gradient(g), normalise_gradient(g * 1234.5)
    assert torch.allclose(a, b, atol=1e-5)
    assert (a[:, 4] == 0).all()  # a channel without gradient stays zero
    assert a[:, :4].abs().mean(0).min() > 0.3  # every other channel on one scale


def test_gamma_schedule_decreases_and_constant_ablation():
    T = 24
    gs = [gamma(t, T, 0.1) for t in range(1, T + 1)]
    assert gs[0] == pytest.approx(1.0) and gs[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(gs, gs[1:], strict=False))
    assert gamma(1, T, 0.1, constant=True) == gamma(T, T, 0.1, constant=True) == 0.55


def _fresh_model_and_inputs(log, scene):
    """A seeded untrained tiny model on ``scene``, its source targets and initial state."""
    torch.manual_seed(0)
    model = G3RModel(replace(TINY_MODEL, channels=scene.channels))
    model.install_decoders(scene)
    return model, view_targets(source_views(log)), scene.state().detach().clone()


def test_one_g3r_step_is_deterministic_and_reduces_source_loss(log, scene):
    model, targets, h0 = _fresh_model_and_inputs(log, scene)

    def one_step():
        return g3r_steps(model, scene, h0, targets, T=4, backend="torch",
                         on_step=lambda t, s, loss: True)  # stop after step 1

    a, b = one_step(), one_step()
    for x, y in zip((a.static, a.actors, a.sky), (b.static, b.actors, b.sky), strict=True):
        assert torch.equal(x, y)
    before = lift_gradient(scene, h0, targets, backend="torch").loss
    after = lift_gradient(scene, a, targets, backend="torch").loss
    assert after < 0.9 * before


def test_lifting_reads_the_images_at_their_native_resolution(log, scene, monkeypatch):
    import recon.g3r.optimize as opt
    from recon.g3r.optimize import G3RRunConfig, optimise_g3r

    model, _, _ = _fresh_model_and_inputs(log, scene)
    lifted_sizes = []
    real = opt.lift_gradient

    def recording(scene_, state, targets, **kw):  # the real lift, noting its render sizes
        lifted_sizes.extend(tuple(img.shape[:2]) for img in targets.images)
        return real(scene_, state, targets, **kw)

    monkeypatch.setattr(opt, "lift_gradient", recording)
    res = optimise_g3r(copy.deepcopy(scene), log, model, G3RRunConfig(steps=2, backend="torch"))
    assert res.lift_width == res.native_width == 64
    assert set(lifted_sizes) == {(40, 64)}  # the log's 64x40 images, not downsampled
    lifted_sizes.clear()
    res = optimise_g3r(copy.deepcopy(scene), log, model,
                       G3RRunConfig(steps=1, lift_width=32, backend="torch"))
    assert res.lift_width == 32 and set(lifted_sizes) == {(20, 32)}  # as asked


def test_lift_width_cap_is_per_device():
    from recon.g3r.optimize import LIFT_WIDTH_CAP, resolve_lift_scale

    assert LIFT_WIDTH_CAP["cuda"] is None  # full resolution on a GPU
    assert resolve_lift_scale([1920, 1920], None, "cuda") == 1.0
    assert resolve_lift_scale([320, 160], None, "cpu") == 1.0
    assert resolve_lift_scale([1920], None, "cpu") == LIFT_WIDTH_CAP["cpu"] / 1920
    assert resolve_lift_scale([320], 160, "cuda") == 0.5  # an explicit width is honoured
    with pytest.raises(ValueError, match="lift_width"):
        resolve_lift_scale([320], 4, "cpu")


def test_view_groups_partition_the_views_and_are_deterministic():
    groups = view_groups(14, 3, seed=4)
    assert sorted(i for g in groups for i in g) == list(range(14))  # each view once
    assert sorted(len(g) for g in groups) == [4, 5, 5]
    assert groups == view_groups(14, 3, seed=4)
    assert view_groups(14, 3, seed=5) != groups
    assert view_groups(2, 5) == [[0], [1]] or view_groups(2, 5) == [[1], [0]]
    assert view_groups(6, 1) == [list(range(6))]
    with pytest.raises(ValueError, match="lift groups"):
        view_groups(6, 0)


def test_grouped_steps_lift_one_view_group_each(log, scene):
    model, targets, h0 = _fresh_model_and_inputs(log, scene)
    first = view_groups(len(targets), 2)[0]
    assert 0 < len(first) < len(targets)
    stop = {"on_step": lambda t, s, loss: True}  # step 1 only
    grouped = g3r_steps(model, scene, h0, targets, T=4, groups=2, backend="torch", **stop)
    alone = g3r_steps(model, scene, h0, targets.subset(first), T=4, backend="torch", **stop)
    full = g3r_steps(model, scene, h0, targets, T=4, backend="torch", **stop)
    assert torch.equal(grouped.static, alone.static)
    assert not torch.equal(grouped.static, full.static)


def test_fresh_network_update_is_the_explicit_step_rule(log, scene):
    model = G3RModel(replace(TINY_MODEL, channels=scene.channels))
    graph = build_scene_graph(scene, model.config)
    h = scene.state().detach()
    grad = normalised(lift_gradient(scene, h, view_targets(source_views(log)[:1]),
                                    backend="torch").as_state())
    with torch.no_grad():
        new = model.update(h, grad, graph, 1, 4)
    step = model.static_rule.log_step.exp() * torch.tanh(-model.static_rule.gain * grad.static)
    assert torch.allclose(new.static - h.static, step, atol=1e-6)


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model = G3RModel(TINY_MODEL)
    path = tmp_path / "m.safetensors"
    sha = save_checkpoint(model, path, {"note": "test"})
    ck = load_checkpoint(path)
    assert ck.sha256 == sha == file_sha256(path) and ck.info == {"note": "test"}
    assert ck.model.config == TINY_MODEL
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck.model.state_dict()[k])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_shipped_checkpoint_reconstructs_and_its_hash_lands_in_the_manifest(tmp_path):
    assert DEFAULT_CHECKPOINT.is_file(), "the trained checkpoint must ship with the package"
    ck = load_checkpoint()
    assert ck.info.get("train_s", 0) > 0 and "train_config" in ck.info
    runner = CliRunner()
    log_dir, scene_dir = tmp_path / "log", tmp_path / "scene"
    assert runner.invoke(app, ["synth", str(log_dir), "--frames", "4", "--width", "48",
                               "--height", "32", "--seed", "5"]).exit_code == 0
    res = runner.invoke(app, ["reconstruct", str(log_dir), "--out", str(scene_dir),
                              "--turbo", "--budget", "2000", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((scene_dir / "manifest.json").read_text())
    assert manifest["method"] == "g3r"
    assert manifest["checkpoint_hash"] == file_sha256(DEFAULT_CHECKPOINT)
    assert manifest["metrics"]["iterations"] == ck.model.config.turbo_steps
    # The gradient was read at the images' own resolution, and the manifest says so.
    assert manifest["metrics"]["lift_width"] == manifest["metrics"]["native_width"] == 48
    res = runner.invoke(app, ["reconstruct", str(log_dir), "--out", str(scene_dir),
                              "--checkpoint", str(tmp_path / "nope.safetensors")])
    assert res.exit_code == 2 and "nope.safetensors" in res.output
    res = runner.invoke(app, ["reconstruct", str(log_dir), "--out", str(scene_dir),
                              "--iters", "5"])
    assert res.exit_code == 2 and "Adam options" in res.output


def _tiny_training(iterations: int) -> TrainConfig:
    return replace(TrainConfig(), scenes=2, val_scenes=1, frames=(4, 5), width=48, height=32,
                   size_scales=(1.0, 1.25), cameras=(("front_camera",),), budget=1500,
                   actor_budget=80, pool_refresh_every=1,
                   iterations=iterations, val_every=1000, save_every=1, loss_views=1,
                   model=replace(TINY_MODEL, channels=46, lift_groups=2))


def test_training_resumes_where_it_stopped(tmp_path):
    straight = train(_tiny_training(3), tmp_path / "a", backend="torch")
    train(_tiny_training(2), tmp_path / "b", backend="torch")
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)
    assert state["iteration"] == 2
    resumed = train(_tiny_training(3), tmp_path / "b", backend="torch")  # 1 more
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v, b.model.state_dict()[k], atol=1e-6), k
    rows = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "iter" in r] == [1, 2, 3]
    assert b.info["iterations"] == 3
    with pytest.raises(ValueError, match="other training settings"):
        train(replace(_tiny_training(4), lr=0.5), tmp_path / "b", backend="torch")


def test_training_pool_sees_fresh_seeds_and_never_the_validation_seed():
    from recon.g3r.train import pool_refresh, pool_seeds

    cfg = replace(TrainConfig(), scenes=3, val_scenes=1, pool_refresh_every=2)
    start = cfg.seed_start
    assert pool_seeds(cfg, 0) == [start, start + 1, start + 2]
    assert pool_refresh(cfg, 1) is None
    assert pool_refresh(cfg, 2) == (0, start + 4)  # start + 3 is the validation seed
    assert pool_seeds(cfg, 2) == [start + 4, start + 1, start + 2]
    seen = {s for e in range(41) for s in pool_seeds(cfg, e)}  # 20 refreshes
    assert start + 3 not in seen and len(seen) == 3 + 40 // 2
    # Settings vary with the seed around the default scale.
    logs = [training_log_config(s, cfg) for s in range(start, start + 12)]
    assert len({(c.width, c.height) for c in logs}) > 1
    assert len({c.cameras for c in logs}) > 1
    assert all(256 <= c.width <= 384 and 16 <= c.frames <= 40 for c in logs)


def test_training_refuses_eval_seeds():
    with pytest.raises(ValueError, match="evaluation seed"):
        training_log_config(5, TrainConfig())


def test_bench_time_to_reach_and_merge():
    from recon.g3r.bench import merge_reports, time_to_reach

    curve = [{"wall_s": 10.0, "psnr": 18.0}, {"wall_s": 20.0, "psnr": 22.0},
             {"wall_s": 30.0, "psnr": 23.0}]
    assert time_to_reach(curve, 17.0) == 10.0
    assert time_to_reach(curve, 20.0) == pytest.approx(15.0)
    assert time_to_reach(curve, 23.5) is None  # never reached: no speedup claimed
    row = {"method": "g3r", "psnr": 23.0, "ssim": 0.7, "wall_s": 5.0,
           "psnr_shift": {"1": 22.0, "2": 21.0, "3": None}}
    adam_curve = [{"wall_s": 60.0, "psnr": 22.5}]
    rep = {"checkpoint": {"sha256": "a"},
           "logs": [{"rows": [row], "speedup": 4.0, "adam_curve": adam_curve}]}
    merged = merge_reports([rep, {**rep, "logs": [{"rows": [row], "speedup": None,
                                                   "adam_curve": adam_curve}]}])
    assert merged["speedups"] == [4.0, None] and merged["summary"][0]["psnr"] == 23.0
    assert merged["speedup_lower_bounds"] == [None, 12.0]  # 60 s of Adam / 5 s of G3R
    with pytest.raises(ValueError, match="different checkpoints"):
        merge_reports([rep, {**rep, "checkpoint": {"sha256": "b"}}])
