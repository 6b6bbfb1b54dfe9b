"""Service settings, read from the environment (``DRIVESPLAT_*``, ``DATABASE_URL``, ``REDIS_URL``).

Every setting has an embedded default so ``drivesplat serve`` runs on a laptop with
nothing configured: storage and an SQLite database under ``./data``, in-process worker
threads, logs readable from ``./data/logs``. README ("The service") lists them all.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Splits a colon-separated list without splitting URL schemes (``s3://a:/b`` -> two roots).
_ROOT_SPLIT = re.compile(r":(?!//)")


def split_roots(value: str) -> list[str]:
    """``"/a:/b:s3://bucket/logs"`` -> ``["/a", "/b", "s3://bucket/logs"]`` (empties dropped)."""
    return [p.strip() for p in _ROOT_SPLIT.split(value) if p.strip()]


def is_url(s: str) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` paths of a single letter."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", s))


class Settings(BaseSettings):
    """What an operator can set. Field docs are the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="DRIVESPLAT_", extra="ignore",
                                      populate_by_name=True)

    home: Path = Field(Path("data"), description="Local root: SQLite database, work and "
                       "cache directories, and (by default) scene storage.")
    data_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Colon-separated roots logs may be read from "
        "(local directories or fsspec URLs); default <home>/logs.")
    storage_url: str | None = Field(None, description="Where scenes and uploaded logs live: "
                                    "a local directory (default <home>) or an fsspec URL "
                                    "(s3://bucket/prefix) shared by several machines.")
    database_url: str | None = Field(None, validation_alias=AliasChoices(
        "DATABASE_URL", "DRIVESPLAT_DATABASE_URL"), description="SQLAlchemy URL; default "
        "sqlite:///<home>/drivesplat.db. postgresql://... uses psycopg 3.")
    executor: Literal["inprocess", "celery"] = Field(
        "inprocess", description="inprocess: worker threads in the API process; celery: "
        "jobs go to Redis and `drivesplat worker` processes run them.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices(
        "REDIS_URL", "DRIVESPLAT_REDIS_URL"), description="Celery broker.")
    queue: str = Field("drivesplat", description="Celery queue name.")
    api_token: str | None = Field(None, description="If set, every endpoint but /healthz, "
                                  "/readyz and the docs needs 'Authorization: Bearer <token>'.")
    workers: int = Field(1, ge=0, le=64, description="In-process worker threads (0: accept "
                         "jobs, run none).")
    lease_s: float = Field(30.0, gt=0, description="A running job whose heartbeat is older "
                           "than this is re-queued (its worker is presumed dead).")
    max_attempts: int = Field(3, ge=1, description="Times a job may be started before a "
                              "lost worker fails it.")
    max_upload_mb: float = Field(4096, gt=0, description="Largest accepted upload.")
    max_extract_mb: float = Field(16384, gt=0, description="Largest total size an uploaded "
                                  "archive may extract to.")
    max_archive_members: int = Field(200_000, ge=1, description="Most entries in an archive.")
    scene_cache_mb: float = Field(2048, gt=0, description="Memory for loaded scenes (LRU).")
    render_concurrency: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1),
                                    ge=1, description="Renders run at once (others wait).")
    render_max_px: int = Field(4096, ge=16, description="Largest render width or height.")
    device: str | None = Field(None, description="Torch device for reconstruction and "
                               "rendering (default: cuda when available, else cpu).")

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return split_roots(v) if isinstance(v, str) else v

    @cached_property
    def home_dir(self) -> Path:
        """``home`` made absolute (created on first use by the service)."""
        return self.home.expanduser().resolve()

    @property
    def roots(self) -> list[str]:
        """Data roots, local ones absolute; default ``<home>/logs``."""
        roots = self.data_roots or [str(self.home_dir / "logs")]
        return [r if is_url(r) else str(Path(r).expanduser().resolve()) for r in roots]

    @property
    def storage(self) -> str:
        """Storage location: ``storage_url`` or ``<home>``."""
        return self.storage_url or str(self.home_dir)

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL (``postgresql://`` mapped to the psycopg 3 driver)."""
        url = self.database_url or f"sqlite:///{self.home_dir / 'drivesplat.db'}"
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://"):]
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return url


def get_settings() -> Settings:
    """Settings from the current environment (read afresh on every call)."""
    return Settings()
