"""Image metrics shared by training losses and evaluation: PSNR, SSIM, depth RMSE.

Images are float tensors in [0, 1], [H, W, 3] or batched [B, H, W, 3].
SSIM follows Wang et al. 2004 (11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03,
valid-region mean), the variant 3DGS and most novel-view-synthesis papers report.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> float:
    """PSNR in dB over all pixels (or those where mask [H, W] is true)."""
    # gt / mask may be CPU ground truth for a CUDA render: compare on pred's device.
    err = (pred.float() - gt.float().to(pred.device)) ** 2
    if mask is not None:
        if not bool(mask.any()):
            return math.nan
        err = err[mask.bool().to(err.device)]
    mse = float(err.mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=None) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(device=device, dtype=dtype)
    return g


def ssim_map(pred: Tensor, gt: Tensor) -> Tensor:
    """Per-pixel SSIM of [B, H, W, C] images (valid region, [B, H-10, W-10, C])."""
    if pred.dim() == 3:
        pred, gt = pred[None], gt[None]
    x = pred.permute(0, 3, 1, 2)
    y = gt.permute(0, 3, 1, 2)
    C = x.shape[1]
    g = _gaussian_window(device=x.device, dtype=x.dtype)
    wx = g.view(1, 1, 1, -1).expand(C, 1, 1, -1)
    wy = g.view(1, 1, -1, 1).expand(C, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:  # separable 11x11 Gaussian, no padding
        return F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    m = num / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return m.permute(0, 2, 3, 1)


def ssim(pred: Tensor, gt: Tensor) -> Tensor:
    """Mean SSIM (differentiable) of [H, W, C] or [B, H, W, C] images."""
    return ssim_map(pred, gt).mean()


def depth_rmse(pred: Tensor, gt: Tensor, valid: Tensor) -> float:
    """RMSE (m) of depth maps [H, W] where valid [H, W] is true."""
    if not bool(valid.any()):
        return math.nan
    return float(((pred[valid] - gt[valid]) ** 2).mean().sqrt())
