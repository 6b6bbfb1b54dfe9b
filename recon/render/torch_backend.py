"""Pure-PyTorch Gaussian rasteriser: vectorised, differentiable through autograd.

Work scales with the (Gaussian, pixel) pairs inside each splat's extent box, not with
N x pixels:

1. Project (``projection.py``) and keep the visible (camera, Gaussian) entries, sorted
   by (camera, depth).
2. Split the image rows of all cameras into chunks of about ``max_pairs_per_chunk``
   box pairs (never spanning two cameras), which bounds the memory of one chunk.
3. Per chunk, without autograd: enumerate the box pairs Gaussian-major (so front to
   back), evaluate alpha, drop alpha < 1/255, stable-sort by pixel (which keeps depth
   order inside each pixel), and get each pair's transmittance from a segmented
   exclusive cumulative sum of log(1 - alpha) (float64). Pairs at or after the point
   where transmittance would fall to 1e-4 are dropped (gsplat's exclusive early stop).
4. With autograd, only the surviving pairs are re-evaluated from the differentiable
   per-Gaussian tensors, and colours, depth and alpha are accumulated with one
   ``index_add``. Dropped pairs contribute nothing and have zero gradient, exactly as
   in gsplat.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from recon.render.projection import (
    ALPHA_THRESHOLD,
    MAX_ALPHA,
    TRANSMITTANCE_THRESHOLD,
    Projection,
)

#: Default box-pair budget of one chunk (~100 bytes of temporaries per pair).
DEFAULT_MAX_PAIRS_PER_CHUNK = 1 << 21

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)


def _segment_starts(keys: Tensor) -> Tensor:
    """For sorted ``keys`` [P], the index of the first element of each element's run."""
    P = keys.numel()
    is_start = torch.ones(P, dtype=torch.bool, device=keys.device)
    if P > 1:
        is_start[1:] = keys[1:] != keys[:-1]
    idx = torch.arange(P, device=keys.device)
    return torch.cummax(torch.where(is_start, idx, torch.zeros_like(idx)), dim=0).values


def _log_transmittance(log1m_alpha: Tensor, starts: Tensor) -> Tensor:
    """Segmented exclusive cumulative sum: log T before each pair, per pixel run.

    Args:
        log1m_alpha: [P] float64 log(1 - alpha), sorted by (pixel, depth).
        starts: [P] index of the first pair of each pair's pixel.
    """
    excl = torch.cumsum(log1m_alpha, 0) - log1m_alpha
    return excl - excl[starts]


def _plan_chunks(cam: Tensor, y0: Tensor, y1: Tensor, box_w: Tensor, n_cams: int,
                 height: int, budget: int) -> list[tuple[int, int, int]]:
    """Split rows into (camera, row_start, row_end) chunks of about ``budget`` box pairs.

    Pairs per row come from a difference array over the rows of all cameras.
    """
    device = cam.device
    rows = n_cams * height
    diff = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    diff.index_add_(0, cam * height + y0, box_w)
    diff.index_add_(0, cam * height + y1, -box_w)
    row_pairs = torch.cumsum(diff[:-1], 0)
    before = torch.cumsum(row_pairs, 0) - row_pairs
    row_cam = torch.arange(rows, device=device) // height
    # Chunk label per row: budget bucket of the pairs before it, split at camera borders.
    label = (before // max(budget, 1)) * (n_cams + 1) + row_cam
    change = torch.ones(rows, dtype=torch.bool, device=device)
    change[1:] = label[1:] != label[:-1]
    starts = change.nonzero().squeeze(1).tolist()
    bounds = starts + [rows]
    out = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        c = s // height
        out.append((c, s - c * height, e - c * height))
    return out


def rasterize_torch(
    proj: Projection,
    opacities: Tensor,
    features: Tensor,
    width: int,
    height: int,
    max_pairs_per_chunk: int = DEFAULT_MAX_PAIRS_PER_CHUNK,
) -> tuple[Tensor, dict[str, int]]:
    """Composite projected Gaussians front to back.

    Args:
        proj: projection of N Gaussians into C cameras.
        opacities: [N]
        features: [C, N, F] per-view features to composite (callers append depth and a
            constant 1 whose composite is the pixel alpha).
        width, height: image size.
        max_pairs_per_chunk: box-pair budget per chunk (bounds temporary memory).

    Returns:
        ([C, H, W, F] composited features without background, stats) where stats
        holds ``pairs_in_boxes`` (evaluated), ``pairs_composited`` (contributing) and
        ``chunks``.
    """
    C, N = proj.valid.shape
    F = features.shape[-1]
    device = features.device
    dtype = features.dtype
    needs_grad = torch.is_grad_enabled() and (
        proj.means2d.requires_grad or proj.conics.requires_grad
        or opacities.requires_grad or features.requires_grad)

    with torch.no_grad():
        vc, vn = proj.valid.nonzero(as_tuple=True)
        # Front to back inside each camera: sort by depth, then stably by camera.
        order = torch.argsort(proj.depths[vc, vn], stable=True)
        order = order[torch.argsort(vc[order], stable=True)]
        vc, vn = vc[order], vn[order]
        m2d = proj.means2d.detach()[vc, vn]
        rad = proj.radii[vc, vn].to(m2d.dtype)
        x0 = torch.floor(m2d[:, 0] - rad[:, 0]).clamp(0, width).long()
        x1 = torch.ceil(m2d[:, 0] + rad[:, 0]).clamp(0, width).long()
        y0 = torch.floor(m2d[:, 1] - rad[:, 1]).clamp(0, height).long()
        y1 = torch.ceil(m2d[:, 1] + rad[:, 1]).clamp(0, height).long()
        box_w = (x1 - x0) * (y1 > y0)
        chunks = _plan_chunks(vc, y0, y1, box_w, C, height, max_pairs_per_chunk)
        cam_start = torch.searchsorted(vc, torch.arange(C + 1, device=device)).tolist()

    # Differentiable per-visible tensors, gathered once for all chunks.
    geo = torch.cat([proj.means2d[vc, vn], proj.conics[vc, vn], opacities[vn, None]], dim=1)
    feat = features[vc, vn]
    geo_d = geo.detach()

    out_rows: list[Tensor] = []
    n_box = 0
    n_comp = 0
    for cam, r0, r1 in chunks:
        n_pix = (r1 - r0) * width
        with torch.no_grad():
            lo, hi = cam_start[cam], cam_start[cam + 1]
            hit = (y0[lo:hi] < r1) & (y1[lo:hi] > r0) & (box_w[lo:hi] > 0)
            sel = lo + hit.nonzero().squeeze(1)
            cy0 = y0[sel].clamp_min(r0)
            cy1 = y1[sel].clamp_max(r1)
            bw = box_w[sel]
            counts = bw * (cy1 - cy0)
            P = int(counts.sum())
            n_box += P
            if P == 0:
                out_rows.append(torch.zeros(n_pix, F, dtype=dtype, device=device))
                continue
            first = torch.cumsum(counts, 0) - counts
            # Gaussian-major enumeration of each box: pair p belongs to local Gaussian pg.
            pg = torch.repeat_interleave(torch.arange(sel.numel(), device=device), counts)
            local = torch.arange(P, device=device) - first[pg]
            bwp = bw[pg]
            px = x0[sel][pg] + local % bwp
            py = cy0[pg] + local // bwp
            g = sel[pg]
            del local, bwp, first, pg
            alpha = _alpha(geo_d[g], px, py)
            keep = alpha >= ALPHA_THRESHOLD
            g, px, py, alpha = g[keep], px[keep], py[keep], alpha[keep]
            pix = ((py - r0) * width + px).to(torch.int32)
            # Stable sort by pixel keeps the front-to-back order of the enumeration.
            pix, perm = torch.sort(pix, stable=True)
            g, px, py, alpha = g[perm], px[perm], py[perm], alpha[perm]
            la = torch.log1p(-alpha.double())
            starts = _segment_starts(pix)
            log_t = _log_transmittance(la, starts)
            alive = (log_t + la) > _LOG_T_MIN
            if not bool(alive.all()):
                g, px, py, pix = g[alive], px[alive], py[alive], pix[alive]
                alpha, log_t = alpha[alive], log_t[alive]
                starts = _segment_starts(pix)
            n_comp += g.numel()
            pix = pix.long()
        if needs_grad:
            # Re-evaluate only the surviving pairs, now with autograd.
            alpha = _alpha(geo[g], px, py)
            log_t = _log_transmittance(torch.log1p(-alpha.double()), starts)
            weight = alpha * torch.exp(log_t).to(dtype)
            contrib = weight[:, None] * feat[g]
        else:
            weight = alpha * torch.exp(log_t).to(dtype)
            contrib = weight[:, None] * feat[g].detach()
        canvas = torch.zeros(n_pix, F, dtype=dtype, device=device)
        out_rows.append(canvas.index_add(0, pix, contrib))

    if out_rows:
        image = torch.cat(out_rows, 0)
    else:
        image = torch.zeros(C * height * width, F, dtype=dtype, device=device)
    stats = {"pairs_in_boxes": n_box, "pairs_composited": n_comp, "chunks": len(chunks)}
    return image.reshape(C, height, width, F), stats


def _alpha(geo: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """alpha = min(0.999, o exp(-q/2)) at pixel centres; 0 where q < 0 (as gsplat skips).

    Args:
        geo: [P, 6] (mean x, mean y, conic a, b, c, opacity) per pair.
        px, py: [P] integer pixel coordinates.
    """
    dx = geo[:, 0] - (px.to(geo.dtype) + 0.5)
    dy = geo[:, 1] - (py.to(geo.dtype) + 0.5)
    sigma = 0.5 * (geo[:, 2] * dx * dx + geo[:, 4] * dy * dy) + geo[:, 3] * dx * dy
    alpha = torch.clamp_max(geo[:, 5] * torch.exp(-sigma), MAX_ALPHA)
    return torch.where(sigma >= 0, alpha, torch.zeros_like(alpha))
