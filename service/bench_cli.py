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
