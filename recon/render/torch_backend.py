"""Pure-PyTorch Gaussian rasteriser: vectorised, differentiable, CPU and CUDA.

Work scales with the (Gaussian, pixel) pairs a splat actually covers, not N x pixels:

1. Project (``projection.py``) and keep the visible (camera, Gaussian) entries, sorted
   by (camera, depth).
2. Split the image rows of all cameras into chunks of about ``max_pairs_per_chunk``
   pairs (never spanning two cameras), which bounds the memory of one chunk.
3. Per chunk, without autograd: enumerate (Gaussian, row) items inside each splat's
   extent box, and in each row only the pixels whose centres lie inside the ellipse
   where ``o exp(-q/2) >= 1/255`` (an exact scanline span, so almost every enumerated
   pair contributes). Pairs come out Gaussian-major, i.e. front to back; a stable sort
   by pixel keeps that depth order inside each pixel. Transmittance is a segmented
   exclusive cumulative sum of log(1 - alpha) (float64). Pairs at or after the point
   where transmittance would reach 1e-4 are dropped (gsplat's exclusive early stop),
   so nothing behind saturated pixels reaches the backward pass.
4. The surviving pairs are composited by :class:`_CompositePairs`, an autograd Function
   whose backward is the analytic 3DGS compositing gradient evaluated over the same
   pairs with vectorised gathers, segmented suffix sums and ``index_add``; everything
   upstream (projection, colours, depth) is differentiated by autograd. Dropped pairs
   contribute nothing and get zero gradient, as in gsplat.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from recon.render.projection import (
    ALPHA_THRESHOLD,
    MAX_ALPHA,
    MAX_EXTENT_SIGMA,
    TRANSMITTANCE_THRESHOLD,
    Projection,
)

#: Default pair budget of one chunk (~60 bytes of temporaries per pair).
DEFAULT_MAX_PAIRS_PER_CHUNK = 1 << 22

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)
#: Scanline spans are widened by this much (px); the exact alpha test decides.
_SPAN_SLACK = 1e-3


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


class _CompositePairs(torch.autograd.Function):
    """Front-to-back compositing of pre-sorted (Gaussian, pixel) pairs of one chunk.

    Forward: ``out[f, p] = sum_i alpha_i T_i feat[f, g_i]`` over the pairs i of pixel p.
    Backward (per pixel, pairs in depth order, s_i = dL/dout[:, p] . feat[:, g_i]):
    ``dL/dalpha_i = T_i s_i - (sum_{j>i} alpha_j T_j s_j) / (1 - alpha_i)``, then through
    ``alpha = min(0.999, o exp(-sigma))`` (no gradient where clamped) to the means,
    conics and opacities; ``dL/dfeat[f, g] = sum_i alpha_i T_i dL/dout[f, p_i]``.
    """

    @staticmethod
    def forward(ctx, mx: Tensor, my: Tensor, ca: Tensor, cb: Tensor, cc: Tensor,
                op: Tensor, feat: Tensor, g: Tensor, pix: Tensor, alpha: Tensor,
                trans: Tensor, n_pix: int, width: int, row0: int) -> Tensor:
        w = alpha * trans
        out = feat.new_zeros(feat.shape[0], n_pix)
        for f in range(feat.shape[0]):  # loop over channels; each is a 1D gather/add
            out[f].index_add_(0, pix, w * feat[f][g])
        ctx.save_for_backward(mx, my, ca, cb, cc, op, feat, g, pix, alpha, trans)
        ctx.geometry = (n_pix, width, row0)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        mx, my, ca, cb, cc, op, feat, g, pix, alpha, trans = ctx.saved_tensors
        n_pix, width, row0 = ctx.geometry
        V = mx.shape[0]
        w = alpha * trans
        s = torch.zeros_like(alpha)
        grad_feat = None
        if ctx.needs_input_grad[6]:
            grad_feat = torch.zeros_like(feat)
        for f in range(feat.shape[0]):
            go = grad_out[f][pix]
            s += go * feat[f][g]
            if grad_feat is not None:
                grad_feat[f].index_add_(0, g, w * go)
        # Sum over later pairs of the same pixel: segment total minus inclusive prefix.
        ws = (w * s).double()
        cs = torch.cumsum(ws, 0)
        prefix = cs - (cs - ws)[_segment_starts(pix)]
        total = torch.zeros(n_pix, dtype=ws.dtype, device=ws.device).index_add_(0, pix, ws)
        later = (total[pix] - prefix).to(alpha.dtype)
        d_alpha = trans * s - later / (1.0 - alpha)

        py = torch.div(pix, width, rounding_mode="floor")
        px = pix - py * width
        dx = mx[g] - (px.to(mx.dtype) + 0.5)
        dy = my[g] - ((py + row0).to(my.dtype) + 0.5)
        a, b, c = ca[g], cb[g], cc[g]
        vis = torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))
        raw = op[g] * vis
        d_alpha = torch.where(raw <= MAX_ALPHA, d_alpha, torch.zeros_like(d_alpha))
        d_sigma = -d_alpha * raw

        def scatter(values: Tensor) -> Tensor:
            return torch.zeros(V, dtype=values.dtype, device=values.device).index_add_(
                0, g, values)

        grads = (
            scatter(d_sigma * (a * dx + b * dy)),
            scatter(d_sigma * (b * dx + c * dy)),
            scatter(d_sigma * 0.5 * dx * dx),
            scatter(d_sigma * dx * dy),
            scatter(d_sigma * 0.5 * dy * dy),
            scatter(d_alpha * vis),
        )
        return (*grads, grad_feat) + (None,) * 7


def _enumerate_pairs(sel: Tensor, y0: Tensor, y1: Tensor, mx: Tensor, my: Tensor,
                     ca: Tensor, cb: Tensor, cc: Tensor, log_o: Tensor, thr: Tensor,
                     r0: int, r1: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs of the selected Gaussians in rows [r0, r1), Gaussian-major.

    In each (Gaussian, row) item only the scanline span of the ellipse
    ``q <= thr`` (``thr = 2 ln(255 o)`` capped at 3.33^2) is enumerated.

    Returns:
        g [P] visible index, pix [P] int32 pixel index within the chunk, alpha [P]
        (0 where below 1/255).
    """
    device = mx.device
    cy0 = y0[sel].clamp_min(r0)
    heights = y1[sel].clamp_max(r1) - cy0
    R = int(heights.sum())
    item_sel = torch.repeat_interleave(torch.arange(sel.numel(), device=device), heights)
    row_first = torch.cumsum(heights, 0) - heights
    row = cy0[item_sel] + torch.arange(R, device=device) - row_first[item_sel]
    gi = sel[item_sel]
    dy = (row.to(mx.dtype) + 0.5) - my[gi]  # pixel - mean
    a, b, c = ca[gi], cb[gi], cc[gi]
    disc = a * thr[gi] - (a * c - b * b) * dy * dy
    half = torch.sqrt(disc.clamp_min(0)) / a
    centre = mx[gi] - b * dy / a - 0.5  # in pixel-index units
    xlo = torch.ceil(centre - half - _SPAN_SLACK).clamp(0, width).long()
    xhi = torch.floor(centre + half + _SPAN_SLACK).clamp(-1, width - 1).long()
    counts = torch.where(disc > 0, (xhi - xlo + 1).clamp_min(0), torch.zeros_like(xlo))
    P = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts
    item = torch.repeat_interleave(torch.arange(R, device=device), counts)
    local = torch.arange(P, device=device) - first[item]
    pix = (local + ((row - r0) * width + xlo)[item]).to(torch.int32)
    # sigma = dx (a dx / 2 + b dy) + c dy^2 / 2, with per-row terms folded per item;
    # alpha = o exp(-sigma) = exp(-(sigma - ln o)).
    dx = local.to(mx.dtype) + (xlo.to(mx.dtype) + 0.5 - mx[gi])[item]
    sigma = dx * ((0.5 * a)[item] * dx + (b * dy)[item]) + (0.5 * c * dy * dy - log_o[gi])[item]
    alpha = torch.exp(-sigma).clamp_max(MAX_ALPHA)
    alpha = torch.where(alpha >= ALPHA_THRESHOLD, alpha, torch.zeros_like(alpha))
    return gi[item], pix, alpha


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
        max_pairs_per_chunk: pair budget per chunk (bounds temporary memory).

    Returns:
        ([C, H, W, F] composited features without background, stats) where stats
        holds ``pairs_enumerated`` (pairs evaluated), ``pairs_composited``
        (contributing pairs, the work of the backward pass) and ``chunks``.
    """
    C, N = proj.valid.shape
    F = features.shape[-1]
    device = features.device
    dtype = features.dtype

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
        o_vis = opacities.detach()[vn]
        log_o = torch.log(o_vis)
        thr = (2.0 * torch.log(o_vis / ALPHA_THRESHOLD)).clamp(0, MAX_EXTENT_SIGMA**2)

    # Differentiable per-visible columns (1D tensors gather fastest).
    m2 = proj.means2d[vc, vn]
    co = proj.conics[vc, vn]
    mx, my = m2[:, 0].contiguous(), m2[:, 1].contiguous()
    ca, cb, cc = (co[:, k].contiguous() for k in range(3))
    op = opacities[vn]
    feat = features[vc, vn].t().contiguous()  # [F, V]
    cols = [t.detach() for t in (mx, my, ca, cb, cc)]

    out_rows: list[Tensor] = []
    n_enum = 0
    n_comp = 0
    for cam, r0, r1 in chunks:
        n_pix = (r1 - r0) * width
        with torch.no_grad():
            lo, hi = cam_start[cam], cam_start[cam + 1]
            hit = (y0[lo:hi] < r1) & (y1[lo:hi] > r0) & (box_w[lo:hi] > 0)
            sel = lo + hit.nonzero().squeeze(1)
            g, pix, alpha = _enumerate_pairs(sel, y0, y1, *cols, log_o, thr, r0, r1, width)
            n_enum += g.numel()
            # Stable sort by pixel keeps the front-to-back order of the enumeration.
            pix, perm = torch.sort(pix, stable=True)
            g, alpha = g[perm], alpha[perm]
            la = torch.log1p(-alpha).double()
            log_t = _log_transmittance(la, _segment_starts(pix))
            keep = ((log_t + la > _LOG_T_MIN) & (alpha > 0)).nonzero().squeeze(1)
            g, pix, alpha = g[keep], pix[keep].long(), alpha[keep]
            trans = torch.exp(log_t[keep]).to(dtype)
            n_comp += g.numel()
        out_rows.append(_CompositePairs.apply(mx, my, ca, cb, cc, op, feat, g, pix, alpha,
                                              trans, n_pix, width, r0))

    if out_rows:
        image = torch.cat(out_rows, 1)
    else:
        image = torch.zeros(F, C * height * width, dtype=dtype, device=device)
    stats = {"pairs_enumerated": n_enum, "pairs_composited": n_comp, "chunks": len(chunks)}
    return image.t().reshape(C, height, width, F), stats
