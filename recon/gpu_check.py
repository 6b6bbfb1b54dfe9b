"""The one prepared device check (``make gpu-check``; ``python -m recon.gpu_check``).

A GPU is lent to a session for about 15 minutes in all, machine start included, so
everything that needs one runs here, in one process, inside ``--time-budget-s``, writing
``results.json`` into ``--out`` after every stage (a run cut short still returns what it
finished). Stages, in the order they run:

1. ``env``: torch, CUDA, the device, whether gsplat's extension loads;
2. ``gsplat_build`` (with ``--gsplat-sdist``, when gsplat does not load yet): gsplat is
   compiled for this GPU's architecture into a wheel (written to ``--out``, so a later
   machine can install it in seconds) and installed into ``--site``, in the background,
   at low priority, while the stages that need no gsplat run on the torch backend;
3. ``finetune``: the shipped G3R checkpoint fine-tuned for a fixed time budget at the
   default scale; the checkpoint is written to ``--out``;
4. (the build is waited for; its time and log are recorded);
5. ``tests``: the GPU tests (gsplat against the torch backend, CUDA against CPU), with
   ``DRIVESPLAT_REQUIRE_GSPLAT=1`` where gsplat was built, so a broken build fails;
6. ``raster``: render time and FPS for 1M Gaussians at 1920x1080, per backend;
7. ``recon``: G3R against Adam on a 1920x1080, 6-camera synthetic log at the device's
   default Gaussian budget (``drivesplat bench recon`` rows, with a plot). Adam's
   reference run stops where the time budget requires; the rows say how far it got.

``--tiny`` runs the same stages at toy sizes on whatever device there is (CI runs it on
CPU): it checks the script, not the numbers. Only ``recon`` and ``scenes`` are imported,
so the device machine needs no web-service packages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from recon.g3r.bench import BenchConfig
    from scenes.synthetic import SyntheticConfig


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
                  raster_frames=2, recon_width=1920, recon_height=1080, recon_frames=8,
                  recon_cameras=("front", "front_left", "front_right", "left", "right",
                                 "back"),
                  recon_budget=None, recon_actor_budget=None, adam_iters=3000,
                  adam_eval_every=250, g3r_steps=None, finetune_s=120.0,
                  finetune_frames=(16, 40),
                  finetune_width=320, finetune_height=180, finetune_budget=100_000,
                  finetune_actor_budget=2000, finetune_scenes=3, repeats=10)
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
            "cpu_count": os.cpu_count(), "gsplat": gsplat_available()}
    try:
        import gsplat

        info["gsplat_version"] = gsplat.__version__
    except ImportError:
        info["gsplat_version"] = None
    return info


class GsplatBuild:
    """gsplat compiled from its source archive in a background process.

    ``pip wheel`` builds the extension for this GPU's architecture only (minutes, not
    the tens of minutes of gsplat's default list); the wheel lands in ``out`` and is
    installed into ``site``, which :meth:`wait` puts on ``sys.path`` (and on the tests'
    ``PYTHONPATH``).
    """

    def __init__(self, sdist: Path, site: Path, out: Path) -> None:
        self.site, self.out = site, out
        self.wheel_dir = out / "wheel"
        arch = "{}.{}".format(*torch.cuda.get_device_capability(0))
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
               "MAX_JOBS": str(max(1, (os.cpu_count() or 2) - 2))}
        py = sys.executable
        script = (f'"{py}" -m pip wheel -q --no-deps --no-build-isolation --no-index '
                  f'-w "{self.wheel_dir}" "{sdist}" && "{py}" -m pip install -q --no-index '
                  f'--no-deps --no-compile --upgrade --target "{site}" '
                  f'"{self.wheel_dir}"/gsplat-*.whl')
        # The log stays outside ``out``: a device run brings back at most 8 files, and
        # its tail goes into results.json.
        self.log = Path(tempfile.gettempdir()) / "drivesplat_gsplat_build.log"
        self.t0 = time.perf_counter()
        # nice: the GPU stages that run meanwhile need a CPU core to launch kernels.
        self.proc = subprocess.Popen(["nice", "-n", "10", "sh", "-c", script], env=env,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.info = {"arch": env["TORCH_CUDA_ARCH_LIST"], "max_jobs": env["MAX_JOBS"],
                     "sdist": sdist.name}

    def wait(self, timeout_s: float) -> dict:
        """Wait for the build (at most ``timeout_s``) and make gsplat importable."""
        from recon.render import gsplat_backend

        try:
            rc = self.proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:  # stop the compilers too: the rest needs the CPUs
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        res = {**self.info, "returncode": rc, "ok": rc == 0,
               "seconds": round(time.perf_counter() - self.t0, 1),
               "wheels": sorted(p.name for p in self.wheel_dir.glob("*.whl"))}
        if rc == 0:
            sys.path.insert(0, str(self.site))
            importlib.invalidate_caches()
            gsplat_backend.gsplat_available.cache_clear()
            res["loads"] = gsplat_backend.gsplat_available()
        res["log_tail"] = self.log.read_text(errors="replace")[-3000 if rc != 0 else -600:]
        return res


def gpu_tests(out: Path, tiny: bool, site: Path | None, require_gsplat: bool) -> dict:
    """The GPU tests (in tiny mode only their collection: CPU has no GPU tests)."""
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *GPU_TEST_FILES]
    if tiny:
        args.append("--collect-only")
    path = [str(Path.cwd())] + ([str(site)] if site else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        path + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if require_gsplat:
        env["DRIVESPLAT_REQUIRE_GSPLAT"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    # pytest exits 5 when every test was deselected or skipped: nothing failed.
    return {"returncode": proc.returncode, "passed": proc.returncode in (0, 5),
            "summary": tail, "require_gsplat": require_gsplat,
            "seconds": time.perf_counter() - t0}


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


def recon_config(sizes: CheckSizes,
                 deadline: float | None) -> tuple[SyntheticConfig, BenchConfig]:
    """The log and bench settings of the ``recon`` stage."""
    from recon.g3r.bench import BenchConfig
    from scenes.synthetic import SyntheticConfig, cameras_arg

    log_cfg = SyntheticConfig(seed=3, frames=sizes.recon_frames, width=sizes.recon_width,
                              height=sizes.recon_height,
                              cameras=cameras_arg(list(sizes.recon_cameras)), shifts_m=())
    cfg = BenchConfig(budget=sizes.recon_budget, actor_budget=sizes.recon_actor_budget,
                      adam_iters=sizes.adam_iters, adam_eval_every=sizes.adam_eval_every,
                      g3r_steps=sizes.g3r_steps, coarse_lift_width=None,
                      adam_deadline=None if deadline is None else deadline - RECON_RESERVE_S)
    return log_cfg, cfg


def recon(sizes: CheckSizes, out: Path, log_cfg: SyntheticConfig, cfg: BenchConfig,
          log_future: Future, say: Callable[[str], None] = print) -> dict:
    """G3R against Adam on one large multi-camera log (the bench recon rows).

    The log is synthesised on the CPU beforehand (``log_future``, started with the first
    stages). ``cfg.adam_deadline`` (:func:`recon_config`) cuts Adam's reference run to
    end ``RECON_RESERVE_S`` before the check's deadline, leaving time for the rows after it.
    """
    from recon.g3r.bench import bench_log, plot_report, summarise
    from recon.g3r.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    log = log_future.result()
    say(f"recon log ready ({time.perf_counter() - t0:.0f} s waited)")
    ckpt = load_checkpoint()
    lg = bench_log(f"{sizes.recon_width}x{sizes.recon_height}, "
                   f"{len(sizes.recon_cameras)} cameras", log_cfg, ckpt, {}, cfg, say, log=log)
    report = {"checkpoint": {"sha256": ckpt.sha256}, "logs": [lg], **summarise([lg])}
    plot_report(report, str(out / "recon_psnr_vs_time.png"))
    return report


def finetune(sizes: CheckSizes, out: Path, seconds: float, backend: str) -> dict:
    """Fine-tune the shipped checkpoint for ``seconds`` (training's own time budget)."""
    from recon.g3r.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from recon.g3r.train import TrainConfig, train

    start = load_checkpoint()
    cfg = replace(TrainConfig(), init_from=str(DEFAULT_CHECKPOINT), model=start.model.config,
                  frames=sizes.finetune_frames, width=sizes.finetune_width,
                  height=sizes.finetune_height, budget=sizes.finetune_budget,
                  actor_budget=sizes.finetune_actor_budget, scenes=sizes.finetune_scenes,
                  unroll_start=start.model.config.steps, lr=3e-4, val_every=10**9,
                  time_budget_s=seconds)
    work = out / "finetune_work"
    path = train(cfg, work, backend=backend)
    shutil.copy(path, out / "g3r_finetuned.safetensors")
    shutil.copy(work / "train_log.jsonl", out / "finetune_log.jsonl")
    ck = load_checkpoint(out / "g3r_finetuned.safetensors")
    shutil.rmtree(work)  # train_state and snapshots stay on the device
    return {"checkpoint": "g3r_finetuned.safetensors", "sha256": ck.sha256,
            "backend": backend, "seconds_budget": seconds,
            "info": {k: ck.info.get(k) for k in ("iterations", "train_s", "val_psnr")},
            "start_sha256": start.sha256}


def in_background(fn: Callable, *args) -> Future:
    """``fn(*args)`` on a daemon thread (a check that ends early does not wait for it)."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for it
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return fut


#: Stages in the order they run (``gsplat_build`` starts where it is listed and is waited
#: for before ``tests``).
STAGES: tuple[str, ...] = ("env", "finetune", "tests", "raster", "recon")
#: The GPU tests (only these files: the rest of the suite needs the web-service packages).
GPU_TEST_FILES: tuple[str, ...] = ("tests/test_render_gpu.py", "tests/test_sparse.py")
#: Seconds kept free after Adam's reference run in ``recon`` (its rows and plot).
RECON_RESERVE_S = 60.0


def run_check(out: str | Path, *, tiny: bool = False, stages: tuple[str, ...] = STAGES,
              time_budget_s: float | None = None, gsplat_sdist: str | Path | None = None,
              site: str | Path | None = None,
              say: Callable[[str], None] = print) -> dict:
    """Run the stages in order; ``results.json`` in ``out`` is rewritten after each.

    A stage that raises is recorded with its error (the traceback goes to
    ``errors.log``) and the next stage still runs. With ``time_budget_s``, the finetune
    budget shrinks to what the budget leaves and Adam's reference run in ``recon`` stops
    in time; a stage that would start with too little time left is skipped (recorded).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = TINY if tiny else FULL
    t_start = time.time()
    deadline = None if time_budget_s is None else t_start + time_budget_s
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown gpu-check stages {unknown}; available: {list(STAGES)}")
    results: dict = {"mode": "tiny" if tiny else "full", "time_budget_s": time_budget_s,
                     "stages": {}}
    site_path = Path(site).resolve() if site else None

    def note(msg: str) -> None:
        # Also kept in progress.log: a run killed at its limit loses its console, not
        # the files already in ``out``.
        with open(out / "progress.log", "a") as f:
            f.write(f"{time.time() - t_start:7.1f} s  {msg}\n")
        say(msg)

    def save() -> None:
        results["elapsed_s"] = round(time.time() - t_start, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    def left() -> float:
        return float("inf") if deadline is None else deadline - time.time()

    def run_stage(name: str, job: Callable[[], dict], min_left_s: float = 0.0) -> None:
        note(f"gpu-check: {name} ({left():.0f} s left)" if deadline else f"gpu-check: {name}")
        t0 = time.perf_counter()
        if left() < min_left_s:
            res = {"ok": False, "skipped": f"{left():.0f} s left, {min_left_s:.0f} needed"}
        else:
            try:
                res = {"ok": True, **job()}
            except Exception as e:  # noqa: BLE001 - recorded; the other stages still run
                with open(out / "errors.log", "a") as f:
                    f.write(f"--- {name}\n{traceback.format_exc()}\n")
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        res["stage_s"] = round(time.perf_counter() - t0, 2)
        results["stages"][name] = res
        save()

    build: GsplatBuild | None = None
    log_future: Future | None = None
    if "recon" in stages:
        # The recon log's ray casting is CPU work: it runs beside the first stages.
        from recon.g3r.bench import synthesise_eval_log

        log_cfg, bench_cfg = recon_config(sizes, deadline)
        log_future = in_background(synthesise_eval_log, log_cfg, bench_cfg,
                                   max(1, (os.cpu_count() or 2) // 4))
    if "env" in stages:
        run_stage("env", environment)
    from recon.render import gsplat_available

    if (gsplat_sdist is not None and site_path is not None and torch.cuda.is_available()
            and not gsplat_available()):
        build = GsplatBuild(Path(gsplat_sdist).resolve(), site_path, out)
        results["stages"]["gsplat_build"] = {"ok": None, "started": True, **build.info}
        save()
    if "finetune" in stages:
        # Alone on the GPU while gsplat compiles: the torch backend, whatever is installed.
        ft_s = min(sizes.finetune_s, max(left() - FINETUNE_RESERVE_S, 0.0))
        run_stage("finetune", lambda: finetune(sizes, out, ft_s,
                                               "torch" if build else "auto"),
                  min_left_s=FINETUNE_RESERVE_S + 30)
    if build is not None:
        note("gpu-check: waiting for the gsplat build")
        # Keep enough for tests, raster and recon on the torch backend if it is late.
        results["stages"]["gsplat_build"] = build.wait(min(left() - BUILD_RESERVE_S, 1800))
        save()
    if "tests" in stages:
        run_stage("tests", lambda: gpu_tests(out, tiny, site_path,
                                             require_gsplat=build is not None))
    if "raster" in stages:
        run_stage("raster", lambda: raster(sizes), min_left_s=30)
    if "recon" in stages:
        run_stage("recon", lambda: recon(sizes, out, log_cfg, bench_cfg, log_future, note),
                  min_left_s=RECON_RESERVE_S + 60)
    return results


#: Seconds kept for the stages after ``finetune`` when a time budget is set.
FINETUNE_RESERVE_S = 380.0
#: Seconds kept for tests, raster and recon when the gsplat build is late (it is stopped).
BUILD_RESERVE_S = 220.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recon.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.json and artifacts")
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device (CI)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset (they run in the order of the default)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="finish within this many seconds (stages shrink or are skipped)")
    p.add_argument("--gsplat-sdist", default=None,
                   help="gsplat source archive to build when gsplat does not load")
    p.add_argument("--site", default=None, help="where the built gsplat is installed")
    a = p.parse_args(argv)
    res = run_check(a.out, tiny=a.tiny, stages=tuple(a.stages.split(",")),
                    time_budget_s=a.time_budget_s, gsplat_sdist=a.gsplat_sdist, site=a.site)
    failed = [n for n, r in res["stages"].items()
              if not r["ok"] or (n == "tests" and not r.get("passed", True))]
    print(json.dumps({"failed": failed, "out": a.out}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
