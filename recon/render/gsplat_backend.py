"""The CUDA backend: ``gsplat.rasterization`` (classic mode, packed) behind our contract.

gsplat is an optional extra (``pip install drivesplat[gpu]``); nothing here is imported
unless this backend is selected. Semantics match the torch backend for gsplat 1.5.x
(alpha clamp 0.999, opacity-aware extent). gsplat's development branch (1.6) lowers the
alpha clamp to 0.99, which changes pixels covered by near-opaque splats.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache

import torch
from torch import Tensor

from recon.render.projection import EPS2D

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def gsplat_available() -> bool:
    """True when gsplat is installed and its CUDA extension loads.

    gsplat imports its kernels lazily (``gsplat.cuda._backend._C``: the prebuilt
    extension, else a JIT build, else None). A package that is installed but cannot load
    them would crash at the first render, so ``auto`` uses the torch backend instead and
    says why.
    """
    if importlib.util.find_spec("gsplat") is None:
        return False
    try:
        from gsplat.cuda._backend import _C
    except Exception as e:  # noqa: BLE001 - any failure to load means: not usable
        logger.warning("gsplat is installed but its CUDA extension does not load (%s: %s); "
                       "rendering with the torch backend", type(e).__name__, e)
        return False
    if _C is None:
        logger.warning("gsplat is installed but its CUDA extension is missing (no prebuilt "
                       "extension and no JIT build); rendering with the torch backend")
        return False
    return True


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near: float,
    far: float,
    backgrounds: Tensor | None,
    rasterize_mode: str = "classic",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, dict[str, int]]:
    """Render with gsplat; same arguments as :func:`recon.render.rasterize`.

    Returns:
        rgb [C, H, W, D], alpha [C, H, W, 1], expected depth [C, H, W, 1],
        radii [C, N, 2] int32, means2d [C, N, 2], depths [C, N] (0 where culled), stats.
    """
    from gsplat import rasterization

    C = viewmats.shape[0]
    N = means.shape[0]
    D = colors.shape[-1]
    render, alpha, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near, far_plane=far, radius_clip=0.0, eps2d=EPS2D, packed=True,
        backgrounds=backgrounds, render_mode="RGB+ED", rasterize_mode=rasterize_mode,
        sparse_grad=False, absgrad=False,
    )
    rgb = render[..., :D]
    depth = render[..., D:D + 1]

    # Packed outputs are per visible (camera, Gaussian): scatter back to dense [C, N].
    cam_ids = meta["camera_ids"].long()
    gauss_ids = meta["gaussian_ids"].long()
    r = meta["radii"]
    if r.dim() == 1:  # gsplat < 1.5 reports one isotropic radius
        r = r[:, None].expand(-1, 2)
    radii = torch.zeros(C, N, 2, dtype=torch.int32, device=means.device)
    radii[cam_ids, gauss_ids] = r.to(torch.int32)
    means2d = torch.zeros(C, N, 2, dtype=means.dtype, device=means.device)
    means2d = means2d.index_put((cam_ids, gauss_ids), meta["means2d"])
    depths = torch.zeros(C, N, dtype=means.dtype, device=means.device)
    depths = depths.index_put((cam_ids, gauss_ids), meta["depths"])
    stats = {"tile_intersections": int(meta["isect_ids"].numel())}
    return rgb, alpha, depth, radii, means2d, depths, stats
