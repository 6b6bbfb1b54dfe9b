"""``drivesplat serve``, ``drivesplat worker`` and ``drivesplat service-demo``."""

from __future__ import annotations

import logging
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run the HTTP API (settings from DRIVESPLAT_* environment variables; see README)."""
    import uvicorn

    from service.api import create_app
    from service.settings import get_settings

    _logging(log_level)
    settings = get_settings()
    err.print(f"drivesplat API on http://{host}:{port} (docs: /docs), executor "
              f"{settings.executor}, home {settings.home_dir}")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=10, log_config=None)


def worker(
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run a Celery worker: one job at a time (one per GPU), jobs from REDIS_URL."""
    from service.celery_app import run_worker
    from service.settings import get_settings

    _logging(log_level)
    run_worker(get_settings(), loglevel=log_level.upper())


def service_demo(
    url: Annotated[str | None, typer.Option(help="API to use (default: http://127.0.0.1:8000 "
                                                 "if it answers, else start one).")] = None,
    out: Annotated[Path, typer.Option(help="Where renders and the PLY go.")] = Path(
        "data/service-demo"),
    frames: Annotated[int, typer.Option(help="Frames of the synthetic log.")] = 6,
    width: Annotated[int, typer.Option(help="Image width.")] = 160,
    height: Annotated[int, typer.Option(help="Image height.")] = 90,
    steps: Annotated[int | None, typer.Option(
        help="Optimiser steps (default: the method's, G3R's T = 24).")] = None,
    budget: Annotated[int, typer.Option(help="Static Gaussians at most.")] = 20_000,
    method: Annotated[str | None, typer.Option(help="adam | g3r (default: server's).")] = None,
    token: Annotated[str | None, typer.Option(envvar="DRIVESPLAT_API_TOKEN",
                                              help="Bearer token.")] = None,
) -> None:
    """Synthesise a log, upload it to the API, follow the job, save renders and the PLY."""
    import signal
    import sys

    from scenes.pandaset import write_pandaset
    from scenes.synthetic import SyntheticConfig, generate_log, render_all
    from service.client import Client
    from service.launch import LocalServer
    from service.progress import progress_bar

    # SIGTERM ends the demo through the finally below, which stops the server it started.
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))
    out.mkdir(parents=True, exist_ok=True)
    server = None
    client = Client(url or "http://127.0.0.1:8000", token=token)
    if url is None and not client.ready():
        err.print("no API on http://127.0.0.1:8000: starting one (log in "
                  f"{out / 'server.log'})")
        server = LocalServer({}, out / "server.log", token=token).wait_ready()
        client = server.client
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log = generate_log(SyntheticConfig(seed=0, frames=frames, width=width,
                                               height=height,
                                               cameras=("front_camera", "front_left_camera")))
            with progress_bar() as bar:
                task = bar.add_task("synthesising log", total=None)
                render_all(log, ground_truth=False,
                           progress=lambda d, t: bar.update(task, completed=d, total=t))
            seq = Path(tmp) / log.name
            write_pandaset(log, seq, ground_truth=False)
            archive = Path(tmp) / f"{log.name}.tar.gz"
            with tarfile.open(archive, "w:gz") as tf:
                tf.add(seq, arcname=log.name)
            job = client.upload(archive, method=method, steps=steps, budget=budget,
                                name="service-demo")
            size_mb = archive.stat().st_size / 2**20
        err.print(f"job {job['id']} queued ({size_mb:.1f} MiB upload)")
        with progress_bar() as bar:
            task = bar.add_task("queued", total=None)

            def show(j: dict) -> None:
                bar.update(task, description=j.get("message") or j["state"],
                           completed=j.get("step") or 0, total=j.get("total_steps"))

            job = client.wait(job["id"], on_update=show)
        if job["state"] != "succeeded":
            raise typer.Exit(_fail(f"job {job['state']}: {job.get('error')}"))
        sid = job["scene_id"]
        manifest = client.json("GET", f"/scenes/{sid}")
        cams = sorted(manifest["cameras"])
        idx = [f["index"] for f in manifest["frames"]]
        actors = [a["id"] for a in manifest["actors"]]
        shots = [(f"frame{idx[0]:02d}_{c}.png", {"frame": idx[0], "camera": c}) for c in cams]
        mid = idx[len(idx) // 2]
        shots += [(f"frame{mid:02d}_shift{s:+.0f}m.png",
                   {"frame": mid, "camera": cams[0], "shift_m": s}) for s in (-2.0, 2.0)]
        if actors:
            shots.append((f"frame{mid:02d}_no_actors.png",
                          {"frame": mid, "camera": cams[0], "hide": ",".join(actors)}))
        for name, params in shots:
            (out / name).write_bytes(client.render(sid, **params))
        (out / "static.ply").write_bytes(client.asset(sid, "static.ply"))
        m = job.get("metrics", {})
        err.print(f"scene {sid}: {m.get('iterations')} steps in {m.get('total_s', 0):.1f} s; "
                  f"wrote {len(shots)} renders and static.ply to {out}")
    finally:
        if server is not None:
            server.stop()


def _fail(message: str) -> int:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return 2


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``drivesplat`` CLI."""
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.command("service-demo")(service_demo)
