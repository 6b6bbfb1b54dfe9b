"""Gradient lifting (DESIGN.md, Learned optimizer, 1): the 3D gradient G3R reads.

Render the current scene into every source view, take L = sum over views of the per-image
mean squared error, and backpropagate to the state of every static, actor and sky Gaussian.
Views are rendered and backpropagated one at a time, so memory is bounded by one view
whatever the number of views; gradients accumulate in the state tensors.

The raw gradient's scale depends on the scene (number of views, image size, how many
Gaussians share a pixel), so :func:`normalise_gradient` makes it scale-free before the
network sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from recon.neural import NeuralScene, SceneState, Splats
from recon.render import RenderOutput
from recon.views import View, render_view


@dataclass
class ViewTargets:
    """Views with their ground truth resized to the resolution they are rendered at.

    Attributes:
        views: the views; images: per view [H_i, W_i, 3] float32 in [0, 1] on the
        scene's device (cameras of a log may differ in size).
    """

    views: list[View]
    images: list[Tensor]

    def __len__(self) -> int:
        return len(self.views)

    def subset(self, idx: list[int]) -> ViewTargets:
        return ViewTargets([self.views[i] for i in idx], [self.images[i] for i in idx])


def view_targets(views: list[View], scale: float = 1.0,
                 device: torch.device | str = "cpu") -> ViewTargets:
    """Load the ground truth of ``views`` at ``scale`` x their size (area-averaged)."""
    images = []
    for v in views:
        img = v.target().permute(2, 0, 1)[None]  # [1, 3, H0, W0]
        W, H = max(8, round(v.width * scale)), max(8, round(v.height * scale))
        if (W, H) != (v.width, v.height):
            img = F.interpolate(img, size=(H, W), mode="area")
        images.append(img[0].permute(1, 2, 0).contiguous().to(device))
    return ViewTargets(list(views), images)


def render_target_output(scene: NeuralScene, targets: ViewTargets,
                         decoded: tuple[Splats, Splats, Splats], i: int,
                         backend: str = "auto") -> RenderOutput:
    """Render view ``i`` of ``targets`` at its target's size (rgb, alpha, depth).

    ``decoded``: ``scene.decode_parts(state)``, decoded once for all views of a state.
    """
    H, W = targets.images[i].shape[:2]
    return render_view(scene, targets.views[i], backend=backend, width=W, height=H,
                       decoded=decoded)


def render_targets(scene: NeuralScene, targets: ViewTargets,
                   decoded: tuple[Splats, Splats, Splats], i: int,
                   backend: str = "auto") -> Tensor:
    """Render view ``i`` of ``targets`` at its target's size: [H, W, 3]."""
    return render_target_output(scene, targets, decoded, i, backend).rgb[0]


def _splat_tensors(parts: tuple[Splats, ...]) -> list[Tensor]:
    return [getattr(p, f.name) for p in parts for f in fields(Splats)]


def _splats_from(tensors: list[Tensor]) -> tuple[Splats, Splats, Splats]:
    n = len(fields(Splats))
    return tuple(Splats(*tensors[k * n:(k + 1) * n]) for k in range(3))  # type: ignore


@dataclass
class LiftedGradient:
    """dL/dh for every Gaussian of every part, and the loss it came from.

    Attributes:
        static: [Ns, C]; actors: [Na, C]; sky: [Hs, Ws, C];
        loss: L = sum over views of the per-image MSE (float).
    """

    static: Tensor
    actors: Tensor
    sky: Tensor
    loss: float

    def as_state(self) -> SceneState:
        return SceneState(self.static, self.actors, self.sky)


def lift_gradient(scene: NeuralScene, state: SceneState, targets: ViewTargets, *,
                  backend: str = "auto") -> LiftedGradient:
    """Gradient of the summed per-image L2 loss over ``targets`` w.r.t. ``state``.

    ``state`` is not modified and no graph is kept: the result is an input, not
    something training backpropagates through.
    """
    leaves = [t.detach().requires_grad_(True) for t in (state.static, state.actors, state.sky)]
    total = 0.0
    # autograd.grad, not backward: decoder weights (the model's, in training) must not
    # collect this gradient.
    with torch.enable_grad():
        # Decode once; views backpropagate to the decoded splats, which then go back
        # through the decoders to the states in one pass.
        decoded = _splat_tensors(scene.decode_parts(SceneState(*leaves)))
        dleaves = [t.detach().requires_grad_(True) for t in decoded]
        dgrads = [torch.zeros_like(t) for t in dleaves]
        for i in range(len(targets)):
            rgb = render_targets(scene, targets, _splats_from(dleaves), i, backend)
            loss = F.mse_loss(rgb, targets.images[i])
            for acc, g in zip(dgrads, torch.autograd.grad(loss, dleaves, allow_unused=True),
                              strict=True):
                if g is not None:
                    acc += g
            total += float(loss.detach())
        used = [k for k, t in enumerate(decoded) if t.requires_grad]
        grads = torch.autograd.grad([decoded[k] for k in used], leaves,
                                    grad_outputs=[dgrads[k] for k in used],
                                    allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves,
                                                                          strict=True)]
    return LiftedGradient(*grads, loss=total)


def view_groups(n: int, groups: int, seed: int = 0) -> list[list[int]]:
    """Split view indices 0..n-1 into ``groups`` interleaved groups of a seeded
    permutation (so no group is one camera or one stretch of road).

    Step t of a G3R run lifts group (t - 1) mod G: every view is read once every G steps
    at 1/G of the cost of a full lift per step. Deterministic for a given seed.
    """
    if groups < 1:
        raise ValueError(f"lift groups must be >= 1, not {groups}")
    g = max(1, min(groups, n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(perm[k::g]) for k in range(g)]


def normalise_gradient(grad: Tensor) -> Tensor:
    """Scale-free gradient [N, C] (or [..., C]): per channel, divide by its RMS over the
    Gaussians that have any gradient, then compress the tails with sign * log1p(|x|).

    Multiplying the loss, or the number of views, by any factor leaves the result
    unchanged; a channel without any gradient stays zero.
    """
    flat = grad.reshape(-1, grad.shape[-1])
    seen = flat.abs().sum(-1) > 0
    if not seen.any():
        return torch.zeros_like(grad)
    rms = flat[seen].pow(2).mean(0).sqrt()  # [C]
    x = grad / torch.where(rms > 0, rms, torch.ones_like(rms))
    return torch.sign(x) * torch.log1p(x.abs())
