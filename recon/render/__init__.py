"""Differentiable Gaussian rasterisation: one contract (``rasterize``), two backends.

``torch``: pure PyTorch, CPU and CUDA, used in CI and on machines without a GPU.
``gsplat``: gsplat's CUDA kernels (optional extra ``drivesplat[gpu]``).
See DESIGN.md "Renderer" and :func:`recon.render.api.rasterize`.
"""

from recon.render.api import BACKENDS, RenderOutput, rasterize, resolve_backend
from recon.render.gsplat_backend import gsplat_available

__all__ = ["BACKENDS", "RenderOutput", "gsplat_available", "rasterize", "resolve_backend"]
