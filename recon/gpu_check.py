"""The one prepared device check (``make gpu-check``; ``python -m recon.gpu_check``).

A GPU is lent to a session for about 15 minutes in all, so everything that needs one runs
here, in one process, in a fixed order, writing ``results.json`` into ``--out`` after
every stage (a run cut short still returns what it finished):

1. ``env``: torch, CUDA, the device, whether gsplat's extension loads;
2. ``tests``: the GPU tests (``pytest -m gpu``: gsplat against the torch backend);
3. ``raster``: render time and FPS for 1M Gaussians at 1920x1080, per backend;
4. ``recon``: G3R against Adam on a 1920x1080, 6-camera synthetic log at the device's
   default Gaussian budget (``drivesplat bench recon`` rows, with a plot);
5. ``finetune``: the shipped G3R checkpoint fine-tuned for a fixed time budget at the
   default scale; the checkpoint is written to ``--out``.

``--tiny`` runs the same stages at toy sizes on whatever device there is (CI runs it on
CPU): it checks the script, not the numbers. Only ``recon`` and ``scenes`` are imported,
so the device machine needs no web-service packages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class CheckSizes:
    """What each stage runs (``FULL`` on a GPU, ``TINY`` anywhere)."""

    raster_gaussians: int
    raster_width: int
    raster_height: int
    raster_frames: int
    recon_width: int
    recon_height: int
    recon_frames: int
    recon_cameras: tuple[str, ...]
    recon_budget: int | None  # None: the device's default (2M on CUDA)
    recon_actor_budget: int | None
    adam_iters: int
    adam_eval_every: int
    g3r_steps: int | None  # None: the model's T
    finetune_s: float
    finetune_frames: tuple[int, int]
    finetune_width: int
    finetune_height: int
    finetune_budget: int
    finetune_actor_budget: int
    finetune_scenes: int
    repeats: int


FULL = CheckSizes(raster_gaussians=1_000_000, raster_width=1920, raster_height=1080,
                  raster_frames=10, recon_width=1920, recon_height=1080, recon_frames=8,
                  recon_cameras=("front", "front_left", "front_right", "left", "right",
                                 "back"),
                  recon_budget=None, recon_actor_budget=None, adam_iters=3000,
                  adam_eval_every=250, g3r_steps=None, finetune_s=150.0,
                  finetune_frames=(16, 40),
                  finetune_width=320, finetune_height=180, finetune_budget=100_000,
                  finetune_actor_budget=2000, finetune_scenes=4, repeats=10)
TINY = CheckSizes(raster_gaussians=2000, raster_width=64, raster_height=36, raster_frames=2,
                  recon_width=48, recon_height=32, recon_frames=4,
                  recon_cameras=("front", "left"), recon_budget=1500,
                  recon_actor_budget=80, adam_iters=4, adam_eval_every=2, g3r_steps=2,
                  finetune_s=4.0,
                  finetune_frames=(4, 4), finetune_width=48, finetune_height=32,
                  finetune_budget=1500, finetune_actor_budget=80, finetune_scenes=1,
                  repeats=1)


def environment() -> dict:
    """What the stages run on: torch, CUDA, the device and gsplat's extension."""
    from recon.render import gsplat_available

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "gsplat": gsplat_available()}
    try:
        import gsplat

        info["gsplat_version"] = gsplat.__version__
    except ImportError:
        info["gsplat_version"] = None
    return info


def gpu_tests(out: Path, tiny: bool) -> dict:
    """``pytest -m gpu`` (in tiny mode only the test collection: CPU has no GPU tests)."""
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"]
    if tiny:
        args.append("--collect-only")
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    # pytest exits 5 when every test was deselected or skipped: nothing failed.
    return {"returncode": proc.returncode, "passed": proc.returncode in (0, 5),
            "summary": tail, "seconds": time.perf_counter() - t0}


def raster(sizes: CheckSizes) -> dict:
    """Forward and forward+backward time per view, per backend available here."""
    from recon.render import gsplat_available
    from recon.render.bench import RasterBenchConfig, run_raster_bench

    backends = ["torch"] + (["gsplat"] if torch.cuda.is_available() and gsplat_available()
                            else [])
    out = {}
    for b in backends:
        rep = run_raster_bench(RasterBenchConfig(
            gaussians=[sizes.raster_gaussians], width=sizes.raster_width,
            height=sizes.raster_height, frames=sizes.raster_frames, backend=b,
            repeats=sizes.repeats))
        row = rep["rows"][0]
        out[b] = {**row, "fps_forward": 1 / row["forward_s"] if row["forward_s"] else None,
                  "machine": rep["machine"]}
    return out


def recon(sizes: CheckSizes, out: Path, tiny: bool) -> dict:
    """G3R against Adam on one large multi-camera log (the bench recon rows)."""
    from recon.g3r.bench import BenchConfig, bench_log, plot_report, summarise
    from recon.g3r.checkpoint import load_checkpoint
    from scenes.synthetic import SyntheticConfig, cameras_arg

    log_cfg = SyntheticConfig(seed=3, frames=sizes.recon_frames, width=sizes.recon_width,
                              height=sizes.recon_height,
                              cameras=cameras_arg(list(sizes.recon_cameras)), shifts_m=())
    cfg = BenchConfig(budget=sizes.recon_budget, actor_budget=sizes.recon_actor_budget,
                      adam_iters=sizes.adam_iters, adam_eval_every=sizes.adam_eval_every,
                      g3r_steps=sizes.g3r_steps)
    ckpt = load_checkpoint()
    lg = bench_log(f"{sizes.recon_width}x{sizes.recon_height}, "
                   f"{len(sizes.recon_cameras)} cameras", log_cfg, ckpt, {}, cfg, print)
    report = {"checkpoint": {"sha256": ckpt.sha256}, "logs": [lg], **summarise([lg])}
    plot_report(report, str(out / "recon_psnr_vs_time.png"))
    return report


def finetune(sizes: CheckSizes, out: Path) -> dict:
    """Fine-tune the shipped checkpoint for ``sizes.finetune_s`` seconds."""
    from recon.g3r.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from recon.g3r.train import TrainConfig, train

    start = load_checkpoint()
    cfg = replace(TrainConfig(), init_from=str(DEFAULT_CHECKPOINT), model=start.model.config,
                  frames=sizes.finetune_frames, width=sizes.finetune_width,
                  height=sizes.finetune_height, budget=sizes.finetune_budget,
                  actor_budget=sizes.finetune_actor_budget, scenes=sizes.finetune_scenes,
                  unroll_start=start.model.config.steps, lr=3e-4, val_every=10**9,
                  time_budget_s=sizes.finetune_s)
    work = out / "finetune_work"
    path = train(cfg, work)
    shutil.copy(path, out / "g3r_finetuned.safetensors")
    shutil.copy(work / "train_log.jsonl", out / "finetune_log.jsonl")
    ck = load_checkpoint(out / "g3r_finetuned.safetensors")
    shutil.rmtree(work)  # train_state and snapshots stay on the device
    return {"checkpoint": "g3r_finetuned.safetensors", "sha256": ck.sha256,
            "info": {k: ck.info.get(k) for k in ("iterations", "train_s", "val_psnr")},
            "start_sha256": start.sha256}


def run_check(out: str | Path, *, tiny: bool = False,
              stages: tuple[str, ...] = ("env", "tests", "raster", "recon", "finetune"),
              say: Callable[[str], None] = print) -> dict:
    """Run the stages in order; ``results.json`` in ``out`` is rewritten after each.

    A stage that raises is recorded with its error (the traceback goes to
    ``errors.log``) and the next stage still runs.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = TINY if tiny else FULL
    results: dict = {"mode": "tiny" if tiny else "full", "stages": {}}
    jobs: dict[str, Callable[[], dict]] = {
        "env": environment, "tests": lambda: gpu_tests(out, tiny),
        "raster": lambda: raster(sizes), "recon": lambda: recon(sizes, out, tiny),
        "finetune": lambda: finetune(sizes, out)}
    unknown = [s for s in stages if s not in jobs]
    if unknown:
        raise ValueError(f"unknown gpu-check stages {unknown}; available: {list(jobs)}")
    for name in stages:
        say(f"gpu-check: {name}")
        t0 = time.perf_counter()
        try:
            res = {"ok": True, **jobs[name]()}
        except Exception as e:  # noqa: BLE001 - recorded; the other stages still run
            with open(out / "errors.log", "a") as f:
                f.write(f"--- {name}\n{traceback.format_exc()}\n")
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        res["stage_s"] = round(time.perf_counter() - t0, 2)
        results["stages"][name] = res
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recon.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.json and artifacts")
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device (CI)")
    p.add_argument("--stages", default="env,tests,raster,recon,finetune",
                   help="comma-separated subset, in this order")
    a = p.parse_args(argv)
    res = run_check(a.out, tiny=a.tiny, stages=tuple(a.stages.split(",")))
    failed = [n for n, r in res["stages"].items()
              if not r["ok"] or (n == "tests" and not r.get("passed", True))]
    print(json.dumps({"failed": failed, "out": a.out}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
