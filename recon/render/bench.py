"""Renderer benchmark: LiDAR-initialised Gaussians from a synthetic log.

The scene is what the optimiser starts from (``recon.lidar_points``), so the splat
footprints (sizes from neighbour spacing, many overlapping near the road) are realistic
rather than random blobs. Views are the log's own cameras around the middle frame,
rendered at the log's image size; the loss for the backward pass is the L2 error to the
recorded images.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from recon.lidar_points import PointGaussians, gaussians_from_lidar, jitter_duplicate
from recon.render.api import rasterize, resolve_backend
from scenes.geometry import invert_pose


@dataclass
class RasterBenchConfig:
    """What ``drivesplat bench raster`` measures.

    Attributes:
        gaussians: scene sizes to time (one result row each).
        width, height: image size (the synthetic log is generated at this size).
        views: cameras rendered per call (C), taken around the middle frame.
        backend: ``auto`` | ``torch`` | ``gsplat``.
        device: ``cpu`` | ``cuda`` (default: cuda when available).
        repeats, warmup: timed and untimed calls per measurement.
        seed, frames: synthetic log.
    """

    gaussians: list[int] = field(default_factory=lambda: [50_000])
    width: int = 320
    height: int = 180
    views: int = 1
    backend: str = "auto"
    device: str | None = None
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    frames: int = 40


@dataclass
class RasterBenchRow:
    """One scene size. Times are per view (call time / C), medians over repeats."""

    gaussians: int
    duplicated: int
    visible: int
    pairs_enumerated: int | None
    pairs_composited: int | None
    forward_s: float
    forward_backward_s: float
    pairs_per_s_forward: float | None
    pairs_per_s_forward_backward: float | None
    peak_memory_mb: float
    memory_kind: str


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssPeak:
    """Samples the process RSS every few ms in a thread: the peak during a block.

    ``ru_maxrss`` cannot be reset, and building the scene peaks higher than rendering.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> _RssPeak:
        self.peak = _rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _views(log, n: int, device: torch.device):
    """[C,4,4] world->camera, [C,3,3] K and [C,H,W,3] images around the middle frame."""
    cams = list(log.cameras)
    mid = len(log.frames) // 2
    picks = []
    for i in range(n):
        frame = log.frames[min(mid + i // len(cams), len(log.frames) - 1)]
        picks.append(frame.images[cams[i % len(cams)]])
    viewmats = torch.tensor(np.stack([invert_pose(im.cam_to_world) for im in picks]),
                            dtype=torch.float32, device=device)
    Ks = torch.tensor(np.stack([log.cameras[im.camera].K for im in picks]),
                      dtype=torch.float32, device=device)
    images = torch.tensor(np.stack([im.image() for im in picks]), device=device).float() / 255
    return viewmats, Ks, images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_scene(cfg: RasterBenchConfig, log=None) -> tuple[object, PointGaussians]:
    """The synthetic log and Gaussians for the largest requested size (on CPU)."""
    from scenes.synthetic import SyntheticConfig, generate_log

    if log is None:
        log = generate_log(SyntheticConfig(seed=cfg.seed, frames=cfg.frames, width=cfg.width,
                                           height=cfg.height))
    return log, gaussians_from_lidar(log, max(cfg.gaussians), seed=cfg.seed)


def run_raster_bench(cfg: RasterBenchConfig, progress=None) -> dict:
    """Time forward and forward+backward for each size in ``cfg.gaussians``.

    Returns:
        JSON-ready dict: ``config``, ``machine``, ``scene`` and ``rows`` (one
        :class:`RasterBenchRow` each).
    """
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = resolve_backend(cfg.backend, device)  # type: ignore[arg-type]
    say = progress or (lambda _msg: None)
    say("building the LiDAR-initialised scene")
    t0 = time.perf_counter()
    log, base = build_scene(cfg)
    build_s = time.perf_counter() - t0
    viewmats, Ks, images = _views(log, cfg.views, device)
    C = cfg.views
    rows = []
    for n in sorted(cfg.gaussians):
        say(f"N = {n}")
        # A random subset of the full voxel set keeps the footprint distribution.
        if n <= len(base):
            perm = torch.randperm(len(base), generator=torch.Generator().manual_seed(cfg.seed))
            g = base.index(perm[:n].sort().values)
        else:
            g = jitter_duplicate(base, n, seed=cfg.seed)
        duplicated = max(0, n - len(base))
        g = g.to(device)
        params = [t.clone().requires_grad_(True)
                  for t in (g.means, g.quats, g.scales, g.opacities, g.colors)]

        def forward(params=params):
            with torch.no_grad():
                return rasterize(*params, viewmats, Ks, cfg.width, cfg.height,
                                 backend=backend)

        def forward_backward(params=params):
            out = rasterize(*params, viewmats, Ks, cfg.width, cfg.height, backend=backend)
            ((out.rgb - images) ** 2).mean().backward()
            for p in params:
                p.grad = None

        # Pair counts come from the torch backend (gsplat does not report them).
        with torch.no_grad():
            ref = rasterize(*params, viewmats, Ks, cfg.width, cfg.height, backend="torch")
        n_enum = ref.stats["pairs_enumerated"]
        n_comp = ref.stats["pairs_composited"]
        visible = int(ref.visible.sum())
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device) / 2**20
        else:
            base_mem = _rss_mb()
        with _RssPeak() as rss:
            fwd = _median_time(forward, device, cfg.warmup, cfg.repeats) / C
            fwd_bwd = _median_time(forward_backward, device, cfg.warmup, cfg.repeats) / C
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20 - base_mem
            kind = "CUDA max_memory_allocated above the scene's tensors"
        else:
            peak = rss.peak - base_mem
            kind = "peak process RSS (sampled every 2 ms) above the RSS before timing"
        rows.append(RasterBenchRow(
            gaussians=n, duplicated=duplicated, visible=visible, pairs_enumerated=n_enum,
            pairs_composited=n_comp, forward_s=fwd, forward_backward_s=fwd_bwd,
            pairs_per_s_forward=n_comp / C / fwd if fwd > 0 else None,
            pairs_per_s_forward_backward=n_comp / C / fwd_bwd if fwd_bwd > 0 else None,
            peak_memory_mb=peak, memory_kind=kind))
    return {
        "config": asdict(cfg) | {"device": str(device), "backend": backend},
        "machine": {"cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "scene": {"log": log.name, "lidar_gaussians": len(base), "voxel_m": base.voxel_size,
                  "median_scale_m": float(base.scales[:, 0].median()),
                  "build_s": build_s},
        "rows": [asdict(r) for r in rows],
    }
