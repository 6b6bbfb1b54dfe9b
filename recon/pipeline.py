"""Log -> scene on disk: the one function the CLI and the service both call."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from recon.adam import AdamConfig, optimise_adam
from recon.assets import save_scene
from recon.init import InitConfig, initialise_scene
from recon.neural import NeuralScene
from scenes.log import LogSegment

METHODS = ("adam",)


@dataclass
class ReconResult:
    """Where the scene went and what it cost.

    Attributes:
        scene_dir: the written scene; scene: the optimised NeuralScene;
        recon_s: wall time of initialisation + optimisation (writing excluded);
        init_s: initialisation part of it; iterations: optimiser steps taken.
    """

    scene_dir: Path
    scene: NeuralScene
    recon_s: float
    init_s: float
    iterations: int


def reconstruct(log: LogSegment, out_dir: str | Path, *, method: str = "adam",
                init: InitConfig | None = None, adam: AdamConfig | None = None,
                stage: Callable[[str], None] | None = None,
                progress: Callable[[int, int, float], None] | None = None,
                should_stop: Callable[[], bool] | None = None,
                steps: int | None = None, turbo: bool = False,
                overwrite: bool = True, device: str | None = None) -> ReconResult:
    """Initialise from LiDAR, optimise with ``method``, write the assets atomically.

    Args:
        stage: called with "initialising", "optimising", "writing" as work moves on.
        progress: ``progress(step, total, loss)`` during optimisation.
        should_stop: polled between steps; a stopped run still writes what it has.
        steps: optimiser steps (Adam iterations; G3R's T); None keeps the method's default.
        turbo: G3R's short schedule (T = 12); not meaningful for Adam.
        device: where to optimise (default: CUDA when available, else CPU).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if method == "adam" and turbo:
        raise ValueError("turbo is a G3R schedule; Adam takes steps (iterations) instead")
    if method == "adam" and steps is not None:
        adam = replace(adam or AdamConfig(), iters=steps)
    say = stage or (lambda _s: None)
    t0 = time.perf_counter()
    say("initialising")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scene = initialise_scene(log, init).to(dev)
    init_s = time.perf_counter() - t0
    say("optimising")
    res = optimise_adam(scene, log, adam, progress=progress, should_stop=should_stop)
    recon_s = init_s + res.seconds
    say("writing")
    path = save_scene(scene, out_dir, log=log, method=method, recon_s=recon_s,
                      metrics={"init_s": init_s, "iterations": res.iterations,
                               "final_loss": res.losses[-1] if res.losses else None},
                      overwrite=overwrite)
    return ReconResult(Path(path), scene, recon_s, init_s, res.iterations)
