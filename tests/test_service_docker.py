"""docker/compose.yaml and docker/Dockerfile: Docker cannot run here, so check that the
compose file parses and wires the services together, and that the image is built as
DESIGN.md asks (CUDA, gsplat compiled at build time, non-root, health check)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (dev extra) is missing")

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _expand(value: str) -> str:
    """Compose's ${VAR:-default} with every variable unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", re.sub(r"\$\{[A-Z_]+\}", "", value))


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"api", "worker", "redis", "postgres"}
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps == {"postgres": {"condition": "service_healthy"},
                        "redis": {"condition": "service_healthy"}}
        assert services[name]["image"] == "drivesplat:latest"
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert (DOCKER / services[name]["build"]["context"] / "pyproject.toml").is_file()
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["api"]["command"][:2] == ["drivesplat", "serve"]
    assert services["worker"]["command"] == ["drivesplat", "worker"]


def test_environment_wires_api_and_worker_to_the_same_stores(compose):
    from service.settings import Settings

    services = compose["services"]
    api_env, worker_env = services["api"]["environment"], services["worker"]["environment"]
    assert api_env == worker_env  # one anchor: they cannot drift apart
    env = {k: _expand(str(v)) for k, v in api_env.items()}
    db = urlsplit(env["DATABASE_URL"])
    assert db.hostname == "postgres" and db.port == 5432
    pg = services["postgres"]["environment"]
    assert db.username == pg["POSTGRES_USER"] and db.path == f"/{pg['POSTGRES_DB']}"
    assert db.password == _expand(pg["POSTGRES_PASSWORD"])
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    # Every variable is a real setting and parses.
    import os

    old = dict(os.environ)
    try:
        os.environ.update(env)
        s = Settings()
        assert s.executor == "celery" and s.db_url.startswith("postgresql+psycopg://")
        assert s.roots == ["/logs"] and str(s.home) == "/data" and s.lease_s == 60
    finally:
        os.environ.clear()
        os.environ.update(old)
    known = {f"DRIVESPLAT_{n.upper()}" for n in Settings.model_fields} | {"DATABASE_URL",
                                                                          "REDIS_URL"}
    assert set(env) <= known, set(env) - known


def test_volumes_ports_and_gpu(compose):
    services = compose["services"]
    for name in ("api", "worker"):
        vols = [_expand(v) for v in services[name]["volumes"]]
        assert "scenes:/data" in vols  # DRIVESPLAT_HOME: shared scene storage
        assert any(v.endswith(":/logs:ro") for v in vols)  # DRIVESPLAT_DATA_ROOTS, read-only
    assert set(compose["volumes"]) >= {"scenes", "pgdata", "redis"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    ports = [_expand(p) for p in services["api"]["ports"]]
    assert ports == ["8000:8000"] and services["api"]["command"][-1] == "8000"
    assert "ports" not in services["worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["api"]


def test_dockerfile():
    text = (DOCKER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) == 2 and all(f.startswith("nvidia/cuda:") for f in froms)
    assert "devel" in froms[0] and "runtime" in froms[1]
    assert 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in text
    assert re.search(r"pip install .*--no-binary gsplat", text)
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*healthz", text, re.M | re.S)
    assert "EXPOSE 8000" in text
    # torch is installed from the CUDA index before anything that depends on it.
    assert text.index('pip install "torch==') < text.index('pip install ".[')
