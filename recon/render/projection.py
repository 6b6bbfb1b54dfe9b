"""EWA projection of 3D Gaussians to screen space (pure PyTorch, differentiable).

Semantics follow gsplat's classic pinhole path (``fully_fused_projection`` with
opacities, ``radius_clip=0``), so the torch and gsplat backends cull and bound the same
Gaussians:

* camera-space depth ``z`` outside ``[near, far]`` -> culled;
* the EWA Jacobian is evaluated at the mean with x/z and y/z clamped to the field of
  view widened by 30 % of the half-FOV tangent on each side (keeps splats that hang far
  off-screen from blowing up);
* 0.3 px^2 is added to the 2D covariance diagonal (``eps2d``, a low-pass filter);
  ``compensations`` = sqrt(det(cov2d) / det(cov2d + eps2d I)) is what gsplat's
  antialiased mode (Mip-Splatting's 2D filter) multiplies opacities by, so a splat
  smaller than a pixel keeps its true coverage instead of growing to the filter's size;
* extent: ``min(3.33, sqrt(2 ln(255 o)))`` standard deviations along each axis (beyond it
  ``o * exp(-q/2)`` falls below 1/255), radius rounded up to whole pixels;
* opacity under 1/255, a non-positive 2D determinant or a box entirely outside the
  image -> culled (radii 0).

In the antialiased mode ``o`` above is the compensated opacity (opacity x
``compensations``), as in gsplat, which applies the compensation before its cull and its
opacity-aware extent; with the raw opacity, small faint splats would keep radii (and pixel
work) that gsplat drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Low-pass filter added to the 2D covariance diagonal (px^2).
EPS2D = 0.3
#: Contributions with alpha below this are skipped; also the opacity cull threshold.
ALPHA_THRESHOLD = 1.0 / 255.0
#: Upper bound of a splat's extent, in standard deviations.
MAX_EXTENT_SIGMA = 3.33
#: Per-sample alpha clamp (gsplat releases 1.x up to 1.5.x).
MAX_ALPHA = 0.999
#: Compositing stops (exclusively) once transmittance would fall to this value.
TRANSMITTANCE_THRESHOLD = 1e-4
#: Fraction of the half-FOV tangent added on each side before clamping the Jacobian.
FOV_CLAMP_MARGIN = 0.3


@dataclass
class Projection:
    """Per-(camera, Gaussian) screen-space quantities.

    Attributes:
        means2d: [C, N, 2] pixel coordinates of the projected means (pixel centres at
            +0.5).
        conics: [C, N, 3] inverse of the (blurred) 2D covariance, (a, b, c) for
            [[a, b], [b, c]].
        depths: [C, N] camera-space z.
        radii: [C, N, 2] int32 extent in pixels along x and y; 0 where culled.
        valid: [C, N] bool, False where culled.
        compensations: [C, N] opacity factor of the antialiased mode, in (0, 1]; None
            unless asked for.
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    valid: Tensor
    compensations: Tensor | None = None


def quat_scale_to_matrix(quats: Tensor, scales: Tensor) -> Tensor:
    """M = R(q) diag(s), so that the covariance is M M^T.

    Args:
        quats: [N, 4] (w, x, y, z), any norm (normalised here).
        scales: [N, 3] standard deviations along the local axes.

    Returns:
        [N, 3, 3]
    """
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)
    return R * scales[..., None, :]


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near: float,
    far: float,
    antialiased: bool = False,
) -> Projection:
    """Project N Gaussians into C pinhole cameras.

    Args:
        means: [N, 3] world positions.
        quats: [N, 4] (w, x, y, z) rotations, any norm.
        scales: [N, 3] standard deviations.
        opacities: [N] in [0, 1].
        viewmats: [C, 4, 4] world -> camera (OpenCV axes).
        Ks: [C, 3, 3] intrinsics.
        width, height: image size in pixels.
        near, far: camera-space z range kept.

    Returns:
        A :class:`Projection`. Culled entries hold finite placeholder values (so masked
        arithmetic never produces NaN gradients) and radii 0.
    """
    Rv = viewmats[:, None, :3, :3]  # [C, 1, 3, 3]
    tv = viewmats[:, None, :3, 3]  # [C, 1, 3]
    means_c = (Rv @ means[None, :, :, None]).squeeze(-1) + tv  # [C, N, 3]
    x, y, z = means_c.unbind(-1)
    in_depth = (z >= near) & (z <= far)
    # Placeholder depth for culled Gaussians: keeps divisions finite.
    zs = torch.where(in_depth, z, torch.ones_like(z))

    fx = Ks[:, 0, 0, None]
    fy = Ks[:, 1, 1, None]
    cx = Ks[:, 0, 2, None]
    cy = Ks[:, 1, 2, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + FOV_CLAMP_MARGIN * tan_fovx
    lim_x_neg = cx / fx + FOV_CLAMP_MARGIN * tan_fovx
    lim_y_pos = (height - cy) / fy + FOV_CLAMP_MARGIN * tan_fovy
    lim_y_neg = cy / fy + FOV_CLAMP_MARGIN * tan_fovy
    u = x / zs
    v = y / zs
    uc = torch.minimum(torch.maximum(u, -lim_x_neg), lim_x_pos)
    vc = torch.minimum(torch.maximum(v, -lim_y_neg), lim_y_pos)

    means2d = torch.stack([fx * u + cx, fy * v + cy], dim=-1)  # [C, N, 2]

    # cov2d = J Rv M M^T Rv^T J^T with J = [[fx/z, 0, -fx uc/z], [0, fy/z, -fy vc/z]].
    Mc = Rv @ quat_scale_to_matrix(quats, scales)[None]  # [C, N, 3, 3]
    row_x = (fx / zs)[..., None] * (Mc[..., 0, :] - uc[..., None] * Mc[..., 2, :])
    row_y = (fy / zs)[..., None] * (Mc[..., 1, :] - vc[..., None] * Mc[..., 2, :])
    a = (row_x * row_x).sum(-1) + EPS2D
    b = (row_x * row_y).sum(-1)
    c = (row_y * row_y).sum(-1) + EPS2D
    det = a * c - b * b
    ok_det = det > 0
    dets = torch.where(ok_det, det, torch.ones_like(det))
    conics = torch.stack([c / dets, -b / dets, a / dets], dim=-1)
    comp = None
    if antialiased:  # floor keeps sqrt's gradient finite for splats seen exactly edge-on
        comp = torch.sqrt(((a - EPS2D) * (c - EPS2D) - b * b).clamp_min(1e-12) / dets)
        comp = comp.clamp_max(1.0)

    with torch.no_grad():
        o = opacities.detach()[None].expand_as(z)
        if comp is not None:  # gsplat culls and bounds with the compensated opacity
            o = o * comp.detach()
        ok_opacity = o >= ALPHA_THRESHOLD
        extent = torch.sqrt(2.0 * torch.log((o / ALPHA_THRESHOLD).clamp_min(1.0)))
        extent = extent.clamp_max(MAX_EXTENT_SIGMA)
        rx = torch.ceil(extent * torch.sqrt(a.detach().clamp_min(0)))
        ry = torch.ceil(extent * torch.sqrt(c.detach().clamp_min(0)))
        mx, my = means2d.detach().unbind(-1)
        on_screen = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        valid = in_depth & ok_det & ok_opacity & ((rx > 0) | (ry > 0)) & on_screen
        radii = torch.stack([rx, ry], dim=-1)
        radii = torch.where(valid[..., None], radii, torch.zeros_like(radii)).to(torch.int32)

    return Projection(means2d=means2d, conics=conics, depths=z, radii=radii, valid=valid,
                      compensations=comp)
