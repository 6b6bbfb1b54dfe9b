"""A small HTTP client of the drivesplat API (standard library only).

Used by ``drivesplat service-demo`` and ``drivesplat bench service``; handy in scripts::

    c = Client("http://127.0.0.1:8000")
    job = c.submit({"format": "synthetic", "uri": "synthetic://?seed=3&frames=6"},
                   method="adam", steps=50)
    job = c.wait(job["id"])
    png = c.render(job["scene_id"], frame=0)
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiClientError(RuntimeError):
    """A non-2xx answer: ``status`` and the server's ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 120.0) -> None:
        self.base = base_url.rstrip("/")
        self.token, self.timeout = token, timeout

    def request(self, method: str, path: str, *, params: dict | None = None,
                body: bytes | Any = None, headers: dict | None = None,
                stream: bool = False):
        """(status, headers, bytes) or, with ``stream``, the open response."""
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(
                {k: v for k, v in params.items() if v is not None}, doseq=True)
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=body, method=method, headers=h)
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
            except ValueError:
                detail = raw.decode(errors="replace")
            raise ApiClientError(e.code, str(detail)) from None
        if stream:
            return resp
        with resp:
            return resp.status, dict(resp.headers), resp.read()

    def json(self, method: str, path: str, payload: Any = None, **kw) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        _, _, data = self.request(method, path, body=body, headers=headers, **kw)
        return json.loads(data) if data else None

    # ------------------------------------------------------------------ jobs

    def submit(self, source: dict, **options: Any) -> dict:
        """POST /reconstruct with a source (format, uri, frames, cameras)."""
        return self.json("POST", "/reconstruct", {"source": source, **options})

    def upload(self, archive: str | Path, **fields: Any) -> dict:
        """POST /reconstruct with a log archive (multipart)."""
        archive = Path(archive)
        boundary = uuid.uuid4().hex
        parts = []
        for k, v in fields.items():
            if v is None:
                continue
            if isinstance(v, bool):
                v = str(v).lower()
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
                         f"{v}\r\n".encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="{archive.name}"\r\nContent-Type: application/octet-stream'
                     "\r\n\r\n".encode())
        body = b"".join(parts) + archive.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        _, _, data = self.request("POST", "/reconstruct", body=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(data)

    def job(self, job_id: str) -> dict:
        return self.json("GET", f"/jobs/{job_id}")

    def events(self, job_id: str) -> Iterator[dict]:
        """Job JSON from GET /jobs/{id}/events until the stream ends."""
        resp = self.request("GET", f"/jobs/{job_id}/events", stream=True)
        with resp:
            event, data = None, []
            for raw in resp:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if event == "job" and data:
                        yield json.loads("\n".join(data))
                    event, data = None, []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None,
             timeout: float | None = None) -> dict:
        """Follow a job (server-sent events, polling as a fallback) until it finishes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.job(job_id)
        while job["state"] not in TERMINAL:
            try:
                for job in self.events(job_id):
                    if on_update:
                        on_update(job)
                    if deadline and time.monotonic() > deadline:
                        break
            except (OSError, ApiClientError):
                time.sleep(0.5)
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if deadline and time.monotonic() > deadline and job["state"] not in TERMINAL:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
        return job

    # ------------------------------------------------------------------ scenes

    def render(self, scene_id: str, **params: Any) -> bytes:
        """GET /scenes/{id}/render (frame, camera, shift_m, width, height, format, hide, t)."""
        _, _, data = self.request("GET", f"/scenes/{scene_id}/render", params=params)
        return data

    def asset(self, scene_id: str, name: str) -> bytes:
        _, _, data = self.request("GET", f"/scenes/{scene_id}/assets/{name}")
        return data

    def ready(self) -> bool:
        try:
            return self.request("GET", "/readyz")[0] == 200
        except (OSError, ApiClientError):
            return False
