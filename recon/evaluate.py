"""Evaluation protocol (DESIGN.md, Measuring quality).

On held-out (odd) frames of every camera: PSNR and SSIM (mean over images), depth RMSE
and AbsRel against ground-truth z-depth where it exists (pixels with finite ground
truth), PSNR
inside moving-actor masks (per view with at least ``MIN_ACTOR_PIXELS`` masked pixels,
averaged over those views, next to the whole-image PSNR of the same views; the pooled
PSNR over all masked pixels, and per track, are reported too); depth RMSE is also broken
down by ground-truth distance (``DEPTH_RANGES_M``). On lane-shifted ground truth (synthetic
logs): PSNR per shift distance, both directions pooled as the mean over images. LPIPS
needs pretrained weights that are not available here and is not computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from recon.metrics import depth_rmse, psnr, ssim
from recon.neural import NeuralScene
from recon.views import View, heldout_views, render_view, shifted_views
from scenes.geometry import invert_pose
from scenes.log import LogSegment, Track

#: Views whose moving-actor mask is smaller than this give no per-view actor PSNR (a few
#: edge pixels make it noise).
MIN_ACTOR_PIXELS = 50

#: Ground-truth z-depth bins (m) of the depth breakdown: [lo, hi).
DEPTH_RANGES_M = ((0.0, 20.0), (20.0, 40.0), (40.0, math.inf))


def actor_masks(view: View, tracks: list[Track], depth: np.ndarray | None = None,
                tolerance: float = 0.3) -> dict[str, np.ndarray]:
    """Track id -> [H, W] bool: the pixels that show each track at the view's time
    (tracks not observed then are left out).

    Without ground-truth depth this is the box's silhouette. With it, only pixels whose
    ground-truth surface lies inside the box (z-depth between the ray's box entry and
    exit, +- tolerance): the actor itself, not what is seen past it through the
    silhouette, nor what hides it.
    """
    H, W = view.height, view.width
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    rays = np.stack([(u - view.K[0, 2]) / view.K[0, 0], (v - view.K[1, 2]) / view.K[1, 1],
                     np.ones_like(u)], -1).reshape(-1, 3)  # z = 1: t is z-depth
    o_w = view.cam_to_world[:3, 3]
    d_w = rays @ view.cam_to_world[:3, :3].T
    masks = {}
    for tr in tracks:
        if not tr.observed_at(view.timestamp, 0.15):
            continue
        T = invert_pose(tr.pose_at(view.timestamp))
        o = T[:3, :3] @ o_w + T[:3, 3]
        d = d_w @ T[:3, :3].T
        half = tr.size / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
            t1 = (-half - o) * inv
            t2 = (half - o) * inv
        tnear = np.minimum(t1, t2).max(1)
        tfar = np.maximum(t1, t2).min(1)
        hit = (tnear <= tfar) & (tfar > 0)
        if depth is not None:
            gd = depth.reshape(-1)
            hit &= (np.isfinite(gd) & (np.maximum(tnear, 0) - tolerance <= gd)
                    & (gd <= tfar + tolerance))
        masks[tr.id] = hit.reshape(H, W)
    return masks


def actor_mask(view: View, tracks: list[Track], depth: np.ndarray | None = None,
               tolerance: float = 0.3) -> np.ndarray:
    """[H, W] bool: the union of :func:`actor_masks`."""
    mask = np.zeros((view.height, view.width), dtype=bool)
    for m in actor_masks(view, tracks, depth, tolerance).values():
        mask |= m
    return mask


def _render(scene: NeuralScene, view: View, backend: str) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        out = render_view(scene, view, backend=backend)
    return out.rgb[0].clamp(0, 1).cpu(), out.depth[0, ..., 0].cpu()


def evaluate(scene: NeuralScene, log: LogSegment, *, backend: str = "auto",
             max_views: int | None = None, recon_s: float | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Metrics of ``scene`` against the log's held-out views (and shifted ground truth).

    Args:
        max_views: evaluate an evenly spaced subset of at most this many views per set
            (None: all).

    Returns:
        ``{"psnr", "ssim", "psnr_shift": {"1", "2", "3"}, "psnr_actors",
        "psnr_actor_views", "psnr_actors_pooled", "psnr_actors_by_track", "depth_rmse",
        "depth_abs_rel", "depth_rmse_by_range", "recon_s", "views"}``; pieces the log
        cannot provide are None. ``psnr_actors_by_track``: track id -> mean per-view
        PSNR inside that track's own mask; ``depth_rmse_by_range``: "lo-hi" (m) -> RMSE
        of the pixels whose ground truth lies in that range.
    """
    held = _subset(heldout_views(log), max_views)
    shifted = _subset(shifted_views(log), max_views * 2 if max_views else None)
    moving = log.moving_tracks
    total = len(held) + len(shifted)
    done = 0
    psnrs, ssims, sq_err, n_actor, d_err, d_n, d_rel = [], [], 0.0, 0, 0.0, 0, 0.0
    actor_psnrs, actor_view_psnrs = [], []
    by_track: dict[str, list[float]] = {}
    range_err = np.zeros(len(DEPTH_RANGES_M))
    range_n = np.zeros(len(DEPTH_RANGES_M), dtype=np.int64)
    for v in held:
        rgb, depth = _render(scene, v, backend)
        gt = v.target()
        psnrs.append(psnr(rgb, gt))
        ssims.append(float(ssim(rgb, gt)))
        gt_depth = v.depth() if v.depth is not None else None
        if gt_depth is not None:
            valid = torch.from_numpy(np.isfinite(gt_depth))
            if valid.any():
                gt_d = torch.from_numpy(np.nan_to_num(gt_depth, posinf=0.0))
                r = depth_rmse(depth, gt_d, valid)
                d_err += r * r * int(valid.sum())
                d_n += int(valid.sum())
                d_rel += float(((depth[valid] - gt_d[valid]).abs() / gt_d[valid]).sum())
                sq = (depth - gt_d) ** 2
                for k, (lo, hi) in enumerate(DEPTH_RANGES_M):
                    sel = valid & (gt_d >= lo) & (gt_d < hi)
                    range_err[k] += float(sq[sel].sum())
                    range_n[k] += int(sel.sum())
        if moving:
            sq_px = ((rgb - gt) ** 2).mean(-1)  # [H, W]
            per_track = actor_masks(v, moving, gt_depth)
            m = torch.zeros(sq_px.shape, dtype=torch.bool)
            for tid, mt_np in per_track.items():
                mt = torch.from_numpy(mt_np)
                m |= mt
                if int(mt.sum()) >= MIN_ACTOR_PIXELS:
                    e = float(sq_px[mt].mean())
                    by_track.setdefault(tid, []).append(10 * math.log10(1 / max(e, 1e-12)))
            if m.any():
                err = float(sq_px[m].sum())
                sq_err += err
                n_actor += int(m.sum())
                if int(m.sum()) >= MIN_ACTOR_PIXELS:
                    actor_psnrs.append(10 * math.log10(int(m.sum()) / max(err, 1e-12)))
                    actor_view_psnrs.append(psnrs[-1])
        done += 1
        if progress is not None:
            progress(done, total)
    by_shift: dict[str, list[float]] = {}
    for v in shifted:
        rgb, _ = _render(scene, v, backend)
        by_shift.setdefault(f"{abs(v.shift_m):g}", []).append(psnr(rgb, v.target()))
        done += 1
        if progress is not None:
            progress(done, total)
    shifts = log.ground_truth.shifts_m if log.ground_truth is not None else (1.0, 2.0, 3.0)
    return {
        "psnr": _mean(psnrs),
        "ssim": _mean(ssims),
        "psnr_shift": {f"{s:g}": _mean(by_shift.get(f"{s:g}", [])) for s in shifts},
        # Same aggregation as "psnr" (mean of per-view PSNRs), over the views that show a
        # moving actor, and the whole-image PSNR of exactly those views to compare with.
        "psnr_actors": _mean(actor_psnrs),
        "psnr_actor_views": _mean(actor_view_psnrs),
        # All actor pixels of all views pooled into one MSE (weighs the worst views most).
        "psnr_actors_pooled": (10 * math.log10(n_actor / max(sq_err, 1e-12))
                               if n_actor else None),
        "psnr_actors_by_track": ({k: _mean(v) for k, v in sorted(by_track.items())}
                                 if moving else None),
        "depth_rmse": math.sqrt(d_err / d_n) if d_n else None,
        "depth_rmse_by_range": ({_range_name(lo, hi): (math.sqrt(e / n) if n else None)
                                 for (lo, hi), e, n in zip(DEPTH_RANGES_M, range_err, range_n,
                                                           strict=True)}
                                if d_n else None),
        # Mean |pred - gt| / gt: robust to the few far pixels that dominate the RMSE.
        "depth_abs_rel": d_rel / d_n if d_n else None,
        "recon_s": recon_s,
        "views": {"heldout": len(held), "shifted": len(shifted)},
    }


def _subset(views: list[View], n: int | None) -> list[View]:
    if n is None or len(views) <= n:
        return views
    idx = np.linspace(0, len(views) - 1, n).round().astype(int)
    return [views[i] for i in sorted(set(idx.tolist()))]


def _range_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}" if math.isfinite(hi) else f"{lo:g}+"


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None
