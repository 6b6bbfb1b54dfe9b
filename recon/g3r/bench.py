"""G3R against per-scene Adam on evaluation logs (``drivesplat bench recon``).

Every log is initialised once; each method starts from a copy of that scene, so the
comparison is of the optimisers alone, side by side in one process. Reported per method:
held-out PSNR/SSIM, lane-shift PSNR per distance, and wall time (initialisation +
optimisation; evaluation excluded). The speedup is the time Adam needs to reach G3R's
held-out PSNR (interpolated on Adam's held-out curve, from its longest run) divided by
G3R's time.

The evaluation logs use seeds from ``EVAL_SEEDS`` (never used in training) and settings
training never saw: other image sizes and fields of view, side cameras, denser or sparser
traffic, tighter curves.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from recon.adam import AdamConfig, optimise_adam
from recon.evaluate import evaluate
from recon.g3r.checkpoint import Checkpoint, load_checkpoint
from recon.g3r.optimize import G3RRunConfig, optimise_g3r
from recon.init import InitConfig, initialise_scene
from recon.metrics import psnr
from recon.neural import BASE_CHANNELS, NeuralScene
from recon.views import heldout_views, render_view
from scenes.log import LogSegment
from scenes.synthetic import SyntheticConfig, generate_log, render_all

#: Evaluation logs at the scale ``drivesplat reconstruct`` runs with its defaults (320x180,
#: 40 frames, 3 cameras, the default Gaussian budget): (what differs from training,
#: config). Training draws 256-384 px wide images, 16-40 frames, hfov 58-84 deg, traffic
#: 0.6-2.2, radius >= 200 m, and the camera sets of ``TRAIN_CAMERA_SETS``.
EVAL_LOGS: tuple[tuple[str, SyntheticConfig], ...] = (
    ("the default log (seed 0)", SyntheticConfig(seed=0)),
    ("side cameras front/left/right", SyntheticConfig(seed=1, cameras=("front", "left",
                                                                        "right"))),
    ("dense traffic, curve r=150 m, hfov 90", SyntheticConfig(seed=2, traffic=3.2,
                                                              curvature=1 / 150,
                                                              hfov_deg=90.0)),
)

#: The small settings of the first G3R benchmarks (``--quick``): 10 frames, 12k static
#: Gaussians, 160-224 px images.
QUICK_LOGS: tuple[tuple[str, SyntheticConfig], ...] = (
    ("seed only", SyntheticConfig(seed=10, frames=10, width=160, height=90)),
    ("192x108, hfov 88", SyntheticConfig(seed=11, frames=10, width=192, height=108,
                                         hfov_deg=88.0)),
    ("side cameras", SyntheticConfig(seed=12, frames=10, width=160, height=90,
                                     cameras=("front", "left", "right"))),
    ("dense traffic, curve r=150 m", SyntheticConfig(seed=13, frames=10, width=160,
                                                     height=90, traffic=3.2,
                                                     curvature=1 / 150)),
    ("224x126, hfov 55, light traffic", SyntheticConfig(seed=14, frames=10, width=224,
                                                        height=126, hfov_deg=55.0,
                                                        traffic=0.3)),
)


@dataclass(frozen=True)
class BenchConfig:
    """Settings of ``drivesplat bench recon`` (defaults: the default scale).

    Attributes:
        suite: "default" (:data:`EVAL_LOGS`) or "quick" (:data:`QUICK_LOGS`).
        logs: how many logs of the suite to run; only: run these indices of it instead
            (to split a run over processes; :func:`merge_reports` joins them);
        budget, actor_budget: Gaussians per scene (None: ``InitConfig``'s defaults,
            what ``reconstruct`` uses).
        adam_iters: Adam's longest run (its convergence reference); adam_eval_every:
            held-out PSNR curve spacing; adam_counts: iteration counts reported as rows
            (each its own run with its own learning-rate schedule), besides the runs at
            G3R's wall time and at ``adam_time_factors`` times it.
        adam_time_factors: Adam runs sized to these multiples of G3R's optimisation time;
            one that would run more steps than ``adam_iters`` reports the reference run
            (marked ``capped_from_steps``): Adam has converged by then.
        all_views: also run G3R lifting every view every step (``lift_groups`` 1).
        g3r_steps: T of the main G3R row (None: the model's; smoke runs shorten it).
        one_step_ablation: also run the model with T = 1 (what iterating buys).
        coarse_lift_width: also run G3R lifting at this width (the default before native
            lifting; None: no such row).
        ablations: name -> checkpoint of models trained differently (e.g. constant gamma,
            no held-out loss); the shipped model also runs with T = 1.
        camera_antialias: the evaluation logs' cameras integrate over each pixel (False:
            point-sampled, as every run before 2026-11-22).
        adam_deadline: ``time.time()`` at which Adam's reference run stops (None: it runs
            all ``adam_iters``; the device check sets it to fit its time budget). Rows
            that would run longer report the reference run, as for ``adam_iters``.
        device: where the methods run (None: CUDA when available, else CPU).
    """

    suite: str = "default"
    logs: int = 3
    only: tuple[int, ...] | None = None
    budget: int | None = None
    actor_budget: int | None = None
    adam_iters: int = 3000
    adam_eval_every: int = 250
    adam_counts: tuple[int, ...] = ()
    adam_time_factors: tuple[float, ...] = (1.0, 10.0)
    all_views: bool = False
    g3r_steps: int | None = None
    coarse_lift_width: int | None = 160
    one_step_ablation: bool = False
    frames: int | None = None
    ablations: tuple[tuple[str, str], ...] = ()
    backend: str = "auto"
    camera_antialias: bool = True
    adam_deadline: float | None = None
    device: str | None = None

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def eval_logs(self) -> tuple[tuple[str, SyntheticConfig], ...]:
        if self.suite not in ("default", "quick"):
            raise ValueError(f"bench suite must be default or quick, not {self.suite!r}")
        return EVAL_LOGS if self.suite == "default" else QUICK_LOGS


def quick(cfg: BenchConfig) -> BenchConfig:
    """The small settings of the first G3R benchmarks (5 logs of 10 frames, 12k static
    Gaussians, Adam to 1500 steps): a quick mode, not the proof."""
    return replace(cfg, suite="quick", logs=5, budget=12_000, actor_budget=600,
                   adam_iters=1500, adam_eval_every=100, adam_counts=(500,),
                   adam_time_factors=(1.0,), all_views=True, coarse_lift_width=None,
                   one_step_ablation=True)


def smoke(cfg: BenchConfig) -> BenchConfig:
    """Seconds-long settings that exercise every row (tests, the gpu-check CPU mode)."""
    return replace(quick(cfg), logs=1, adam_iters=6, adam_eval_every=3, adam_counts=(),
                   adam_time_factors=(1.0, 10.0), frames=4, budget=1500, actor_budget=80,
                   all_views=False, g3r_steps=2)


def heldout_psnr(scene: NeuralScene, log: LogSegment, backend: str) -> float:
    """Mean held-out PSNR (the curve metric; ``evaluate`` gives the full protocol)."""
    out = []
    with torch.no_grad():
        for v in heldout_views(log):
            out.append(psnr(render_view(scene, v, backend=backend).rgb[0].clamp(0, 1),
                            v.target(scene.static_state.device)))
    return float(np.mean(out))


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Wall time at which a (wall_s, psnr) curve first reaches ``target`` (linear
    interpolation between points); None if it never does."""
    prev = None
    for row in curve:
        if row["psnr"] >= target:
            if prev is None:
                return row["wall_s"]
            f = (target - prev["psnr"]) / max(row["psnr"] - prev["psnr"], 1e-12)
            return prev["wall_s"] + f * (row["wall_s"] - prev["wall_s"])
        prev = row
    return None


def synthesise_eval_log(log_cfg: SyntheticConfig, cfg: BenchConfig,
                        workers: int | None = None) -> LogSegment:
    """The evaluation log with every image, sweep and ground truth already rendered."""
    if cfg.frames is not None:
        log_cfg = replace(log_cfg, frames=cfg.frames)
    log = generate_log(replace(log_cfg, antialias=cfg.camera_antialias))
    # Synthesise before the clock starts: a recorded log is on disk already, so the
    # generator's ray casting is no part of a method's init.
    render_all(log, ground_truth=True, workers=workers or os.cpu_count() or 1)
    return log


def bench_log(name: str, log_cfg: SyntheticConfig, ckpt: Checkpoint,
              ablations: dict[str, Checkpoint], cfg: BenchConfig,
              say: Callable[[str], None], log: LogSegment | None = None) -> dict:
    """All methods on one evaluation log (``log``: that log synthesised already, see
    :func:`synthesise_eval_log`)."""
    if log is None:
        log = synthesise_eval_log(log_cfg, cfg)
    t0 = time.perf_counter()
    init = InitConfig(latent=ckpt.model.config.channels - BASE_CHANNELS)
    init = replace(init, **{k: v for k, v in (("budget", cfg.budget),
                                             ("actor_budget", cfg.actor_budget))
                            if v is not None})
    base = initialise_scene(log, init).to(cfg.torch_device())
    init_s = time.perf_counter() - t0
    rows: list[dict] = []

    def record(method: str, scene: NeuralScene, seconds: float, **extra) -> dict:
        m = evaluate(scene, log, backend=cfg.backend)
        row = {"method": method, "psnr": m["psnr"], "ssim": m["ssim"],
               "psnr_shift": m["psnr_shift"], "psnr_actors": m["psnr_actors"],
               "psnr_actor_views": m["psnr_actor_views"],
               "depth_abs_rel": m["depth_abs_rel"], "wall_s": init_s + seconds, **extra}
        rows.append(row)
        say(f"{log.name} {method}: {row['psnr']:.2f} dB in {row['wall_s']:.1f} s")
        return row

    record("init", base, 0.0)

    def g3r(method: str, model_ck: Checkpoint, **run) -> dict:
        scene = copy.deepcopy(base)
        res = optimise_g3r(scene, log, model_ck.model,
                           G3RRunConfig(backend=cfg.backend, **run))
        return record(method, scene, res.seconds, steps=res.iterations)

    main = g3r("g3r", ckpt, steps=cfg.g3r_steps)
    g3r("g3r turbo", ckpt, turbo=True)
    if cfg.all_views and ckpt.model.config.lift_groups > 1:  # what full lifts buy
        g3r("g3r, all views every step", ckpt, lift_groups=1)
    if cfg.one_step_ablation:
        g3r("ablation: T=1", ckpt, steps=1)
    if cfg.coarse_lift_width is not None:
        g3r(f"ablation: lifted at {cfg.coarse_lift_width} px", ckpt,
            lift_width=cfg.coarse_lift_width)
    for aname, ack in ablations.items():
        g3r(f"ablation: {aname}", ack)

    # Adam's longest run, with a held-out curve (evaluation time excluded).
    scene = copy.deepcopy(base)
    curve: list[dict] = []

    def hook(step: int, elapsed: float) -> dict:
        row = {"step": step, "wall_s": init_s + elapsed,
               "psnr": heldout_psnr(scene, log, cfg.backend)}
        curve.append(row)
        return row

    budget_s = None if cfg.adam_deadline is None else max(cfg.adam_deadline - time.time(), 1.0)
    res = optimise_adam(scene, log, AdamConfig(iters=cfg.adam_iters, backend=cfg.backend,
                                               time_budget_s=budget_s),
                        eval_hook=hook, eval_every=cfg.adam_eval_every)
    record(f"adam {res.iterations}", scene, res.seconds, steps=res.iterations)
    step_s = res.seconds / max(res.iterations, 1)
    # Adam with a multiple of G3R's optimisation time (its own schedule, sized by the
    # measured step time), then the fixed iteration counts.
    g3r_s = main["wall_s"] - init_s
    runs = [(adam_time_row(f), max(1, int(f * g3r_s / step_s)))
            for f in cfg.adam_time_factors]
    runs += [(f"adam {n}", n) for n in cfg.adam_counts if n < cfg.adam_iters]
    for method, n in runs:
        if n >= res.iterations:
            # Longer than the reference run: report that run (same base, same schedule
            # capped at adam_iters, converged; or cut at adam_deadline, the longest
            # run there was time for) instead of spending the time again.
            ref = dict(next(r for r in rows if r["method"] == f"adam {res.iterations}"))
            rows.append({**ref, "method": method, "capped_from_steps": n})
            say(f"{log.name} {method}: {n} steps >= {res.iterations}: the reference run")
            continue
        s = copy.deepcopy(base)
        r = optimise_adam(s, log, AdamConfig(iters=n, backend=cfg.backend))
        record(method, s, r.seconds, steps=n)
    reach = time_to_reach(curve, main["psnr"])
    return {"log": log.name, "setting": name, "size": [log_cfg.width, log_cfg.height],
            "frames": len(log.frames),
            "cameras": list(log.cameras), "init_s": init_s,
            "gaussians": base.num_gaussians, "rows": rows, "adam_curve": curve,
            "adam_time_to_g3r_psnr_s": reach,
            "speedup": (reach / main["wall_s"]) if reach is not None else None}


def adam_time_row(factor: float) -> str:
    """Row name of Adam sized to ``factor`` x G3R's optimisation time."""
    return "adam at G3R's time" if factor == 1 else f"adam at {factor:g}x G3R's time"


def bench_recon(cfg: BenchConfig, checkpoint: str | None = None,
                say: Callable[[str], None] = lambda _s: None) -> dict:
    """Run every method on ``cfg.logs`` evaluation logs; returns rows and summaries."""
    ckpt = load_checkpoint(checkpoint)
    ablations = {n: load_checkpoint(p) for n, p in cfg.ablations}
    suite = cfg.eval_logs()
    chosen = cfg.only if cfg.only is not None else range(min(cfg.logs, len(suite)))
    logs = [bench_log(*suite[i], ckpt, ablations, cfg, say) for i in chosen]
    return {"config": {**cfg.__dict__, "ablations": dict(cfg.ablations)},
            "checkpoint": {"path": str(ckpt.path), "sha256": ckpt.sha256,
                           "info": {k: ckpt.info.get(k) for k in
                                    ("iterations", "train_s", "val_psnr")}},
            "machine": {"cpu_threads": torch.get_num_threads(),
                        "device": str(cfg.torch_device())},
            "logs": logs, **summarise(logs)}


def summarise(logs: list[dict]) -> dict:
    """Means per method over the logs (methods every log has) and the speedups."""
    methods = [r["method"] for r in logs[0]["rows"]] if logs else []
    summary = []
    for m in methods:
        rs = [r for lg in logs for r in lg["rows"] if r["method"] == m]
        if len(rs) != len(logs):
            continue
        shifts = {k: _mean([r["psnr_shift"].get(k) for r in rs]) for k in ("1", "2", "3")}
        summary.append({"method": m, "psnr": _mean([r["psnr"] for r in rs]),
                        "ssim": _mean([r["ssim"] for r in rs]), "psnr_shift": shifts,
                        "psnr_actors": _mean([r.get("psnr_actors") for r in rs]),
                        "psnr_actor_views": _mean([r.get("psnr_actor_views") for r in rs]),
                        "depth_abs_rel": _mean([r.get("depth_abs_rel") for r in rs]),
                        "wall_s": _mean([r["wall_s"] for r in rs])})
    return {"summary": summary, "speedups": [lg["speedup"] for lg in logs],
            "speedup_lower_bounds": [speedup_lower_bound(lg) for lg in logs],
            "speedup_note": "None: Adam never reached G3R's held-out PSNR within its run; "
                            "the lower bound is then its whole run's time / G3R's time"}


def speedup_lower_bound(log_report: dict) -> float | None:
    """Where Adam never reached G3R's PSNR: its longest run's time / G3R's time (the
    speedup is at least this); None where it did (the speedup itself is measured)."""
    if log_report["speedup"] is not None or not log_report["adam_curve"]:
        return None
    g3r = next(r for r in log_report["rows"] if r["method"] == "g3r")
    return log_report["adam_curve"][-1]["wall_s"] / g3r["wall_s"]


def merge_reports(reports: list[dict]) -> dict:
    """One report from runs over different logs (same checkpoint and settings)."""
    if len({r["checkpoint"]["sha256"] for r in reports}) > 1:
        raise ValueError("reports come from different checkpoints")
    logs = [lg for r in reports for lg in r["logs"]]
    return {**reports[0], "logs": logs, **summarise(logs)}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def plot_report(report: dict, path: str) -> None:
    """PNG of held-out PSNR against wall time, one panel per log: Adam's curve (its
    longest run), Adam's other runs and G3R's runs as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = report["logs"]
    fig, axes = plt.subplots(1, len(logs), figsize=(5.2 * len(logs), 4.2), squeeze=False)
    for ax, lg in zip(axes[0], logs, strict=True):
        curve = lg["adam_curve"]
        ax.plot([r["wall_s"] for r in curve], [r["psnr"] for r in curve], "-o", ms=3,
                color="tab:blue", label="Adam (held-out curve of its longest run)")
        for r in lg["rows"]:
            m = r["method"]
            if m == "init":
                continue
            g3r = m.startswith("g3r") or m.startswith("ablation")
            ax.scatter([r["wall_s"]], [r["psnr"]], marker="*" if g3r else "s",
                       s=120 if m == "g3r" else 40,
                       color="tab:red" if g3r else "tab:cyan", zorder=3)
            ax.annotate(m, (r["wall_s"], r["psnr"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("wall time, s (init + optimisation; log scale)")
        ax.set_ylabel("held-out PSNR, dB")
        sp = lg.get("speedup")
        ax.set_title(f"{lg['log']}: {lg['setting']}\n"
                     + (f"speedup {sp:.1f}x" if sp is not None else "Adam never reaches G3R"),
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
