"""The G3R network (DESIGN.md, Learned optimizer, 2-3).

Per Gaussian it reads x = [h, normalised grad, step embedding] and outputs an update of
the state; the update rule is

    h <- h + gamma(t) * s * tanh(net(x) - a * grad_n)

where ``net`` is a point-voxel network (sparse-voxel residual U-Net over the fixed
anchors plus a point MLP) for static and for actor Gaussians (separate weights) and a 2D
CNN for the sky grid; ``s`` [C] is a learned per-channel step size (metres for
positions, log units for scales, logits for colour and opacity) and ``a`` [C] a learned
per-channel gain on the normalised gradient. ``net``'s last layer starts at zero, so an
untrained model is normalised gradient descent with the step sizes ``s``; training
learns what to add to it. gamma(t) decreases with a cosine from 1 to ``gamma_min``
over the T steps.

The model also owns the three state decoders (g = h[:14] + tanh(W h + b)) that every
scene it reconstructs uses, so the latent channels mean the same thing in every scene.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from recon.g3r.sparse import PointVoxelNet, VoxelHierarchy, build_hierarchy
from recon.neural import BASE_CHANNELS, NeuralScene, SceneState, StateDecoder

#: Initial per-channel step sizes of the 14 base channels (one step, gamma = 1):
#: position (m), log scale, quaternion, colour logit, opacity logit.
BASE_STEP = (0.04,) * 3 + (0.08,) * 3 + (0.04,) * 4 + (0.25,) * 3 + (0.4,)
LATENT_STEP = 0.05
#: Actor Gaussians of different tracks are laid out this far apart (m) in the voxel
#: grid, so no voxel mixes two actors.
ACTOR_SPACING_M = 1000.0


@dataclass(frozen=True)
class G3RConfig:
    """Architecture and schedule of a G3R model (stored in its checkpoint).

    Attributes:
        channels: state channels C (14 + latent) the model was built for.
        steps: T, the default number of update steps; turbo_steps: T of ``--turbo``.
        gamma_min: last step's gamma (cosine schedule from 1); constant_gamma: use
            the schedule's mean at every step instead (an ablation).
        embed_dim: size of the sinusoidal step embedding.
        static_voxel_m / actor_voxel_m: level-0 voxel size; levels: U-Net depth.
        widths: voxel channels per level; point_hidden: point-MLP width.
        sky_hidden: sky-CNN width.
        lift_groups: the source views are split into this many interleaved groups and
            step t lifts the gradient of group t mod G only (1: every view every step),
            so a step costs 1/G of a full lift and every view is read every G steps.
            The model is trained with the grouping it runs with.
    """

    channels: int = BASE_CHANNELS + 32
    steps: int = 24
    turbo_steps: int = 12
    gamma_min: float = 0.1
    constant_gamma: bool = False
    embed_dim: int = 16
    static_voxel_m: float = 0.4
    actor_voxel_m: float = 0.2
    levels: int = 3
    widths: tuple[int, ...] = (32, 48, 64)
    point_hidden: int = 64
    sky_hidden: int = 32
    lift_groups: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> G3RConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        return G3RConfig(**d)


def gamma(t: int, T: int, gamma_min: float = 0.1, constant: bool = False) -> float:
    """Step size multiplier of step t in 1..T: cosine from 1 down to ``gamma_min``
    (or, with ``constant``, the schedule's mean at every step)."""
    if constant:
        return (1 + gamma_min) / 2
    if T <= 1:
        return 1.0
    c = 0.5 * (1 + math.cos(math.pi * (t - 1) / (T - 1)))
    return gamma_min + (1 - gamma_min) * c


def step_embedding(t: int, T: int, dim: int) -> Tensor:
    """[dim] sinusoidal embedding of the progress t/T in [0, 1]."""
    u = t / max(T, 1)
    freqs = math.pi * (2.0 ** torch.arange(dim // 2, dtype=torch.float32))
    return torch.cat([torch.sin(freqs * u), torch.cos(freqs * u)])


@dataclass
class SceneGraph:
    """Per-scene neighbourhoods, built once from the fixed anchors and reused every step.

    Attributes:
        static: hierarchy over the static anchors (None if there are none);
        actors: hierarchy over the actor anchors, each track shifted to its own region.
    """

    static: VoxelHierarchy | None
    actors: VoxelHierarchy | None


def build_scene_graph(scene: NeuralScene, config: G3RConfig) -> SceneGraph:
    """Voxel hierarchies of a scene's static and actor anchors."""
    static = None
    if scene.static_anchors.shape[0]:
        static = build_hierarchy(scene.static_anchors, config.static_voxel_m, config.levels)
    actors = None
    if scene.actor_anchors.shape[0]:
        shift = torch.zeros_like(scene.actor_anchors)
        shift[:, 0] = scene.actor_index.float() * ACTOR_SPACING_M
        actors = build_hierarchy(scene.actor_anchors + shift, config.actor_voxel_m,
                                 config.levels)
    return SceneGraph(static, actors)


class SkyNet(nn.Module):
    """2D CNN over the sky grid [Hs, Ws, Cin] -> [Hs, Ws, Cout]; circular in azimuth."""

    def __init__(self, cin: int, cout: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3)
        self.conv2 = nn.Conv2d(hidden, hidden, 3)
        self.out = nn.Conv2d(hidden, cout, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _pad(x: Tensor) -> Tensor:
        x = torch.nn.functional.pad(x, (1, 1, 0, 0), mode="circular")  # azimuth wraps
        return torch.nn.functional.pad(x, (0, 0, 1, 1), mode="replicate")

    def forward(self, x: Tensor) -> Tensor:
        y = x.permute(2, 0, 1)[None]
        y = torch.nn.functional.silu(self.conv1(self._pad(y)))
        y = torch.nn.functional.silu(self.conv2(self._pad(y)))
        return self.out(y)[0].permute(1, 2, 0)


class StepRule(nn.Module):
    """The explicit part of the update: per-channel step sizes s and gradient gains a."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        steps = torch.tensor(list(BASE_STEP) + [LATENT_STEP] * (channels - BASE_CHANNELS))
        self.log_step = nn.Parameter(steps.log())
        self.gain = nn.Parameter(torch.ones(channels))

    def forward(self, net_out: Tensor, grad_n: Tensor) -> Tensor:
        """Update direction [..., C] before gamma: s * tanh(net_out - a * grad_n)."""
        return self.log_step.exp() * torch.tanh(net_out - self.gain * grad_n)


class G3RModel(nn.Module):
    """Static and actor point-voxel networks, the sky CNN, the step rules and decoders."""

    def __init__(self, config: G3RConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or G3RConfig()
        C = c.channels
        cin = 2 * C + c.embed_dim
        self.static_net = PointVoxelNet(cin, C, voxel_widths=c.widths,
                                        point_hidden=c.point_hidden)
        self.actor_net = PointVoxelNet(cin, C, voxel_widths=c.widths,
                                       point_hidden=c.point_hidden)
        self.sky_net = SkyNet(cin, C, c.sky_hidden)
        self.static_rule = StepRule(C)
        self.actor_rule = StepRule(C)
        self.sky_rule = StepRule(C)
        self.static_decoder = StateDecoder(C)
        self.actor_decoder = StateDecoder(C)
        self.sky_decoder = StateDecoder(C)

    def install_decoders(self, scene: NeuralScene) -> None:
        """Make the scene decode its states with this model's decoders (copies)."""
        if scene.channels != self.config.channels:
            raise ValueError(f"the model was trained for {self.config.channels}-channel "
                             f"states; the scene has {scene.channels}")
        for part in ("static", "actor", "sky"):
            getattr(scene, f"{part}_decoder").load_state_dict(
                getattr(self, f"{part}_decoder").state_dict())

    def share_decoders(self, scene: NeuralScene) -> None:
        """Make the scene use this model's decoder modules themselves (training: the
        decoders learn through the scene's renders)."""
        scene.static_decoder = self.static_decoder
        scene.actor_decoder = self.actor_decoder
        scene.sky_decoder = self.sky_decoder

    def update(self, state: SceneState, grad_n: SceneState, graph: SceneGraph, t: int,
               T: int) -> SceneState:
        """One G3R step: the new state (differentiable w.r.t. the model's parameters).

        Args:
            state: h (static [Ns, C], actors [Na, C], sky [Hs, Ws, C]);
            grad_n: the normalised lifted gradient, same shapes;
            t, T: step index in 1..T and the number of steps.
        """
        c = self.config
        g = gamma(t, T, c.gamma_min, c.constant_gamma)
        emb = step_embedding(t, T, c.embed_dim).to(state.static.device)

        def inputs(h: Tensor, gr: Tensor) -> Tensor:
            return torch.cat([h, gr, emb.expand(*h.shape[:-1], -1)], -1)

        def part(h: Tensor, gr: Tensor, net, hier, rule: StepRule) -> Tensor:
            if h.shape[0] == 0:
                return h
            out = net(inputs(h, gr), hier)
            return h + g * rule(out, gr)

        static = part(state.static, grad_n.static, self.static_net, graph.static,
                      self.static_rule)
        actors = part(state.actors, grad_n.actors, self.actor_net, graph.actors,
                      self.actor_rule)
        sky = state.sky + g * self.sky_rule(self.sky_net(inputs(state.sky, grad_n.sky)),
                                            grad_n.sky)
        return SceneState(static, actors, sky)
