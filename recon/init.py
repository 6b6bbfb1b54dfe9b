"""Initialise a ``NeuralScene`` from a log's LiDAR and images (deterministic).

1. Aggregate every sweep in the world frame with per-point time and frame.
2. Decompose: a point inside a track's box at the point's own time goes to that actor
   (moved into its object frame); the rest is static.
3. Voxel-downsample each part to its budget (static: ``budget``; actors: their share);
   scales from nearest-neighbour distances (:mod:`recon.lidar_points`).
4. Colours: project into the source images (held-out frames never colour the scene),
   nearest camera of the point's own frame first, with a depth test against a z-buffer
   of that frame's LiDAR so occluded points do not take the colour of what hides them.
5. Far field: pixels of the source views that no LiDAR return explains (above the
   highest projected return in their column) and that look at most a few degrees above
   the horizon are cast onto a sphere beyond LiDAR reach, voxel-downsampled to their
   own budget and join the static background: distant facades and trees get Gaussians
   of their own instead of being smeared into the sky or into the last LiDAR returns.
6. Sky: a grid on a larger sphere, coloured from the unexplained pixels.
A log without LiDAR fails with a clear error; a log without tracks gives a static-only
scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from recon.lidar_points import (
    InitError,
    LidarCloud,
    ViewBank,
    aggregate_lidar,
    neighbour_scales,
    project_colors,
    voxel_downsample,
)
from recon.neural import (
    DEFAULT_LATENT,
    NeuralScene,
    SkyGrid,
    encode_state,
)
from scenes.geometry import invert_pose
from scenes.log import LogSegment, Track


def default_budget() -> int:
    """Static Gaussian budget sized for the machine: millions on a GPU, ~100k on CPU."""
    return 2_000_000 if torch.cuda.is_available() else 100_000


@dataclass(frozen=True)
class InitConfig:
    """Initialisation settings.

    Attributes:
        budget: static Gaussians at most, far field included (default:
            :func:`default_budget`).
        actor_budget: Gaussians per actor at most.
        actor_voxel: finest voxel for actors (m).
        min_actor_points: tracks with fewer LiDAR points stay out of the actor set.
        actors: "all" tracks become actors (parked cars stay editable), or only the
            "moving" ones (parked cars join the static background: fewer Gaussians).
        box_margin: xy margin (m) around a box when collecting its points.
        latent: latent channels L of the state.
        opacity: initial opacity of LiDAR Gaussians.
        far_budget: the part of ``budget`` for what lies beyond LiDAR reach
            (:func:`far_field_points`; None: a tenth; 0: none). They join the static
            background.
        far_elevation_deg: highest elevation of a far-field ray (the sky grid covers
            what is above).
        sky_rows, sky_cols: sky grid size.
        seed: for subsampling.
    """

    budget: int = field(default_factory=default_budget)
    actor_budget: int = 2000
    actor_voxel: float = 0.08
    min_actor_points: int = 20
    actors: str = "all"
    box_margin: float = 0.1
    latent: int = DEFAULT_LATENT
    opacity: float = 0.7
    sky_opacity: float = 0.95
    far_budget: int | None = None
    far_elevation_deg: float = 15.0
    sky_rows: int = 24
    sky_cols: int = 96
    seed: int = 0


def assign_to_tracks(cloud: LidarCloud, tracks: dict[str, Track], margin: float = 0.1
                     ) -> tuple[Tensor, Tensor]:
    """Which track each point belongs to, and its object-frame position.

    A point belongs to a track when it lies inside the box at the point's own time
    (xy widened by ``margin``; the bottom raised 5 cm so road points stay static).

    Returns:
        owner [P] long (-1 = static) and local [P, 3] float32 (valid where owner >= 0).
    """
    P = len(cloud.points)
    owner = torch.full((P,), -1, dtype=torch.int64)
    local = torch.zeros(P, 3)
    pts = cloud.points.double().numpy()
    times = cloud.time.numpy()
    for k, tr in enumerate(tracks.values()):
        in_time = tr.observed_at(times, margin_s=0.15)
        centres = tr.poses[:, :3, 3]
        reach = float(np.linalg.norm(tr.size)) / 2 + margin
        lo, hi = centres.min(0) - reach, centres.max(0) + reach
        cand = np.nonzero(in_time & np.all((pts >= lo) & (pts <= hi), axis=1))[0]
        if len(cand) == 0:
            continue
        T = invert_pose(tr.pose_at(times[cand]))
        loc = np.einsum("nij,nj->ni", T[:, :3, :3], pts[cand]) + T[:, :3, 3]
        half = tr.size / 2
        inside = (np.abs(loc[:, 0]) <= half[0] + margin) & (np.abs(loc[:, 1]) <= half[1] + margin) \
            & (loc[:, 2] >= -half[2] + 0.05) & (loc[:, 2] <= half[2] + margin)
        sel = torch.from_numpy(cand[inside])
        free = owner[sel] < 0  # first track wins where boxes overlap
        owner[sel[free]] = k
        local[sel[free]] = torch.from_numpy(loc[inside][free.numpy()]).float()
    return owner, local


def unexplained_pixels(bank: ViewBank, v: int) -> Tensor | None:
    """[H, W] bool: pixels of view v above the highest projected LiDAR return of their
    column (sky, or geometry beyond LiDAR reach); None when no return lands in the view."""
    zb = bank.zbuffer(v)
    has = torch.isfinite(zb)
    if not has.any():
        return None
    rows = torch.arange(zb.shape[0])[:, None].expand_as(has)
    top = torch.where(has, rows, zb.shape[0]).min(0).values  # [W] first LiDAR row
    return rows < (top[None] - 2)


def far_field_points(bank: ViewBank, centre: np.ndarray, radius: float,
                     max_elevation_deg: float, stride: int = 2) -> tuple[Tensor, Tensor]:
    """Points for what the cameras see beyond LiDAR reach.

    Every ``stride``-th pixel of each source view that no LiDAR return explains (see
    :func:`unexplained_pixels`) and whose ray rises at most ``max_elevation_deg`` above
    the horizon (far facades and trees; the sky grid covers what is higher) is cast onto
    the sphere of ``radius`` around ``centre``.

    Returns:
        world points [P, 3] float32 and their frame positions [P] int64.
    """
    pts, frames = [], []
    c = torch.from_numpy(np.asarray(centre, dtype=np.float64))
    max_z = math.sin(math.radians(max_elevation_deg))
    for v, (fi, im) in enumerate(bank.views):
        mask = unexplained_pixels(bank, v)
        if mask is None:
            continue
        cam = bank.camera(v)
        vv, uu = mask[::stride, ::stride].nonzero(as_tuple=True)
        pix = torch.stack([uu * stride + 0.5, vv * stride + 0.5, torch.ones(len(uu))], 1)
        d = pix.double() @ torch.linalg.inv(torch.from_numpy(cam.K)).T
        c2w = torch.from_numpy(im.cam_to_world)
        d = d @ c2w[:3, :3].T
        d = d / d.norm(dim=1, keepdim=True)
        d = d[d[:, 2] <= max_z]
        # Ray o + t d meets |p - c| = radius at the far root (o lies inside the sphere).
        oc = c2w[:3, 3] - c
        b = d @ oc
        t = -b + (b * b - (oc @ oc - radius * radius)).clamp_min(0).sqrt()
        pts.append((c2w[:3, 3] + t[:, None] * d).float())
        frames.append(torch.full((len(d),), fi, dtype=torch.int64))
    if not pts:
        return torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)
    return torch.cat(pts), torch.cat(frames)


def sky_colors(bank: ViewBank, grid: SkyGrid) -> Tensor:
    """RGB [rows * cols, 3] for the sky grid from pixels no LiDAR return explains.

    In each view, a pixel is sky when it lies above the highest projected LiDAR return
    of its column. A cell takes the median of the sky pixels its direction lands on over
    all views; cells never seen take the mean sky colour.
    """
    dirs = grid.directions().reshape(-1, 3).double()
    samples: list[list[Tensor]] = [[] for _ in range(len(dirs))]
    all_sky: list[Tensor] = []
    for v, (_, im) in enumerate(bank.views):
        cam = bank.camera(v)
        sky_mask = unexplained_pixels(bank, v)
        if sky_mask is None:
            continue
        img = torch.from_numpy(np.array(im.image())).float() / 255.0
        all_sky.append(img[sky_mask])
        # Directions at infinity: only the rotation matters.
        R = bank.w2c[v, :3, :3]
        dc = dirs @ R.T
        z = dc[:, 2]
        uv = (dc @ torch.from_numpy(cam.K).T)[:, :2] / z.clamp_min(1e-6)[:, None]
        ok = (z > 0.05) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & \
            (uv[:, 1] < cam.height)
        for c in ok.nonzero().squeeze(1).tolist():
            u, w = int(uv[c, 0]), int(uv[c, 1])
            if sky_mask[w, u]:
                samples[c].append(img[w, u])
    mean = torch.cat(all_sky).mean(0) if all_sky and sum(len(a) for a in all_sky) else \
        torch.tensor([0.7, 0.8, 0.9])
    out = mean.expand(len(dirs), 3).clone()
    for c, s in enumerate(samples):
        if s:
            out[c] = torch.stack(s).median(0).values
    return out


def _part_gaussians(points: Tensor, frame: Tensor, budget: int, min_voxel: float, seed: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Voxel-downsampled means [M, 3], their latest frame [M] and scales [M]."""
    means, last, size = voxel_downsample(points, frame, budget, seed=seed, min_voxel=min_voxel)
    return means, last, neighbour_scales(means, size)


def initialise_scene(log: LogSegment, config: InitConfig | None = None) -> NeuralScene:
    """Build the initial ``NeuralScene`` of a log (see module docstring)."""
    cfg = config or InitConfig()
    if cfg.actors not in ("all", "moving"):
        raise ValueError(f"InitConfig.actors must be 'all' or 'moving', not {cfg.actors!r}")
    cloud = aggregate_lidar(log)
    tracks = {k: t for k, t in log.tracks.items() if cfg.actors == "all" or t.is_moving}
    owner, local = assign_to_tracks(cloud, tracks, cfg.box_margin)
    bank = ViewBank(log, cloud)
    track_list = list(tracks.values())

    static = owner < 0
    if not static.any():
        raise InitError(f"log {log.name!r}: every LiDAR point lies inside a track box; "
                        "nothing is left for the static background")
    far_budget = cfg.budget // 10 if cfg.far_budget is None else cfg.far_budget
    if not 0 <= far_budget < cfg.budget:
        raise ValueError(f"InitConfig.far_budget must lie in [0, budget={cfg.budget}), "
                         f"not {far_budget}")
    s_means, s_frame, s_scale = _part_gaussians(cloud.points[static], cloud.frame[static],
                                                cfg.budget - far_budget, 0.01, cfg.seed)

    # Sky and far field: centred on the drive, beyond every LiDAR return.
    ego = np.stack([f.ego_to_world[:3, 3] for f in log.frames])
    centre = ego.mean(0)
    reach = float((cloud.points.double() - torch.from_numpy(centre)).norm(dim=1).max())
    sky_radius = max(2.0 * reach, 200.0)
    if far_budget > 0:
        far, far_frame = far_field_points(bank, centre, (reach + sky_radius) / 2,
                                          cfg.far_elevation_deg)
        if len(far):
            f_means, f_frame, f_scale = _part_gaussians(far, far_frame, far_budget, 0.01,
                                                        cfg.seed)
            s_means = torch.cat([s_means, f_means])
            s_frame = torch.cat([s_frame, f_frame])
            s_scale = torch.cat([s_scale, f_scale])
    s_colors = project_colors(bank, s_means, s_frame)

    a_anchor, a_scale, a_color, a_index = [], [], [], []
    actors: dict[str, Track] = {}
    for k, tr in enumerate(track_list):
        sel = owner == k
        if int(sel.sum()) < cfg.min_actor_points:
            continue
        means, last, scale = _part_gaussians(local[sel], cloud.frame[sel], cfg.actor_budget,
                                             cfg.actor_voxel, cfg.seed + k + 1)
        # Colour each object-frame point where the actor was when the source frame it is
        # coloured from was taken (held-out frames lend no colour).
        last = bank.source_frame(last)
        times = np.array([log.frames[i].timestamp for i in last.tolist()])
        T = torch.from_numpy(tr.pose_at(times)).float()
        world = torch.einsum("nij,nj->ni", T[:, :3, :3], means) + T[:, :3, 3]
        a_anchor.append(means)
        a_scale.append(scale)
        a_color.append(project_colors(bank, world, last))
        a_index.append(torch.full((len(means),), len(actors), dtype=torch.int64))
        actors[tr.id] = tr

    def state(means_scale: Tensor, colors: Tensor) -> Tensor:
        n = len(means_scale)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        return encode_state(means_scale[:, None].expand(n, 3), quats, colors,
                            torch.full((n,), cfg.opacity), cfg.latent)

    if a_anchor:
        actor_anchors = torch.cat(a_anchor)
        actor_state = state(torch.cat(a_scale), torch.cat(a_color))
        actor_index = torch.cat(a_index)
    else:
        actor_anchors = torch.zeros(0, 3)
        actor_state = torch.zeros(0, 14 + cfg.latent)
        actor_index = torch.zeros(0, dtype=torch.int64)

    grid = SkyGrid(tuple(float(x) for x in centre), radius=sky_radius,
                   rows=cfg.sky_rows, cols=cfg.sky_cols)
    sky_scales, sky_quats = grid.init_splats()
    sky_rgb = sky_colors(bank, grid)
    sky_state = encode_state(sky_scales, sky_quats, sky_rgb,
                             torch.full((len(sky_rgb),), cfg.sky_opacity), cfg.latent)
    sky_state = sky_state.reshape(grid.rows, grid.cols, -1)

    return NeuralScene(s_means, state(s_scale, s_colors), actor_anchors, actor_state,
                       actor_index, actors, grid, sky_state)
