"""``drivesplat bench ...``: benchmarks whose numbers go into BENCHMARKS.md."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks (numbers for BENCHMARKS.md).", no_args_is_help=True)
