"""Gaussians seeded from a log's LiDAR points (the static-scene part of initialisation).

``gaussians_from_lidar(log, budget)``:

1. aggregate every sweep in the world frame (each point remembers its frame);
2. voxel-downsample to at most ``budget`` points: the finest voxel size whose occupied
   voxel count reaches the budget (bisection on a log scale), one centroid per voxel,
   then a seeded random subset when there are still too many;
3. scale: isotropic, the RMS distance to the 3 nearest neighbours, found through a
   voxel hash (each voxel holds at most one centroid, so looking at the 26 neighbouring
   voxels is enough and costs O(points); no scipy, no N x N distances);
4. colour: the pixel under the point in the nearest camera image (by distance to the
   camera centre) that sees it, preferring images of the point's own frame so that
   moving things take colours from the right time; grey where no camera sees it.
   Occlusion is not tested;
5. identity rotations, opacity 0.7.

Actor/static splitting and sky seeding belong to the full initialisation
(``recon/init.py``), which builds on these pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from scenes.geometry import invert_pose
from scenes.log import LogSegment

#: Opacity given to every seeded Gaussian.
INIT_OPACITY = 0.7
#: Colour of points that no camera sees.
UNSEEN_COLOR = 0.5
#: Nearest neighbours averaged for the scale.
SCALE_NEIGHBOURS = 3


@dataclass
class PointGaussians:
    """Gaussians in the world frame, in :func:`recon.render.rasterize`'s layout.

    Attributes:
        means: [N, 3] float32 positions (m).
        quats: [N, 4] float32 (w, x, y, z).
        scales: [N, 3] float32 standard deviations (m).
        opacities: [N] float32.
        colors: [N, 3] float32 RGB in [0, 1].
        voxel_size: voxel edge (m) used for the downsampling.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor
    voxel_size: float

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def to(self, device: torch.device | str) -> PointGaussians:
        return PointGaussians(*(getattr(self, f.name).to(device) for f in fields(self)
                                if f.name != "voxel_size"), voxel_size=self.voxel_size)

    def index(self, idx: Tensor) -> PointGaussians:
        return PointGaussians(self.means[idx], self.quats[idx], self.scales[idx],
                              self.opacities[idx], self.colors[idx], self.voxel_size)


def aggregate_sweeps(log: LogSegment) -> tuple[Tensor, Tensor]:
    """All LiDAR points of the log in the world frame.

    Returns:
        points [P, 3] float32 and frame [P] int64 (position of the sweep's frame in
        ``log.frames``).
    """
    pts, frame = [], []
    for i, f in enumerate(log.frames):
        if not f.has_lidar:
            continue
        p = np.asarray(f.lidar().points, dtype=np.float32)
        pts.append(torch.from_numpy(p))
        frame.append(torch.full((len(p),), i, dtype=torch.int64))
    if not pts:
        raise ValueError(f"log {log.name!r} has no LiDAR sweeps to seed Gaussians from")
    return torch.cat(pts), torch.cat(frame)


def _voxel_ids(points: Tensor, size: float) -> tuple[Tensor, Tensor]:
    """(unique voxel count, inverse index) of points on a grid of edge ``size``."""
    ijk = torch.floor(points / size).long()
    ijk -= ijk.min(0).values
    dims = ijk.max(0).values + 1
    key = (ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]
    uniq, inverse = torch.unique(key, return_inverse=True)
    return uniq.numel(), inverse


def voxel_downsample(points: Tensor, frame: Tensor, budget: int, *, seed: int = 0,
                     min_voxel: float = 0.01, max_voxel: float = 20.0,
                     ) -> tuple[Tensor, Tensor, float]:
    """At most ``budget`` voxel centroids (and each voxel's latest frame).

    Returns:
        centroids [M, 3], frame [M], voxel size (m); M = min(budget, voxels at
        ``min_voxel``).
    """
    lo, hi = math.log(min_voxel), math.log(max_voxel)
    if _voxel_ids(points, min_voxel)[0] <= budget:
        size = min_voxel
    else:
        # Invariant: count(exp(lo)) > budget >= count(exp(hi)).
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            if _voxel_ids(points, math.exp(mid))[0] > budget:
                lo = mid
            else:
                hi = mid
        size = math.exp(lo)  # finest size with at least the budget: subsample below
    m, inverse = _voxel_ids(points, size)
    sums = torch.zeros(m, 3, dtype=torch.float64).index_add_(0, inverse, points.double())
    counts = torch.bincount(inverse, minlength=m).double()
    centroids = (sums / counts[:, None]).float()
    last = torch.full((m,), -1, dtype=torch.int64).scatter_reduce_(0, inverse, frame, "amax")
    if m > budget:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(m, generator=g)[:budget].sort().values
        centroids, last = centroids[keep], last[keep]
    return centroids, last, size


def neighbour_scales(points: Tensor, voxel_size: float, k: int = SCALE_NEIGHBOURS) -> Tensor:
    """RMS distance to the ``k`` nearest neighbours among the 26 adjacent voxels.

    Assumes at most one point per voxel of edge ``voxel_size`` (true for the output of
    :func:`voxel_downsample`). A point with no neighbour there gets ``voxel_size``.

    Returns:
        [P] float32
    """
    ijk = torch.floor(points / voxel_size).long()
    ijk -= ijk.min(0).values - 1  # margin so that -1 offsets stay non-negative
    dims = ijk.max(0).values + 2
    def encode(v: Tensor) -> Tensor:
        return (v[..., 0] * dims[1] + v[..., 1]) * dims[2] + v[..., 2]
    key = encode(ijk)
    skey, order = torch.sort(key)
    offsets = torch.tensor([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1)
                            for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)])
    d2 = torch.full((len(points), len(offsets)), math.inf)
    for j, off in enumerate(offsets):  # 26 vectorised lookups
        q = encode(ijk + off)
        pos = torch.searchsorted(skey, q).clamp_max(len(skey) - 1)
        found = skey[pos] == q
        nb = order[pos]
        dist = ((points[nb] - points) ** 2).sum(-1)
        d2[:, j] = torch.where(found, dist, d2[:, j])
    nearest = torch.topk(d2, k, dim=1, largest=False).values
    finite = torch.isfinite(nearest)
    n = finite.sum(1)
    mean = torch.where(finite, nearest, 0.0).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, mean.sqrt(), torch.full_like(mean, voxel_size)).float()


def nearest_camera_colors(log: LogSegment, points: Tensor, frame: Tensor,
                          chunk: int = 4096) -> Tensor:
    """RGB [P, 3] in [0, 1] from the nearest image that sees each point.

    Images of the point's own frame win over any other; among those, the camera
    centre closest to the point. Points no image sees get grey.
    """
    views = [(fi, im) for fi, f in enumerate(log.frames) for im in f.images.values()]
    P = len(points)
    colors = torch.full((P, 3), UNSEEN_COLOR)
    if not views:
        return colors
    w2c = torch.tensor(np.stack([invert_pose(im.cam_to_world) for _, im in views]),
                       dtype=torch.float64)
    Ks = torch.tensor(np.stack([log.cameras[im.camera].K for _, im in views]),
                      dtype=torch.float64)
    sizes = torch.tensor([(log.cameras[im.camera].width, log.cameras[im.camera].height)
                          for _, im in views], dtype=torch.float64)
    centres = torch.tensor(np.stack([im.cam_to_world[:3, 3] for _, im in views]),
                           dtype=torch.float64)
    view_frame = torch.tensor([fi for fi, _ in views])
    best = torch.full((P,), -1, dtype=torch.int64)
    best_uv = torch.zeros(P, 2, dtype=torch.int64)
    for s in range(0, P, chunk):
        p = points[s:s + chunk].double()
        pc = torch.einsum("mij,pj->pmi", w2c[:, :3, :3], p) + w2c[:, :3, 3]  # [p, M, 3]
        z = pc[..., 2]
        uv = torch.einsum("mij,pmj->pmi", Ks[:, :2, :], pc) / z.clamp_min(1e-6)[..., None]
        seen = (z > 0.1) & (uv >= 0).all(-1) & (uv < sizes).all(-1)
        dist = (p[:, None, :] - centres[None]).norm(dim=-1)
        # Another frame's image only counts when no own-frame image sees the point.
        score = dist + 1e6 * (view_frame[None] != frame[s:s + chunk, None])
        score = torch.where(seen, score, torch.full_like(score, math.inf))
        val, arg = score.min(1)
        ok = torch.isfinite(val)
        best[s:s + chunk] = torch.where(ok, arg, -1)
        best_uv[s:s + chunk] = uv[torch.arange(len(p)), arg].floor().long()
    for v in best.unique().tolist():
        if v < 0:
            continue
        sel = (best == v).nonzero().squeeze(1)
        img = torch.from_numpy(np.array(views[v][1].image()))
        u, w = best_uv[sel, 0], best_uv[sel, 1]
        colors[sel] = img[w.clamp(0, img.shape[0] - 1), u.clamp(0, img.shape[1] - 1)].float() / 255
    return colors


def gaussians_from_lidar(log: LogSegment, budget: int, *, seed: int = 0,
                         opacity: float = INIT_OPACITY) -> PointGaussians:
    """Seed at most ``budget`` Gaussians from the log's LiDAR (see module docstring)."""
    points, frame = aggregate_sweeps(log)
    means, frame, size = voxel_downsample(points, frame, budget, seed=seed)
    scale = neighbour_scales(means, size)
    n = len(means)
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return PointGaussians(
        means=means, quats=quats, scales=scale[:, None].expand(n, 3).contiguous(),
        opacities=torch.full((n,), float(opacity)),
        colors=nearest_camera_colors(log, means, frame), voxel_size=size)


def jitter_duplicate(g: PointGaussians, n: int, *, seed: int = 0) -> PointGaussians:
    """Grow ``g`` to ``n`` Gaussians by copying random members with jitter.

    Copies are displaced by a normal offset of one scale, and every scale shrinks by
    sqrt(len(g) / n) so that splats on a surface overlap about as much as before.
    Used to benchmark more Gaussians than a log's LiDAR provides.
    """
    m = len(g)
    if n <= m:
        return g.index(torch.arange(n))
    gen = torch.Generator().manual_seed(seed)
    src = torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=gen)])
    out = g.index(src)
    noise = torch.randn(n - m, 3, generator=gen) * out.scales[m:]
    out.means = torch.cat([out.means[:m], out.means[m:] + noise])
    out.scales = out.scales * math.sqrt(m / n)
    return out
