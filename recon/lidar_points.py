"""Gaussians seeded from a log's LiDAR points (the static-scene part of initialisation).

``gaussians_from_lidar(log, budget)``:

1. aggregate every sweep in the world frame (each point remembers its frame);
2. voxel-downsample to at most ``budget`` points: the finest voxel size whose occupied
   voxel count reaches the budget (bisection on a log scale), one centroid per voxel,
   then a seeded random subset when there are still too many;
3. scale: isotropic, the RMS distance to the 3 nearest neighbours, found through a
   voxel hash (each voxel holds at most one centroid, so looking at the 26 neighbouring
   voxels is enough and costs O(points); no scipy, no N x N distances);
4. colour: the pixel under the point in the nearest source camera image (by distance to
   the camera centre; held-out images never colour anything) that sees it, preferring
   images of the point's own frame so that moving things take colours from the right
   time, with a depth test against that frame's LiDAR z-buffer; grey where no camera
   sees it (:func:`project_colors`);
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

from recon.views import is_source_position
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


class InitError(ValueError):
    """The log lacks what initialisation needs (says what is missing)."""


@dataclass
class LidarCloud:
    """All LiDAR points of a log in the world frame.

    Attributes:
        points: [P, 3] float32; time: [P] float64 (s); frame: [P] int64 position of the
        sweep's frame in ``log.frames``.
    """

    points: Tensor
    time: Tensor
    frame: Tensor


def aggregate_lidar(log: LogSegment) -> LidarCloud:
    pts, times, frames = [], [], []
    for i, f in enumerate(log.frames):
        if not f.has_lidar:
            continue
        s = f.lidar()
        pts.append(torch.from_numpy(np.asarray(s.points, dtype=np.float32)))
        times.append(torch.from_numpy(np.asarray(s.time, dtype=np.float64)))
        frames.append(torch.full((len(s),), i, dtype=torch.int64))
    if not pts or sum(len(p) for p in pts) == 0:
        raise InitError(f"log {log.name!r} has no LiDAR points: initialisation seeds Gaussians "
                        "from LiDAR, so a log needs at least one non-empty sweep")
    return LidarCloud(torch.cat(pts), torch.cat(times), torch.cat(frames))


class ViewBank:
    """Every source (frame, camera) view of a log with projection helpers and LiDAR
    z-buffers.

    Only source frames are kept (:func:`recon.views.is_source_position`): held-out images
    are what a reconstruction is measured on, so they never colour it. LiDAR sweeps of
    every frame still give geometry and z-buffers.
    """

    def __init__(self, log: LogSegment, cloud: LidarCloud) -> None:
        self.log = log
        self.views = [(fi, im) for fi, f in enumerate(log.frames) if is_source_position(fi)
                      for im in f.images.values()]
        self.w2c = torch.tensor(np.stack([invert_pose(im.cam_to_world) for _, im in self.views]),
                                dtype=torch.float64) if self.views else torch.zeros(0, 4, 4)
        self.cloud = cloud
        self._zbuf: dict[int, Tensor] = {}

    @staticmethod
    def source_frame(frame: Tensor) -> Tensor:
        """[P] position of the source frame at or just before each frame position [P]."""
        return torch.where(is_source_position(frame), frame, frame - 1)

    def camera(self, v: int):
        return self.log.cameras[self.views[v][1].camera]

    def project(self, v: int, points: Tensor) -> tuple[Tensor, Tensor]:
        """Pixel coordinates [P, 2] (float) and camera z [P] of world points in view v."""
        cam = self.camera(v)
        pc = points.double() @ self.w2c[v, :3, :3].T + self.w2c[v, :3, 3]
        z = pc[:, 2]
        K = torch.from_numpy(cam.K)
        uv = (pc @ K.T)[:, :2] / z.clamp_min(1e-6)[:, None]
        return uv, z

    def in_image(self, v: int, uv: Tensor, z: Tensor) -> Tensor:
        cam = self.camera(v)
        return (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & \
            (uv[:, 1] < cam.height)

    def zbuffer(self, v: int) -> Tensor:
        """[H, W] nearest LiDAR depth of the view's own frame, splatted 3x3 (inf: none)."""
        if v in self._zbuf:
            return self._zbuf[v]
        fi = self.views[v][0]
        cam = self.camera(v)
        pts = self.cloud.points[self.cloud.frame == fi]
        uv, z = self.project(v, pts)
        ok = self.in_image(v, uv, z)
        u = uv[ok, 0].long()
        w = uv[ok, 1].long()
        zz = z[ok].float()
        buf = torch.full((cam.height * cam.width,), math.inf)
        for du in (-1, 0, 1):
            for dv in (-1, 0, 1):
                uu = (u + du).clamp(0, cam.width - 1)
                vv = (w + dv).clamp(0, cam.height - 1)
                buf.scatter_reduce_(0, vv * cam.width + uu, zz, "amin")
        out = buf.reshape(cam.height, cam.width)
        self._zbuf[v] = out
        return out


def project_colors(bank: ViewBank, points: Tensor, frame: Tensor) -> Tensor:
    """RGB [P, 3] of world points [P, 3] observed at frames [P] (occlusion-aware).

    A view qualifies when the point projects inside it in front of the camera and is not
    behind the view's LiDAR z-buffer (3% + 0.3 m tolerance). Views of the point's own frame
    (or, for a held-out frame, the source frame before it) come first; only points none
    of them sees look at the other frames. Among qualifying
    views, the nearest camera wins. Points no view sees stay grey.
    """
    P = len(points)
    colors = torch.full((P, 3), UNSEEN_COLOR)
    if not bank.views:
        return colors
    best_score = torch.full((P,), math.inf, dtype=torch.float64)
    best_view = torch.full((P,), -1, dtype=torch.int64)
    best_uv = torch.zeros(P, 2, dtype=torch.int64)

    def consider(v: int, idx: Tensor) -> None:
        uv, z = bank.project(v, points[idx])
        ok = bank.in_image(v, uv, z)
        idx, uv, z = idx[ok], uv[ok], z[ok]
        pix = uv.long()
        vis = z <= bank.zbuffer(v)[pix[:, 1], pix[:, 0]].double() * 1.03 + 0.3
        idx, pix = idx[vis], pix[vis]
        centre = torch.from_numpy(bank.views[v][1].cam_to_world[:3, 3])
        score = (points[idx].double() - centre).norm(dim=1)
        better = score < best_score[idx]
        idx = idx[better]
        best_score[idx] = score[better]
        best_view[idx] = v
        best_uv[idx] = pix[better]

    views_of_frame: dict[int, list[int]] = {}
    for v, (fi, _) in enumerate(bank.views):
        views_of_frame.setdefault(fi, []).append(v)
    frame = bank.source_frame(frame)
    for fi in frame.unique().tolist():
        idx = (frame == fi).nonzero().squeeze(1)
        for v in views_of_frame.get(fi, []):
            consider(v, idx)
    unseen = (best_view < 0).nonzero().squeeze(1)
    if len(unseen):
        for v in range(len(bank.views)):
            consider(v, unseen)
    for v in best_view.unique().tolist():
        if v < 0:
            continue
        sel = (best_view == v).nonzero().squeeze(1)
        img = torch.from_numpy(np.array(bank.views[v][1].image()))
        colors[sel] = img[best_uv[sel, 1], best_uv[sel, 0]].float() / 255.0
    return colors


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


def gaussians_from_lidar(log: LogSegment, budget: int, *, seed: int = 0,
                         opacity: float = INIT_OPACITY) -> PointGaussians:
    """Seed at most ``budget`` Gaussians from the log's LiDAR (see module docstring)."""
    cloud = aggregate_lidar(log)
    means, frame, size = voxel_downsample(cloud.points, cloud.frame, budget, seed=seed)
    scale = neighbour_scales(means, size)
    n = len(means)
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return PointGaussians(
        means=means, quats=quats, scales=scale[:, None].expand(n, 3).contiguous(),
        opacities=torch.full((n,), float(opacity)),
        colors=project_colors(ViewBank(log, cloud), means, frame), voxel_size=size)


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
