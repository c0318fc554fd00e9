"""The Dockerfile, docker-compose.yml and the Kubernetes manifests, validated offline."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from tests.shared.procs import ROOT
from vlpipe.cli import COMMANDS
from vlpipe.shared.redis_acl import AclTable

K8S_VERSION = "1.30.0"
WORKLOADS = ("Deployment", "StatefulSet")


# ---------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_the_compose_file_follows_the_compose_specification() -> None:
    parsed = PyCompose.from_yaml((ROOT / "docker-compose.yml").read_text())
    parsed.validate()
    assert set(parsed.service_names()) == {
        "redis-acl", "redis", "engine", "ingest", "broker", "egress", "otel-collector", "jaeger",
    }  # fmt: skip


def test_the_specification_check_is_real() -> None:
    broken = (
        (ROOT / "docker-compose.yml").read_text().replace("    healthcheck:", "    healtcheck:", 1)
    )
    with pytest.raises(ValueError, match="healtcheck"):
        PyCompose.from_yaml(broken)


def test_compose_runs_the_pipeline_with_health_checks_and_optional_env_file() -> None:
    services = compose()["services"]
    assert (
        services["redis"]["command"][-3:]
        == ["--appendonly", "yes", "--appendfsync", "everysec"][-3:]
    )
    for name in ("redis", "engine", "ingest", "broker", "egress", "jaeger"):
        assert "healthcheck" in services[name], name
    for name in ("ingest", "broker", "egress"):
        service = services[name]
        assert service["command"] == [name] and name in COMMANDS
        assert service["build"]["target"] == "service"
        assert {"path": ".env", "required": False} in service["env_file"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        port = service["environment"]["VLPIPE_HTTP_PORT"]
        assert port in " ".join(service["healthcheck"]["test"])
    assert services["engine"]["build"]["target"] == "engine"
    assert services["egress"]["environment"]["VLPIPE_GATEWAY_TOKENS"]  # never open to the world
    assert services["egress"]["environment"]["VLPIPE_GATEWAY_SIGNING_KEY"]
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]


def test_compose_runs_each_service_as_its_own_redis_user_from_the_generated_acl_file() -> None:
    services = compose()["services"]
    roles = AclTable().roles()
    writer = services["redis-acl"]
    assert writer["command"][0] == "redis-acl" and "redis-acl" in COMMANDS
    assert set(writer["environment"]) == {role.password_env for role in roles}
    out = writer["command"][writer["command"].index("--out") + 1]
    [acl_volume] = [v for v in writer["volumes"] if out.startswith(v.split(":")[1])]
    redis = services["redis"]
    assert redis["depends_on"]["redis-acl"]["condition"] == "service_completed_successfully"
    conf_mount = next(v for v in redis["volumes"] if v.startswith("./deploy/redis/redis.conf:"))
    assert conf_mount.split(":")[1] == redis["command"][1]
    aclfile = re.search(r"^aclfile (\S+)$", (ROOT / "deploy/redis/redis.conf").read_text(), re.M)
    assert aclfile is not None
    mounted = next(v for v in redis["volumes"] if v.startswith(acl_volume.split(":")[0] + ":"))
    assert aclfile.group(1) == mounted.split(":")[1] + "/" + out.rsplit("/", 1)[1]
    for name in ("ingest", "broker", "egress"):
        url = services[name]["environment"]["VLPIPE_REDIS_URL"]
        assert url.startswith(f"redis://{name}:${{VLPIPE_REDIS_PASSWORD_{name.upper()}"), url


# ---------------------------------------------------------------- Dockerfile


def test_the_dockerfile_builds_small_non_root_images_of_real_commands() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = {name for _, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)}
    assert {"build", "build-engine", "runtime", "service", "engine"} <= set(stages)
    assert not re.search(r"apt-get install|build-essential|gcc", text), "no compilers anywhere"
    assert re.search(r'^ENTRYPOINT \["vlpipe"\]$', text, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vlpipe"] == "vlpipe.cli:main"
    assert re.search(r"^USER 10001:10001$", text, re.M)
    for command in re.findall(r'^CMD \["([a-z-]+)"\]$', text, re.M):
        assert command in COMMANDS or command == "--help"
    engine_stage = text[text.index("AS engine") :]
    assert "build-engine" in engine_stage and "HEALTHCHECK" in engine_stage


# ---------------------------------------------------------------- Kubernetes


def kustomize(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, (
        "the manifest tests need kubectl (its built-in kustomize): apt-get install kubectl"
    )
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


KEDA_SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"]},
                "minReplicaCount": {"type": "integer", "minimum": 1},
                "maxReplicaCount": {"type": "integer"},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "redis-streams"},
                            "metadata": {"type": "object", "required": ["stream", "consumerGroup"]},
                        },
                    },
                },
            },
        },
    },
}  # fmt: skip


@pytest.fixture(scope="module", params=["dev", "prod"])
def manifests(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(request.param)


def test_every_object_is_valid_for_kubernetes(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    import jsonschema

    _, docs = manifests
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            if doc["kind"] == "ScaledObject":
                jsonschema.validate(doc, KEDA_SCALED_OBJECT)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_workloads_are_probed_limited_non_root_and_disruption_budgeted(
    manifests: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = manifests
    accounts = by_kind(docs, "ServiceAccount")
    budgets = list(by_kind(docs, "PodDisruptionBudget").values())
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert workloads
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["terminationGracePeriodSeconds"] >= 30, name
        assert pod["serviceAccountName"] in accounts, name
        for container in pod["containers"]:
            assert container["readinessProbe"] and container["livenessProbe"], name
            limits = container["resources"]["limits"]
            assert limits["cpu"] and limits["memory"], name
            assert container["resources"]["requests"], name
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
        assert any(
            all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())
            for b in budgets
        ), f"no PodDisruptionBudget for {name}"


def test_traffic_is_denied_unless_allowed_and_scaling_follows_the_streams(
    manifests: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, docs = manifests
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["vlpipe-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny
    scaled = by_kind(docs, "ScaledObject")
    deployments = by_kind(docs, "Deployment")
    assert set(scaled) == {"vlpipe-ingest", "vlpipe-egress", "vlpipe-broker"}
    for name, obj in scaled.items():
        assert obj["spec"]["scaleTargetRef"]["name"] in deployments
        trigger = obj["spec"]["triggers"][0]["metadata"]
        assert trigger["stream"] == "vl:sessions"
        assert trigger["consumerGroup"] == name.removeprefix("vlpipe-")
    broker = deployments["vlpipe-broker"]["spec"]["template"]
    env = {e["name"]: e for e in broker["spec"]["containers"][0]["env"]}
    if overlay == "prod":
        assert "vlpipe-engine" not in deployments
        assert broker["metadata"]["labels"]["azure.workload.identity/use"] == "true"
        account = by_kind(docs, "ServiceAccount")["vlpipe-broker"]
        assert account["metadata"]["annotations"]["azure.workload.identity/client-id"]
        assert env["VLPIPE_BROKER_AUTH"]["value"] == "entra" and "VLPIPE_BROKER_API_KEY" not in env
        assert not [d for d in docs if d["kind"] == "Secret"], "prod secrets live outside git"
    else:
        assert "vlpipe-engine" in deployments
        redis = by_kind(docs, "StatefulSet")["redis"]
        assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
        assert redis["spec"]["volumeClaimTemplates"]


def secret_ref(container: dict[str, Any], name: str) -> dict[str, Any]:
    env = {e["name"]: e for e in container["env"]}
    ref: dict[str, Any] = env[name]["valueFrom"]["secretKeyRef"]
    return ref


def test_each_service_connects_to_redis_as_its_own_user_and_the_engine_not_at_all(
    manifests: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, docs = manifests
    deployments = by_kind(docs, "Deployment")
    secrets = {name.rsplit("-", 1)[0] if overlay == "dev" and name != "vlpipe-redis" else name: d
               for name, d in by_kind(docs, "Secret").items()}  # fmt: skip
    for service in ("ingest", "broker", "egress"):
        container = deployments[f"vlpipe-{service}"]["spec"]["template"]["spec"]["containers"][0]
        ref = secret_ref(container, "VLPIPE_REDIS_URL")
        assert ref["name"].startswith(f"vlpipe-redis-{service}") and ref["key"] == "url"
        if overlay == "dev":
            url = base64.b64decode(secrets[f"vlpipe-redis-{service}"]["data"]["url"]).decode()
            assert url.startswith(f"redis://{service}:"), url
    egress = deployments["vlpipe-egress"]["spec"]["template"]["spec"]["containers"][0]
    assert secret_ref(egress, "VLPIPE_GATEWAY_SIGNING_KEY")["key"] == "signing-key"
    engine = [d for name, d in deployments.items() if name == "vlpipe-engine"]
    for workload in engine:
        names = {e["name"] for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "VLPIPE_REDIS_URL" not in names  # the engine never talks to Redis
    if overlay != "dev":
        return
    # The in-cluster Redis loads the users an init container generates from the passwords.
    pod = by_kind(docs, "StatefulSet")["redis"]["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["args"][0] == "redis-acl" and "redis-acl" in COMMANDS
    out = init["args"][init["args"].index("--out") + 1]
    users = secrets["vlpipe-redis-users"]["data"]
    assert set(users) == {role.password_env for role in AclTable().roles()}
    redis = pod["containers"][0]
    config = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    conf = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config)
    assert f"aclfile {out}" in conf["data"]["redis.conf"]
    assert redis["args"][1] == "/etc/redis/redis.conf"
    mounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    assert mounts["config"] == "/etc/redis" and out.startswith(mounts["acl"])
    keda = base64.b64decode(secrets["vlpipe-redis"]["data"]["username"]).decode()
    assert keda == "monitor"


# ---------------------------------------------------------------- dashboard


def defined_metrics() -> set[str]:
    """Every metric the code creates, as Prometheus names (dots to underscores)."""
    names = set()
    for source in (ROOT / "vlpipe").rglob("*.py"):
        for kind, name in re.findall(
            r'create_(counter|histogram|observable_gauge|observable_counter|up_down_counter)\(\s*"([a-z_.]+)"',
            source.read_text(),
        ):
            base = name.replace(".", "_")
            names.add(base + ("_total" if kind.endswith("counter") else ""))
            names.add(base)
    return names


def test_the_dashboard_only_charts_metrics_the_services_export() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "vlpipe.json").read_text())
    known = defined_metrics()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        for metric in re.findall(r"\b(vlpipe_[a-z_]+)", expr):
            stem = re.sub(r"_(milliseconds_bucket|bucket)$", "", metric)
            assert metric in known or stem in known, f"{metric} is not a metric vlpipe exports"
