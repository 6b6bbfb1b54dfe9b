"""Adam baseline convergence on a synthetic log (``drivesplat bench adam``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from recon.adam import AdamConfig, optimise_adam
from recon.evaluate import evaluate
from recon.init import InitConfig, initialise_scene
from scenes.synthetic import SyntheticConfig, generate_log, render_all


def bench_adam_curve(log_config: SyntheticConfig, init: InitConfig, adam: AdamConfig, *,
                     eval_every: int, max_views: int | None,
                     on_row: Callable[[dict], None] | None = None) -> dict:
    """Held-out PSNR/SSIM of the Adam baseline from initialisation on, every
    ``eval_every`` steps (evaluation time excluded from the wall time), then the full
    protocol (lane shifts, actors, depth) on the final scene."""
    log = generate_log(log_config)
    render_all(log, ground_truth=False)  # not part of init: a recorded log is on disk
    t0 = time.perf_counter()
    scene = initialise_scene(log, init)
    init_s = time.perf_counter() - t0

    def hook(step: int, elapsed: float) -> dict:
        m = evaluate(scene, log, max_views=max_views, backend=adam.backend)
        row = {"step": step, "wall_s": round(init_s + elapsed, 2), "psnr": m["psnr"],
               "ssim": m["ssim"]}
        if on_row is not None:
            on_row(row)
        return row

    torch.manual_seed(adam.seed)
    res = optimise_adam(scene, log, adam, eval_hook=hook, eval_every=eval_every)
    final = evaluate(scene, log, backend=adam.backend, recon_s=init_s + res.seconds)
    return {"log": log.name, "gaussians": scene.num_gaussians, "init_s": init_s,
            "iterations": res.iterations, "optimise_s": res.seconds, "curve": res.curve,
            "final": final}
