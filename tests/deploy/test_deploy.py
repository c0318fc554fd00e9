"""The Dockerfile, docker-compose.yml and the Kubernetes manifests, validated offline."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyOptions
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from tests.shared.procs import ROOT
from vlpipe.cli import COMMANDS
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_acl import AclTable
from vlpipe.shared.redis_server import RedisServer, find_redis_server, free_port

K8S_VERSION = "1.30.0"
WORKLOADS = ("Deployment", "StatefulSet")


# ---------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def parse_compose(text: str) -> Any:
    """The file as Compose reads it: YAML merge keys (`<<: *anchor`) applied."""
    return PyOptions(apply_merge=True).from_yaml(text)


CLUSTER_NODES = [f"redis-node-{n}" for n in range(1, 7)]


def test_the_compose_file_follows_the_compose_specification() -> None:
    parsed = parse_compose((ROOT / "docker-compose.yml").read_text())
    parsed.validate()
    assert set(parsed.service_names()) == {
        "redis-acl", "redis", "engine", "ingest", "broker", "egress", "otel-collector", "jaeger",
        *CLUSTER_NODES, "redis-cluster",
    }  # fmt: skip


def test_the_specification_check_is_real() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    with pytest.raises(ValueError, match="healtcheck"):
        parse_compose(text.replace("    healthcheck:", "    healtcheck:", 1))
    with pytest.raises(ValueError, match="expected a set"):  # in a merged anchor too
        parse_compose(text.replace('\n  profiles: ["cluster"]', "\n  profiles: cluster", 1))


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
    writer = services["redis-acl"]
    assert writer["command"][0] == "redis-acl" and "redis-acl" in COMMANDS
    assert "--cluster" in writer["command"]  # one file for the standalone and the cluster
    roles = AclTable(cluster=True).roles()
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


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME:-default}` and `${NAME}`, with `env` as the environment."""
    return re.sub(r"\$\{(\w+)(?::-([^${}]*))?\}",
                  lambda m: env.get(m.group(1)) or m.group(2) or "", value)  # fmt: skip


def cluster_env() -> dict[str, str]:
    lines = (ROOT / "deploy" / "cluster.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def conf(path: str) -> dict[str, str]:
    """A redis.conf's directives (one `name value` a line)."""
    lines = (ROOT / path).read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line and not line.startswith("#"))


def test_profile_cluster_runs_three_masters_and_replicas_on_the_standalones_acl_file() -> None:
    data = compose()
    services = data["services"]
    passwords = data["x-redis-passwords"]
    acl_volume = next(v.split(":")[0] for v in services["redis"]["volumes"] if ":/acl" in v)
    node_conf = conf("deploy/redis/cluster.conf")
    assert node_conf["cluster-enabled"] == "yes" and node_conf["masteruser"] == "replica"
    assert node_conf["aclfile"] == conf("deploy/redis/redis.conf")["aclfile"]
    assert node_conf["appendonly"] == "yes"
    assert node_conf["cluster-preferred-endpoint-type"] == "hostname"
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["profiles"] == ["cluster"] and node["hostname"] == name
        assert node["image"] == services["redis"]["image"]
        mounts = dict(v.split(":")[:2] for v in node["volumes"])
        assert mounts[acl_volume] == "/acl"  # the very file the standalone redis loads
        script = node["command"][-1]
        assert script.startswith("exec docker-entrypoint.sh redis-server ")  # not as root
        assert mounts["./deploy/redis/cluster.conf"] in script
        assert mounts[f"{name}-data"] == "/data" and f"{name}-data" in data["volumes"]
        assert node_conf["cluster-config-file"].startswith("/data/")
        # Replicas authenticate as `replica`, with the password the ACL file hashed.
        assert '--masterauth "$$VLPIPE_REDIS_PASSWORD_REPLICA"' in node["command"][-1]
        assert (
            node["environment"]["VLPIPE_REDIS_PASSWORD_REPLICA"]
            == (passwords["VLPIPE_REDIS_PASSWORD_REPLICA"])
        )
        assert node["depends_on"]["redis-acl"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in node
    create = services["redis-cluster"]
    assert create["profiles"] == ["cluster"] and create["image"] == services["redis"]["image"]
    script = next(v.split(":")[1] for v in create["volumes"]
                  if v.startswith("./deploy/redis/cluster-create.sh:"))  # fmt: skip
    assert create["command"][:2] == ["sh", script]
    assert create["command"][2:] == [f"{name}:6379" for name in CLUSTER_NODES]  # 3 + 3
    assert create["environment"]["REDISCLI_AUTH"] == passwords["VLPIPE_REDIS_PASSWORD_OPERATOR"]
    assert {n: d["condition"] for n, d in create["depends_on"].items()} == dict.fromkeys(
        CLUSTER_NODES, "service_healthy"
    )


def test_the_services_follow_the_cluster_under_the_profile_and_redis_without_it() -> None:
    services = compose()["services"]
    on_cluster = cluster_env()
    assert on_cluster["COMPOSE_PROFILES"] == "cluster"
    for name in ("ingest", "broker", "egress"):
        env = services[name]["environment"]
        standalone = interpolate(env["VLPIPE_REDIS_URL"], {})
        assert standalone == f"redis://{name}:dev-{name}-password@redis:6379/0"
        assert interpolate(env["VLPIPE_REDIS_CLUSTER"], {}) == "false"
        cluster_url = interpolate(env["VLPIPE_REDIS_URL"], on_cluster)
        assert cluster_url == f"redis://{name}:dev-{name}-password@redis-node-1:6379/0"
        assert interpolate(env["VLPIPE_REDIS_CLUSTER"], on_cluster) == "true"
        # On the cluster a service waits until every slot is served; without it, no wait.
        wait = services[name]["depends_on"]["redis-cluster"]
        assert wait == {"condition": "service_completed_successfully", "required": False}


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


def keda_metadata(address: tuple[str, ...]) -> dict[str, Any]:
    """A Redis Streams trigger's metadata as KEDA documents it (keda.sh/docs/2.16/scalers/
    redis-streams, redis-cluster-streams): `address` names the connection fields, which
    differ between the two forms; a key KEDA does not know is refused (it would ignore it)."""
    known = {"stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
             "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
             "usernameFromEnv", "passwordFromEnv", *address}  # fmt: skip
    count = {"type": "string", "pattern": "^[0-9]+$"}
    return {
        "type": "object",
        "required": ["stream", "consumerGroup"],
        "propertyNames": {"enum": sorted(known)},
        "additionalProperties": {"type": "string"},
        "properties": {
            **{key: count for key in ("pendingEntriesCount", "lagCount", "activationLagCount")},
            "enableTLS": {"enum": ["true", "false"]},
        },
        "anyOf": [{"required": [key]} for key in address if not key.startswith("port")],
        # Lag-based scaling (XINFO GROUPS) says when to wake up; it replaces the pending count.
        "dependentRequired": {"lagCount": ["activationLagCount"]},
        "not": {"required": ["lagCount", "pendingEntriesCount"]},
    }


KEDA_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata", "authenticationRef"],
    "oneOf": [
        {"properties": {"type": {"const": "redis-streams"},
                        "metadata": keda_metadata(("address", "addressFromEnv", "host",
                                                   "hostFromEnv", "port", "portFromEnv"))}},
        {"properties": {"type": {"const": "redis-cluster-streams"},
                        "metadata": keda_metadata(("addresses", "addressesFromEnv", "hosts",
                                                   "hostsFromEnv", "ports", "portsFromEnv"))}},
    ],
}  # fmt: skip

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
                "triggers": {"type": "array", "minItems": 1, "items": KEDA_TRIGGER},
            },
        },
    },
}  # fmt: skip

KEDA_TRIGGER_AUTHENTICATION = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["parameter", "name", "key"],
                        "properties": {"parameter": {"enum": ["username", "password", "tls",
                                                              "ca", "cert", "key",
                                                              "keyPassword"]}},
                    },
                },
            },
        },
    },
}  # fmt: skip


def test_the_keda_schemas_refuse_what_keda_would_not_understand() -> None:
    import jsonschema

    good = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {},
            "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{
                "type": "redis-cluster-streams", "authenticationRef": {"name": "a"},
                "metadata": {"addressesFromEnv": "A", "stream": "s", "consumerGroup": "g",
                             "lagCount": "5", "activationLagCount": "1",
                             "enableTLS": "true"}}]}}  # fmt: skip
    jsonschema.validate(good, KEDA_SCALED_OBJECT)
    trigger = good["spec"]["triggers"][0]  # type: ignore[index]
    for broken in (
        {"addressFromEnv": "A"},  # the standalone form's field: the scaler ignores it
        {"activationLagCount": None},  # lagCount alone
        {"pendingEntriesCount": "100"},  # with lagCount
        {"enableTLS": "yes"},
        {"lagCount": 5},  # not a string
    ):
        metadata = {**trigger["metadata"], **broken}
        if broken.get("addressFromEnv"):
            del metadata["addressesFromEnv"]
        metadata = {k: v for k, v in metadata.items() if v is not None}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, "spec": {**good["spec"],  # type: ignore[dict-item]
                "triggers": [{**trigger, "metadata": metadata}]}}, KEDA_SCALED_OBJECT)  # fmt: skip


@pytest.fixture(scope="module", params=["dev", "prod"])
def manifests(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(request.param)


def test_every_object_is_valid_for_kubernetes(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    import jsonschema

    _, docs = manifests
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            schema = {"ScaledObject": KEDA_SCALED_OBJECT,
                      "TriggerAuthentication": KEDA_TRIGGER_AUTHENTICATION}[doc["kind"]]  # fmt: skip
            jsonschema.validate(doc, schema)
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
    auths = by_kind(docs, "TriggerAuthentication")
    for name, obj in scaled.items():
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        container = target["spec"]["template"]["spec"]["containers"][0]
        defined = {e["name"] for e in container["env"]}
        for trigger in obj["spec"]["triggers"]:
            metadata = trigger["metadata"]
            assert metadata["stream"] == "vl:sessions"
            assert metadata["consumerGroup"] == name.removeprefix("vlpipe-")
            # KEDA reads the address from the scale target's environment.
            assert metadata.get("addressFromEnv", metadata.get("addressesFromEnv")) in defined
            auth = auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
            assert {ref["parameter"] for ref in auth} >= {"username", "password"}
            if metadata.get("enableTLS") == "true":  # KEDA refuses both ways of asking TLS
                assert "tls" not in {ref["parameter"] for ref in auth}
            if overlay == "prod":  # on the cluster, over TLS, lag-based where it can be
                assert trigger["type"] == "redis-cluster-streams"
                assert metadata["enableTLS"] == "true"
            else:
                assert trigger["type"] == "redis-streams"
        lag = [t["metadata"] for t in obj["spec"]["triggers"] if "lagCount" in t["metadata"]]
        assert lag or overlay == "dev", name
        if name == "vlpipe-broker":  # the sessions its replicas own, 100 a replica
            assert any(t["metadata"].get("pendingEntriesCount") == "100"
                       for t in obj["spec"]["triggers"])  # fmt: skip
    configs = by_kind(docs, "ConfigMap")
    for service in ("ingest", "broker", "egress"):
        cluster = configs[f"vlpipe-{service}"]["data"].get("VLPIPE_REDIS_CLUSTER", "false")
        assert cluster == ("true" if overlay == "prod" else "false"), service
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


# ---------------------------------------------------------------- the cluster recipe, run


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000, as in compose) is free too."""
    while True:
        port = free_port()
        if port <= 55535 and port_is_free(port + 10000):
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def recipe_nodes(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Six redis-servers configured as compose's redis-node-N are: deploy/redis/cluster.conf
    (its paths moved under tmp_path), the file of `vlpipe redis-acl --cluster`, --masterauth."""
    env = {
        **os.environ,
        **{k: interpolate(v, {}) for k, v in compose()["x-redis-passwords"].items()},
    }
    acl = tmp_path / "users.acl"
    subprocess.run([sys.executable, "-m", "vlpipe", "redis-acl", "--cluster", "--out", str(acl)],
                   cwd=ROOT, env=env, check=True)  # fmt: skip
    nodes: list[RedisServer] = []
    try:
        for n in range(1, 7):
            data = tmp_path / f"node-{n}"
            directives = {**conf("deploy/redis/cluster.conf"), "aclfile": str(acl),
                          "cluster-config-file": str(data / "nodes.conf"),
                          "cluster-announce-hostname": "localhost",
                          "masterauth": env["VLPIPE_REDIS_PASSWORD_REPLICA"]}  # fmt: skip
            args = tuple(a for k, v in directives.items() for a in (f"--{k}", v))
            node = RedisServer(data, port=cluster_port(), extra_args=args)
            nodes.append(node)
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def redis_cli() -> str:
    binary = find_redis_server()
    sibling = Path(binary).with_name("redis-cli") if binary else None
    found = str(sibling) if sibling and sibling.exists() else shutil.which("redis-cli")
    assert found, "the cluster recipe's test needs redis-cli, which ships with redis-server"
    return found


@pytest.fixture
def recipe_cluster(recipe_nodes: list[RedisServer], tmp_path: Path) -> list[RedisServer]:
    """The six nodes joined by deploy/redis/cluster-create.sh, as compose's redis-cluster
    runs it (redis-cli on PATH, the operator's password in REDISCLI_AUTH), then run again."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-cli").symlink_to(redis_cli())
    create = [
        "sh", str(ROOT / "deploy/redis/cluster-create.sh"),
        *(f"{node.host}:{node.port}" for node in recipe_nodes),
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "REDISCLI_AUTH": recipe_passwords()["VLPIPE_REDIS_PASSWORD_OPERATOR"]}  # fmt: skip
    run = subprocess.run(create, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    again = subprocess.run(create, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == "the cluster is up\n"  # left as it is
    return recipe_nodes


def recipe_passwords() -> dict[str, str]:
    """The development passwords of docker-compose.yml."""
    return {k: interpolate(v, {}) for k, v in compose()["x-redis-passwords"].items()}


async def test_the_compose_cluster_recipe_builds_a_cluster_every_service_user_works_on(
    recipe_cluster: list[RedisServer],
) -> None:
    def client(role: str) -> RedisCluster:
        seed = recipe_cluster[-1]
        return RedisCluster(host=seed.host, port=seed.port, username=role, decode_responses=True,
                            password=recipe_passwords()[f"VLPIPE_REDIS_PASSWORD_{role.upper()}"])  # fmt: skip

    def paired(shard: dict[str, Any]) -> bool:
        roles = sorted(node["role"] for node in shard["nodes"])
        return roles == ["master", "replica"] and all(
            node["health"] == "online" for node in shard["nodes"]
        )

    # Three masters, each with a replica that synced as user `replica` (gossip tells the
    # other nodes within a few node timeouts).
    monitor = client("monitor")
    try:
        for _ in range(300):
            shards: Any = await monitor.execute_command("CLUSTER SHARDS")
            if len(shards) == 3 and all(paired(shard) for shard in shards):
                break
            await asyncio.sleep(0.1)
    finally:
        await monitor.aclose()
    assert len(shards) == 3 and all(paired(shard) for shard in shards), shards
    # Every service user works on a session of each master, through redis-py's cluster client.
    keys = StreamKeys("vl")
    sessions = [session_on(range(s["slots"][0], s["slots"][1] + 1)) for s in shards]
    assert len(sessions) == 3
    for role in ("ingest", "broker", "egress"):
        service = client(role)
        try:
            for sid in sessions:
                await service.xadd(keys.status(sid), {"type": role})
                read: Any = await service.xread({keys.status(sid): "0"}, count=10)
                [[_, entries]] = read
                assert entries[-1][1] == {"type": role}
        finally:
            await service.aclose()


def session_on(slots: range) -> str:
    """A session id whose hash tag lands on one of `slots`."""
    n = 0
    while key_slot(f"{{s{n}}}".encode()) not in slots:
        n += 1
    return f"s{n}"
