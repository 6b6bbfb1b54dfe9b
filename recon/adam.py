"""Per-scene Adam baseline: the reference every quality and speed claim is measured against.

It optimises the same representation (the 14 base channels of every Gaussian's state;
decoders stay the identity) with the standard 3DGS recipe:

| 3DGS parameter  | our channel          | learning rate                               |
|-----------------|----------------------|---------------------------------------------|
| position        | 0:3 offset (m)       | 1.6e-4 x extent, exp. decay to 1.6e-6 x ext. |
| scaling (log)   | 3:6 log scale        | 5e-3                                        |
| rotation        | 6:10 quaternion      | 1e-3                                        |
| colour (SH DC)  | 10:13 colour logit   | 2.5e-3 / (C0 * 0.25) ~ 3.5e-2 (same colour step; |
|                 |                      | the logit's slope at 0.5 is 0.25, SH DC's C0)|
| opacity (logit) | 13 opacity logit     | 5e-2                                        |

Loss: (1 - 0.2) L1 + 0.2 (1 - SSIM) on source views, a batch of views per step.
``extent`` is the radius of the camera centres around their mean times 1.1, as in 3DGS.
Stops after ``iters`` steps or at the first step past ``time_budget_s`` seconds.
Optional densification/pruning follows 3DGS (clone small / split large Gaussians whose
view-space position gradient is high; prune nearly transparent ones), on the static part
and on every actor in its object frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from recon.metrics import ssim
from recon.neural import COLOR, LOG_SCALE, OPACITY, POS, QUAT, NeuralScene
from recon.render.projection import quat_scale_to_matrix
from recon.views import render_view, source_views
from scenes.log import LogSegment

SH_C0 = 0.28209479177387814


@dataclass(frozen=True)
class AdamConfig:
    """Settings of the per-scene Adam baseline (3DGS defaults where they exist)."""

    iters: int = 3000
    time_budget_s: float | None = None
    batch_views: int = 1
    lr_position: float = 1.6e-4
    lr_position_final: float = 1.6e-6
    lr_log_scale: float = 5e-3
    lr_rotation: float = 1e-3
    lr_color: float = 2.5e-3 / (SH_C0 * 0.25)
    lr_opacity: float = 5e-2
    ssim_weight: float = 0.2
    densify: bool = False
    densify_from: int = 300
    densify_until_fraction: float = 0.5
    densify_every: int = 100
    densify_grad_threshold: float = 2e-4  # on NDC-space position gradients, as 3DGS
    prune_opacity: float = 0.005
    max_gaussians: int = 400_000
    seed: int = 0
    backend: str = "auto"
    # Antialiased (Mip-Splatting's 2D filter): actors seen both at 5 m and at 60 m keep
    # one appearance; classic swells their sub-pixel splats when they are far.
    rasterize_mode: str = "antialiased"


@dataclass
class AdamResult:
    iterations: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # from the eval hook


class ChannelAdam:
    """Adam with a learning rate per state channel (one tensor holds all channels)."""

    def __init__(self, params: list[Tensor], lrs: Tensor, betas=(0.9, 0.999),
                 eps: float = 1e-15) -> None:
        self.params = params
        self.lrs = lrs  # [C]
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            lr = self.lrs.to(p.device).view(*([1] * (p.dim() - 1)), -1)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + self.eps))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def replace(self, i: int, new: Tensor, keep: Tensor, n_new: int) -> None:
        """Swap parameter i after densify/prune: moments of kept rows, zeros for new."""
        self.params[i] = new
        for buf in (self.m, self.v):
            old = buf[i][keep]
            buf[i] = torch.cat([old, torch.zeros(n_new, *old.shape[1:], dtype=old.dtype,
                                                 device=old.device)])


def scene_extent(log: LogSegment) -> float:
    centres = np.stack([im.cam_to_world[:3, 3] for f in log.frames for im in f.images.values()])
    return float(np.linalg.norm(centres - centres.mean(0), axis=1).max() * 1.1) or 1.0


def photometric_loss(pred: Tensor, gt: Tensor, ssim_weight: float) -> Tensor:
    """(1 - w) L1 + w (1 - SSIM) of [H, W, 3] images."""
    l1 = (pred - gt).abs().mean()
    return (1 - ssim_weight) * l1 + ssim_weight * (1 - ssim(pred, gt))


def optimise_adam(scene: NeuralScene, log: LogSegment, config: AdamConfig | None = None, *,
                  progress: Callable[[int, int, float], None] | None = None,
                  eval_hook: Callable[[int, float], dict | None] | None = None,
                  eval_every: int = 0, should_stop: Callable[[], bool] | None = None
                  ) -> AdamResult:
    """Optimise ``scene`` in place on the log's source views; the scene takes the
    config's rasterize mode (it is then saved and rendered in that mode).

    Args:
        progress: called as ``progress(step, total, loss)``.
        eval_hook: ``eval_hook(step, elapsed_s)`` every ``eval_every`` steps (and at step 0
            and the end); its dicts form ``result.curve``. Its time is not counted.
        should_stop: polled every step (cancellation).
    """
    cfg = config or AdamConfig()
    scene.rasterize_mode = cfg.rasterize_mode  # validated by the scene
    views = source_views(log)
    if not views:
        raise ValueError(f"log {log.name!r} has no source views (even frames with images)")
    device = scene.static_state.device
    targets = [v.target(device) for v in views]
    extent = scene_extent(log)
    rng = np.random.default_rng(cfg.seed)
    lrs = torch.zeros(scene.channels)
    lrs[POS] = cfg.lr_position * extent
    lrs[LOG_SCALE] = cfg.lr_log_scale
    lrs[QUAT] = cfg.lr_rotation
    lrs[COLOR] = cfg.lr_color
    lrs[OPACITY] = cfg.lr_opacity
    params = [scene.static_state, scene.actor_state, scene.sky_state]
    for d in (scene.static_decoder, scene.actor_decoder, scene.sky_decoder):
        d.requires_grad_(False)
    opt = ChannelAdam(params, lrs)
    densify = _Densifier(scene, cfg, extent) if cfg.densify else None

    result = AdamResult(0, 0.0)
    elapsed = 0.0
    if eval_hook is not None:
        row = eval_hook(0, 0.0)
        if row is not None:
            result.curve.append(row)
    order: list[int] = []
    step = 0
    for step in range(1, cfg.iters + 1):
        t0 = time.perf_counter()
        # Position lr: log-linear decay over the schedule (3DGS).
        u = min(1.0, (step - 1) / max(cfg.iters - 1, 1))
        lrs[POS] = extent * math.exp((1 - u) * math.log(cfg.lr_position)
                                     + u * math.log(cfg.lr_position_final))
        opt.zero_grad()
        total = 0.0
        for _ in range(cfg.batch_views):
            if not order:
                order = list(rng.permutation(len(views)))
            i = order.pop()
            out = render_view(scene, views[i], backend=cfg.backend)
            if densify is not None:
                out.means2d.retain_grad()
            loss = photometric_loss(out.rgb[0], targets[i], cfg.ssim_weight) / cfg.batch_views
            loss.backward()
            total += float(loss.detach())
            if densify is not None:
                densify.accumulate(out, views[i].timestamp)
        opt.step()
        if densify is not None:
            densify.maybe_densify(step, opt)
        elapsed += time.perf_counter() - t0
        result.losses.append(total)
        if progress is not None:
            progress(step, cfg.iters, total)
        if eval_hook is not None and eval_every and step % eval_every == 0:
            row = eval_hook(step, elapsed)
            if row is not None:
                result.curve.append(row)
        if cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s:
            break
        if should_stop is not None and should_stop():
            break
    result.iterations = step
    result.seconds = elapsed
    if eval_hook is not None and (not eval_every or step % eval_every):
        row = eval_hook(step, elapsed)
        if row is not None:
            result.curve.append(row)
    return result


def sample_offsets(quats: Tensor, scales: Tensor) -> Tensor:
    """One sample per Gaussian from N(0, R diag(s)^2 R^T), its own covariance: [N, 3].

    Args:
        quats: [N, 4] (w, x, y, z); scales: [N, 3] standard deviations (m).
    """
    M = quat_scale_to_matrix(quats, scales)  # [N, 3, 3]
    return (M @ torch.randn(len(M), 3, 1, device=M.device, dtype=M.dtype)).squeeze(-1)


class _Densifier:
    """3DGS adaptive density control on the static part and on every actor (each in its
    own object frame); the sky grid keeps its fixed layout.

    Per Gaussian it averages the view-space position gradient over the views that drew it;
    every ``densify_every`` steps, hot small Gaussians are cloned, hot large ones split in
    two samples of their own covariance (scales / 1.6), nearly transparent ones pruned.
    """

    def __init__(self, scene: NeuralScene, cfg: AdamConfig, extent: float) -> None:
        self.scene = scene
        self.cfg = cfg
        self.extent = extent
        self._reset()

    def _reset(self) -> None:
        dev = self.scene.static_state.device
        n = self.scene.static_state.shape[0] + self.scene.actor_state.shape[0]
        self.grad_sum = torch.zeros(n, device=dev)  # static rows, then actor rows
        self.count = torch.zeros(n, device=dev)
        self._rows: dict[float, Tensor] = {}  # view time -> its rendered rows' state rows

    def _rendered_rows(self, t: float, device: torch.device) -> Tensor:
        """State rows of the splats rendered at time t: static, then visible actors."""
        if t not in self._rows:
            scene = self.scene
            _, visible = scene.actor_poses(t)
            actors = visible.to(device)[scene.actor_index].nonzero().squeeze(1)
            self._rows[t] = torch.cat([torch.arange(scene.static_state.shape[0],
                                                    device=device),
                                       scene.static_state.shape[0] + actors])
        return self._rows[t]

    def accumulate(self, out, t: float) -> None:
        """Add the view-space gradients of a view rendered at time ``t``."""
        g = out.means2d.grad
        if g is None:
            return
        rows = self._rendered_rows(t, g.device)
        n = len(rows)
        vis = out.visible[0, :n]
        # 3DGS thresholds the gradient w.r.t. NDC positions: d/d(ndc) = d/d(px) * size / 2.
        H, W = out.rgb.shape[1:3]
        norm = (g[0, :n] * g.new_tensor([W / 2, H / 2])).norm(dim=-1)
        self.grad_sum.index_add_(0, rows[vis], norm[vis])
        self.count.index_add_(0, rows[vis], torch.ones_like(norm[vis]))

    @torch.no_grad()
    def maybe_densify(self, step: int, opt: ChannelAdam) -> None:
        cfg = self.cfg
        if step < cfg.densify_from or step > cfg.densify_until_fraction * cfg.iters or \
                step % cfg.densify_every:
            return
        scene = self.scene
        ns = scene.static_state.shape[0]
        avg = self.grad_sum / self.count.clamp_min(1)
        room = max(0, cfg.max_gaussians - ns - scene.actor_state.shape[0])
        if scene.actor_state.shape[0]:  # actors first: they are few, and would starve
            state, anchors, index, room = self._part(
                scene.actor_state.data, scene.actor_anchors, scene.actor_index, avg[ns:],
                scene.actor_decoder, opt, 1, room)
            # Keep actors contiguous in id order (NeuralScene.splats relies on it).
            order = torch.argsort(index, stable=True)
            scene.actor_anchors, scene.actor_index = anchors[order], index[order]
            scene.actor_state = torch.nn.Parameter(state[order])
            opt.params[1] = scene.actor_state
            opt.m[1], opt.v[1] = opt.m[1][order], opt.v[1][order]
        static_state, static_anchors, _, _ = self._part(
            scene.static_state.data, scene.static_anchors, None, avg[:ns], scene.static_decoder,
            opt, 0, room)
        scene.static_anchors = static_anchors
        scene.static_state = torch.nn.Parameter(static_state)
        opt.params[0] = scene.static_state
        self._reset()

    def _part(self, h: Tensor, anchors: Tensor, index: Tensor | None, avg: Tensor, decoder,
              opt: ChannelAdam, i: int, room: int
              ) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """Clone / split / prune one part; returns its new state, anchors, actor index
        and the Gaussians still allowed (``room``)."""
        cfg = self.cfg
        scales = h[:, LOG_SCALE].exp().max(1).values
        opacity = torch.sigmoid(h[:, OPACITY]).squeeze(1)
        big = scales > 0.01 * self.extent  # 3DGS percent_dense
        hot = avg > cfg.densify_grad_threshold
        clone = (hot & ~big).nonzero().squeeze(1)[:room]
        split = (hot & big).nonzero().squeeze(1)[:max(0, room - len(clone))]
        keep = (opacity > cfg.prune_opacity) & ~torch.zeros_like(hot).index_fill_(0, split, True)
        new_h, new_a = [h[keep]], [anchors[keep]]
        new_i = [index[keep]] if index is not None else []
        if len(clone):
            hc = h[clone].clone()
            new_a.append(anchors[clone] + hc[:, POS])
            hc[:, POS] = 0.0
            new_h.append(hc)
            new_i += [index[clone]] if index is not None else []
        if len(split):
            hs = h[split].repeat(2, 1)
            g = decoder(hs)  # two samples from each split Gaussian
            offset = sample_offsets(g[:, QUAT], g[:, LOG_SCALE].exp())
            new_a.append(anchors[split].repeat(2, 1) + g[:, POS] + offset)
            hs[:, POS] = 0.0
            hs[:, LOG_SCALE] -= math.log(1.6)
            new_h.append(hs)
            new_i += [index[split].repeat(2)] if index is not None else []
        state = torch.cat(new_h)
        n_new = len(state) - int(keep.sum())
        opt.replace(i, state, keep, n_new)
        return (state, torch.cat(new_a), torch.cat(new_i) if index is not None else None,
                room - len(clone) - len(split))
