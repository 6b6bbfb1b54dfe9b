"""Neural Gaussians and the decomposed ``NeuralScene`` (DESIGN.md, Neural Gaussians).

Every Gaussian has a fixed anchor and a state h of C = 14 + L channels:

    0:3 position offset (m) | 3:6 log scale | 6:10 quaternion wxyz | 10:13 colour logit
    13 opacity logit | 14: latent features

Decoding: g = h[:14] + tanh(W h + b) with W, b zero-initialised (identity), then
means = anchor + g[0:3], scales = exp(g[3:6]), quats = normalise(g[6:10]),
colours = sigmoid(g[10:13]), opacities = sigmoid(g[13]).

A scene has three parts, each with its own decoder: **static** (world frame), **actors**
(object frame, one set per track, placed at time t by the interpolated track pose) and
**sky** (a grid on a cropped sphere around the segment's centre, kept as a 2D map
[Hs, Ws, C] so a 2D CNN can read it). ``scene.splats(t, edits)`` composes world-frame
splats for :func:`recon.render.rasterize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from recon.render.api import check_rasterize_mode
from scenes.log import Track

BASE_CHANNELS = 14
DEFAULT_LATENT = 32
POS, LOG_SCALE, QUAT, COLOR, OPACITY = (slice(0, 3), slice(3, 6), slice(6, 10),
                                         slice(10, 13), slice(13, 14))
#: Actors keep showing this long past their first/last keyframe (s).
ACTOR_TIME_MARGIN_S = 0.15


@dataclass
class Splats:
    """World-frame Gaussians in :func:`recon.render.rasterize` layout.

    Attributes:
        means: [N, 3]; quats: [N, 4] (w, x, y, z) unit; scales: [N, 3] (m);
        opacities: [N]; colors: [N, 3] in [0, 1].
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @staticmethod
    def cat(parts: list[Splats]) -> Splats:
        return Splats(*(torch.cat([getattr(p, f) for p in parts]) for f in
                        ("means", "quats", "scales", "opacities", "colors")))


class StateDecoder(nn.Module):
    """g = h[:14] + tanh(W h + b), zero-initialised so it starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, BASE_CHANNELS)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        """[N, C] -> [N, 14]."""
        return h[:, :BASE_CHANNELS] + torch.tanh(self.linear(h))


def decode(anchors: Tensor, g: Tensor) -> Splats:
    """Activate decoded channels g [N, 14] around anchors [N, 3] (local frame)."""
    return Splats(
        means=anchors + g[:, POS],
        quats=torch.nn.functional.normalize(g[:, QUAT], dim=-1),
        scales=torch.exp(g[:, LOG_SCALE]),
        opacities=torch.sigmoid(g[:, OPACITY]).squeeze(-1),
        colors=torch.sigmoid(g[:, COLOR]),
    )


def encode_state(scales: Tensor, quats: Tensor, colors: Tensor, opacities: Tensor,
                 latent: int, offsets: Tensor | None = None) -> Tensor:
    """Initial state [N, 14 + latent] whose identity decoding gives these parameters.

    Args:
        scales: [N, 3] (m); quats: [N, 4]; colors: [N, 3] in (0, 1); opacities: [N].
        offsets: [N, 3] position offsets from the anchors (default zeros).
    """
    n = scales.shape[0]
    h = torch.zeros(n, BASE_CHANNELS + latent, dtype=torch.float32)
    if offsets is not None:
        h[:, POS] = offsets
    h[:, LOG_SCALE] = torch.log(scales.clamp_min(1e-6))
    h[:, QUAT] = quats
    h[:, COLOR] = torch.logit(colors.clamp(1e-3, 1 - 1e-3))
    h[:, OPACITY] = torch.logit(opacities.clamp(1e-4, 1 - 1e-4))[:, None]
    return h


@dataclass
class SkyGrid:
    """Geometry of the sky grid: Hs x Ws Gaussians on a sphere cropped in elevation.

    Attributes:
        centre: [3] world-frame centre (the segment's centre).
        radius: sphere radius (m), beyond all LiDAR geometry.
        rows, cols: grid size (elevation x azimuth).
        elev_min, elev_max: elevation range (rad); azimuth covers the full circle.
    """

    centre: tuple[float, float, float]
    radius: float
    rows: int = 24
    cols: int = 96
    elev_min: float = math.radians(-8.0)
    elev_max: float = math.radians(75.0)

    def directions(self) -> Tensor:
        """[rows, cols, 3] unit directions of the cell centres."""
        el = self.elev_min + (torch.arange(self.rows) + 0.5) / self.rows * (
            self.elev_max - self.elev_min)
        az = (torch.arange(self.cols) + 0.5) / self.cols * 2 * math.pi - math.pi
        E, A = torch.meshgrid(el, az, indexing="ij")
        return torch.stack([E.cos() * A.cos(), E.cos() * A.sin(), E.sin()], -1)

    def anchors(self) -> Tensor:
        """[rows * cols, 3] world positions of the cells."""
        c = torch.tensor(self.centre, dtype=torch.float32)
        return (c + self.radius * self.directions()).reshape(-1, 3).float()

    def init_splats(self) -> tuple[Tensor, Tensor]:
        """Scales [R*C, 3] and quats [R*C, 4] of flat discs tangent to the sphere.

        Each disc spans about one cell (slightly more, so neighbours overlap) and is
        thin along the radius.
        """
        d = self.directions().reshape(-1, 3)
        cell_el = self.radius * (self.elev_max - self.elev_min) / self.rows
        cos_el = d[:, 2].clamp(max=1.0).pow(2).neg().add(1).clamp_min(1e-4).sqrt()
        cell_az = self.radius * 2 * math.pi / self.cols * cos_el
        # Local axes: x = radial (thin), y = azimuth tangent, z = elevation tangent.
        x = d
        y = torch.nn.functional.normalize(torch.stack([-d[:, 1], d[:, 0],
                                                       torch.zeros_like(d[:, 0])], -1), dim=-1)
        z = torch.cross(x, y, dim=-1)
        R = torch.stack([x, y, z], -1)
        scales = torch.stack([torch.full_like(cell_az, 0.01 * self.radius),
                              0.7 * cell_az, torch.full_like(cell_az, 0.7 * cell_el)], -1)
        return scales, matrix_to_quat_torch(R)

    def to_json(self) -> dict:
        return {"centre": list(self.centre), "radius": self.radius, "rows": self.rows,
                "cols": self.cols, "elev_min": self.elev_min, "elev_max": self.elev_max}

    @staticmethod
    def from_json(d: dict) -> SkyGrid:
        return SkyGrid(tuple(d["centre"]), d["radius"], d["rows"], d["cols"], d["elev_min"],
                       d["elev_max"])


def matrix_to_quat_torch(R: Tensor) -> Tensor:
    """Quaternions (w, x, y, z) from rotation matrices [N, 3, 3] (float64 inside)."""
    from scenes.geometry import matrix_to_quat

    return torch.from_numpy(matrix_to_quat(R.double().numpy())).float()


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of (w, x, y, z) quaternions, broadcasting [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], -1)


@dataclass
class ActorEdit:
    """A render-time change to one actor.

    Attributes:
        hide: drop the actor.
        offset: [3] world-frame translation added to its pose at every time.
        pose: [4, 4] object_to_world that replaces the track pose (takes precedence).
    """

    hide: bool = False
    offset: tuple[float, float, float] | None = None
    pose: np.ndarray | None = None


@dataclass
class SceneState:
    """The three state tensors of a scene, outside the module (G3R evolves these).

    Attributes:
        static: [Ns, C]; actors: [Na, C] (rows in ``NeuralScene.actor_index`` order);
        sky: [Hs, Ws, C].
    """

    static: Tensor
    actors: Tensor
    sky: Tensor

    def detach(self) -> SceneState:
        return SceneState(self.static.detach(), self.actors.detach(), self.sky.detach())

    def clone(self) -> SceneState:
        return SceneState(self.static.clone(), self.actors.clone(), self.sky.clone())


@dataclass
class SceneParts:
    """Index ranges of the parts inside a composed splat set (for callers)."""

    static: slice
    actors: dict[str, slice] = field(default_factory=dict)
    sky: slice = field(default_factory=lambda: slice(0, 0))


class NeuralScene(nn.Module):
    """Static + actors + sky neural Gaussians with their decoders.

    Tensors:
        static_anchors [Ns, 3] (buffer), static_state [Ns, C] (parameter);
        actor_anchors [Na, 3] object frame (buffer), actor_state [Na, C], actor_index
        [Na] long into ``actor_ids``; sky_anchors [Hs*Ws, 3] (buffer), sky_state
        [Hs, Ws, C].

    ``rasterize_mode`` ("classic" | "antialiased", see :func:`recon.render.rasterize`)
    is part of the scene: it is rendered in the mode it was optimised in.
    """

    def __init__(self, static_anchors: Tensor, static_state: Tensor, actor_anchors: Tensor,
                 actor_state: Tensor, actor_index: Tensor, tracks: dict[str, Track],
                 sky: SkyGrid, sky_state: Tensor, rasterize_mode: str = "classic") -> None:
        super().__init__()
        self.rasterize_mode = rasterize_mode
        C = static_state.shape[1]
        if actor_state.shape[1] != C or sky_state.shape[-1] != C:
            raise ValueError("static, actor and sky states must have the same channel count")
        self.channels = C
        order = torch.argsort(actor_index, stable=True)  # actors contiguous, in id order
        actor_anchors, actor_state, actor_index = (actor_anchors[order], actor_state[order],
                                                   actor_index[order])
        self.register_buffer("static_anchors", static_anchors.float())
        self.static_state = nn.Parameter(static_state.float())
        self.register_buffer("actor_anchors", actor_anchors.float())
        self.actor_state = nn.Parameter(actor_state.float())
        self.register_buffer("actor_index", actor_index.long())
        self.actor_ids = list(tracks)
        self.tracks = dict(tracks)
        self.sky = sky
        self.register_buffer("sky_anchors", sky.anchors())
        self.sky_state = nn.Parameter(sky_state.float())
        self.static_decoder = StateDecoder(C)
        self.actor_decoder = StateDecoder(C)
        self.sky_decoder = StateDecoder(C)

    @property
    def rasterize_mode(self) -> str:
        return self._rasterize_mode

    @rasterize_mode.setter
    def rasterize_mode(self, mode: str) -> None:
        self._rasterize_mode = check_rasterize_mode(mode)

    @property
    def latent(self) -> int:
        return self.channels - BASE_CHANNELS

    @property
    def num_gaussians(self) -> dict[str, int]:
        return {"static": int(self.static_state.shape[0]),
                "actors": int(self.actor_state.shape[0]),
                "sky": int(self.sky_state.shape[0] * self.sky_state.shape[1])}

    def state(self) -> SceneState:
        """The scene's own state parameters (not copies)."""
        return SceneState(self.static_state, self.actor_state, self.sky_state)

    def load_state_(self, state: SceneState) -> None:
        """Copy ``state`` into the scene's parameters (shapes must match)."""
        with torch.no_grad():
            self.static_state.copy_(state.static)
            self.actor_state.copy_(state.actors)
            self.sky_state.copy_(state.sky)

    def decode_parts(self, state: SceneState | None = None) -> tuple[Splats, Splats, Splats]:
        """Static (world), actors (object frame) and sky (world) splats.

        Args:
            state: decode these states instead of the scene's parameters (same shapes).
        """
        st = state or self.state()
        static = decode(self.static_anchors, self.static_decoder(st.static))
        actors = decode(self.actor_anchors, self.actor_decoder(st.actors))
        sky = decode(self.sky_anchors, self.sky_decoder(st.sky.reshape(-1, self.channels)))
        return static, actors, sky

    def actor_poses(self, t: float, edits: dict[str, ActorEdit] | None = None
                    ) -> tuple[Tensor, Tensor]:
        """object_to_world of every actor at time t [A, 4, 4] and visibility [A] bool."""
        edits = edits or {}
        poses = np.zeros((len(self.actor_ids), 4, 4))
        visible = np.zeros(len(self.actor_ids), dtype=bool)
        for i, tid in enumerate(self.actor_ids):
            tr = self.tracks[tid]
            e = edits.get(tid)
            poses[i] = tr.pose_at(t)
            visible[i] = bool(tr.observed_at(t, ACTOR_TIME_MARGIN_S))
            if e is None:
                continue
            if e.pose is not None:
                poses[i] = np.asarray(e.pose, dtype=np.float64)
                visible[i] = True
            if e.offset is not None:
                poses[i, :3, 3] += np.asarray(e.offset, dtype=np.float64)
            if e.hide:
                visible[i] = False
        return torch.from_numpy(poses).float(), torch.from_numpy(visible)

    def splats(self, t: float, edits: dict[str, ActorEdit] | None = None,
               include_sky: bool = True,
               decoded: tuple[Splats, Splats, Splats] | None = None
               ) -> tuple[Splats, SceneParts]:
        """All parts composed in the world frame at time t (actors moved by their tracks).

        ``decoded``: the parts from :meth:`decode_parts` (of another state, e.g. G3R's
        unrolled h), so views rendered from one state decode it once (default: decode
        the scene's own parameters).

        Returns:
            splats [N, ...] and where each part sits in them.
        """
        unknown = set(edits or {}) - set(self.actor_ids)
        if unknown:
            raise KeyError(f"no actor(s) {sorted(unknown)} in this scene; actors: "
                           f"{self.actor_ids}")
        static, actors, sky = decoded if decoded is not None else self.decode_parts()
        out = [static]
        parts = SceneParts(static=slice(0, len(static)))
        n = len(static)
        if len(self.actor_ids) and len(actors):
            dev = self.actor_state.device
            poses, visible = self.actor_poses(t, edits)
            pose_quats = matrix_to_quat_torch(poses[:, :3, :3]).to(dev)
            poses, visible = poses.to(dev), visible.to(dev)
            keep = visible[self.actor_index]
            idx = self.actor_index[keep]
            R = poses[idx, :3, :3]
            placed = Splats(
                means=torch.einsum("nij,nj->ni", R, actors.means[keep]) + poses[idx, :3, 3],
                quats=quat_multiply(pose_quats[idx], actors.quats[keep]),
                scales=actors.scales[keep], opacities=actors.opacities[keep],
                colors=actors.colors[keep])
            out.append(placed)
            # Contiguous per actor because actor_index is sorted at construction.
            for i, tid in enumerate(self.actor_ids):
                cnt = int((idx == i).sum())
                if cnt:
                    first = int((idx < i).sum())
                    parts.actors[tid] = slice(n + first, n + first + cnt)
            n += len(placed)
        if include_sky:
            out.append(sky)
            parts.sky = slice(n, n + len(sky))
        return Splats.cat(out), parts
