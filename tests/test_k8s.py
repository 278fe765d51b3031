"""k8s/: every overlay rendered with kustomize (kubectl's) and every object validated against
the Kubernetes schemas offline (kubernetes-validate, strict), then held against the code:
commands the CLI parses, settings that validate, probes on the services the tiers register,
selectors, autoscalers and network policies that reach what they name."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.api.grpc_server import RankingServicer, RecommenderServicer, RetrievalServicer
from service.api.tiers import SHUTDOWN_GRACE_SECONDS, SHUTDOWN_NOTICE_SECONDS
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from tests.test_deploy_files import SETTINGS_ENV, parse_cli, settings_from

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = Path(sys.executable).parent / "kubectl"
KUBERNETES_VERSION = "1.33.0"  # oldest release the manifests target (preStop `sleep` is 1.30+)
OVERLAYS = ("dev", "gpu", "prod")
TIER_SERVICES = {
    tier: pb.DESCRIPTOR.services_by_name[servicer.service].full_name
    for tier, servicer in (
        ("gateway", RecommenderServicer),
        ("retrieval", RetrievalServicer),
        ("ranking", RankingServicer),
    )
}


def render(path: Path) -> list[dict]:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict]:
    objects = render(ROOT / "k8s/overlays" / request.param)
    return request.param, {(o["kind"], o["metadata"]["name"]): o for o in objects}


def workloads(objects: dict) -> dict[str, dict]:
    return {
        name: o
        for (kind, name), o in objects.items()
        if kind in ("Deployment", "StatefulSet", "Job")
    }


def recsys_containers(objects: dict):
    for name, workload in workloads(objects).items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("recsys:"):
                yield name, workload, container


def container_settings(objects: dict, container: dict):
    environment = {}
    for source in container.get("envFrom", []):
        environment.update(objects[("ConfigMap", source["configMapRef"]["name"])]["data"])
    environment.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    from_secrets = {e["name"] for e in container.get("env", []) if "valueFrom" in e}
    assert set(environment) | from_secrets <= SETTINGS_ENV
    return settings_from(environment)


def selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def tier_of(container: dict) -> str | None:
    return container["args"][1] if container["args"][0] == "serve" else None


def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    _, objects = overlay
    for _key, obj in objects.items():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_malformed_object(overlay):
    _, objects = overlay
    broken = copy.deepcopy(objects[("Deployment", "recsys-retrieval")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = (
        "grpc"  # must be a number
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_recsys_containers_run_real_commands_with_valid_settings_locked_down(overlay):
    _, objects = overlay
    tiers = set()
    for name, workload, container in recsys_containers(objects):
        parse_cli(container["args"])
        settings = container_settings(objects, container)
        pod = workload["spec"]["template"]["spec"]
        assert (
            pod["securityContext"]["runAsNonRoot"] is True
            and pod["securityContext"]["runAsUser"] != 0
        )
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == [
            "ALL"
        ]
        assert security["allowPrivilegeEscalation"] is False
        assert (
            container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
        )
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert writable <= {"/tmp", str(settings.artifacts)} and ("/tmp" in writable)
        if tier_of(container):
            tiers.add(tier_of(container))
            assert str(settings.artifacts) not in writable, (
                name
            )  # only the demo job writes artifacts
    assert tiers == {"gateway", "retrieval", "ranking", "online-train"}


def test_tier_probes_use_native_grpc_health_of_the_service_they_serve(overlay):
    _, objects = overlay
    for name, workload, container in recsys_containers(objects):
        tier = tier_of(container)
        if tier is None:
            continue
        settings = container_settings(objects, container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        pod = workload["spec"]["template"]["spec"]
        assert (
            container["lifecycle"]["preStop"]["sleep"]["seconds"]
            + SHUTDOWN_NOTICE_SECONDS
            + SHUTDOWN_GRACE_SECONDS
            < pod["terminationGracePeriodSeconds"]
        )
        assert {"startupProbe", "livenessProbe"} <= set(container), name
        if tier == "online-train":  # no request service: the server's overall health
            assert ports == {"metrics": settings.trainer_metrics_port, "grpc": settings.grpc_port}
            assert (
                container["startupProbe"]["grpc"]
                == container["livenessProbe"]["grpc"]
                == {"port": settings.grpc_port}
            )
            continue
        assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}, name
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {
                "port": settings.grpc_port,
                "service": TIER_SERVICES[tier],
            }, (name, probe)


def test_services_autoscalers_and_budgets_select_existing_workloads(overlay):
    _, objects = overlay
    pods = {name: pod_labels(w) for name, w in workloads(objects).items()}
    for (kind, name), obj in objects.items():
        if kind == "Service":
            selected = [
                w for w, labels in pods.items() if obj["spec"]["selector"].items() <= labels.items()
            ]
            assert len(selected) == 1, name
            containers = workloads(objects)[selected[0]]["spec"]["template"]["spec"]["containers"]
            named_ports = {p["name"] for c in containers for p in c["ports"]}
            assert {p["targetPort"] for p in obj["spec"]["ports"]} <= named_ports, name
        elif kind == "HorizontalPodAutoscaler":
            assert obj["apiVersion"] == "autoscaling/v2"
            target = objects[
                (obj["spec"]["scaleTargetRef"]["kind"], obj["spec"]["scaleTargetRef"]["name"])
            ]
            assert all(
                "cpu" in c["resources"]["requests"]
                for c in target["spec"]["template"]["spec"]["containers"]
            )
            assert 1 <= obj["spec"]["minReplicas"] <= obj["spec"]["maxReplicas"]
        elif kind == "PodDisruptionBudget":
            assert sum(selects(obj["spec"]["selector"], labels) for labels in pods.values()) == 1, (
                name
            )
    scaled = {
        obj["spec"]["scaleTargetRef"]["name"]
        for (kind, _), obj in objects.items()
        if kind == "HorizontalPodAutoscaler"
    }
    assert scaled == {"recsys-gateway", "recsys-retrieval", "recsys-ranking"}


def service_for(objects: dict, host: str, port: int, workload: str) -> dict:
    """`host:port` is a Service in front of `workload`, on a port that reaches its gRPC port
    (and is that port, for a headless Service: clients connect to the pods themselves)."""
    service = objects[("Service", host.split(".")[0])]
    assert service["spec"]["selector"].items() <= pod_labels(workloads(objects)[workload]).items()
    assert any(p["port"] == port for p in service["spec"]["ports"])
    if service["spec"].get("clusterIP") == "None":
        containers = workloads(objects)[workload]["spec"]["template"]["spec"]["containers"]
        assert port in {
            p["containerPort"] for c in containers for p in c["ports"] if p["name"] == "grpc"
        }
    return service


def test_the_gateway_addresses_the_tiers_through_their_services(overlay):
    _, objects = overlay
    gateway = next(c for _, _, c in recsys_containers(objects) if tier_of(c) == "gateway")
    settings = container_settings(objects, gateway)
    for address, workload in (
        (settings.retrieval_address, "recsys-retrieval"),
        (settings.ranking_address, "recsys-ranking"),
    ):
        # One connection per pod, so calls spread over the replicas: a DNS target of a headless Service.
        assert address.startswith("dns:///"), address
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        service = service_for(objects, host, int(port), workload)
        assert service["spec"].get("clusterIP") == "None", host


def ingress_sources(objects: dict, labels: dict, port_name: str) -> list[dict]:
    """The `from` peers of every rule that admits traffic to `port_name` of pods with `labels`."""
    sources = []
    for (kind, _), policy in objects.items():
        if kind == "NetworkPolicy" and selects(policy["spec"]["podSelector"], labels):
            for rule in policy["spec"].get("ingress", []):
                if not rule.get("ports") or any(p["port"] == port_name for p in rule["ports"]):
                    sources.extend(rule.get("from", [{}]))  # no `from`: everyone
    return sources


def test_network_policies_let_only_the_gateway_reach_the_tiers(overlay):
    _, objects = overlay
    gateway_pods = pod_labels(workloads(objects)["recsys-gateway"])
    for workload in ("recsys-retrieval", "recsys-ranking"):
        sources = ingress_sources(objects, pod_labels(workloads(objects)[workload]), "grpc")
        assert sources, workload
        for peer in sources:
            assert set(peer) == {"podSelector"} and selects(peer["podSelector"], gateway_pods), (
                workload,
                peer,
            )
    ranking_pods = pod_labels(workloads(objects)["recsys-ranking"])
    assert not any(
        selects(p.get("podSelector", {"matchLabels": {"-": "-"}}), gateway_pods)
        for p in ingress_sources(objects, ranking_pods, "http")
    )


def test_redis_is_in_cluster_with_aof_or_an_external_cluster(overlay):
    name, objects = overlay
    urls = {container_settings(objects, c).redis_url for _, _, c in recsys_containers(objects)}
    clusters = {
        container_settings(objects, c).redis_cluster for _, _, c in recsys_containers(objects)
    }
    (url,) = urls
    host = re.match(r"redis://([^:/]+)", url)[1]
    if name == "prod":
        assert (
            clusters == {True}
            and ("StatefulSet", "redis") not in objects
            and ("Job", "recsys-demo-artifacts") not in objects
        )
        assert host.split(".")[0] not in {
            n for kind, n in objects if kind == "Service"
        }  # outside this deployment
        return
    assert clusters == {False}
    service_for(objects, host, 6379, "redis")
    redis = objects[("StatefulSet", "redis")]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": data_dir} in redis["spec"]["template"]["spec"][
        "containers"
    ][0]["volumeMounts"]
    redis_clients = [
        selects(p["podSelector"], pod_labels(workloads(objects)[w]))
        for p in ingress_sources(objects, pod_labels(redis), "redis")
        for w in ("recsys-gateway", "recsys-retrieval", "recsys-online-trainer", "recsys-ranking")
    ]
    assert (
        sum(redis_clients) == 3
    )  # gateway, retrieval, trainer; the ranking tier does not use Redis


def test_gpu_overlay_puts_retrieval_on_a_gpu_with_the_cuda_image(overlay):
    name, objects = overlay
    for _workload, _, container in recsys_containers(objects):
        assert container["image"].split(":")[1] == {"gpu": "gpu", "prod": "0.1.0-cpu"}.get(
            name, "cpu"
        )
    retrieval = next(c for _, _, c in recsys_containers(objects) if tier_of(c) == "retrieval")
    gpus = retrieval["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (name == "gpu")
    assert container_settings(objects, retrieval).index_device == (
        "gpu" if name == "gpu" else "auto"
    )


def test_the_online_trainer_keeps_one_stable_consumer(overlay):
    _, objects = overlay
    trainer = objects[("StatefulSet", "recsys-online-trainer")]
    assert trainer["spec"]["replicas"] == 1
    container = trainer["spec"]["template"]["spec"]["containers"][0]
    assert "RECSYS_TRAINER_CONSUMER" not in {
        e["name"] for e in container.get("env", [])
    }  # the pod's stable hostname
