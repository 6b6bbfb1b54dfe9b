"""Reconstruct with a trained G3R model: T learned update steps instead of thousands of
Adam steps (DESIGN.md, Learned optimizer, 3).

Each step lifts the gradient of the source views' L2 loss to every Gaussian
(:mod:`recon.g3r.lift`), normalises it, and applies the model's update. Nothing here
backpropagates through the model: inference only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from recon.g3r.lift import ViewTargets, lift_gradient, normalise_gradient, view_groups, view_targets
from recon.g3r.model import G3RModel, build_scene_graph
from recon.neural import NeuralScene, SceneState
from recon.views import source_views
from scenes.log import LogSegment

logger = logging.getLogger(__name__)

#: Widest gradient-lifting render per device kind (px; None: no cap, the images' own
#: resolution). On CPU a lift renders and backpropagates a third of the source views per
#: step, so a 1920-px rig would take minutes per step; wider images are area-downsampled
#: to this width, with a warning and the width recorded in the result.
LIFT_WIDTH_CAP: dict[str, int | None] = {"cuda": None, "cpu": 960}


def lift_width_cap(device: torch.device | str) -> int | None:
    """The device's lifting cap (:data:`LIFT_WIDTH_CAP`; unknown kinds: the CPU's)."""
    kind = torch.device(device).type
    return LIFT_WIDTH_CAP.get(kind, LIFT_WIDTH_CAP["cpu"])


def resolve_lift_scale(widths: list[int], lift_width: int | None,
                       device: torch.device | str) -> float:
    """Scale of the lifting renders relative to the images (1.0: native resolution).

    ``lift_width`` None lifts at the widest image's own width, up to the device cap;
    an explicit width is honoured as asked (a caller's choice, never the model's).
    """
    if lift_width is not None and lift_width < 8:
        raise ValueError(f"lift_width must be >= 8 px, not {lift_width}")
    widest = max(widths)
    target = lift_width if lift_width is not None else lift_width_cap(device)
    return 1.0 if target is None else min(1.0, target / widest)


@dataclass(frozen=True)
class G3RRunConfig:
    """How to run a trained model on one scene.

    Attributes:
        steps: T (None: the model's default, 24); turbo: the model's short schedule (12).
        lift_width: gradient-lifting renders are at most this wide (aspect kept); larger
            images are area-downsampled. None (default): the images' native resolution,
            up to the device's cap (:data:`LIFT_WIDTH_CAP`: none on CUDA, 960 px on
            CPU); a capped lift logs a warning and every result records its width.
        lift_groups: views lifted per step = 1/G of the source views (None: the
            model's, the grouping it was trained with; 1: all views every step).
        backend: renderer.
    """

    steps: int | None = None
    turbo: bool = False
    lift_width: int | None = None
    lift_groups: int | None = None
    backend: str = "auto"

    def resolve_steps(self, model: G3RModel) -> int:
        if self.steps is not None:
            if self.steps < 1:
                raise ValueError(f"steps must be >= 1, not {self.steps}")
            return self.steps
        return model.config.turbo_steps if self.turbo else model.config.steps

    def resolve_groups(self, model: G3RModel) -> int:
        g = self.lift_groups if self.lift_groups is not None else model.config.lift_groups
        if g < 1:
            raise ValueError(f"lift_groups must be >= 1, not {g}")
        return g


@dataclass
class G3RResult:
    iterations: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # L2 of the step's view group, before it
    lift_width: int = 0  # px of the widest lifting render (the images' own: native)
    native_width: int = 0  # px of the widest source image
    curve: list[dict] = field(default_factory=list)  # from the eval hook


def normalised(grad: SceneState) -> SceneState:
    return SceneState(normalise_gradient(grad.static), normalise_gradient(grad.actors),
                      normalise_gradient(grad.sky))


def g3r_steps(model: G3RModel, scene: NeuralScene, state: SceneState, targets: ViewTargets,
              T: int, *, groups: int = 1, backend: str = "auto",
              on_step: Callable[[int, SceneState, float], bool | None] | None = None
              ) -> SceneState:
    """Apply T model updates to ``state`` (no graph); returns the final state.

    Step t lifts the gradient from view group (t - 1) mod ``groups``
    (:func:`~recon.g3r.lift.view_groups`). ``on_step(t, new_state, loss_before)`` runs
    after each step; returning True stops.
    """
    graph = build_scene_graph(scene, model.config)
    subsets = [targets.subset(g) for g in view_groups(len(targets), groups)]
    for t in range(1, T + 1):
        lifted = lift_gradient(scene, state, subsets[(t - 1) % len(subsets)],
                               backend=backend)
        with torch.no_grad():
            state = model.update(state, normalised(lifted.as_state()), graph, t, T)
        if on_step is not None and on_step(t, state, lifted.loss):
            break
    return state


def optimise_g3r(scene: NeuralScene, log: LogSegment, model: G3RModel,
                 config: G3RRunConfig | None = None, *,
                 progress: Callable[[int, int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 eval_hook: Callable[[int, float], dict] | None = None) -> G3RResult:
    """Run the model on ``scene`` (initialised from ``log``) in place.

    The scene takes the model's decoders, then T updates of its states from the
    gradient of ``log``'s source views.

    Args:
        progress: ``progress(step, T, loss)`` after every step.
        should_stop: polled after every step; the scene keeps the state reached so far.
        eval_hook: ``eval_hook(step, seconds)`` after every step (its time is excluded
            from the reported seconds); the returned rows form ``curve``.
    """
    cfg = config or G3RRunConfig()
    T = cfg.resolve_steps(model)
    device = scene.static_state.device
    model = model.to(device)
    model.install_decoders(scene)
    t0 = time.perf_counter()
    views = source_views(log)
    if not views:
        raise ValueError(f"log {log.name!r} has no source views (even frames with images)")
    native = max(v.width for v in views)
    scale = resolve_lift_scale([v.width for v in views], cfg.lift_width, device)
    targets = view_targets(views, scale, device)
    lifted_w = max(img.shape[1] for img in targets.images)
    if lifted_w < native:
        logger.warning("G3R lifts gradients at %d px wide, below the images' %d px (%s)",
                    lifted_w, native, "asked for" if cfg.lift_width is not None
                    else f"the {device.type} cap, LIFT_WIDTH_CAP")
    result = G3RResult(0, 0.0, lift_width=lifted_w, native_width=native)
    excluded = 0.0

    def on_step(t: int, state: SceneState, loss: float) -> bool:
        nonlocal excluded
        result.iterations = t
        result.losses.append(loss)
        if progress is not None:
            progress(t, T, loss)
        if eval_hook is not None:
            scene.load_state_(state)
            t_eval = time.perf_counter()
            result.curve.append(eval_hook(t, t_eval - t0 - excluded))
            excluded += time.perf_counter() - t_eval
        return bool(should_stop is not None and should_stop())

    final = g3r_steps(model, scene, scene.state().detach().clone(), targets, T,
                      groups=cfg.resolve_groups(model), backend=cfg.backend,
                      on_step=on_step)
    scene.load_state_(final)
    result.seconds = time.perf_counter() - t0 - excluded
    return result
