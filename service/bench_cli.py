"""``drivesplat bench ...``: benchmarks whose numbers go into BENCHMARKS.md."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks (numbers for BENCHMARKS.md).", no_args_is_help=True)


@bench_app.command("synth")
def bench_synth(
    seed: int = 0,
    frames: int = 40,
    width: int = 320,
    height: int = 180,
    cameras: Annotated[str, typer.Option(help="Comma-separated cameras.")]
    = "front,front_left,front_right",
    ground_truth: Annotated[bool, typer.Option(help="Also time lane-shifted views.")] = True,
    write: Annotated[bool, typer.Option(help="Also time the PandaSet writer.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time synthetic log generation (goal: 40 frames, 3 cameras, 320x180 + LiDAR < 30 s)."""
    from scenes.synthetic import SyntheticConfig, cameras_arg
    from scenes.synthetic_bench import bench_generation

    config = SyntheticConfig(seed=seed, frames=frames, width=width, height=height,
                             cameras=cameras_arg(cameras))
    res = bench_generation(config, ground_truth=ground_truth, write=write)
    if as_json:
        print(json.dumps(res))
        return
    table = Table(title=f"synthetic log: {frames} frames, {len(config.cameras)} cameras, "
                        f"{width}x{height}, seed {seed}")
    table.add_column("part")
    table.add_column("seconds", justify="right")
    table.add_column("items", justify="right")
    table.add_row("layout + tracks", f"{res['build_s']:.2f}", f"{res['tracks']} tracks")
    table.add_row("camera images + depth", f"{res['images_s']:.2f}", str(res["images"]))
    table.add_row("LiDAR sweeps", f"{res['lidar_s']:.2f}", f"{res['lidar_points']:,} points")
    table.add_row("[bold]log total[/]", f"[bold]{res['log_total_s']:.2f}[/]", "")
    if "ground_truth_s" in res:
        table.add_row("lane-shifted ground truth", f"{res['ground_truth_s']:.2f}",
                      f"{res['shifted_views']} views")
    if "write_s" in res:
        table.add_row("PandaSet writer", f"{res['write_s']:.2f}", "")
    table.add_row("everything", f"{res['total_s']:.2f}", "")
    Console().print(table)


@bench_app.command("raster")
def raster(
    gaussians: str = typer.Option("50000", help="Gaussian count(s), comma-separated "
                                  "(e.g. 12500,25000,50000)."),
    width: int = typer.Option(320, help="Image width."),
    height: int = typer.Option(180, help="Image height."),
    views: int = typer.Option(1, help="Views rendered per call (C)."),
    backend: str = typer.Option("auto", help="auto | torch | gsplat."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    repeats: int = typer.Option(5, help="Timed repeats (median reported)."),
    warmup: int = typer.Option(1, help="Untimed warm-up calls."),
    seed: int = typer.Option(0, help="Synthetic log seed."),
    frames: int = typer.Option(40, help="Synthetic log frames (LiDAR sweeps)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Renderer speed: forward and forward+backward per view on LiDAR-seeded Gaussians."""

    from recon.render.bench import RasterBenchConfig, run_raster_bench

    sizes = [int(x) for x in gaussians.split(",") if x.strip()]
    cfg = RasterBenchConfig(gaussians=sizes, width=width, height=height, views=views,
                            backend=backend, device=device, repeats=repeats, warmup=warmup,
                            seed=seed, frames=frames)
    report = run_raster_bench(
        cfg, progress=None if as_json else lambda m: typer.echo(m, err=True))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    c, sc = report["config"], report["scene"]
    typer.echo(f"backend {c['backend']} on {c['device']} "
               f"({report['machine']['cpu_threads']} threads), {width}x{height}, C={views}; "
               f"scene {sc['log']}: {sc['lidar_gaussians']} LiDAR Gaussians, voxel "
               f"{sc['voxel_m']:.3f} m, median scale {sc['median_scale_m']:.3f} m")
    typer.echo(f"{'N':>9} {'visible':>8} {'pairs':>10} {'fwd ms':>8} {'fwd+bwd ms':>11} "
               f"{'Mpairs/s f':>11} {'Mpairs/s fb':>12} {'peak MB':>8}")
    for r in report["rows"]:
        typer.echo(f"{r['gaussians']:>9} {r['visible']:>8} {r['pairs_composited']:>10} "
                   f"{r['forward_s'] * 1e3:>8.1f} {r['forward_backward_s'] * 1e3:>11.1f} "
                   f"{(r['pairs_per_s_forward'] or 0) / 1e6:>11.2f} "
                   f"{(r['pairs_per_s_forward_backward'] or 0) / 1e6:>12.2f} "
                   f"{r['peak_memory_mb']:>8.0f}")
        if r["duplicated"]:
            typer.echo(f"          ({r['duplicated']} of them jitter-duplicated: the log's "
                       f"LiDAR gave {sc['lidar_gaussians']})")
    typer.echo("pairs = Gaussian-pixel pairs composited per view (torch backend count); "
               "times per view, median")


@bench_app.command("adam")
def bench_adam(
    seed: int = 0,
    frames: int = 40,
    width: int = 320,
    height: int = 180,
    budget: Annotated[int, typer.Option(help="Static Gaussians at most.")] = 100_000,
    actors: Annotated[str, typer.Option(help="all | moving")] = "all",
    far_budget: Annotated[int | None, typer.Option(
        help="Far-field Gaussians beyond LiDAR reach (default: budget / 10; 0: none).")]
    = None,
    iters: Annotated[int, typer.Option(help="Adam steps.")] = 3000,
    eval_every: Annotated[int, typer.Option(help="Evaluate every this many steps.")] = 250,
    max_views: Annotated[int | None, typer.Option(help="Held-out views per curve point "
                                                       "(evenly spaced subset).")] = 12,
    densify: Annotated[bool, typer.Option(help="3DGS densify/prune (static and actors).")]
    = False,
    rasterize_mode: Annotated[str, typer.Option(help="antialiased | classic")]
    = "antialiased",
    camera_antialias: Annotated[bool, typer.Option(
        help="Synthetic camera integrates over each pixel (off: point-sampled, as before "
             "2026-11-22).")] = True,
    backend: str = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Adam baseline: held-out PSNR vs steps and wall time, then the full protocol."""
    from recon.adam import AdamConfig
    from recon.adam_bench import bench_adam_curve
    from recon.init import InitConfig
    from scenes.synthetic import SyntheticConfig

    console = Console(stderr=True)
    res = bench_adam_curve(
        SyntheticConfig(seed=seed, frames=frames, width=width, height=height,
                        antialias=camera_antialias),
        InitConfig(budget=budget, actors=actors, far_budget=far_budget),
        AdamConfig(iters=iters, densify=densify, backend=backend,
                   rasterize_mode=rasterize_mode),
        eval_every=eval_every, max_views=max_views,
        on_row=lambda r: console.print(f"step {r['step']:>6}  {r['wall_s']:>8.1f} s  "
                                       f"PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.3f}"))
    if as_json:
        print(json.dumps(res))
        return
    table = Table(title=f"Adam baseline on {res['log']} ({res['gaussians']})")
    for col in ("step", "wall s", "held-out PSNR", "SSIM"):
        table.add_column(col, justify="right")
    for r in res["curve"]:
        table.add_row(str(r["step"]), f"{r['wall_s']:.1f}", f"{r['psnr']:.2f}",
                      f"{r['ssim']:.3f}")
    Console().print(table)
    Console().print_json(json.dumps(res["final"]))


@bench_app.command("recon")
def bench_recon_cmd(
    quick: Annotated[bool, typer.Option(
        help="The small settings (5 logs of 10 frames, 12k Gaussians, Adam 1500): a quick "
             "mode; the default is the scale reconstruct runs at.")] = False,
    smoke: Annotated[bool, typer.Option(help="Seconds-long run of every row (tests).")] = False,
    logs: Annotated[int | None, typer.Option(help="Evaluation logs of the suite.")] = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="G3R model (default: the shipped checkpoint).")] = None,
    ablation: Annotated[list[str] | None, typer.Option(
        help="NAME=CHECKPOINT of a model trained differently (repeatable).")] = None,
    adam_iters: Annotated[int | None, typer.Option(
        help="Adam's longest run (convergence reference).")] = None,
    budget: Annotated[int | None, typer.Option(help="Static Gaussians per scene.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    backend: str = "auto",
    only: Annotated[str | None, typer.Option(
        help="Comma-separated indices of the evaluation logs to run (split a run).")] = None,
    merge: Annotated[list[str] | None, typer.Option(
        help="Print the table of these JSON reports joined (runs nothing).")] = None,
    out: Annotated[str | None, typer.Option(help="Also write the JSON report here.")] = None,
    plot: Annotated[str | None, typer.Option(
        help="Also write a PNG of held-out PSNR against wall time here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """G3R (T=24, turbo, ablations) vs Adam (G3R's time, 10x it, 3000 steps) on evaluation
    logs at the default scale; prints the table and the speedup."""
    from dataclasses import replace
    from pathlib import Path

    import torch

    from recon.g3r.bench import BenchConfig, bench_recon, merge_reports, plot_report
    from recon.g3r.bench import quick as quick_config
    from recon.g3r.bench import smoke as smoke_config

    if threads:
        torch.set_num_threads(threads)
    pairs = []
    for a in ablation or []:
        name, sep, path = a.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--ablation must look like NAME=CHECKPOINT, not {a!r}")
        pairs.append((name, path))
    cfg = BenchConfig(ablations=tuple(pairs), backend=backend)
    if quick:
        cfg = quick_config(cfg)
    if smoke:
        cfg = smoke_config(cfg)
    cfg = replace(cfg, **{k: v for k, v in {"logs": logs, "adam_iters": adam_iters,
                                            "budget": budget}.items() if v is not None})
    if only:
        cfg = replace(cfg, only=tuple(int(i) for i in only.split(",")))
    console = Console(stderr=True)
    if merge:
        report = merge_reports([json.loads(Path(p).read_text()) for p in merge])
    else:
        report = bench_recon(cfg, checkpoint, say=console.print)
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    if plot:
        plot_report(report, plot)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"G3R vs Adam on {len(report['logs'])} evaluation logs (means)")
    for col in ("method", "held-out PSNR", "SSIM", "shift 1 m", "shift 2 m", "shift 3 m",
                "actors/view (whole)", "AbsRel", "wall s"):
        table.add_column(col, justify="right")

    def f(x, fmt=".2f"):
        return "-" if x is None else format(x, fmt)

    for r in report["summary"]:
        sh = r["psnr_shift"]
        table.add_row(r["method"], f(r["psnr"]), f(r["ssim"], ".3f"), f(sh["1"]), f(sh["2"]),
                      f(sh["3"]), f"{f(r.get('psnr_actors'))} ({f(r.get('psnr_actor_views'))})",
                      f(r.get("depth_abs_rel"), ".3f"), f(r["wall_s"], ".1f"))
    Console().print(table)
    for lg, bound in zip(report["logs"], report["speedup_lower_bounds"], strict=True):
        sp = lg["speedup"]
        if sp is not None:
            Console().print(f"{lg['log']} ({lg['setting']}): speedup {sp:.1f}x (Adam "
                            f"reaches G3R's PSNR after {lg['adam_time_to_g3r_psnr_s']:.1f} s)")
        else:
            Console().print(f"{lg['log']} ({lg['setting']}): Adam never reaches G3R's "
                            f"PSNR; speedup > {f(bound, '.1f')}x")


@bench_app.command("service")
def bench_service_cmd(
    concurrency: Annotated[int, typer.Option(help="Render requests sent at once.")] = 50,
    rounds: Annotated[int, typer.Option(help="Times the burst is repeated.")] = 3,
    frames: int = 4,
    width: int = 320,
    height: int = 180,
    budget: Annotated[int, typer.Option(help="Static Gaussians of the scene.")] = 20_000,
    steps: Annotated[int, typer.Option(help="Adam steps for the scene.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """HTTP render latency under load: p50/p99 of CONCURRENCY concurrent renders."""
    from service.bench_service import bench_service

    console = Console(stderr=True)
    res = bench_service(concurrency=concurrency, rounds=rounds, frames=frames, width=width,
                        height=height, budget=budget, steps=steps, progress=console.print)
    if as_json:
        print(json.dumps(res))
        return
    table = Table(title=f"render API: {res['requests']} requests, {concurrency} at a time, "
                        f"{width}x{height}, {res['scene']['gaussians']}")
    for col in ("ok", "failed", "p50 ms", "p90 ms", "p99 ms", "max ms", "req/s",
                "single ms"):
        table.add_column(col, justify="right")
    ms = lambda v: "-" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
    table.add_row(str(res["succeeded"]), str(res["failed"]), ms(res["p50_s"]),
                  ms(res["p90_s"]), ms(res["p99_s"]), ms(res["max_s"]),
                  str(res["throughput_rps"]), ms(res["single_median_s"]))
    Console().print(table)
