"""The HTTP API (FastAPI): jobs, scenes, renders, health and metrics. OpenAPI at /docs.

``create_app(settings)`` builds the app; ``drivesplat serve`` runs it under uvicorn.
Errors are ``{"detail": "<what is wrong>"}`` with a 4xx status naming the problem; a
rejected request changes nothing stored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.archive import ArchiveError, archive_suffix, scan
from service.db import TERMINAL_STATES, new_id
from service.executors import Executor, make_executor
from service.jobs import JobContext
from service.metrics import (
    JOB_BUCKETS,
    RENDER_BUCKETS,
    Histogram,
    bucketed,
    counter_lines,
    gauge_lines,
    histogram_lines,
)
from service.models import (
    JobList,
    JobOut,
    Options,
    Problem,
    ReconstructRequest,
    RenderRequest,
    SceneList,
    SceneOut,
)
from service.rendering import IMAGE_FORMATS, custom_view, encode, recorded_view, render_rgb
from service.scene_cache import SceneCache
from service.settings import Settings, get_settings
from service.sources import SourceError, resolve_source

log = logging.getLogger("drivesplat.api")

#: Largest body of any request but an upload.
MAX_JSON_BYTES = 4 * 2**20
#: A rejected body is read and dropped up to this size so that the client gets the 413.
_DRAIN_CAP = 64 * 2**20
_FORM_FIELDS = ("file", "method", "steps", "turbo", "name", "budget", "actors", "format",
                "frames", "cameras")


class ApiError(Exception):
    """An error answered as ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit (uploads: ``max_upload_mb``).

    Checks Content-Length first and then counts the bytes actually received, so a chunked
    upload without a length is cut off too.
    """

    def __init__(self, app, upload_limit: int) -> None:
        self.app, self.upload_limit = app, upload_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == "/reconstruct" else MAX_JSON_BYTES
        started = False

        async def reply_413(close: bool) -> None:
            body = json.dumps({"detail": f"request body is larger than the limit of "
                                         f"{limit / 2**20:.1f} MiB"}).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode())]
            if close:
                headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        async def drain() -> None:
            # Read (and drop) what the client is still sending, up to a cap, so it sees
            # the 413 instead of a reset connection.
            got = 0
            while got < _DRAIN_CAP:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                got += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    return

        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        if int(v) <= _DRAIN_CAP:
                            await drain()
                        await reply_413(close=int(v) > _DRAIN_CAP)
                        return
                except ValueError:
                    pass
        seen = 0

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return msg

        async def tracked_send(msg) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await drain()
                await reply_413(close=True)


class Service:
    """Everything the endpoints share (one per app)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = JobContext.from_settings(settings)
        self.store, self.storage = self.ctx.store, self.ctx.storage
        self.executor: Executor = make_executor(self.ctx)
        self.cache = SceneCache(int(settings.scene_cache_mb * 2**20))
        self.render_latency = Histogram("drivesplat_render_seconds",
                                        "Render request latency (scene load included).",
                                        RENDER_BUCKETS)
        self.renders: dict[int, int] = {}
        self.lock = threading.Lock()
        self.render_limiter: anyio.CapacityLimiter | None = None
        self.closing = False
        self.started = time.time()

    def load_scene(self, scene_id: str):
        from recon.assets import load_scene

        def loader():
            loaded = load_scene(self.storage.scene_dir(scene_id))
            if self.settings.device:
                loaded.scene.to(self.settings.device)
            elif _cuda():
                loaded.scene.to("cuda")
            return loaded

        return self.cache.get(scene_id, loader)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def svc_of(request: Request) -> Service:
    """The app's Service (a FastAPI dependency)."""
    return request.app.state.svc


Svc = Annotated[Service, Depends(svc_of)]
_bearer = HTTPBearer(auto_error=False, description="DRIVESPLAT_API_TOKEN, when set.")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()
    svc_box: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = Service(settings)
        svc.render_limiter = anyio.CapacityLimiter(settings.render_concurrency)
        app.state.svc = svc
        svc_box["svc"] = svc
        svc.executor.start()
        log.info("drivesplat API ready: executor %s, database %s, storage %s, data roots %s",
                 settings.executor, settings.db_url.split("@")[-1], settings.storage,
                 settings.roots)
        try:
            yield
        finally:
            svc.closing = True
            await run_in_threadpool(svc.executor.stop)
            svc.store.dispose()

    app = FastAPI(
        title="drivesplat",
        version="0.1.0",
        description="Reconstruct driving logs into decomposed 3D Gaussian scenes and render "
                    "them. Submit a log with POST /reconstruct, follow GET /jobs/{id}, then "
                    "render with GET /scenes/{id}/render.",
        lifespan=lifespan,
        responses={401: {"model": Problem, "description": "Missing or wrong bearer token."},
                   422: {"model": Problem, "description": "Invalid request."}},
    )
    app.add_middleware(BodyLimit, upload_limit=int(settings.max_upload_mb * 2**20))

    async def auth(creds: Annotated[HTTPAuthorizationCredentials | None,
                                    Depends(_bearer)]) -> None:
        token = settings.api_token
        if not token:
            return
        if creds is None:
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise ApiError(401, "invalid bearer token", {"WWW-Authenticate": "Bearer"})

    protected = [Depends(auth)]

    # ------------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(SourceError)
    async def _source_error(_req: Request, e: SourceError) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(list(e.errors()))},
                            status_code=422)

    @app.exception_handler(OperationalError)
    async def _db_down(_req: Request, e: OperationalError) -> JSONResponse:
        log.error("database error: %s", e)
        return JSONResponse({"detail": "the job database is unavailable; retry later"},
                            status_code=503)

    # ------------------------------------------------------------------ health

    @app.get("/", include_in_schema=False)
    async def root() -> dict:
        return {"service": "drivesplat", "docs": "/docs", "openapi": "/openapi.json"}

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers.")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: database, storage, executor.",
             responses={503: {"description": "Not ready; 'problems' says why."}})
    async def readyz(svc: Svc) -> JSONResponse:
        def check() -> list[str]:
            problems = []
            try:
                svc.store.ping()
            except Exception as e:
                problems.append(f"database: {e}")
            try:
                svc.storage.check()
            except Exception as e:
                problems.append(f"storage {svc.storage.url}: {e}")
            p = svc.executor.problem()
            if p:
                problems.append(f"executor: {p}")
            return problems

        problems = await run_in_threadpool(check)
        body = {"status": "ready" if not problems else "not ready", "problems": problems,
                "executor": settings.executor}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics", tags=["health"], dependencies=protected,
             response_class=PlainTextResponse, summary="Prometheus metrics.")
    async def metrics(svc: Svc) -> PlainTextResponse:
        def collect() -> str:
            counts = svc.store.state_counts()
            lines = gauge_lines("drivesplat_jobs", "Jobs by state.",
                                {(("state", s),): n for s, n in counts.items()})
            lines += histogram_lines("drivesplat_job_duration_seconds",
                           "Job wall time from first start to finish, by final state.",
                           JOB_BUCKETS, bucketed(svc.store.durations(), JOB_BUCKETS, "state"))
            lines += svc.render_latency.expose()
            lines += counter_lines("drivesplat_renders", "Render requests by HTTP status.",
                                   {(("status", str(k)),): v
                                    for k, v in dict(svc.renders).items()})
            lines += gauge_lines("drivesplat_scene_cache_bytes",
                                 "Bytes of loaded scenes held for rendering.",
                                 {(): svc.cache.bytes})
            lines += gauge_lines("drivesplat_scene_cache_scenes", "Scenes held for rendering.",
                                 {(): len(svc.cache)})
            return "\n".join(lines) + "\n"

        text = await run_in_threadpool(collect)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ jobs

    reconstruct_body = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ReconstructRequest"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary",
                             "description": "The log as .tar, .tar.gz/.tgz or .zip: one "
                                            "PandaSet sequence directory or Waymo .tfrecord."},
                    "method": {"type": "string"}, "steps": {"type": "integer", "minimum": 1},
                    "turbo": {"type": "boolean"}, "name": {"type": "string"},
                    "budget": {"type": "integer"},
                    "actors": {"type": "string", "enum": ["all", "moving"]},
                    "format": {"type": "string", "enum": ["auto", "pandaset", "waymo"]},
                    "frames": {"type": "string", "description": "START:END"},
                    "cameras": {"type": "string", "description": "comma-separated"},
                }}},
        },
    }

    @app.post("/reconstruct", status_code=202, response_model=JobOut, tags=["jobs"],
              dependencies=protected, openapi_extra={"requestBody": reconstruct_body},
              summary="Submit a log for reconstruction (JSON source or archive upload).",
              responses={400: {"model": Problem}, 403: {"model": Problem},
                         413: {"model": Problem}, 415: {"model": Problem}})
    async def reconstruct(request: Request, response: Response, svc: Svc) -> JobOut:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            stored, name, job_id = await _json_request(request, svc)
        elif ctype == "multipart/form-data":
            stored, name, job_id = await _upload_request(request, svc)
        else:
            raise ApiError(415, f"send the request as application/json (a source URI) or "
                                f"multipart/form-data (an archive), not {ctype or 'no type'!r}")
        try:
            job = await run_in_threadpool(svc.store.create_job, stored, name, job_id)
        except BaseException:
            if stored["source"]["kind"] == "upload":
                await run_in_threadpool(svc.storage.delete_upload, job_id)
            raise
        try:
            await run_in_threadpool(svc.executor.dispatch, job.id)
        except Exception as e:  # the reaper re-sends undispatched jobs
            log.error("job %s: queued but not sent to a worker yet: %s", job.id, e)
        log.info("job %s: queued (%s, method %s)", job.id, stored["source"]["kind"],
                 stored["method"])
        response.headers["Location"] = f"/jobs/{job.id}"
        return JobOut.of(job)

    async def _json_request(request: Request, svc: Svc) -> tuple[dict, str | None, str]:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        try:
            req = ReconstructRequest.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _validation_message(e.errors())) from None
        source = await run_in_threadpool(resolve_source, req.source.model_dump(),
                                         settings.roots)
        opts = req.model_dump(exclude={"source"})
        return {"source": source, **opts}, req.name, new_id()

    async def _upload_request(request: Request, svc: Svc) -> tuple[dict, str | None, str]:
        try:
            form = await request.form(max_files=1, max_fields=len(_FORM_FIELDS) + 1)
        except _BodyTooLarge:
            raise
        except Exception as e:
            raise ApiError(400, f"malformed multipart body: {e}") from None
        try:
            unknown = [k for k in form if k not in _FORM_FIELDS]
            if unknown:
                raise ApiError(422, f"unknown form field(s) {unknown}; allowed: "
                                    f"{', '.join(_FORM_FIELDS)}")
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "form field 'file' (the log archive) is required and must "
                                    "be a file")
            fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
            source = {"format": fields.pop("format", "auto"), "frames": None, "cameras": None}
            if source["format"] not in ("auto", "pandaset", "waymo"):
                raise ApiError(422, f"format: {source['format']!r} is not auto, pandaset or "
                                    "waymo (an upload is a recorded log)")
            if "frames" in fields:
                source["frames"] = _frames(fields.pop("frames"))
            if "cameras" in fields:
                cams = [c.strip() for c in fields.pop("cameras").split(",") if c.strip()]
                source["cameras"] = cams or None
            try:
                opts = Options.model_validate(fields)
            except ValidationError as e:
                raise ApiError(422, _validation_message(e.errors())) from None
            filename = _safe_filename(upload.filename or "")
            job_id = new_id()
            await run_in_threadpool(_store_upload, svc, upload, filename, job_id)
        finally:
            await form.close()
        source.update(kind="upload", filename=filename, uri=f"upload:{filename}")
        return {"source": source, **opts.model_dump()}, opts.name, job_id

    def _frames(v: str) -> list[int]:
        m = re.fullmatch(r"\s*\[?\s*(\d+)\s*[:,]\s*(\d+)\s*\]?\s*", v)
        if not m or int(m.group(2)) <= int(m.group(1)):
            raise ApiError(422, f"frames: {v!r} is not START:END with END > START")
        return [int(m.group(1)), int(m.group(2))]

    def _safe_filename(name: str) -> str:
        base = re.split(r"[/\\]", name)[-1]
        try:
            suffix = archive_suffix(base)
        except ArchiveError as e:
            raise ApiError(400, str(e)) from None
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", base[: -len(suffix)]).lstrip(".") or "log"
        return stem[:100] + suffix

    def _store_upload(svc: Service, upload: UploadFile, filename: str, job_id: str) -> None:
        """Copy the upload to a temp file, check every entry, then store it."""
        from service.archive import ArchiveLimits

        tmp_dir = Path(tempfile.mkdtemp(prefix="upload-", dir=_tmp_root()))
        try:
            path = tmp_dir / filename
            upload.file.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
            limits = ArchiveLimits(int(settings.max_extract_mb * 2**20),
                                   settings.max_archive_members)
            try:
                scan(path, filename, limits)
            except ArchiveError as e:
                raise ApiError(400, f"upload {filename!r}: {e}") from None
            svc.storage.put_upload(job_id, path, filename)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def _tmp_root() -> Path:
        d = settings.home_dir / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _get_job(svc: Service, job_id: str):
        job = svc.store.get_job(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}")
        return job

    @app.get("/jobs", response_model=JobList, tags=["jobs"], dependencies=protected,
             summary="List jobs, newest first.")
    def list_jobs(svc: Svc,
                  state: Annotated[Literal["queued", "running", "succeeded", "failed",
                                           "cancelled"] | None, Query()] = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                  offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> JobList:
        jobs, total = svc.store.list_jobs(state, limit, offset)
        return JobList(jobs=[JobOut.of(j) for j in jobs], total=total)

    @app.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], dependencies=protected,
             responses={404: {"model": Problem}}, summary="One job's state and progress.")
    def get_job(job_id: str, svc: Svc) -> JobOut:
        return JobOut.of(_get_job(svc, job_id))

    @app.delete("/jobs/{job_id}", response_model=JobOut, tags=["jobs"],
                dependencies=protected,
                responses={202: {"model": JobOut, "description": "Running: it stops at its "
                                 "next step."}, 404: {"model": Problem},
                           409: {"model": Problem}},
                summary="Cancel a job (a running job stops at its next step).")
    def cancel_job(job_id: str, svc: Svc, response: Response) -> JobOut:
        job = _get_job(svc, job_id)
        if job.state in ("succeeded", "failed"):
            raise ApiError(409, f"job {job_id} already {job.state}; nothing to cancel")
        job = svc.store.cancel(job_id)
        assert job is not None
        if job.state == "cancelled" and job.request["source"].get("kind") == "upload":
            svc.storage.delete_upload(job_id)
        if job.state == "running":
            response.status_code = 202
        log.info("job %s: cancel requested (%s)", job_id, job.state)
        return JobOut.of(job)

    @app.get("/jobs/{job_id}/events", tags=["jobs"], dependencies=protected,
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "Server-sent events: 'job' events carrying the "
                                             "job JSON on every change; the stream ends once "
                                             "the job is finished."},
                        404: {"model": Problem}},
             summary="Server-sent progress events of a job.")
    async def job_events(job_id: str, request: Request, svc: Svc) -> StreamingResponse:
        await run_in_threadpool(_get_job, svc, job_id)

        async def stream():
            last, n, quiet = None, 0, 0.0
            yield "retry: 1000\n\n"
            while True:
                job = await run_in_threadpool(svc.store.get_job, job_id)
                if job is None:
                    yield "event: gone\ndata: {}\n\n"
                    return
                data = JobOut.of(job).model_dump_json()
                if data != last:
                    n += 1
                    yield f"event: job\nid: {n}\ndata: {data}\n\n"
                    last, quiet = data, 0.0
                if job.state in TERMINAL_STATES or svc.closing:
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.25)
                quiet += 0.25
                if quiet >= 15:
                    yield ": keep-alive\n\n"
                    quiet = 0.0

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ scenes

    def _get_scene(svc: Service, scene_id: str):
        scene = svc.store.get_scene(scene_id)
        if scene is None:
            raise ApiError(404, f"no scene {scene_id!r}")
        return scene

    @app.get("/scenes", response_model=SceneList, tags=["scenes"], dependencies=protected,
             summary="List scenes, newest first.")
    def list_scenes(svc: Svc, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> SceneList:
        scenes, total = svc.store.list_scenes(limit, offset)
        return SceneList(scenes=[SceneOut.of(s) for s in scenes], total=total)

    def _manifest(svc: Service, scene_id: str) -> dict:
        from recon.assets import SceneFormatError, read_manifest

        _get_scene(svc, scene_id)
        try:
            return read_manifest(svc.storage.scene_dir(scene_id))
        except SceneFormatError as e:
            log.error("scene %s: %s", scene_id, e)
            raise ApiError(410, f"scene {scene_id}'s assets are missing or damaged") from None

    @app.get("/scenes/{scene_id}", tags=["scenes"], dependencies=protected,
             responses={200: {"description": "The scene's manifest.json.",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                        404: {"model": Problem}, 410: {"model": Problem}},
             summary="A scene's manifest (cameras, frames, tracks, actors, metrics).")
    def get_scene(scene_id: str, svc: Svc) -> JSONResponse:
        m = _manifest(svc, scene_id)
        return JSONResponse({"id": scene_id, **m})

    @app.delete("/scenes/{scene_id}", status_code=204, tags=["scenes"],
                dependencies=protected, responses={404: {"model": Problem}},
                summary="Delete a scene and its assets.")
    def delete_scene(scene_id: str, svc: Svc) -> Response:
        _get_scene(svc, scene_id)
        svc.store.delete_scene(scene_id)
        svc.cache.evict(scene_id)
        svc.storage.delete_scene(scene_id)
        log.info("scene %s: deleted", scene_id)
        return Response(status_code=204)

    @app.get("/scenes/{scene_id}/assets/{name:path}", tags=["scenes"], dependencies=protected,
             response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}}},
                        404: {"model": Problem}},
             summary="One asset file: static.ply, sky.ply, actors/<id>.ply, "
                     "state.safetensors, manifest.json.")
    def get_asset(scene_id: str, name: str, svc: Svc) -> FileResponse:
        from recon.assets import MANIFEST

        m = _manifest(svc, scene_id)
        files = m.get("files", {})
        allowed = {MANIFEST, *(v for v in files.values() if isinstance(v, str)),
                   *(a.get("file") for a in m.get("actors", []) if isinstance(a, dict))}
        if name not in allowed:
            raise ApiError(404, f"no asset {name!r} in scene {scene_id}; assets: "
                                f"{', '.join(sorted(a for a in allowed if a)[:20])}"
                                f"{' ...' if len(allowed) > 20 else ''}")
        path = svc.storage.scene_dir(scene_id) / name
        if not path.is_file():
            raise ApiError(410, f"asset {name!r} of scene {scene_id} is missing")
        media = "application/json" if name.endswith(".json") else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=Path(name).name)

    # ------------------------------------------------------------------ render

    async def _render(svc: Service, scene_id: str, fn) -> bytes:
        t0 = time.perf_counter()
        status = 200
        try:
            await run_in_threadpool(_get_scene, svc, scene_id)
            try:
                loaded = await run_in_threadpool(svc.load_scene, scene_id)
            except ValueError as e:  # SceneFormatError
                log.error("scene %s: cannot load: %s", scene_id, e)
                raise ApiError(410, f"scene {scene_id}'s assets are missing or damaged") \
                    from None
            return await anyio.to_thread.run_sync(fn, loaded, limiter=svc.render_limiter)
        except ApiError as e:
            status = e.status
            raise
        except BaseException:
            status = 500
            raise
        finally:
            with svc.lock:
                svc.renders[status] = svc.renders.get(status, 0) + 1
            if status == 200:
                svc.render_latency.observe(time.perf_counter() - t0)

    def _size(width: int | None, height: int | None) -> None:
        mx = settings.render_max_px
        for what, v in (("width", width), ("height", height)):
            if v is not None and v > mx:
                raise ApiError(422, f"{what} {v} is larger than the limit {mx} "
                                    "(DRIVESPLAT_RENDER_MAX_PX)")

    def _actors_check(loaded, ids: list[str]) -> None:
        unknown = [a for a in ids if a not in loaded.scene.actor_ids]
        if unknown:
            have = loaded.scene.actor_ids
            more = " ..." if len(have) > 30 else ""
            raise ApiError(422, f"no actor(s) {unknown} in this scene; actors: "
                                f"{', '.join(have[:30]) or 'none'}{more}")

    @app.get("/scenes/{scene_id}/render", tags=["render"], dependencies=protected,
             response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}}},
                        404: {"model": Problem}, 422: {"model": Problem}},
             summary="Render a recorded view (optionally lane-shifted, at another time, "
                     "with actors hidden).")
    async def render_get(
        scene_id: str, svc: Svc,
        frame: Annotated[int, Query(ge=0, le=10**7, description="Source frame index.")] = 0,
        camera: Annotated[str | None, Query(max_length=100, description="Camera (default: "
                                            "the scene's first).")] = None,
        shift_m: Annotated[float, Query(ge=-100, le=100, allow_inf_nan=False,
                                        description="Lateral ego shift, + = left (m).")] = 0.0,
        width: Annotated[int | None, Query(ge=1, le=4096)] = None,
        height: Annotated[int | None, Query(ge=1, le=4096)] = None,
        format: Annotated[Literal["png", "jpeg"], Query()] = "png",
        quality: Annotated[int, Query(ge=1, le=100)] = 90,
        hide: Annotated[list[str] | None, Query(description="Actor ids to hide (repeat or "
                                                "comma-separate).")] = None,
        t: Annotated[float | None, Query(ge=-1e6, le=1e6, allow_inf_nan=False,
                                         description="Time (s) placing the actors; default "
                                                     "the frame's.")] = None,
    ) -> Response:
        _size(width, height)
        hidden = [h.strip() for v in hide or [] for h in v.split(",") if h.strip()]

        def fn(loaded) -> bytes:
            if frame not in loaded.frame_indices:
                fi = loaded.frame_indices
                raise ApiError(422, f"frame {frame} is not in scene {scene_id}; frames "
                                    f"{fi[0]}..{fi[-1]}" if fi else "the scene has no frames")
            if camera is not None and camera not in loaded.cameras:
                raise ApiError(422, f"no camera {camera!r} in scene {scene_id}; cameras: "
                                    f"{', '.join(sorted(loaded.cameras))}")
            _actors_check(loaded, hidden)
            from recon.neural import ActorEdit

            try:
                view = recorded_view(loaded, frame, camera, shift_m, t)
            except ValueError as e:
                raise ApiError(422, str(e).split(" in scene ")[0]) from None
            img = render_rgb(loaded.scene, view, width=width, height=height,
                             edits={a: ActorEdit(hide=True) for a in hidden})
            return encode(img, format, quality)

        data = await _render(svc, scene_id, fn)
        return Response(data, media_type=IMAGE_FORMATS[format][1])

    @app.post("/scenes/{scene_id}/render", tags=["render"], dependencies=protected,
              response_class=Response,
              responses={200: {"content": {"image/png": {}, "image/jpeg": {}}},
                         404: {"model": Problem}, 422: {"model": Problem}},
              summary="Render from an arbitrary camera pose and intrinsics, at any time, "
                      "with actor edits (hide, offset, pose).")
    async def render_post(scene_id: str, body: RenderRequest, svc: Svc) -> Response:
        _size(body.width, body.height)

        def fn(loaded) -> bytes:
            import numpy as np

            from recon.neural import ActorEdit

            _actors_check(loaded, list(body.edits))
            if body.intrinsics is not None:
                k = body.intrinsics
                K = np.array([[k.fx, 0, k.cx], [0, k.fy, k.cy], [0, 0, 1]], dtype=np.float64)
                view = custom_view(np.array(body.cam_to_world), K, body.width, body.height,
                                   body.t)
                w = h = None
            else:
                name = body.camera or next(iter(loaded.cameras))
                if name not in loaded.cameras:
                    raise ApiError(422, f"no camera {name!r} in scene {scene_id}; cameras: "
                                        f"{', '.join(sorted(loaded.cameras))}")
                cam = loaded.cameras[name]
                view = custom_view(np.array(body.cam_to_world), cam.K, cam.width, cam.height,
                                   body.t, name)
                w, h = body.width, body.height
            edits = {a: ActorEdit(hide=e.hide, offset=tuple(e.offset) if e.offset else None,
                                  pose=None if e.pose is None else np.array(e.pose))
                     for a, e in body.edits.items()}
            img = render_rgb(loaded.scene, view, edits=edits, width=w, height=h)
            return encode(img, body.format, body.quality)

        data = await _render(svc, scene_id, fn)
        return Response(data, media_type=IMAGE_FORMATS[body.format][1])

    # ------------------------------------------------------------------ OpenAPI

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        defs = ReconstructRequest.model_json_schema(
            ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for k, v in defs.pop("$defs", {}).items():
            comps.setdefault(k, v)
        comps["ReconstructRequest"] = defs
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

