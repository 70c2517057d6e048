"""docker-compose.yml, prometheus.yml and the Dockerfile describe a server that `tailorkv serve` would start."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tailorkv.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def mount(volume: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume such as `${MODELS_DIR:-./models}:/models:ro`."""
    source, target = re.fullmatch(r"(.+):(/[^:]*)(?::ro|:rw)?", volume).groups()
    return source, target


def serve_args(command: list[str]):
    assert command[0] == "tailorkv", command
    args = build_parser().parse_args(command[1:])
    assert args.command == "serve"
    return args


def test_tailorkv_service(services):
    svc = services["tailorkv"]
    args = serve_args(svc["command"])
    assert args.host == "0.0.0.0" and args.port == 30000 and args.model.startswith("/models/")
    assert "30000:30000" in [str(p) for p in svc["ports"]]
    assert "/models" in [mount(v)[1] for v in svc["volumes"]], svc["volumes"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_prometheus_scrapes_metrics(services):
    prom = services["prometheus"]
    source = next(s for s, t in map(mount, prom["volumes"]) if t.endswith("prometheus.yml"))
    config = yaml.safe_load((ROOT / source).read_text())
    jobs = [
        j
        for j in config["scrape_configs"]
        if any("tailorkv:30000" in c["targets"] for c in j.get("static_configs", []))
    ]
    assert jobs and jobs[0].get("metrics_path", "/metrics") == "/metrics"


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.\S+-devel-ubuntu", text, re.M)
    assert "pip install torch==2.13.0" in text and "pip install '.[gpu]'" in text
    assert text.index("torch==2.13.0") < text.index(".[gpu]")
    args = serve_args(json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1)))
    assert args.host == "0.0.0.0" and args.port == 30000
    assert re.search(r"^EXPOSE 30000$", text, re.M)


def test_replicas_behind_the_router(services):
    replicas = [services[f"replica-{i}"] for i in range(2)]
    for i, svc in enumerate(replicas):
        args = serve_args(svc["command"])
        assert args.host == "0.0.0.0" and args.port == 30000 and svc["profiles"] == ["replicas"]
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [str(i)]
    router = " ".join(services["router"]["command"])
    assert "sglang-router==0.3.2" in router and "--policy cache_aware" in router
    assert "--worker-urls http://replica-0:30000 http://replica-1:30000" in router
