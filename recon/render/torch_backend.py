"""Pure-PyTorch Gaussian rasteriser: vectorised, differentiable, CPU and CUDA.

Work scales with the (Gaussian, pixel) pairs that actually contribute, not N x pixels:

1. Project (``projection.py``) and keep the visible (camera, Gaussian) entries, sorted
   by (camera, depth), once.
2. Per camera, list the (Gaussian, row) *items* inside each splat's extent box and each
   item's exact scanline span of the ellipse where ``o exp(-q/2) >= 1/255``. Items come
   out Gaussian-major, i.e. front to back.
3. Walk the items front to back in *depth batches* of about ``max_pairs_per_chunk``
   pairs, keeping a per-pixel log transmittance. Pixels that can no longer accept a
   sample (gsplat's exclusive stop at T < 1e-4) are dropped from the list of live
   pixels, and a batch enumerates only the live pixels of each span, so pixels behind
   saturated ones cost nothing. Inside a batch a stable sort by pixel keeps the depth
   order; the transmittance is a segmented exclusive sum of log(1 - alpha) (float64)
   started from the pixel's value after the previous batches.
4. Compositing and its gradient are one autograd Function per camera
   (:class:`_CompositeCamera`): the forward is a CSR sparse-dense product
   ``[pixels x Gaussians] @ features``; the backward walks the batches back to front
   with a per-pixel suffix sum, sums the geometry gradient per item as moments
   (sum d_sigma [1, dx, dx^2]) and folds items into per-Gaussian gradients.
   Everything upstream (projection, colours, depth) is differentiated by autograd.
   Dropped pairs contribute nothing and get zero gradient, as in gsplat.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from recon.render.projection import (
    ALPHA_THRESHOLD,
    MAX_ALPHA,
    MAX_EXTENT_SIGMA,
    TRANSMITTANCE_THRESHOLD,
    Projection,
)

#: Default pair budget of one depth batch (~40 bytes kept per pair for the backward;
#: small batches also keep the temporaries in cache).
DEFAULT_MAX_PAIRS_PER_CHUNK = 1 << 17

_LOG_T_MIN = math.log(TRANSMITTANCE_THRESHOLD)
#: A pixel whose log T is at or below this can accept no further sample: every sample
#: has alpha >= 1/255, so log(1 - alpha) <= log(1 - 1/255) (shrunk by 1e-4 for rounding).
_LOG_T_DEAD = _LOG_T_MIN - math.log1p(-ALPHA_THRESHOLD) * (1.0 - 1e-4)
#: Scanline spans are widened by this much (px); the exact alpha test decides.
_SPAN_SLACK = 1e-3


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix (sparse-dense products are the fast segmented sums on CPU)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _pad_cumsum(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """[P] -> [P + 1] inclusive cumulative sum with a leading 0, accumulated in ``dtype``."""
    out = x.new_empty(x.numel() + 1, dtype=dtype or x.dtype)
    out[0] = 0
    torch.cumsum(x, 0, dtype=out.dtype, out=out[1:])
    return out


@dataclass
class _Items:
    """(Gaussian, row) items of one camera, Gaussian-major (front to back).

    Attributes (all [R]):
        g: camera-local visible index (int32).
        dy: pixel-centre y minus mean y.
        h: 0.5 - mean x, so that dx = column + h (pixel centre minus mean).
        qa, qb, qc: sigma - ln o = dx (qa dx + qb) + qc with the row's terms folded.
        lo, hi: flat pixel indices of the span's first pixel and one past its last.
        span: pixels in the span (0 if the row misses the ellipse).
    """

    g: Tensor
    dy: Tensor
    h: Tensor
    qa: Tensor
    qb: Tensor
    qc: Tensor
    lo: Tensor
    hi: Tensor
    span: Tensor


def _camera_items(mx: Tensor, my: Tensor, ca: Tensor, cb: Tensor, cc: Tensor,
                  log_o: Tensor, thr: Tensor, y0: Tensor, y1: Tensor, width: int) -> _Items:
    """Items of one camera's visible Gaussians [V] (no grad), empty spans removed."""
    device = mx.device
    heights = (y1 - y0).clamp_min(0)
    R = int(heights.sum())
    g = torch.repeat_interleave(torch.arange(mx.numel(), device=device), heights)
    row_first = torch.cumsum(heights, 0) - heights
    row = y0[g] + torch.arange(R, device=device) - row_first[g]
    dy = (row.to(mx.dtype) + 0.5) - my[g]
    a, b, c = ca[g], cb[g], cc[g]
    disc = a * thr[g] - (a * c - b * b) * dy * dy
    half = torch.sqrt(disc.clamp_min(0)) / a
    centre = mx[g] - b * dy / a - 0.5  # in pixel-index units
    xlo = torch.ceil(centre - half - _SPAN_SLACK).clamp(0, width).long()
    xhi = torch.floor(centre + half + _SPAN_SLACK).clamp(-1, width - 1).long()
    span = torch.where(disc > 0, (xhi - xlo + 1).clamp_min(0), torch.zeros_like(xlo))
    nz = (span > 0).nonzero().squeeze(1)
    g, row, dy, a, b, c = g[nz], row[nz], dy[nz], a[nz], b[nz], c[nz]
    lo = row * width + xlo[nz]
    return _Items(g=g.to(torch.int32), dy=dy, h=0.5 - mx[g], qa=0.5 * a, qb=b * dy,
                  qc=0.5 * c * dy * dy - log_o[g], lo=lo, hi=lo + span[nz], span=span[nz])


@dataclass
class _Batch:
    """Pairs of one depth batch, kept for the backward. P pairs, I items, n_pix pixels.

    Pixel order (sorted by pixel, depth order inside a pixel): ``crow`` [n_pix + 1]
    int32 CSR row offsets, ``pix`` [P] int32, ``g`` [P] int32 camera-local Gaussian,
    ``w`` [P] alpha T, ``trans`` [P] T, ``raw`` [P] o exp(-sigma) where the pair
    contributes with an unclamped alpha, else 0 (no alpha gradient), ``perm`` [P]
    enumeration index of each pixel-ordered pair. Enumeration order (item-major):
    ``pix_e`` [P] int32, ``dx`` [P] pixel centre minus mean x. Items: ``item_g``,
    ``item_dy``, ``count`` [I] pairs per item.
    """

    crow: Tensor
    pix: Tensor
    g: Tensor
    w: Tensor
    trans: Tensor
    raw: Tensor
    perm: Tensor
    pix_e: Tensor
    dx: Tensor
    item_g: Tensor
    item_dy: Tensor
    count: Tensor


def _render_batches(items: _Items, featT: Tensor, n_pix: int, width: int, budget: int,
                    stats: dict[str, int], save: bool) -> tuple[Tensor, list[_Batch]]:
    """Front-to-back compositing of one camera's items (no grad).

    Args:
        items: the camera's items.
        featT: [V, F] camera-local features.
        n_pix: H * W.
        save: keep what the backward needs.

    Returns:
        ([n_pix, F] composite, the batches (empty unless ``save``)).
    """
    device, dtype = featT.device, featT.dtype
    V = featT.shape[0]
    R = items.g.numel()
    log_t = torch.zeros(n_pix, dtype=torch.float64, device=device)
    image = featT.new_zeros(n_pix, featT.shape[1])
    span_cum = torch.cumsum(items.span, 0)
    batches: list[_Batch] = []
    live_pix = torch.arange(n_pix, device=device, dtype=torch.int32)
    live_before = torch.arange(n_pix + 1, device=device)  # live pixels before each pixel
    live_col = (live_pix % width).to(dtype)  # their image columns
    widen = 1.0
    i0 = 0
    while i0 < R:
        # Window of items whose spans hold about budget * widen pairs, then cut it where
        # the *live* pairs reach the budget (at least one item).
        done = int(span_cum[i0 - 1]) if i0 > 0 else 0
        j = int(torch.searchsorted(span_cum, done + int(budget * widen), right=True))
        j = min(max(j, i0 + 1), R)
        count_w = live_before[items.hi[i0:j]] - live_before[items.lo[i0:j]]
        cum = torch.cumsum(count_w, 0)
        k = max(int(torch.searchsorted(cum, budget, right=True)), 1)
        i1 = i0 + k
        span_w = int(span_cum[j - 1]) - done
        widen = min(max(span_w / max(int(cum[-1]), 1), 1.0), 64.0)
        count = count_w[:k]
        sl = slice(i0, i1)
        i0 = i1
        P = int(cum[k - 1])
        if P == 0:
            continue
        # Enumerate live pixels of each span: pair -> item, -> index into the live list.
        I = count.numel()
        item = torch.repeat_interleave(torch.arange(I, device=device), count, output_size=P)
        off = live_before[items.lo[sl]] - (cum[:k] - count)
        pos = torch.arange(P, device=device).add_(off.index_select(0, item))
        pix_e = live_pix.index_select(0, pos)
        dx = live_col.index_select(0, pos).add_(items.h[sl].index_select(0, item))
        sigma = items.qa[sl].index_select(0, item).mul_(dx)
        sigma.add_(items.qb[sl].index_select(0, item)).mul_(dx)
        raw_e = sigma.add_(items.qc[sl].index_select(0, item)).neg_().exp_()
        # Stable sort by pixel keeps the depth order of the enumeration.
        pix, perm = torch.sort(pix_e, stable=True)
        raw = raw_e.index_select(0, perm)
        alpha = raw.clamp_max(MAX_ALPHA)
        valid = alpha >= ALPHA_THRESHOLD
        alpha.mul_(valid)
        crow = _pad_cumsum(torch.bincount(pix, minlength=n_pix)).to(torch.int32)
        cs = _pad_cumsum(torch.log1p(alpha.neg()), torch.float64)
        start = cs.index_select(0, crow[:-1])
        # log T per pair: previous batches + earlier pairs of this pixel in this batch.
        base = (log_t - start).index_select(0, pix)
        keep = torch.add(cs[1:], base) > _LOG_T_MIN  # inclusive: T after the pair
        keep &= valid
        log_t += cs.index_select(0, crow[1:]) - start
        trans = base.add_(cs[:-1]).to(dtype).exp_().mul_(keep)
        w = alpha * trans
        g_items = items.g[sl]
        g = g_items.index_select(0, item).index_select(0, perm)
        image.addmm_(_csr(crow, g, w, (n_pix, V)), featT)
        stats["pairs_enumerated"] += P
        stats["pairs_composited"] += int(keep.count_nonzero())
        stats["chunks"] += 1
        if save:
            # Where alpha is clamped at 0.999 (or the pair does not count) no gradient.
            keep &= raw <= MAX_ALPHA
            batches.append(_Batch(crow=crow, pix=pix, g=g, w=w, trans=trans,
                                  raw=raw.mul_(keep), perm=perm, pix_e=pix_e, dx=dx,
                                  item_g=g_items, item_dy=items.dy[sl], count=count))
        if i0 < R:
            live = log_t > _LOG_T_DEAD
            live_pix = live.nonzero().squeeze(1).to(torch.int32)
            live_col = (live_pix % width).to(dtype)
            live_before = _pad_cumsum(live.long())
    return image, batches


class _CompositeCamera(torch.autograd.Function):
    """Front-to-back compositing of one camera's Gaussians.

    Forward: ``out[p] = sum_i alpha_i T_i feat[g_i]`` over the pairs i of pixel p.
    Backward (per pixel, pairs in depth order, s_i = dL/dout[p] . feat[g_i]):
    ``dL/dalpha_i = T_i s_i - (sum_{j>i} alpha_j T_j s_j) / (1 - alpha_i)``, then through
    ``alpha = min(0.999, o exp(-sigma))`` (no gradient where clamped) to the means,
    conics and opacities; ``dL/dfeat[g] = sum_i alpha_i T_i dL/dout[p_i]``.
    """

    @staticmethod
    def forward(ctx, mx: Tensor, my: Tensor, ca: Tensor, cb: Tensor, cc: Tensor,
                op: Tensor, feat: Tensor, items: _Items, n_pix: int, width: int,
                budget: int, stats: dict[str, int], save: bool) -> Tensor:
        image, batches = _render_batches(items, feat, n_pix, width, budget, stats, save)
        ctx.save_for_backward(ca, cb, cc, op, feat)
        ctx.batches = batches
        return image

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        ca, cb, cc, op, feat = ctx.saved_tensors
        batches: list[_Batch] = ctx.batches
        V, F = feat.shape
        n_pix = grad_out.shape[0]
        grad_out = grad_out.contiguous()
        device, dtype = feat.device, feat.dtype
        grad_feat = torch.zeros_like(feat)
        mom = torch.zeros(6, V, dtype=dtype, device=device)  # S0, Sx, Sy, Sxx, Sxy, Syy
        later_carry = torch.zeros(n_pix, dtype=torch.float64, device=device)
        # Channels without gradient (e.g. depth when the loss ignores it) cost nothing.
        go_t = grad_out.t().contiguous()  # [F, n_pix]
        feat_t = feat.t().contiguous()  # [F, V]
        live_f = go_t.ne(0).any(1).nonzero().squeeze(1).tolist()
        for b in reversed(batches):
            P = b.w.numel()
            s = torch.zeros_like(b.w)
            for f in live_f:
                s.addcmul_(go_t[f].index_select(0, b.pix), feat_t[f].index_select(0, b.g))
            # Sum over later pairs of the pixel: later batches + the rest of this one.
            cs = _pad_cumsum(b.w * s, torch.float64)
            end = cs.index_select(0, b.crow[1:])
            later = (later_carry + end).index_select(0, b.pix).sub_(cs[1:])
            later_carry += end - cs.index_select(0, b.crow[:-1])
            # d_sigma = -raw dL/dalpha = raw (later / (1 - alpha) - T s)
            d_sigma = later.to(dtype).div_(torch.rsub(b.raw, 1.0)).sub_(b.trans * s).mul_(b.raw)
            # Back to enumeration order: items are contiguous there.
            d_sigma_e = torch.empty_like(d_sigma).index_copy_(0, b.perm, d_sigma)
            I = b.count.numel()
            rhs = torch.stack([torch.ones_like(b.dx), b.dx, b.dx * b.dx], 1)
            per_item = _csr(_pad_cumsum(b.count), torch.arange(P, device=device), d_sigma_e,
                            (I, P)) @ rhs  # [I, 3]: sum d_sigma [1, dx, dx^2]
            s0, sx, sxx = per_item.unbind(1)
            dy = b.item_dy
            for k, v in enumerate((s0, sx, s0 * dy, sxx, sx * dy, s0 * dy * dy)):
                mom[k].index_add_(0, b.item_g, v)
            if live_f:
                w_e = torch.empty_like(b.w).index_copy_(0, b.perm, b.w)
                g_count = torch.zeros(V, dtype=torch.long, device=device).index_add_(
                    0, b.item_g, b.count)
                g_crow = _pad_cumsum(g_count).to(torch.int32)
                grad_feat += _csr(g_crow, b.pix_e, w_e, (V, n_pix)) @ grad_out
        s0, sx, sy, sxx, sxy, syy = mom.unbind(0)
        # sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2 with dx = pixel - mean.
        grads = (-(ca * sx + cb * sy), -(cb * sx + cc * sy), 0.5 * sxx, sxy, 0.5 * syy,
                 -s0 / op)
        return (*grads, grad_feat) + (None,) * 6


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
        opacities: [N], or [C, N] per view (the antialiased mode's compensated ones)
        features: [C, N, F] per-view features to composite (callers append depth and a
            constant 1 whose composite is the pixel alpha).
        width, height: image size.
        max_pairs_per_chunk: pair budget per depth batch (bounds temporary memory).

    Returns:
        ([C, H, W, F] composited features without background, stats) where stats
        holds ``pairs_enumerated`` (pairs evaluated), ``pairs_composited``
        (contributing pairs, the work of the backward pass) and ``chunks`` (depth
        batches).
    """
    C, N = proj.valid.shape
    F = features.shape[-1]
    device = features.device
    dtype = features.dtype
    n_pix = height * width

    with torch.no_grad():
        vc, vn = proj.valid.nonzero(as_tuple=True)
        # Front to back inside each camera: sort by depth, then stably by camera.
        order = torch.argsort(proj.depths[vc, vn], stable=True)
        order = order[torch.argsort(vc[order], stable=True)]
        vc, vn = vc[order], vn[order]
        m2d = proj.means2d.detach()[vc, vn]
        rad = proj.radii[vc, vn].to(m2d.dtype)
        y0 = torch.floor(m2d[:, 1] - rad[:, 1]).clamp(0, height).long()
        y1 = torch.ceil(m2d[:, 1] + rad[:, 1]).clamp(0, height).long()
        cam_start = torch.searchsorted(vc, torch.arange(C + 1, device=device)).tolist()
        o_vis = (opacities.detach()[vc, vn] if opacities.dim() == 2 else
                 opacities.detach()[vn])
        log_o = torch.log(o_vis)
        thr = (2.0 * torch.log(o_vis / ALPHA_THRESHOLD)).clamp(0, MAX_EXTENT_SIGMA**2)

    # Differentiable per-visible columns (1D tensors gather fastest).
    m2 = proj.means2d[vc, vn]
    co = proj.conics[vc, vn]
    mx, my = m2[:, 0].contiguous(), m2[:, 1].contiguous()
    ca, cb, cc = (co[:, k].contiguous() for k in range(3))
    op = opacities[vc, vn] if opacities.dim() == 2 else opacities[vn]
    feat = features[vc, vn]  # [V, F]

    # Keep per-pair state for the backward only when one can follow.
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (proj.means2d, proj.conics, opacities, features))
    stats = {"pairs_enumerated": 0, "pairs_composited": 0, "chunks": 0}
    images = []
    for cam in range(C):
        lo, hi = cam_start[cam], cam_start[cam + 1]
        if hi == lo:
            images.append(feat.new_zeros(n_pix, F))
            continue
        cols = [t[lo:hi] for t in (mx, my, ca, cb, cc, op)]
        with torch.no_grad():
            items = _camera_items(*(t.detach() for t in cols[:5]), log_o[lo:hi],
                                  thr[lo:hi], y0[lo:hi], y1[lo:hi], width)
        images.append(_CompositeCamera.apply(*cols, feat[lo:hi].contiguous(), items, n_pix,
                                             width, max_pairs_per_chunk, stats, save))
    image = torch.stack(images) if images else feat.new_zeros(0, n_pix, F)
    return image.reshape(C, height, width, F).to(dtype), stats
