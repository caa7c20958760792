"""deploy/: no Docker engine or cluster here, so the files are checked against the code they
drive: every `streamvlm` command line parses with the CLI's own parser, every STREAMVLM_*
variable names a configuration field, and the probes hit real routes on the served port."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path
from unittest import mock

import msgspec
import pytest
import yaml

from streamvlm.cli import main as cli_main
from streamvlm.contract.config import SECTION_OF
from streamvlm.gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
ENV_FIELDS = set(SECTION_OF) | {f.name for f in msgspec.structs.fields(GatewaySettings)}


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, argv: list[str]) -> None:
        self.parser, self.argv = parser, argv


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """argv (after `streamvlm`) parsed by the parser streamvlm.cli.main builds, without running
    the command; an unknown command or flag exits (SystemExit) as on the command line."""
    def capture(parser: argparse.ArgumentParser, args: list[str] | None = None, namespace=None):
        raise _Parsed(parser, list(args or []))

    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
            cli_main(argv)
    except _Parsed as parsed:
        return parsed.parser.parse_args(parsed.argv)
    raise AssertionError("streamvlm.cli.main did not parse its arguments")


def check_env_name(name: str) -> None:
    assert name.startswith("STREAMVLM_"), name
    field = name.removeprefix("STREAMVLM_").lower()
    assert field in ENV_FIELDS, f"{name}: no EngineConfig or GatewaySettings field {field!r}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in rest.split())
    return env


def dockerfile_entrypoint() -> list[str]:
    [entrypoint] = [json.loads(rest) for instruction, rest in dockerfile_instructions()
                    if instruction == "ENTRYPOINT"]
    return entrypoint


def containers() -> list[tuple[str, dict]]:
    """(manifest name, container) for every container of every Deployment."""
    found = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Deployment":
                found += [(path.name, c) for c in doc["spec"]["template"]["spec"]["containers"]]
    return found


def container_argv(container: dict) -> list[str]:
    """The command line the container runs: its command, or the image's entry point, plus args."""
    return list(container.get("command") or dockerfile_entrypoint()) + list(container.get("args", []))


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


# ---- Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_entrypoint_is_streamvlm_serve_on_the_exposed_port():
    argv = dockerfile_entrypoint()
    assert argv[:2] == ["streamvlm", "serve"]
    args = parse_cli(argv[1:])
    assert args.host == "0.0.0.0"
    exposed = [int(rest) for instruction, rest in dockerfile_instructions() if instruction == "EXPOSE"]
    assert exposed == [args.port]


def test_dockerfile_env_names_configuration_fields():
    streamvlm_env = [name for name in dockerfile_env() if name.startswith("STREAMVLM_")]
    assert streamvlm_env
    for name in streamvlm_env:
        check_env_name(name)


def test_dockerfile_installs_the_flash_attn_extra_only_when_asked():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    instructions = dockerfile_instructions()
    assert ("ARG", "FLASH_ATTN=0") in instructions
    [install] = [rest for instruction, rest in instructions
                 if instruction == "RUN" and "pip install" in rest]
    named = re.findall(r'\.\[([\w-]+)\]', install)
    assert named and all(extra in extras for extra in named)
    assert '"$FLASH_ATTN" = "1"' in install and "pip install --no-cache-dir .;" in install


def test_dockerfile_copies_paths_that_exist():
    for instruction, rest in dockerfile_instructions():
        if instruction == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert re.search(r"FROM \$\{CUDA_IMAGE\}", DOCKERFILE.read_text())
    assert "nvidia/cuda" in DOCKERFILE.read_text()


# ---- Kubernetes ---------------------------------------------------------------------------

def test_manifests_exist():
    assert {p.name for p in MANIFESTS} >= {"streamvlm.yaml", "remote-worker.yaml"}


@pytest.mark.parametrize("name,container", containers(), ids=lambda v: v if isinstance(v, str) else "")
def test_container_command_parses_and_env_names_fields(name, container):
    argv = container_argv(container)
    assert argv[0] == "streamvlm", name
    parse_cli(argv[1:])
    for variable in container.get("env", []):
        if variable["name"].startswith("STREAMVLM_") or variable["name"] == "API_KEY":
            check_env_name(variable["name"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1


def routes(llama_path: Path) -> set[str]:
    from streamvlm import AsyncEngine, EngineConfig
    from streamvlm.gateway.app import build_app

    app = build_app(AsyncEngine(EngineConfig(model=str(llama_path), device="cpu")))
    return {route.path for route in app.routes}


def test_probes_hit_real_routes_on_the_served_port(llama_path):
    served = routes(llama_path)
    servers = [(name, c) for name, c in containers() if container_argv(c)[1] == "serve"]
    assert {name for name, _ in servers} == {p.name for p in MANIFESTS}
    for name, container in servers:
        args = parse_cli(container_argv(container)[1:])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in served, (name, probe, get["path"])
            assert container_port(container, get["port"]) == args.port, (name, probe)
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        # A step may be slow for a while: liveness gives /health more failures than readiness.
        assert (container["livenessProbe"]["failureThreshold"]
                > container["readinessProbe"].get("failureThreshold", 3))


def test_services_point_at_declared_ports():
    for path in MANIFESTS:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        ports = {(d["spec"]["template"]["metadata"]["labels"]["app"], p["name"]): p["containerPort"]
                 for d in docs if d["kind"] == "Deployment"
                 for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for service in (d for d in docs if d["kind"] == "Service"):
            app = service["spec"]["selector"]["app"]
            for port in service["spec"]["ports"]:
                assert (app, port["targetPort"]) in ports, (path.name, service["metadata"]["name"])


def test_remote_worker_joins_the_core_listen_port():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes/remote-worker.yaml").read_text()) if d]
    by_name = {d["metadata"]["name"]: d for d in docs}
    core = by_name["streamvlm-core"]["spec"]["template"]["spec"]["containers"][0]
    worker = by_name["streamvlm-worker"]["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v.get("value") for v in core["env"]}
    listen_port = int(env["STREAMVLM_WORKER_LISTEN_ADDRESS"].rpartition(":")[2])
    assert int(env["STREAMVLM_REMOTE_WORKER_GROUPS"]) == 1
    args = parse_cli(container_argv(worker)[1:])
    host, _, port = args.connect.removeprefix("tcp://").rpartition(":")
    assert int(port) == listen_port
    service = by_name[host]
    assert service["spec"]["clusterIP"] == "None"   # the core's extra ports reachable
    assert service["spec"]["selector"] == by_name["streamvlm-core"]["spec"]["selector"]["matchLabels"]
