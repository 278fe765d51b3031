"""Dockerfile, compose file and Kubernetes manifests checked against the CLI and settings.

No Docker engine or cluster runs here, so these parse the files and hold every command,
environment variable and port they name against the code that will receive them.
"""

import json
import re
from pathlib import Path

import pytest
import typer
from typer.exceptions import TyperException
import yaml

from service.cli import app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_ENV = {f"RECSYS_{name.upper()}" for name in Settings.model_fields}


def parse_cli(args: list[str]) -> None:
    """Parse the arguments as `recsys` would, without running the command."""
    group = typer.main.get_command(app)
    context = typer.Context(group, info_name="recsys")
    command = group.get_command(context, args[0])
    if command is None:
        raise ValueError(f"no such command {args[0]!r}")
    command.make_context(args[0], list(args[1:]), parent=context)


def test_cli_parser_rejects_what_it_should():
    with pytest.raises(TyperException, match="no-such-flag"):
        parse_cli(["serve", "--no-such-flag"])
    with pytest.raises(ValueError, match="teleport"):
        parse_cli(["teleport"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_recsys_as_non_root_in_exec_form():
    instructions = dockerfile_instructions()
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    runtime = instructions[stages[-1] :]
    user = [arg for op, arg in runtime if op == "USER"]
    assert user and not user[-1].startswith(("root", "0:", "0 ")) and user[-1] != "0"
    entrypoint = json.loads(next(arg for op, arg in runtime if op == "ENTRYPOINT"))
    command = json.loads(next(arg for op, arg in runtime if op == "CMD"))
    assert entrypoint == ["recsys"]
    parse_cli(command)
    env = " ".join(arg for op, arg in runtime if op == "ENV")
    assert set(re.findall(r"(RECSYS_[A-Z_]+)=", env)) <= SETTINGS_ENV
    exposed = {int(p) for op, arg in runtime if op == "EXPOSE" for p in arg.split()}
    assert exposed == {Settings().http_port, Settings().grpc_port}
    healthcheck = next(arg for op, arg in runtime if op == "HEALTHCHECK")
    assert "/readyz" in healthcheck and "python" in healthcheck


def test_compose_services_use_real_commands_settings_and_ports():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"recsys", "demo-artifacts"} <= set(services)
    for service in services.values():
        parse_cli(service["command"])
        assert set(service.get("environment", {})) <= SETTINGS_ENV
    recsys = services["recsys"]
    published = {int(p.split(":")[1]) for p in recsys["ports"]}
    assert published == {int(recsys["environment"]["RECSYS_HTTP_PORT"]), int(recsys["environment"]["RECSYS_GRPC_PORT"])}
    assert recsys["depends_on"]["demo-artifacts"]["condition"] == "service_completed_successfully"
    assert recsys["read_only"] is True
    volumes = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert volumes <= set(compose["volumes"])


def k8s_objects() -> list[dict]:
    base = ROOT / "k8s" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((base / name).read_text())]


def test_k8s_deployment_probes_security_and_commands():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}
    deployment = objects[("Deployment", "recsys")]
    service = objects[("Service", "recsys")]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {name for kind, name in objects if kind == "PersistentVolumeClaim"}
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        parse_cli(container["args"])
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
        assert {e["name"] for e in container.get("env", [])} <= SETTINGS_ENV
    server = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    env = {e["name"]: e["value"] for e in server["env"]}
    assert ports == {"http": int(env["RECSYS_HTTP_PORT"]), "grpc": int(env["RECSYS_GRPC_PORT"])}
    assert server["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert server["readinessProbe"]["grpc"]["service"] == "recsys.v1.Recommender"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
