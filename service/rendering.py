"""Rendering a loaded scene into an image: the one path the CLI and the HTTP API share.

``recorded_view`` builds the ``recon.views.View`` of a recorded camera (optionally
lane-shifted, optionally at another time), ``custom_view`` one from an arbitrary pose and
intrinsics, ``render_rgb`` renders with actor edits into uint8 pixels and ``encode``
makes PNG or JPEG bytes.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from recon.assets import LoadedScene
from recon.neural import ActorEdit, NeuralScene
from recon.views import View, render_view

IMAGE_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg")}


def recorded_view(loaded: LoadedScene, frame: int, camera: str | None = None,
                  shift_m: float = 0.0, t: float | None = None) -> View:
    """The view of ``camera`` (default: the scene's first) at recorded ``frame``.

    Args:
        shift_m: lateral ego shift (m, + = left).
        t: time (s since segment start) that places the actors; default the image's.

    Raises:
        ValueError: unknown frame or camera (the message lists the valid ones).
    """
    cam = camera or next(iter(loaded.cameras))
    if cam not in loaded.cameras:
        raise ValueError(f"no camera {cam!r} in this scene; cameras: {sorted(loaded.cameras)}")
    _, _, W, H, ts = loaded.view(frame, cam, shift_m)
    return View(frame, cam, loaded.cam_to_world(frame, cam, shift_m), loaded.cameras[cam].K,
                W, H, ts if t is None else float(t), shift_m)


def custom_view(cam_to_world: np.ndarray, K: np.ndarray, width: int, height: int,
                t: float, camera: str = "custom") -> View:
    """A view from an arbitrary OpenCV camera pose [4, 4] and intrinsics K [3, 3]."""
    return View(-1, camera, np.asarray(cam_to_world, dtype=np.float64),
                np.asarray(K, dtype=np.float64), int(width), int(height), float(t))


def render_rgb(scene: NeuralScene, view: View, *, edits: dict[str, ActorEdit] | None = None,
               width: int | None = None, height: int | None = None,
               backend: str = "auto") -> np.ndarray:
    """Render a view into [H, W, 3] uint8 (resizing scales the intrinsics).

    Raises:
        KeyError: an edit names an actor the scene does not have.
    """
    with torch.no_grad():
        res = render_view(scene, view, edits=edits or {}, backend=backend, width=width,
                          height=height)
    return (res.rgb[0].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def encode(img: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """PNG or JPEG bytes of an [H, W, 3] uint8 image."""
    from PIL import Image

    pil_fmt, _ = IMAGE_FORMATS[fmt]
    buf = io.BytesIO()
    kwargs = {"quality": int(quality)} if pil_fmt == "JPEG" else {}
    Image.fromarray(img).save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()
