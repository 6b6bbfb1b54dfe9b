"""Log -> scene on disk: the one function the CLI and the service both call."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from recon.adam import AdamConfig, optimise_adam
from recon.assets import save_scene
from recon.g3r.optimize import G3RRunConfig
from recon.init import InitConfig, initialise_scene
from recon.neural import BASE_CHANNELS, NeuralScene
from scenes.log import LogSegment

METHODS = ("g3r", "adam")
DEFAULT_METHOD = "g3r"


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
    checkpoint_hash: str | None = None


def reconstruct(log: LogSegment, out_dir: str | Path, *, method: str = DEFAULT_METHOD,
                init: InitConfig | None = None, adam: AdamConfig | None = None,
                stage: Callable[[str], None] | None = None,
                progress: Callable[[int, int, float], None] | None = None,
                should_stop: Callable[[], bool] | None = None,
                steps: int | None = None, turbo: bool = False,
                checkpoint: str | Path | None = None, g3r: G3RRunConfig | None = None,
                overwrite: bool = True, device: str | None = None) -> ReconResult:
    """Initialise from LiDAR, optimise with ``method``, write the assets atomically.

    Args:
        stage: called with "initialising", "optimising", "writing" as work moves on.
        progress: ``progress(step, total, loss)`` during optimisation.
        should_stop: polled between steps; a stopped run still writes what it has.
        steps: optimiser steps (Adam iterations; G3R's T); None keeps the method's default.
        turbo: G3R's short schedule (T = 12); not meaningful for Adam.
        checkpoint: G3R model file (default: the shipped checkpoint); its SHA-256 lands
            in the manifest. g3r: other G3R run settings (lift resolution, backend).
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
    if method != "g3r" and (checkpoint is not None or g3r is not None):
        raise ValueError("checkpoint and G3R settings apply to method g3r only")
    say = stage or (lambda _s: None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = None
    if method == "g3r":  # load (and fail on a bad file) before any work
        from recon.g3r.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, device=dev)
    t0 = time.perf_counter()
    say("initialising")
    if ckpt is not None:
        latent = ckpt.model.config.channels - BASE_CHANNELS
        init = replace(init or InitConfig(), latent=latent)
    scene = initialise_scene(log, init).to(dev)
    init_s = time.perf_counter() - t0
    say("optimising")
    if ckpt is not None:
        from recon.g3r.optimize import optimise_g3r

        run = g3r or G3RRunConfig()
        # Only what the caller set overrides the run config's own steps and schedule.
        if steps is not None:
            run = replace(run, steps=steps)
        if turbo:
            run = replace(run, turbo=True)
        res = optimise_g3r(scene, log, ckpt.model, run, progress=progress,
                           should_stop=should_stop)
    else:
        res = optimise_adam(scene, log, adam, progress=progress, should_stop=should_stop)
    recon_s = init_s + res.seconds
    say("writing")
    metrics = {"init_s": init_s, "iterations": res.iterations,
               "final_loss": res.losses[-1] if res.losses else None}
    if ckpt is not None:  # what resolution the gradient was read at: never silent
        metrics |= {"lift_width": res.lift_width, "native_width": res.native_width}
    path = save_scene(scene, out_dir, log=log, method=method, recon_s=recon_s,
                      checkpoint_hash=ckpt.sha256 if ckpt is not None else None,
                      metrics=metrics,
                      overwrite=overwrite)
    return ReconResult(Path(path), scene, recon_s, init_s, res.iterations,
                       ckpt.sha256 if ckpt is not None else None)
