"""``drivesplat bench service``: render latency of the HTTP API under concurrent load.

Starts a real server (``drivesplat serve``, in-process executor, SQLite) in a temporary
home, reconstructs a small synthetic scene through the API, then fires ``concurrency``
render requests at once (released together by a barrier), ``rounds`` times, each from
its own client thread and connection. Latency is per request, client side.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))
    return s[k]


def bench_service(concurrency: int = 50, rounds: int = 3, frames: int = 4, width: int = 320,
                  height: int = 180, budget: int = 20_000, steps: int = 5,
                  render_concurrency: int | None = None,
                  progress=None) -> dict:
    """Run the benchmark; returns a JSON-able report."""
    from service.client import Client
    from service.launch import LocalServer

    say = progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        home = Path(tmp)
        env = {"DRIVESPLAT_HOME": str(home), "DRIVESPLAT_DATA_ROOTS": str(home / "logs"),
               "DATABASE_URL": f"sqlite:///{home / 'jobs.db'}",
               "DRIVESPLAT_EXECUTOR": "inprocess"}
        if render_concurrency:
            env["DRIVESPLAT_RENDER_CONCURRENCY"] = str(render_concurrency)
        server = LocalServer(env, home / "server.log").wait_ready()
        try:
            c = server.client
            # Render latency does not depend on how well the scene is fitted: few steps,
            # a light LiDAR (fewer points to seed from) keep the set-up short.
            uri = (f"synthetic://?seed=0&frames={frames}&width={width}&height={height}"
                   "&cameras=front&lidar_beams=16&lidar_azimuths=512")
            t0 = time.perf_counter()
            job = c.submit({"format": "synthetic", "uri": uri}, method="adam", steps=steps,
                           budget=budget, actors="moving", name="bench")
            say(f"reconstructing {uri} ({steps} steps, budget {budget}) ...")
            job = c.wait(job["id"], timeout=1800)
            if job["state"] != "succeeded":
                raise RuntimeError(f"bench scene failed: {job.get('error')}")
            recon_s = time.perf_counter() - t0
            sid = job["scene_id"]
            t1 = time.perf_counter()
            c.render(sid, frame=0)
            first_s = time.perf_counter() - t1  # includes loading the scene
            single = []
            for i in range(10):
                t1 = time.perf_counter()
                c.render(sid, frame=i % frames)
                single.append(time.perf_counter() - t1)
            say(f"single renders: median {statistics.median(single) * 1e3:.0f} ms; "
                f"now {rounds} rounds of {concurrency} concurrent requests")
            lat: list[float] = []
            failures: list[str] = []
            walls = []
            for _ in range(rounds):
                barrier = threading.Barrier(concurrency)

                def one(i: int, barrier: threading.Barrier = barrier) -> None:
                    cl = Client(server.url, timeout=600)
                    barrier.wait()
                    t = time.perf_counter()
                    try:
                        data = cl.render(sid, frame=i % frames)
                        if data[:8] != b"\x89PNG\r\n\x1a\n":
                            raise ValueError("not a PNG")
                        lat.append(time.perf_counter() - t)
                    except Exception as e:  # counted, reported
                        failures.append(f"{type(e).__name__}: {e}")

                tw = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(one, range(concurrency)))
                walls.append(time.perf_counter() - tw)
            n = concurrency * rounds
            scene = c.json("GET", f"/scenes/{sid}")
        finally:
            server.stop()
    return {
        "machine": {"cpu_threads": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": os.getloadavg()[0]},
        "scene": {"frames": frames, "width": width, "height": height,
                  "gaussians": scene.get("counts"), "recon_s": round(recon_s, 2)},
        "concurrency": concurrency, "rounds": rounds, "requests": n,
        "succeeded": len(lat), "failed": len(failures), "failures": failures[:5],
        "first_render_s": round(first_s, 4),
        "single_median_s": round(statistics.median(single), 4),
        "p50_s": round(_pct(lat, 0.50), 4) if lat else None,
        "p90_s": round(_pct(lat, 0.90), 4) if lat else None,
        "p99_s": round(_pct(lat, 0.99), 4) if lat else None,
        "max_s": round(max(lat), 4) if lat else None,
        "throughput_rps": round(len(lat) / sum(walls), 2) if walls else None,
        "render_concurrency": render_concurrency or os.cpu_count(),
    }
