"""The ``drivesplat`` command line: a thin layer over the functions the service calls."""

from __future__ import annotations

import typer

from service.bench_cli import bench_app

app = typer.Typer(
    name="drivesplat",
    help="Reconstruct driving logs into decomposed 3D Gaussian scenes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
