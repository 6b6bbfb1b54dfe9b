"""The ``drivesplat`` command line: a thin layer over the functions the service calls."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from service.bench_cli import bench_app
from service.progress import progress_bar
from service.serve_cli import register as register_service_commands

app = typer.Typer(
    name="drivesplat",
    help="Reconstruct driving logs into decomposed 3D Gaussian scenes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(bench_app, name="bench")
register_service_commands(app)  # serve, worker, service-demo

err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output directory (PandaSet layout) or "
                                              ".tfrecord file (Waymo).")],
    seed: Annotated[int, typer.Option(help="Layout/traffic/appearance seed.")] = 0,
    frames: Annotated[int, typer.Option(help="Frames at 10 Hz.")] = 40,
    width: Annotated[int, typer.Option(help="Image width (px).")] = 320,
    height: Annotated[int, typer.Option(help="Image height (px).")] = 180,
    cameras: Annotated[str, typer.Option(help="Comma-separated cameras: front, front_left, "
                                              "front_right, left, right, back.")]
    = "front,front_left,front_right",
    traffic: Annotated[float, typer.Option(help="Moving vehicles per 100 m per lane.")] = 1.5,
    format: Annotated[str, typer.Option("--format", help="pandaset | waymo")] = "pandaset",
    ground_truth: Annotated[bool, typer.Option(help="Also write held-out ground truth "
                                                    "(depth, lane-shifted views).")] = True,
    antialias: Annotated[bool, typer.Option(help="Camera integrates over each pixel "
                                                 "(off: one ray per pixel centre).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Generate a synthetic driving log with ground truth and write it to disk."""
    from scenes.synthetic import SyntheticConfig, cameras_arg, generate_log, render_all

    try:
        config = SyntheticConfig(seed=seed, frames=frames, width=width, height=height,
                                 cameras=cameras_arg(cameras), traffic=traffic,
                                 antialias=antialias)
    except ValueError as e:
        raise _fail(str(e)) from e
    if format not in ("pandaset", "waymo"):
        raise _fail(f"--format must be pandaset or waymo, not {format!r}")
    t0 = time.perf_counter()
    log = generate_log(config)
    with progress_bar() as bar:
        task = bar.add_task("rendering", total=None)
        render_all(log, ground_truth=ground_truth,
                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    try:
        if format == "pandaset":
            from scenes.pandaset import write_pandaset

            write_pandaset(log, out, ground_truth=ground_truth, overwrite=overwrite)
        else:
            from scenes.waymo import write_waymo

            write_waymo(log, out, overwrite=overwrite)
    except FileExistsError as e:
        raise _fail(f"{out} already exists; pass --overwrite to replace it ({e})") from e
    err.print(f"wrote {log.name} ({len(log.frames)} frames, {len(log.cameras)} cameras, "
              f"{len(log.tracks)} tracks) to {out} in {time.perf_counter() - t0:.1f} s")


def summarize(log) -> dict:
    """The one-object summary ``drivesplat inspect --json`` prints."""
    return {
        "format": log.source_format,
        "name": log.name,
        "frames": len(log.frames),
        "duration_s": round(log.duration_s, 6),
        "cameras": {n: {"width": c.width, "height": c.height, "fx": c.fx, "fy": c.fy,
                        "cx": c.cx, "cy": c.cy} for n, c in log.cameras.items()},
        "lidar_points": log.lidar_point_count(),
        "tracks": len(log.tracks),
        "moving_tracks": len(log.moving_tracks),
        "world_offset": [float(x) for x in log.world_offset],
    }


@app.command()
def inspect(
    log_path: Annotated[Path, typer.Argument(metavar="LOG", help="Log directory or file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    format: Annotated[str, typer.Option("--format", help="auto | pandaset | waymo")] = "auto",
) -> None:
    """Read a log, check every file, and summarise it (format detected from the path)."""
    from scenes.errors import LogFormatError
    from scenes.formats import load_log

    try:
        log = load_log(log_path, format=format)
        summary = summarize(log)  # touches every LiDAR sweep
    except LogFormatError as e:
        raise _fail(str(e)) from e
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    out = Console()
    out.print(f"[bold]{summary['name']}[/] ({summary['format']}): {summary['frames']} frames, "
              f"{summary['duration_s']:.2f} s")
    for name, c in summary["cameras"].items():
        out.print(f"  camera {name}: {c['width']}x{c['height']} fx={c['fx']:.1f} "
                  f"fy={c['fy']:.1f} cx={c['cx']:.1f} cy={c['cy']:.1f}")
    out.print(f"  lidar points: {summary['lidar_points']:,}")
    out.print(f"  tracks: {summary['tracks']} ({summary['moving_tracks']} moving)")


def _frames_arg(frames: str | None) -> tuple[int, int] | None:
    if not frames:
        return None
    try:
        a, b = (int(x) for x in frames.split(":"))
    except ValueError as e:
        raise _fail(f"--frames must look like START:END, not {frames!r}") from e
    return a, b


@app.command()
def reconstruct(
    log_path: Annotated[Path, typer.Argument(metavar="LOG", help="Log directory or file.")],
    out: Annotated[Path, typer.Option("--out", help="Scene directory to write.")],
    method: Annotated[str, typer.Option(help="Optimiser: g3r (learned, T steps) | adam "
                                             "(per-scene baseline).")] = "g3r",
    steps: Annotated[int | None, typer.Option(
        help="G3R update steps T (default 24; --turbo 12).")] = None,
    turbo: Annotated[bool, typer.Option(help="G3R's short schedule (T = 12).")] = False,
    checkpoint: Annotated[Path | None, typer.Option(
        help="G3R model (default: the checkpoint shipped with drivesplat).")] = None,
    lift_groups: Annotated[int | None, typer.Option(
        help="G3R: lift 1/G of the source views per step (default: the model's).")] = None,
    lift_width: Annotated[int | None, typer.Option(
        help="G3R: lift gradients at most this wide (default: the images' native width, "
             "capped at 960 px on CPU, none on CUDA).")] = None,
    iters: Annotated[int | None, typer.Option(help="Adam iterations (default 3000).")] = None,
    time_budget_s: Annotated[float | None, typer.Option(
        help="Adam: stop at the first step past this many seconds.")] = None,
    budget: Annotated[int | None, typer.Option(
        help="Static Gaussians at most (default: 100k on CPU, 2M on a GPU).")] = None,
    densify: Annotated[bool, typer.Option(help="3DGS densify/prune (Adam).")] = False,
    actors: Annotated[str, typer.Option(help="Which tracks become actors: all | moving "
                                             "(parked cars then stay static).")] = "all",
    frames: Annotated[str | None, typer.Option(help="Frame range START:END.")] = None,
    cameras: Annotated[str | None, typer.Option(help="Comma-separated cameras.")] = None,
    backend: Annotated[str, typer.Option(help="Renderer: auto | torch | gsplat.")] = "auto",
) -> None:
    """Reconstruct a log into a decomposed Gaussian scene (assets in --out)."""
    from recon.adam import AdamConfig
    from recon.g3r.checkpoint import CheckpointError
    from recon.g3r.optimize import G3RRunConfig
    from recon.init import InitConfig, InitError
    from recon.pipeline import METHODS
    from recon.pipeline import reconstruct as run
    from scenes.errors import LogFormatError
    from scenes.formats import load_log

    if method not in METHODS:
        raise _fail(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "adam" and (steps is not None or turbo or checkpoint is not None
                             or lift_groups is not None or lift_width is not None):
        raise _fail("--steps, --turbo, --checkpoint, --lift-groups and --lift-width are "
                    "G3R options; "
                    "Adam takes --iters or --time-budget-s")
    if method == "g3r" and (time_budget_s is not None or densify or iters is not None):
        raise _fail("--iters, --time-budget-s and --densify are Adam options; G3R takes "
                    "--steps or --turbo")
    try:
        log = load_log(log_path, frames=_frames_arg(frames),
                       cameras=cameras.split(",") if cameras else None)
    except (LogFormatError, ValueError) as e:
        raise _fail(str(e)) from e
    adam = AdamConfig(iters=iters or AdamConfig.iters, time_budget_s=time_budget_s,
                      densify=densify, backend=backend)
    with progress_bar() as bar:
        task = bar.add_task("initialising", total=None)

        def on_stage(s: str) -> None:
            bar.update(task, description=s)

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total,
                       description=f"optimising {step}/{total} (loss {loss:.4f})")

        try:
            init = InitConfig(actors=actors) if budget is None else InitConfig(
                budget=budget, actors=actors)
            g3r_kw = ({"steps": steps, "turbo": turbo, "checkpoint": checkpoint,
                       "g3r": G3RRunConfig(backend=backend, lift_groups=lift_groups,
                                          lift_width=lift_width)}
                      if method == "g3r" else {})
            res = run(log, out, method=method, init=init, adam=adam, stage=on_stage,
                      progress=on_step, **g3r_kw)
        except (InitError, ValueError, LogFormatError, CheckpointError) as e:
            raise _fail(str(e)) from e
    err.print(f"scene written to {res.scene_dir} ({method}, {res.iterations} steps, "
              f"{res.recon_s:.1f} s)")


@app.command()
def render(
    scene_dir: Annotated[Path, typer.Argument(metavar="SCENE", help="Scene directory.")],
    frame: Annotated[int, typer.Option(help="Frame index of the log.")] = 0,
    camera: Annotated[str | None, typer.Option(help="Camera name (default: first).")] = None,
    shift_m: Annotated[float, typer.Option(help="Lateral ego shift (m, + = left).")] = 0.0,
    hide_actor: Annotated[list[str] | None, typer.Option(help="Actor id to remove "
                                                              "(repeatable).")] = None,
    width: Annotated[int | None, typer.Option(help="Output width (default: camera's).")] = None,
    height: Annotated[int | None, typer.Option(help="Output height.")] = None,
    out: Annotated[Path, typer.Option(help="Image file (.png or .jpg).")] = Path("render.png"),
    backend: Annotated[str, typer.Option(help="Renderer: auto | torch | gsplat.")] = "auto",
) -> None:
    """Render a recorded (or lane-shifted) view of a reconstructed scene."""
    from PIL import Image

    from recon.assets import SceneFormatError, load_scene
    from recon.neural import ActorEdit
    from service.rendering import recorded_view, render_rgb

    try:
        loaded = load_scene(scene_dir)
        view = recorded_view(loaded, frame, camera, shift_m)
        edits = {a: ActorEdit(hide=True) for a in hide_actor or []}
        img = render_rgb(loaded.scene, view, edits=edits, backend=backend, width=width,
                         height=height)
    except (SceneFormatError, ValueError, KeyError) as e:
        raise _fail(str(e).strip('"')) from e
    Image.fromarray(img).save(out)
    err.print(f"wrote {out} ({img.shape[1]}x{img.shape[0]})")


@app.command("eval")
def eval_cmd(
    scene_dir: Annotated[Path, typer.Argument(metavar="SCENE", help="Scene directory.")],
    log_path: Annotated[Path, typer.Argument(metavar="LOG", help="The log it came from.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    max_views: Annotated[int | None, typer.Option(help="Evaluate at most this many views "
                                                       "per set.")] = None,
    backend: Annotated[str, typer.Option(help="Renderer: auto | torch | gsplat.")] = "auto",
) -> None:
    """Held-out PSNR/SSIM, lane-shift PSNR, actor PSNR and depth RMSE of a scene."""
    import numpy as np

    from recon.assets import SceneFormatError, load_scene
    from recon.evaluate import evaluate
    from scenes.errors import LogFormatError
    from scenes.formats import load_log

    try:
        loaded = load_scene(scene_dir)
        log = load_log(log_path, ground_truth=True)
    except (SceneFormatError, LogFormatError) as e:
        raise _fail(str(e)) from e
    offset = loaded.world_offset
    if not np.allclose(offset, log.world_offset, atol=1e-6):
        raise _fail(f"{log_path} is re-centred at {log.world_offset.round(3).tolist()} but the "
                    f"scene at {offset.round(3).tolist()}: evaluate on the log (and frame "
                    "range) the scene was reconstructed from")
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=None)
        metrics = evaluate(loaded.scene, log, backend=backend, max_views=max_views,
                           recon_s=loaded.manifest.get("recon_s"),
                           progress=lambda d, t: bar.update(task, completed=d, total=t))
    if as_json:
        sys.stdout.write(json.dumps(metrics) + "\n")
        return
    Console().print_json(json.dumps(metrics))


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Training directory (log, resume "
                                                    "state, g3r.safetensors).")],
    iterations: Annotated[int | None, typer.Option(help="Network updates.")] = None,
    time_budget_s: Annotated[float | None, typer.Option(
        help="Stop at the first update past this many seconds.")] = None,
    scenes: Annotated[int | None, typer.Option(help="Training scenes in the pool.")] = None,
    frames: Annotated[str | None, typer.Option(
        help="Frames per training log, N or MIN:MAX drawn per seed (default 16:40).")] = None,
    width: Annotated[int | None, typer.Option(help="Base training image width (320).")] = None,
    height: Annotated[int | None, typer.Option(help="Base training image height (180).")] = None,
    size_scales: Annotated[str | None, typer.Option(
        help="Comma-separated factors on the base size drawn per seed (0.8,1.0,1.2).")] = None,
    budget: Annotated[int | None, typer.Option(help="Static Gaussians per scene.")] = None,
    actor_budget: Annotated[int | None, typer.Option(help="Gaussians per actor.")] = None,
    pool_refresh_every: Annotated[int | None, typer.Option(
        help="Replace one pool scene by a fresh seed every this many episodes (0: never).")
    ] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="Fine-tune this checkpoint (its architecture) instead of starting fresh.")] = None,
    unroll_start: Annotated[int | None, typer.Option(
        help="Unrolled steps of the first episode (grows to T; fine-tuning: T).")] = None,
    depth_weight: Annotated[float | None, typer.Option(
        help="Weight of the LiDAR depth term on source views (default 0: off).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    heldout_loss: Annotated[bool, typer.Option(
        help="Take the loss on held-out views too (--no-heldout-loss: ablation).")] = True,
    constant_gamma: Annotated[bool, typer.Option(
        help="Constant step size instead of the cosine schedule (ablation).")] = False,
    lift_groups: Annotated[int | None, typer.Option(
        help="Lift the gradient from 1/G of the source views per step (default 3; "
             "1: all views every step).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from --out/train_state.pt.")] = True,
    seed: Annotated[int | None, typer.Option(help="Network init and sampling seed.")] = None,
    seed_start: Annotated[int | None, typer.Option(
        help="First training log seed (a continued fine-tune takes fresh logs from a new "
             "start; evaluation seeds are refused).")] = None,
    backend: Annotated[str, typer.Option(help="Renderer: auto | torch | gsplat.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Meta-train a G3R model on synthetic scenes (seeds disjoint from evaluation)."""
    from dataclasses import replace

    import torch

    if threads:
        torch.set_num_threads(threads)

    from recon.g3r.checkpoint import CheckpointError, load_checkpoint
    from recon.g3r.train import TrainConfig, with_overrides
    from recon.g3r.train import train as run_training

    frame_range = None
    if frames is not None:
        lo, _, hi = frames.partition(":")
        try:
            frame_range = (int(lo), int(hi or lo))
        except ValueError:
            raise _fail(f"--frames must be N or MIN:MAX, not {frames!r}") from None
        if not 1 <= frame_range[0] <= frame_range[1]:
            raise _fail(f"--frames must satisfy 1 <= MIN <= MAX, not {frames!r}")
    scales = None
    if size_scales is not None:
        try:
            scales = tuple(float(x) for x in size_scales.split(","))
        except ValueError:
            raise _fail(f"--size-scales must be comma-separated numbers, not "
                        f"{size_scales!r}") from None
    cfg = with_overrides(TrainConfig(), iterations=iterations, time_budget_s=time_budget_s,
                         scenes=scenes, frames=frame_range, width=width, height=height,
                         size_scales=scales, budget=budget, actor_budget=actor_budget,
                         pool_refresh_every=pool_refresh_every, unroll_start=unroll_start,
                         depth_weight=depth_weight, lr=lr, seed=seed,
                         seed_start=seed_start)
    try:
        from scenes.synthetic import train_seeds

        train_seeds(1, cfg.seed_start)
    except ValueError as e:
        raise _fail(f"--seed-start: {e}") from None
    model = cfg.model
    if init_from is not None:  # fine-tuning keeps the checkpoint's architecture
        try:
            model = load_checkpoint(init_from).model.config
        except CheckpointError as e:
            raise _fail(str(e)) from e
        cfg = replace(cfg, init_from=str(init_from))
    cfg = replace(cfg, heldout_loss=heldout_loss,
                  model=replace(model, constant_gamma=constant_gamma or model.constant_gamma,
                                lift_groups=lift_groups or model.lift_groups))
    with progress_bar() as bar:
        task = bar.add_task("building training scenes", total=None)

        def on_iter(it: int, total: int, row: dict) -> None:
            val = f", val {row['val_psnr']:.2f} dB" if "val_psnr" in row else ""
            bar.update(task, completed=it, total=total,
                       description=f"training (loss {row['loss']:.4f}, held-out "
                                   f"{row.get('psnr_heldout', float('nan')):.2f} dB{val})")

        try:
            path = run_training(cfg, out, resume=resume, backend=backend, progress=on_iter)
        except ValueError as e:
            raise _fail(str(e)) from e
    err.print(f"checkpoint written to {path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its log.")] = Path(
        "data/demo"),
    frames: Annotated[int, typer.Option(help="Frames to generate.")] = 20,
) -> None:
    """End-to-end demo: synthesise a log, write it as PandaSet, read it back, inspect it."""
    from scenes.formats import load_log
    from scenes.pandaset import write_pandaset
    from scenes.synthetic import SyntheticConfig, generate_log, render_all

    log = generate_log(SyntheticConfig(seed=0, frames=frames))
    with progress_bar() as bar:
        task = bar.add_task("rendering synthetic log", total=None)
        render_all(log, progress=lambda d, t: bar.update(task, completed=d, total=t))
    path = out / log.name
    write_pandaset(log, path, overwrite=True)
    back = load_log(path, ground_truth=True)
    Console().print_json(json.dumps(summarize(back)))
    err.print(f"demo log written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
