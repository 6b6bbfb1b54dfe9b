"""Camera views of a log and rendering a ``NeuralScene`` into them.

Protocol (DESIGN.md, Measuring quality): source views are the even frames of every
camera, held-out views the odd frames, lane-shifted views the synthetic ground truth of
held-out frames with the ego moved sideways.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon.neural import ActorEdit, NeuralScene, Splats
from recon.render import RenderOutput, rasterize
from scenes.geometry import invert_pose
from scenes.log import LogSegment


@dataclass
class View:
    """One pinhole view with (optionally) its ground truth.

    Attributes:
        frame_index: source frame index; camera: camera name.
        cam_to_world: [4, 4] float64; K: [3, 3] float64; width, height: pixels.
        timestamp: seconds since segment start (places the actors).
        shift_m: lateral ego shift of a lane-shifted view (0 for recorded views).
        image: returns [H, W, 3] uint8 ground truth (None if there is none).
        depth: returns [H, W] float32 z-depth ground truth, inf = sky (None: none).
    """

    frame_index: int
    camera: str
    cam_to_world: np.ndarray
    K: np.ndarray
    width: int
    height: int
    timestamp: float
    shift_m: float = 0.0
    image: Callable[[], np.ndarray] | None = None
    depth: Callable[[], np.ndarray] | None = None

    def target(self, device: torch.device | str = "cpu") -> Tensor:
        """Ground-truth image [H, W, 3] float32 in [0, 1]."""
        if self.image is None:
            raise ValueError(f"view frame {self.frame_index} {self.camera} has no image")
        return torch.from_numpy(np.array(self.image())).to(device).float() / 255.0


def is_source_position(pos):
    """Whether the frame at position ``pos`` (an int, or an int tensor elementwise) of a
    log is a source frame (even positions); the others are held out and must never
    inform a reconstruction."""
    return pos % 2 == 0


def log_views(log: LogSegment, parity: int | None = None) -> list[View]:
    """Recorded views of a log: ``parity`` 0 = even frames (source), 1 = odd (held-out).

    Parity is of the frame's position in the log, so a selected sub-range keeps the
    protocol.
    """
    gt = log.ground_truth
    views = []
    for pos, f in enumerate(log.frames):
        if parity is not None and is_source_position(pos) != (parity == 0):
            continue
        for name, im in f.images.items():
            cam = log.cameras[name]
            depth = gt.depth.get((f.index, name)) if gt is not None else None
            views.append(View(f.index, name, im.cam_to_world, cam.K, cam.width, cam.height,
                              im.timestamp, 0.0, im.image, depth))
    return views


def source_views(log: LogSegment) -> list[View]:
    return log_views(log, 0)


def heldout_views(log: LogSegment) -> list[View]:
    return log_views(log, 1)


def shifted_views(log: LogSegment) -> list[View]:
    """Lane-shifted ground-truth views of held-out frames (synthetic logs only)."""
    if log.ground_truth is None:
        return []
    out = []
    for v in log.ground_truth.shifted:
        cam = log.cameras[v.camera]
        out.append(View(v.frame_index, v.camera, v.cam_to_world, cam.K, cam.width, cam.height,
                        v.timestamp, v.shift_m, v.image.load, v.depth))
    return out


def render_view(scene: NeuralScene, view: View, *, edits: dict[str, ActorEdit] | None = None,
                backend: str = "auto", width: int | None = None,
                height: int | None = None,
                decoded: tuple[Splats, Splats, Splats] | None = None) -> RenderOutput:
    """Render the scene into one view (optionally resized: intrinsics scale with it).

    ``decoded`` renders parts decoded from another state (see
    :meth:`NeuralScene.splats`).

    Returns the rasterizer output for C = 1.
    """
    device = scene.static_state.device
    W, H = width or view.width, height or view.height
    K = view.K.copy()
    K[0] *= W / view.width
    K[1] *= H / view.height
    splats, _ = scene.splats(view.timestamp, edits, decoded=decoded)
    viewmat = torch.from_numpy(invert_pose(view.cam_to_world)).float().to(device)[None]
    Ks = torch.from_numpy(K).float().to(device)[None]
    return rasterize(splats.means, splats.quats, splats.scales, splats.opacities,
                     splats.colors, viewmat, Ks, W, H, backend=backend,
                     rasterize_mode=scene.rasterize_mode)
