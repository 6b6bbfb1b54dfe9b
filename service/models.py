"""Pydantic models at the HTTP edge (request bodies and responses)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.db import Job, Scene

SourceFormat = Literal["pandaset", "waymo", "synthetic", "auto"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def available_methods() -> tuple[str, ...]:
    from recon.pipeline import METHODS

    return tuple(METHODS)


def default_method() -> str:
    """``g3r`` once it exists in ``recon.pipeline.METHODS``, else ``adam``."""
    return "g3r" if "g3r" in available_methods() else "adam"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    """Which log to reconstruct."""

    format: SourceFormat = Field("auto", description="Log format; auto detects it.")
    uri: str = Field(..., min_length=1, max_length=4096, description=(
        "A path under a data root (absolute, or relative to a root), a file:// or fsspec "
        "URL under a data root, or synthetic://?seed=3&frames=6&width=96&height=64"))
    frames: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="[start, end) frame positions.")
    cameras: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, min_length=1, max_length=32, description="Cameras to use (default: all).")

    @field_validator("uri")
    @classmethod
    def _no_nul(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("uri must not contain NUL characters")
        return v

    @field_validator("frames")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and v[1] <= v[0]:
            raise ValueError(f"frames [start, end) needs end > start, got {list(v)}")
        return v


class Options(_Strict):
    """How to reconstruct (shared by JSON and multipart requests)."""

    method: str = Field(default_factory=default_method, description=(
        "Optimiser: one of recon.pipeline.METHODS (default g3r when available, else "
        "adam)."))
    steps: int | None = Field(None, ge=1, le=100_000, description="Optimiser steps (Adam "
                              "iterations, G3R's T); default the method's.")
    turbo: bool = Field(False, description="G3R's short schedule (T = 12).")
    name: str | None = Field(None, max_length=200, description="A label for the job/scene.")
    budget: int | None = Field(None, ge=100, le=50_000_000, description="Static Gaussians "
                               "at most (default: sized for the machine).")
    actors: Literal["all", "moving"] | None = Field(None, description="Which tracks become "
                                                    "actors (default all).")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        methods = available_methods()
        if v not in methods:
            raise ValueError(f"unknown method {v!r}; available: {', '.join(methods)}")
        return v

    @model_validator(mode="after")
    def _turbo(self) -> Options:
        if self.turbo and self.method == "adam":
            raise ValueError("turbo is a G3R schedule; Adam takes steps instead")
        return self


class ReconstructRequest(Options):
    """``POST /reconstruct`` JSON body."""

    source: Source

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "source": {"format": "synthetic",
                   "uri": "synthetic://?seed=3&frames=6&width=96&height=64"},
        "method": "adam", "steps": 3}]})


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")


class JobOut(BaseModel):
    """A job as the API reports it."""

    id: str
    name: str | None
    state: JobState
    stage: str | None = Field(None, description="loading, initialising, optimising, "
                              "writing while running.")
    step: int = Field(0, description="Optimiser step done (k of T).")
    total_steps: int | None = Field(None, description="T.")
    progress: float = Field(..., description="0..1 of the optimisation.")
    message: str | None = Field(None, description="Stage with step/T, e.g. "
                                "'optimising 3/10 (loss 0.0123)'.")
    loss: float | None = None
    method: str
    source: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    scene_id: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    updated_at: str | None

    @staticmethod
    def of(job: Job) -> JobOut:
        msg = job.stage
        if job.state == "running" and job.stage == "optimising" and job.total_steps:
            msg = f"optimising {job.step}/{job.total_steps}"
            if job.loss is not None and math.isfinite(job.loss):
                msg += f" (loss {job.loss:.4g})"
        elif job.state != "running":
            msg = job.state
        src = job.request.get("source", {})
        shown = {k: src.get(k) for k in ("format", "uri", "frames", "cameras")}
        if src.get("kind") == "upload":
            shown["uri"] = f"upload:{src.get('filename')}"
        loss = job.loss if job.loss is None or math.isfinite(job.loss) else None
        return JobOut(id=job.id, name=job.name, state=job.state,  # type: ignore[arg-type]
                      stage=job.stage if job.state == "running" else None, step=job.step,
                      total_steps=job.total_steps, progress=job.progress, message=msg,
                      loss=loss, method=job.request.get("method", ""), source=shown,
                      metrics=job.metrics, error=job.error, scene_id=job.scene_id,
                      attempts=job.attempts, cancel_requested=job.cancel_requested,
                      created_at=_iso(job.created_at), started_at=_iso(job.started_at),
                      finished_at=_iso(job.finished_at), updated_at=_iso(job.updated_at))


class JobList(BaseModel):
    jobs: list[JobOut]
    total: int


class SceneOut(BaseModel):
    id: str
    name: str | None
    job_id: str | None
    method: str | None
    created_at: str | None
    frames: int | None = None
    cameras: list[str] = Field(default_factory=list)
    actors: int | None = None
    gaussians: dict[str, int] = Field(default_factory=dict)

    @staticmethod
    def of(scene: Scene) -> SceneOut:
        s = scene.summary
        return SceneOut(id=scene.id, name=scene.name, job_id=scene.job_id, method=scene.method,
                        created_at=_iso(scene.created_at), frames=s.get("frames"),
                        cameras=s.get("cameras", []), actors=s.get("actors"),
                        gaussians=s.get("gaussians", {}))


class SceneList(BaseModel):
    scenes: list[SceneOut]
    total: int


Matrix4 = Annotated[list[Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]],
                    Field(min_length=4, max_length=4)]
Matrix3 = Annotated[list[Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]],
                    Field(min_length=3, max_length=3)]
Vector3 = Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]


class Intrinsics(_Strict):
    fx: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    fy: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    cx: FiniteFloat
    cy: FiniteFloat


class ActorEditIn(_Strict):
    """A render-time change to one actor."""

    hide: bool = False
    offset: Vector3 | None = Field(None, description="World-frame translation (m).")
    pose: Matrix4 | None = Field(None, description="object_to_world replacing the track's.")


def _check_pose(m: list[list[float]] | None, what: str) -> None:
    if m is None:
        return
    import numpy as np

    a = np.asarray(m, dtype=np.float64)
    if not np.allclose(a[3], [0, 0, 0, 1], atol=1e-6):
        raise ValueError(f"{what}: last row must be [0, 0, 0, 1]")
    R = a[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-3) or np.linalg.det(R) < 0:
        raise ValueError(f"{what}: the upper-left 3x3 must be a rotation")


class RenderRequest(_Strict):
    """``POST /scenes/{id}/render``: an arbitrary camera."""

    cam_to_world: Matrix4 = Field(..., description="OpenCV camera (x right, y down, z "
                                  "forward) to world, 4x4.")
    camera: str | None = Field(None, description="Take intrinsics and size from this scene "
                               "camera (scaled to width/height); default the first.")
    intrinsics: Intrinsics | None = Field(None, description="Pixels of the output image; "
                                          "needs width and height.")
    width: int | None = Field(None, ge=1, le=4096)
    height: int | None = Field(None, ge=1, le=4096)
    t: FiniteFloat = Field(0.0, description="Time (s since the segment's start) that places "
                           "the actors.")
    edits: dict[str, ActorEditIn] = Field(default_factory=dict, max_length=10_000)
    format: Literal["png", "jpeg"] = "png"
    quality: int = Field(90, ge=1, le=100)

    @model_validator(mode="after")
    def _checks(self) -> RenderRequest:
        _check_pose(self.cam_to_world, "cam_to_world")
        for k, e in self.edits.items():
            _check_pose(e.pose, f"edits.{k}.pose")
        if self.intrinsics is not None and (self.width is None or self.height is None):
            raise ValueError("intrinsics need width and height")
        if self.intrinsics is not None and self.camera is not None:
            raise ValueError("give either camera or intrinsics, not both")
        return self


class Problem(BaseModel):
    """Every 4xx/5xx body: ``detail`` says what is wrong."""

    detail: str
