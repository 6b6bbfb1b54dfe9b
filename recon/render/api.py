"""``rasterize``: one contract, two backends (pure torch; gsplat on CUDA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from recon.render.gsplat_backend import gsplat_available, rasterize_gsplat
from recon.render.projection import project_gaussians
from recon.render.torch_backend import DEFAULT_MAX_PAIRS_PER_CHUNK, rasterize_torch

Backend = Literal["auto", "torch", "gsplat"]
RasterizeMode = Literal["classic", "antialiased"]
RASTERIZE_MODES = ("classic", "antialiased")


def check_rasterize_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`RASTERIZE_MODES`, else ValueError naming it."""
    if mode not in RASTERIZE_MODES:
        raise ValueError(f"rasterize_mode must be one of {RASTERIZE_MODES}, not {mode!r}")
    return mode
BACKENDS: tuple[str, ...] = ("auto", "torch", "gsplat")

#: Floor of the alpha that divides accumulated depth (gsplat's "ED" mode uses the same).
DEPTH_ALPHA_FLOOR = 1e-10


@dataclass
class RenderOutput:
    """What :func:`rasterize` returns.

    Attributes:
        rgb: [C, H, W, D] composited colours/features, background blended in.
        alpha: [C, H, W, 1] accumulated opacity, 1 - final transmittance.
        depth: [C, H, W, 1] expected camera-space z: sum(w z) / max(alpha, 1e-10)
            (gsplat's "ED"); 0 where nothing was drawn. Background does not enter it.
        radii: [C, N, 2] int32 screen extent in pixels (x, y); 0 where the Gaussian is
            culled in that view (behind near / beyond far, off-screen, opacity < 1/255).
        means2d: [C, N, 2] projected means in pixels (undefined where radii are 0).
        depths: [C, N] camera-space z of the means (undefined where radii are 0).
        backend: the backend that ran ("torch" or "gsplat").
        stats: backend counters. torch: ``pairs_enumerated`` (Gaussian-pixel pairs
            evaluated; pixels already saturated by nearer Gaussians are skipped),
            ``pairs_composited`` (pairs that contributed, the work of the backward pass),
            ``chunks`` (depth batches); gsplat: ``tile_intersections``.
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    radii: Tensor
    means2d: Tensor
    depths: Tensor
    backend: str
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def visible(self) -> Tensor:
        """[C, N] bool: the Gaussian was rasterised in that view."""
        return (self.radii > 0).any(-1)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``auto`` -> gsplat when on CUDA and gsplat is installed, else torch."""
    if backend == "auto":
        return "gsplat" if device.type == "cuda" and gsplat_available() else "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise ValueError("the gsplat backend needs CUDA tensors; use backend='torch'")
        if not gsplat_available():
            raise ValueError("the gsplat backend needs gsplat: pip install 'drivesplat[gpu]'")
        return "gsplat"
    if backend == "torch":
        return "torch"
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _check_shapes(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                  colors: Tensor, viewmats: Tensor, Ks: Tensor,
                  backgrounds: Tensor | None) -> None:
    N = means.shape[0]
    C = viewmats.shape[0]
    expect = {
        "means": (means, (N, 3)), "quats": (quats, (N, 4)), "scales": (scales, (N, 3)),
        "opacities": (opacities, (N,)), "viewmats": (viewmats, (C, 4, 4)),
        "Ks": (Ks, (C, 3, 3)),
    }
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if colors.dim() not in (2, 3) or colors.shape[-2] != N or (
            colors.dim() == 3 and colors.shape[0] != C):
        raise ValueError(f"colors has shape {tuple(colors.shape)}, expected [N, D] or "
                         f"[C, N, D] with N={N}, C={C}")
    D = colors.shape[-1]
    if backgrounds is not None and tuple(backgrounds.shape) != (C, D):
        raise ValueError(f"backgrounds has shape {tuple(backgrounds.shape)}, expected {(C, D)}")


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    backgrounds: Tensor | None = None,
    backend: Backend = "auto",
    *,
    rasterize_mode: RasterizeMode = "classic",
    max_pairs_per_chunk: int = DEFAULT_MAX_PAIRS_PER_CHUNK,
) -> RenderOutput:
    """Render 3D Gaussians into C pinhole views, differentiably.

    Semantics of gsplat's classic mode: EWA projection (Jacobian clamped at 1.3x the
    FOV tangent), +0.3 px^2 on the 2D covariance diagonal, opacity-aware extent
    min(3.33, sqrt(2 ln(255 o))) sigma, alpha = min(0.999, o exp(-q/2)), samples with
    alpha < 1/255 skipped, front-to-back compositing by camera-space z, stop before
    transmittance reaches 1e-4, pixel centres at +0.5, Gaussians with z outside
    [near, far] culled.

    Args:
        means: [N, 3] world positions.
        quats: [N, 4] rotations (w, x, y, z), need not be normalised.
        scales: [N, 3] standard deviations (metres) along the local axes.
        opacities: [N] in [0, 1].
        colors: [N, D] or [C, N, D]; any D (RGB, features, ...).
        viewmats: [C, 4, 4] world -> camera, OpenCV axes (x right, y down, z forward).
        Ks: [C, 3, 3] pinhole intrinsics in pixels.
        width, height: image size.
        near, far: camera-space z range kept.
        backgrounds: [C, D] colour behind the Gaussians (default black).
        backend: "torch" (CPU or CUDA), "gsplat" (CUDA), or "auto" (gsplat when the
            tensors are on CUDA and gsplat is installed).
        rasterize_mode: "classic", or "antialiased" (gsplat's mode, Mip-Splatting's 2D
            filter): opacities are multiplied by sqrt(det(cov2d) / det(cov2d + 0.3 I)),
            so splats smaller than a pixel do not swell to the filter's size; use it
            for scenes seen both near and far.
        max_pairs_per_chunk: torch backend only: Gaussian-pixel pairs evaluated per
            depth batch, which bounds temporary memory (smaller batches skip more
            saturated pixels but pay more per-batch overhead).

    Returns:
        :class:`RenderOutput` with rgb [C, H, W, D], alpha [C, H, W, 1], depth
        [C, H, W, 1] and per-(view, Gaussian) radii / means2d / depths.
    """
    _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    check_rasterize_mode(rasterize_mode)
    which = resolve_backend(backend, means.device)
    C = viewmats.shape[0]
    if which == "gsplat":
        rgb, alpha, depth, radii, means2d, depths, stats = rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, near, far,
            backgrounds, rasterize_mode)
        return RenderOutput(rgb, alpha, depth, radii, means2d, depths, "gsplat", stats)

    proj = project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height,
                             near, far, antialiased=rasterize_mode == "antialiased")
    N, D = means.shape[0], colors.shape[-1]
    per_view = colors if colors.dim() == 3 else colors[None].expand(C, N, D)
    ones = torch.ones(C, N, 1, dtype=colors.dtype, device=colors.device)
    # Depth and a constant 1 ride along as extra channels: their composites are the
    # accumulated depth and the pixel alpha.
    features = torch.cat([per_view, proj.depths[..., None].to(colors.dtype), ones], dim=-1)
    if rasterize_mode == "antialiased":
        opacities = opacities[None] * proj.compensations
    image, stats = rasterize_torch(proj, opacities, features, width, height,
                                   max_pairs_per_chunk=max_pairs_per_chunk)
    rgb = image[..., :D]
    acc_depth = image[..., D:D + 1]
    alpha = image[..., D + 1:]
    if backgrounds is not None:
        rgb = rgb + (1.0 - alpha) * backgrounds[:, None, None, :]
    depth = acc_depth / alpha.clamp_min(DEPTH_ALPHA_FLOOR)
    return RenderOutput(rgb, alpha, depth, proj.radii, proj.means2d, proj.depths, "torch",
                        stats)
