"""Meta-training of the G3R model across synthetic scenes (DESIGN.md, Learned optimizer, 4).

An *episode* takes one training scene from its LiDAR initialisation through K update
steps (K, the unroll length, grows over training up to T). At every step:

1. the gradient input is lifted from the scene's **source** views only (from one group
   of them when the model runs with ``lift_groups`` > 1);
2. the model updates the state;
3. the loss is taken on a sample of source **and held-out** views of the new state:
   MSE + w_ssim (1 - SSIM) + w_flat * mean smallest scale (flat Gaussians hug surfaces);
4. backpropagation goes through this one step only (the state is detached before the
   next step), and Adam updates the network.

Training scenes come from seeds disjoint from the evaluation seeds (``train_seeds``), with
their settings (traffic, curvature, field of view, speed) drawn per seed; they are built
once and kept in memory. Progress is logged as JSON lines (loss, source/held-out PSNR,
validation PSNR after full T-step runs on scenes outside the pool); ``train_state.pt``
lets a run resume where it stopped.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.g3r.checkpoint import load_checkpoint, save_checkpoint
from recon.g3r.lift import (
    ViewTargets,
    lift_gradient,
    render_target_output,
    render_targets,
    view_groups,
    view_targets,
)
from recon.g3r.model import G3RConfig, G3RModel, SceneGraph, build_scene_graph
from recon.g3r.optimize import g3r_steps, normalised
from recon.init import InitConfig, initialise_scene
from recon.lidar_points import ViewBank, aggregate_lidar
from recon.metrics import psnr, ssim
from recon.neural import LOG_SCALE, NeuralScene, SceneState
from recon.views import heldout_views, source_views
from scenes.synthetic import EVAL_SEEDS, SyntheticConfig, generate_log, train_seeds

#: Camera sets training draws from (the eval logs' front/left/right set is not one).
TRAIN_CAMERA_SETS: tuple[tuple[str, ...], ...] = (
    ("front_camera", "front_left_camera", "front_right_camera"),
    ("front_camera", "front_left_camera", "left_camera"),
    ("front_camera", "front_right_camera", "right_camera"),
)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``drivesplat train`` (stored in the checkpoint's metadata).

    Training logs are drawn per seed around the scale ``reconstruct`` runs at: image size
    ``width x height`` times one of ``size_scales``, a frame count in ``frames``, a camera
    set from ``camera_sets``, a horizontal FOV in ``hfov_deg``, and the default
    Gaussian budgets.

    Attributes:
        scenes: training pool size (scenes in memory); val_scenes: validation scenes
            (training seeds outside the pool); seed_start: first training seed.
        pool_refresh_every: every this many episodes one pool scene is replaced by a
            fresh seed (0: the pool never changes), so a long run sees many seeds.
        frames: (min, max) frames per training log (10 Hz).
        width, height: base image size; size_scales: factors drawn per seed.
        camera_sets: rigs drawn per seed; hfov_deg: (min, max) horizontal FOV.
        budget, actor_budget: Gaussians per training scene (static; per actor).
        iterations: network updates (one per unrolled step).
        lr: Adam learning rate; grad_clip: global norm clip.
        unroll_start, unroll_every: the unroll length starts at ``unroll_start`` steps
            and grows by one every ``unroll_every`` episodes, up to T.
        turbo_fraction: share of episodes run with the turbo schedule (T = 12).
        loss_views: views (per kind: source, held-out) the loss is taken on each step.
        heldout_loss: include held-out views in the loss (ablation: False).
        ssim_weight, flat_weight: loss terms.
        depth_weight: weight of the LiDAR depth term on the sampled source views (mean
            |log z_render - log z_lidar| over pixels with a return of the view's own
            frame): LiDAR is a source input, and the term keeps geometry from drifting.
            Off by default: at weight 0.05 a 40-minute fine-tune lost 0.6-1.0 dB of
            held-out PSNR against the same fine-tune without it (BENCHMARKS.md).
        lift_scale: resolution of gradient lifting relative to the training images
            (1: native, as ``reconstruct`` lifts).
        init_from: checkpoint to start from (fine-tuning; its architecture is used).
        val_every: validate every this many iterations; save_every: write train_state.
        time_budget_s: stop at the first iteration past this many seconds.
        seed: network init and sampling.
        model: architecture.
    """

    scenes: int = 6
    val_scenes: int = 1
    seed_start: int = train_seeds(1)[0]
    pool_refresh_every: int = 2
    frames: tuple[int, int] = (16, 40)
    width: int = 320
    height: int = 180
    size_scales: tuple[float, ...] = (0.8, 1.0, 1.2)
    cameras: tuple[tuple[str, ...], ...] = TRAIN_CAMERA_SETS
    hfov_deg: tuple[float, float] = (58.0, 84.0)
    budget: int = 100_000
    actor_budget: int = 2000
    iterations: int = 1500
    lr: float = 1e-3
    grad_clip: float = 1.0
    unroll_start: int = 2
    unroll_every: int = 2
    turbo_fraction: float = 0.25
    loss_views: int = 3
    heldout_loss: bool = True
    ssim_weight: float = 0.2
    flat_weight: float = 0.1
    depth_weight: float = 0.0
    lift_scale: float = 1.0
    init_from: str | None = None
    val_every: int = 150
    save_every: int = 10
    time_budget_s: float | None = None
    seed: int = 0
    #: Trained to lift a third of the source views per step (see G3RConfig.lift_groups).
    model: G3RConfig = field(default_factory=lambda: G3RConfig(lift_groups=3))

    def to_json(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_json()
        return json.loads(json.dumps(d))  # tuples as lists, as a saved config has them

    #: Fields that only say how long to run: a resumed run may change them.
    RUN_LENGTH = ("iterations", "time_budget_s", "val_every", "save_every")

    def same_training(self, saved: dict) -> bool:
        """Whether a saved config (JSON) trains the same thing as this one."""
        mine = self.to_json()
        return all(mine[k] == saved.get(k) for k in mine if k not in self.RUN_LENGTH)

    @staticmethod
    def from_json(d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = G3RConfig.from_json(d["model"])
        for k in ("frames", "size_scales", "hfov_deg"):
            d[k] = tuple(d[k])
        d["cameras"] = tuple(tuple(c) for c in d["cameras"])
        return TrainConfig(**d)


def training_log_config(seed: int, cfg: TrainConfig) -> SyntheticConfig:
    """The synthetic log of one training seed: size, frames, rig, FOV and traffic drawn
    from the seed (see :class:`TrainConfig`)."""
    if seed in EVAL_SEEDS:
        raise ValueError(f"seed {seed} is an evaluation seed; training must not use it")
    rng = np.random.default_rng([seed, 7])
    k = float(cfg.size_scales[int(rng.integers(len(cfg.size_scales)))])
    # Even sizes keep the aspect of the base size within a pixel.
    w, h = 2 * round(cfg.width * k / 2), 2 * round(cfg.height * k / 2)
    frames = int(rng.integers(cfg.frames[0], cfg.frames[1] + 1))
    cams = tuple(cfg.cameras[int(rng.integers(len(cfg.cameras)))])
    return SyntheticConfig(seed=seed, frames=frames, width=w, height=h, cameras=cams,
                           traffic=float(rng.uniform(0.6, 2.2)),
                           hfov_deg=float(rng.uniform(*cfg.hfov_deg)), shifts_m=())


@dataclass
class TrainingScene:
    """One pool scene, ready for episodes.

    Attributes:
        seed: its training seed; scene: the initialised NeuralScene (decoders shared
        with the model); h0: its initial state; graph: voxel hierarchies;
        source: source-view targets (gradient input); heldout: held-out targets;
        source_depth: per source view [H, W] LiDAR z of its own frame at the target's
        size (inf: no return); empty when the loss has no depth term.
    """

    seed: int
    scene: NeuralScene
    h0: SceneState
    graph: SceneGraph
    source: ViewTargets
    heldout: ViewTargets
    source_depth: list[Tensor]


def lidar_depth_targets(log, targets: ViewTargets, device: torch.device) -> list[Tensor]:
    """[H, W] nearest LiDAR z of each source view's own frame, at the target's size
    (min-pooled where the target is smaller; inf where no return lands)."""
    bank = ViewBank(log, aggregate_lidar(log))
    if len(bank.views) != len(targets):
        raise ValueError("LiDAR view bank and source views disagree")
    out = []
    for v, img in enumerate(targets.images):
        z = bank.zbuffer(v)
        H, W = img.shape[:2]
        if z.shape != (H, W):  # nearest return per target pixel
            z = -torch.nn.functional.adaptive_max_pool2d(-z[None, None], (H, W))[0, 0]
        out.append(z.to(device))
    return out


def build_training_scene(seed: int, cfg: TrainConfig, model: G3RModel,
                         device: torch.device) -> TrainingScene:
    log = generate_log(training_log_config(seed, cfg))
    init = InitConfig(budget=cfg.budget, actor_budget=cfg.actor_budget,
                      latent=cfg.model.channels - 14)
    scene = initialise_scene(log, init).to(device)
    model.share_decoders(scene)
    source = view_targets(source_views(log), cfg.lift_scale, device)
    return TrainingScene(seed, scene, scene.state().detach().clone(),
                         build_scene_graph(scene, cfg.model), source,
                         view_targets(heldout_views(log), cfg.lift_scale, device),
                         # Only a loss with the depth term reads LiDAR z-buffers.
                         lidar_depth_targets(log, source, device)
                         if cfg.depth_weight > 0 else [])


def flatness(scene: NeuralScene, state: SceneState) -> Tensor:
    """Mean smallest scale (m) of the static and actor Gaussians."""
    parts = [scene.static_decoder(state.static)[:, LOG_SCALE],
             scene.actor_decoder(state.actors)[:, LOG_SCALE]]
    s = torch.cat(parts).exp()
    return s.min(-1).values.mean() if len(s) else s.sum()


def depth_log_l1(depth: Tensor, lidar: Tensor) -> Tensor:
    """Mean |log depth - log lidar| over pixels with a LiDAR return ([H, W] each).

    Relative like AbsRel, but bounded where a see-through surface lets the sky's far
    depth in (AbsRel ~ 100 there), so a few such pixels do not drown the rest.
    """
    ok = torch.isfinite(lidar)
    if not ok.any():
        return depth.sum() * 0
    return (depth[ok].clamp_min(0.1).log() - lidar[ok].log()).abs().mean()


def step_loss(ts: TrainingScene, state: SceneState, cfg: TrainConfig, rng: random.Random,
              backend: str) -> tuple[Tensor, dict]:
    """Loss of ``state`` on sampled source (and held-out) views, plus PSNRs (and the
    LiDAR depth error of the source views) for the log."""
    sets = [("source", ts.source)] + ([("heldout", ts.heldout)] if cfg.heldout_loss else [])
    terms, depth_terms, stats = [], [], {}
    decoded = ts.scene.decode_parts(state)
    for name, targets in sets:
        idx = rng.sample(range(len(targets)), min(cfg.loss_views, len(targets)))
        ps = []
        for i in idx:
            out = render_target_output(ts.scene, targets, decoded, i, backend)
            rgb, gt = out.rgb[0], targets.images[i]
            terms.append(torch.nn.functional.mse_loss(rgb, gt)
                         + cfg.ssim_weight * (1 - ssim(rgb, gt)))
            if name == "source" and cfg.depth_weight > 0:
                depth_terms.append(depth_log_l1(out.depth[0, ..., 0], ts.source_depth[i]))
            ps.append(psnr(rgb.detach().clamp(0, 1), gt))
        stats[f"psnr_{name}"] = float(np.mean(ps))
    loss = torch.stack(terms).mean() + cfg.flat_weight * flatness(ts.scene, state)
    if depth_terms:
        depth = torch.stack(depth_terms).mean()
        loss = loss + cfg.depth_weight * depth
        stats["depth_log_l1_source"] = float(depth.detach())
    return loss, stats


def validate(model: G3RModel, scenes: list[TrainingScene], T: int, backend: str) -> float:
    """Mean held-out PSNR after a full T-step run on each validation scene."""
    out = []
    with torch.no_grad():
        for ts in scenes:
            final = ts.scene.decode_parts(
                g3r_steps(model, ts.scene, ts.h0, ts.source, T,
                          groups=model.config.lift_groups, backend=backend))
            out += [psnr(render_targets(ts.scene, ts.heldout, final, i, backend).clamp(0, 1),
                         ts.heldout.images[i]) for i in range(len(ts.heldout))]
    return float(np.mean(out))


def pool_seeds(cfg: TrainConfig, episode: int) -> list[int]:
    """The pool's seeds after ``episode`` episodes (slot order).

    Slot j starts with training seed j; the k-th refresh (after episode
    k * pool_refresh_every) puts seed ``scenes + val_scenes + k - 1`` in slot
    (k - 1) mod scenes, so validation seeds never enter the pool and a resumed run
    rebuilds the same pool.
    """
    seeds = train_seeds(cfg.scenes, cfg.seed_start)
    fresh = cfg.seed_start + cfg.scenes + cfg.val_scenes  # after the validation seeds
    refreshes = episode // cfg.pool_refresh_every if cfg.pool_refresh_every > 0 else 0
    for k in range(refreshes):
        seeds[k % cfg.scenes] = fresh + k
    return seeds


def pool_refresh(cfg: TrainConfig, episode: int) -> tuple[int, int] | None:
    """(slot, seed) replaced once ``episode`` episodes are done, or None."""
    if cfg.pool_refresh_every <= 0 or episode % cfg.pool_refresh_every:
        return None
    k = episode // cfg.pool_refresh_every - 1
    return k % cfg.scenes, pool_seeds(cfg, episode)[k % cfg.scenes]


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = True,
          device: str | None = None, backend: str = "auto",
          progress: Callable[[int, int, dict], None] | None = None) -> Path:
    """Meta-train a G3R model; returns the path of the exported checkpoint.

    Writes into ``out_dir``: ``train_log.jsonl`` (one line per iteration, plus
    validation lines), ``train_state.pt`` (resume point), ``g3r.safetensors`` (the
    model, with the training config and summary in its metadata).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model = G3RModel(cfg.model).to(dev)
    if cfg.init_from is not None:  # fine-tune: same architecture, its weights
        start = load_checkpoint(cfg.init_from)
        if start.model.config != cfg.model:
            raise ValueError(f"{cfg.init_from} has another architecture than the training "
                             f"config ({start.model.config} vs {cfg.model})")
        model.load_state_dict(start.model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state_path = out / "train_state.pt"
    it, episode, elapsed_before, rng = 0, 0, 0.0, random.Random(cfg.seed)
    if resume and state_path.exists():
        # CPU: the RNG state must stay a CPU ByteTensor (set_rng_state rejects a CUDA
        # one); the model and optimizer copy their tensors to their parameters' device.
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if not cfg.same_training(saved["config"]):
            raise ValueError(f"{state_path} was written with other training settings; "
                             "start a new directory or pass the same settings (only "
                             f"{', '.join(cfg.RUN_LENGTH)} may change)")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        it, episode, elapsed_before = saved["iteration"], saved["episode"], saved["elapsed_s"]
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
    seeds = train_seeds(cfg.scenes + cfg.val_scenes, cfg.seed_start)
    val = [build_training_scene(s, cfg, model, dev) for s in seeds[cfg.scenes:]]
    # A resumed run that is already long enough only validates and exports.
    done = it >= cfg.iterations or (cfg.time_budget_s is not None
                                    and elapsed_before >= cfg.time_budget_s)
    pool = [] if done else [build_training_scene(s, cfg, model, dev)
                            for s in pool_seeds(cfg, episode)]
    T_full = cfg.model.steps
    t0 = time.perf_counter()
    log_f = open(out / "train_log.jsonl", "a")

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"config": cfg.to_json(), "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "iteration": it, "episode": episode,
                    "elapsed_s": elapsed(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(state_path)

    last_val = None
    try:
        while pool and it < cfg.iterations:
            if cfg.time_budget_s is not None and elapsed() > cfg.time_budget_s:
                break
            ts = pool[rng.randrange(len(pool))]
            T = cfg.model.turbo_steps if rng.random() < cfg.turbo_fraction else T_full
            K = min(T, cfg.unroll_start + episode // cfg.unroll_every)
            state = ts.h0
            # A fresh split of the source views per episode, as many as the model runs with.
            groups = [ts.source.subset(g) for g in view_groups(
                len(ts.source), cfg.model.lift_groups, seed=rng.randrange(2**31))]
            stop = False
            for t in range(1, K + 1):
                lifted = lift_gradient(ts.scene, state, groups[(t - 1) % len(groups)],
                                       backend=backend)
                new = model.update(state, normalised(lifted.as_state()), ts.graph, t, T)
                loss, stats = step_loss(ts, new, cfg, rng, backend)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                state = new.detach()
                it += 1
                row = {"iter": it, "episode": episode, "seed": ts.seed, "t": t, "T": T,
                       "K": K, "loss": float(loss.detach()), "lift_loss": lifted.loss,
                       "grad_norm": float(gnorm), "elapsed_s": round(elapsed(), 2), **stats}
                if it % cfg.val_every == 0 or it == cfg.iterations:
                    last_val = validate(model, val, T_full, backend)
                    row["val_psnr"] = last_val
                    # Snapshots let ablations compare at equal training time.
                    save_checkpoint(model, out / "snapshots" / f"g3r_{it:06d}.safetensors",
                                    {"iterations": it, "train_s": round(elapsed(), 1),
                                     "val_psnr": last_val})
                log_f.write(json.dumps(row) + "\n")
                log_f.flush()
                if progress is not None:
                    progress(it, cfg.iterations, row)
                if it % cfg.save_every == 0:
                    save_state()
                stop = it >= cfg.iterations or (cfg.time_budget_s is not None
                                                and elapsed() > cfg.time_budget_s)
                if stop:  # mid-episode: a resumed run starts a fresh episode
                    break
            if t == K:  # the episode ran to its end
                episode += 1
                refresh = pool_refresh(cfg, episode)
                if refresh is not None:  # a fresh seed replaces the slot's scene
                    slot, seed = refresh
                    pool[slot] = build_training_scene(seed, cfg, model, dev)
            if stop:
                break
    finally:
        log_f.close()
    save_state()
    if last_val is None and pool:
        last_val = validate(model, val, T_full, backend)
    info = {"train_config": cfg.to_json(), "iterations": it, "episodes": episode,
            "train_s": round(elapsed(), 1), "val_psnr": last_val,
            "train_seeds": [seeds[0], max(max(pool_seeds(cfg, episode)),
                                          seeds[cfg.scenes - 1])],
            "val_seeds": seeds[cfg.scenes:], "device": str(dev),
            "torch": torch.__version__}
    path = out / "g3r.safetensors"
    save_checkpoint(model.cpu(), path, info)
    return path


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    """``cfg`` with the given fields replaced (None values are ignored)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
