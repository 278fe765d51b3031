"""Dockerfile, compose file and monitoring configuration checked against the CLI, the
settings and the metrics the code exports.

No Docker engine runs here, so these validate the files (the compose file against the
Compose Specification's JSON schema) and hold every command, environment variable, port,
address and metric they name against the code that will receive them.
`tests/test_compose_stack.py` runs the same topology's commands as local processes.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from prometheus_client.metrics import MetricWrapperBase
from typer.exceptions import TyperException

from service import metrics as service_metrics
from service.cli import app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS_ENV = {f"RECSYS_{name.upper()}" for name in Settings.model_fields}
RECSYS_IMAGE = re.compile(r"^recsys:")
PROBES = {"grpc", "http"}


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
    with pytest.raises(TyperException, match="teleport"):
        parse_cli(["serve", "teleport"])
    with pytest.raises(ValueError, match="teleport"):
        parse_cli(["teleport"])


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}` / `${NAME:-default}` substitution."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] or ""), text)


def load_compose(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), env or {}))


def recsys_services(compose: dict) -> dict[str, dict]:
    return {
        name: s for name, s in compose["services"].items() if RECSYS_IMAGE.match(s.get("image", ""))
    }


def settings_from(environment: dict[str, str]) -> Settings:
    """The settings a process with this environment's RECSYS_* variables would get."""
    environment = {k: v for k, v in environment.items() if k.startswith("RECSYS_")}
    saved = {k: v for k, v in os.environ.items() if k.startswith("RECSYS_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(environment)
    try:
        return Settings()
    finally:
        for name in environment:
            del os.environ[name]
        os.environ.update(saved)


def metric_ports(environment: dict[str, str], command: list[str]) -> set[int]:
    settings = settings_from(environment)
    return (
        {settings.trainer_metrics_port} if command[-1] == "online-train" else {settings.http_port}
    )


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_builds_cpu_and_gpu_variants_and_runs_recsys_as_non_root():
    instructions = dockerfile_instructions()
    variant = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("VARIANT="))
    assert variant == "VARIANT=cpu"
    stages = {
        arg.split(" AS ")[1]: (i, arg.split(" AS ")[0])
        for i, (op, arg) in enumerate(instructions)
        if op == "FROM"
    }
    assert set(stages) == {"python-cpu", "python-gpu", "build", "runtime"}
    assert stages["build"][1] == stages["runtime"][1] == "python-${VARIANT}"
    assert (
        stages["python-gpu"][1].startswith("nvidia/cuda:")
        and "cudnn-runtime" in stages["python-gpu"][1]
    )

    def stage_env(name: str) -> str:
        start = stages[name][0]
        end = min((i for i, _ in stages.values() if i > start), default=len(instructions))
        return " ".join(arg for op, arg in instructions[start:end] if op == "ENV")

    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["gpu"]
    faiss_gpu = re.search(r"FAISS_PACKAGE=(\S+)", stage_env("python-gpu"))[1]
    assert any(requirement.startswith(faiss_gpu) for requirement in gpu_extra)
    assert "whl/cpu" in stage_env("python-cpu") and re.search(r"whl/cu\d+", stage_env("python-gpu"))

    runtime = instructions[stages["runtime"][0] :]
    user = [arg for op, arg in runtime if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert json.loads(next(arg for op, arg in runtime if op == "ENTRYPOINT")) == ["recsys"]
    parse_cli(json.loads(next(arg for op, arg in runtime if op == "CMD")))
    env = " ".join(arg for op, arg in runtime if op == "ENV")
    assert set(re.findall(r"(RECSYS_[A-Z_]+)=", env)) <= SETTINGS_ENV
    exposed = {int(p) for op, arg in runtime if op == "EXPOSE" for p in arg.split()}
    assert exposed == {Settings().http_port, Settings().grpc_port}
    probe = json.loads(next(arg for op, arg in runtime if op == "HEALTHCHECK").split(" CMD ", 1)[1])
    assert probe[:3] == ["python", "-m", "service.probe"] and probe[3] in PROBES


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )


def test_compose_file_follows_the_compose_specification(tmp_path):
    result = check_compose_schema(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        (ROOT / "docker-compose.yml").read_text().replace("service_healthy", "service_healty", 1)
    )
    assert check_compose_schema(broken).returncode != 0  # the validator does catch a bad condition


def test_compose_services_use_real_commands_settings_ports_and_probes():
    compose = load_compose()
    services = compose["services"]
    recsys = recsys_services(compose)
    assert set(recsys) == {"demo-artifacts", "retrieval", "ranking", "online-trainer", "gateway"}
    tiers = {}
    for name, service in recsys.items():
        parse_cli(service["command"])
        environment = service["environment"]
        assert set(environment) <= SETTINGS_ENV, name
        settings_from(
            environment
        )  # the combination validates (the gateway needs both tiers and Redis)
        if service["command"][0] == "serve":
            tiers[service["command"][1]] = name
            probe = service["healthcheck"]["test"]
            assert probe[:4] == ["CMD", "python", "-m", "service.probe"] and probe[4] in PROBES
            assert probe[4] == ("http" if service["command"][1] == "gateway" else "grpc")
    assert set(tiers) == {"retrieval", "ranking", "online-train", "gateway"}

    gateway = settings_from(services["gateway"]["environment"])
    for address, tier in (
        (gateway.retrieval_address, "retrieval"),
        (gateway.ranking_address, "ranking"),
    ):
        host, port = address.rsplit(":", 1)
        assert (
            host == tiers[tier]
            and int(port) == settings_from(services[host]["environment"]).grpc_port
        )
    published = {int(p.split(":")[1]) for p in services["gateway"]["ports"]}
    assert published == {gateway.http_port, gateway.grpc_port}

    redis_host = {
        re.match(r"redis://([^:/]+)", s["environment"]["RECSYS_REDIS_URL"])[1]
        for s in recsys.values()
        if "RECSYS_REDIS_URL" in s["environment"]
    }
    assert redis_host == {"redis"} and "--appendonly" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
        == "yes"
    )

    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            else:
                assert (
                    rule["condition"] == "service_completed_successfully"
                    and services[dependency]["restart"] == "no"
                )
    for tier in ("retrieval", "ranking", "online-trainer"):
        assert (
            services[tier]["depends_on"]["demo-artifacts"]["condition"]
            == "service_completed_successfully"
        )
        assert services[tier]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {
        d
        for d, r in services["gateway"]["depends_on"].items()
        if r["condition"] == "service_healthy"
    } >= {"retrieval", "ranking"}

    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
            if source == "artifacts" and name != "demo-artifacts":
                assert volume.endswith(":ro"), name  # only the one-shot job writes artifacts
    assert all(s["read_only"] is True for s in recsys.values())


def bind_mount(service: dict, target: str) -> Path:
    source = next(v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == target)
    return ROOT / source


def test_prometheus_scrapes_every_tier_on_its_metrics_port():
    compose = load_compose()
    services = compose["services"]
    config = yaml.safe_load(
        bind_mount(services["prometheus"], "/etc/prometheus/prometheus.yml").read_text()
    )
    scraped = {}
    for job in config["scrape_configs"]:
        for target in (t for group in job["static_configs"] for t in group["targets"]):
            host, port = target.rsplit(":", 1)
            scraped[host] = int(port)
            assert job["job_name"] == host
    serving = {
        name: s for name, s in recsys_services(compose).items() if s["command"][0] == "serve"
    }
    assert set(scraped) == set(serving)
    for name, service in serving.items():
        assert scraped[name] in metric_ports(service["environment"], service["command"]), name


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/recsys.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for every metric the service declares (whether or not it
    has been observed yet), named as Prometheus will see them."""
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_count", "_sum"],
        "gauge": [""],
        "info": ["_info"],
    }
    series = {}
    for metric in vars(service_metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in suffixes[metric._type]:
                series[metric._name + suffix] = set(metric._labelnames) | (
                    {"le"} if suffix == "_bucket" else set()
                )
    return series


def test_grafana_is_provisioned_with_prometheus_and_a_dashboard_of_real_metrics():
    compose = load_compose()
    grafana = compose["services"]["grafana"]
    provisioning = bind_mount(grafana, "/etc/grafana/provisioning")
    datasource = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert (
        re.match(r"http://prometheus:9090$", datasource["url"])
        and "prometheus" in compose["services"]
    )
    provider = yaml.safe_load((provisioning / "dashboards/recsys.yml").read_text())["providers"][0]
    assert bind_mount(grafana, provider["options"]["path"]) == ROOT / "deploy/grafana/dashboards"

    exported = exported_series()
    jobs = {
        job["job_name"]
        for job in yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())[
            "scrape_configs"
        ]
    }
    queried = set()
    for expression in dashboard_expressions():
        for name in re.findall(r"\b(recsys_\w+)", expression):
            queried.add(name)
            assert name in exported, (name, expression)
        for grouping in re.findall(r"by \(([^)]*)\)", expression):
            labels = {label.strip() for label in grouping.split(",")} - {"job", "le"}
            names = re.findall(r"\b(recsys_\w+)", expression)
            assert any(labels <= exported[n] for n in names), expression
        assert set(re.findall(r'job="([^"]+)"', expression)) <= jobs
    assert {
        "recsys_degraded_responses_total",
        "recsys_stage_duration_seconds_bucket",
        "recsys_events_backlog",
        "recsys_embedding_lookups_total",
    } <= queried
