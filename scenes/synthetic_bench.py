"""Timing of synthetic log generation (``drivesplat bench synth``)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict

from scenes.synthetic import SyntheticConfig, generate_log


def bench_generation(config: SyntheticConfig, *, ground_truth: bool = True,
                     write: bool = True) -> dict:
    """Generate one log and time each part.

    Returns seconds for: ``build`` (street layout, tracks), ``images`` (camera renders +
    JPEG + depth), ``lidar`` (all sweeps), ``log_total`` (the three: what a log with LiDAR
    costs), ``ground_truth`` (lane-shifted views), ``write`` (PandaSet writer), plus counts.
    """
    out: dict = {"config": asdict(config)}
    t0 = time.perf_counter()
    log = generate_log(config)
    out["build_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    for f in log.frames:
        for im in f.images.values():
            im.image()
    out["images_s"] = time.perf_counter() - t
    out["images"] = sum(len(f.images) for f in log.frames)

    t = time.perf_counter()
    points = sum(len(f.lidar()) for f in log.frames if f.has_lidar)
    out["lidar_s"] = time.perf_counter() - t
    out["lidar_points"] = points
    out["log_total_s"] = out["build_s"] + out["images_s"] + out["lidar_s"]

    if ground_truth and log.ground_truth is not None:
        t = time.perf_counter()
        for v in log.ground_truth.shifted:
            v.image.load()
        out["ground_truth_s"] = time.perf_counter() - t
        out["shifted_views"] = len(log.ground_truth.shifted)
    if write:
        from scenes.pandaset import write_pandaset

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            write_pandaset(log, os.path.join(tmp, "seq"), ground_truth=ground_truth)
            out["write_s"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - t0
    out["tracks"] = len(log.tracks)
    out["moving_tracks"] = len(log.moving_tracks)
    return out
