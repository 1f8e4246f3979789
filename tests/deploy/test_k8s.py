"""deploy/k8s, checked without a cluster: every manifest against the Kubernetes API schemas (kubernetes-validate
bundles them, no network needed), and every setting against the code it configures (the services' flag parsers,
the client's CLI, the encoder address parser), for both variants: the base (TLS and API keys on, exec probes) and
the plaintext overlay (rendered by `kubectl kustomize` where kubectl is installed)."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from generator_service.encoder_client import encoder_targets
from tests.deploy.support import (
    HEALTH_DEADLINE_S,
    PARSERS,
    REPO,
    SERVICE_NAMES,
    build_config,
    flags_in,
    health_args,
    service_env_names,
    service_flags,
    with_files,
)

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests target (native gRPC probes are GA since 1.27)
NAMESPACE = "team-a"  # stands in for the namespace the pods run in (metadata.namespace)
MODEL_PATH = "/models/checkpoint"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


BASE_DOCS = [doc for name in kustomization(K8S / "base")["resources"] for doc in load_documents(K8S / "base" / name)]
SECRETS = load_documents(K8S / "secrets.example.yaml")


@functools.cache
def render(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/k8s/<overlay>`: the objects `kubectl apply -k` would send (do not mutate)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: cannot render the overlay")
    run = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc is not None]


@pytest.fixture(scope="module", params=["base", "plaintext"])
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The manifests of one variant, as applied."""
    return BASE_DOCS if request.param == "base" else render(request.param)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return doc


def deployments(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (doc for doc in docs if doc["kind"] == "Deployment")


def pod(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment", f"mmserve-{component}")["spec"]["template"]
    return spec


def container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (only,) = pod(docs, component)["spec"]["containers"]
    return dict(only)


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the process sees it: `$(VAR)` expanded from the variables defined before."""
    env: dict[str, str] = {}
    for entry in spec.get("env", []):
        if "valueFrom" in entry:
            assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, entry
            env[entry["name"]] = NAMESPACE
        else:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
    return env


def secret_mounts(pod_template: dict[str, Any], name: str) -> dict[str, set[str]]:
    """mount path -> the file names a Secret volume puts there."""
    volumes = {volume["name"]: volume for volume in pod_template["spec"].get("volumes", [])}
    (spec,) = pod_template["spec"]["containers"]
    mounted: dict[str, set[str]] = {}
    for mount in spec.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:
            provided = find(SECRETS, "Secret", secret["secretName"])["stringData"]
            files = {item["path"] for item in secret["items"]} if "items" in secret else set(provided)
            assert {item["key"] for item in secret.get("items", [])} <= set(provided), (name, secret)
            mounted[mount["mountPath"]] = files
    return mounted


def config(docs: list[dict[str, Any]], component: str, tmp_path: Path) -> Any:
    """The service's validated config as the pod builds it (secret files replaced by stand-ins)."""
    spec = container(docs, component)
    env = with_files(environment(spec), secret_mounts(pod(docs, component), component), tmp_path)
    return build_config(component, env, spec.get("args", []))


def quantity(value: str | int) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti)?", str(value))
    assert match, value
    scale = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]
    return float(match.group(1)) * scale


def test_kustomizations_list_every_manifest() -> None:
    manifests = sorted(path.name for path in (K8S / "base").glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(kustomization(K8S / "base")["resources"]) == manifests
    assert kustomization(K8S)["resources"] == ["base"]
    overlay = kustomization(K8S / "plaintext")
    assert overlay["resources"] == ["../base"]
    assert all((K8S / "plaintext" / patch["path"]).is_file() for patch in overlay["patches"])
    assert {doc["kind"] for doc in BASE_DOCS} == {"Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy"}
    assert all("namespace" not in doc["metadata"] for doc in BASE_DOCS + SECRETS), "namespace-agnostic"


def test_base_renders_as_the_plain_files() -> None:
    """`kubectl apply -k deploy/k8s` and `kubectl apply -f deploy/k8s/base` apply the same objects."""

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(render("."), key=key) == sorted(BASE_DOCS, key=key)


@pytest.mark.parametrize("doc", BASE_DOCS + SECRETS, ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}".lower())
def test_manifest_validates_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_plaintext_overlay_validates_against_the_kubernetes_schema() -> None:
    for doc in render("plaintext"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_rejects_misspelt_and_mistyped_fields() -> None:
    """The check above is a real one: the bundled schemas (strict) catch what the API server would refuse."""
    misspelt = copy.deepcopy(find(BASE_DOCS, "Deployment", "mmserve-encoder"))
    spec = misspelt["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    mistyped = copy.deepcopy(find(BASE_DOCS, "Deployment", "mmserve-encoder"))
    mistyped["spec"]["replicas"] = "one"
    for doc in (misspelt, mistyped):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("component", ["encoder", "generator"])
def test_container_runs_the_service_with_its_real_settings(
    docs: list[dict[str, Any]], component: str, tmp_path: Path
) -> None:
    spec = container(docs, component)
    module = f"{component}_service"
    assert spec["command"] == ["python", "-m", module] and (REPO / module / "__main__.py").is_file()
    assert set(flags_in(spec.get("args", []))) <= service_flags(component)
    env = environment(spec)
    mmserve = {name for name in env if name.startswith("MMSERVE_")}
    assert mmserve - service_env_names(component) == set(), "every MMSERVE_* variable must be a flag of the service"
    assert set(env) - mmserve == ({"POD_NAMESPACE"} if component == "generator" else set())
    built = config(docs, component, tmp_path)
    assert built.server.host == "0.0.0.0" and built.server.metrics_port is not None
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    assert ports == {"grpc": built.server.port, "metrics": built.server.metrics_port}
    redis = find(docs, "Service", "mmserve-redis")
    assert built.cache.redis_url == f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    assert env["MMSERVE_MODEL"] == MODEL_PATH


@pytest.mark.parametrize("component", ["encoder", "generator"])
def test_probes_ask_the_services_health(docs: list[dict[str, Any]], component: str, tmp_path: Path) -> None:
    spec = container(docs, component)
    built = config(docs, component, tmp_path)
    tls = built.server.tls
    for name in PROBES:
        probe = spec[name]
        assert probe["timeoutSeconds"] > HEALTH_DEADLINE_S, name
        if "grpc" in probe:
            # kubelet's own gRPC probe speaks plaintext only
            assert not tls.enabled, f"{name}: a native gRPC probe cannot reach a TLS server"
            assert probe["grpc"] == {"port": built.server.port, "service": SERVICE_NAMES[component]}
            continue
        args = health_args(probe["exec"]["command"])
        assert args.service == component and args.address == f"127.0.0.1:{built.server.port}"
        assert args.timeout is None or args.timeout < probe["timeoutSeconds"]
        if tls.enabled:
            assert args.ssl_ca_certs is not None, f"{name}: TLS is on, the probe must trust its CA"
        if tls.ca_certs is not None:  # mutual TLS: the probe presents a certificate the server accepts
            assert args.ssl_certfile and args.ssl_keyfile
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "room to load and warm up a large model"
    liveness = spec["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > built.server.shutdown_grace_s


@pytest.mark.parametrize("component", ["encoder", "generator"])
def test_termination_grace_outlasts_the_drain(docs: list[dict[str, Any]], component: str, tmp_path: Path) -> None:
    template = pod(docs, component)
    pre_stop = container(docs, component)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + config(docs, component, tmp_path).server.shutdown_grace_s
    assert template["spec"]["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("component", ["encoder", "generator"])
def test_every_file_setting_is_a_read_only_secret_file(docs: list[dict[str, Any]], component: str) -> None:
    spec = container(docs, component)
    mounts = secret_mounts(pod(docs, component), component)
    files = {f"{path}/{name}" for path, names in mounts.items() for name in names}
    used = {value for value in environment(spec).values() if value.startswith("/") and value != MODEL_PATH}
    for probe in (spec[name] for name in PROBES if "exec" in spec[name]):
        args = health_args(probe["exec"]["command"])
        used |= {path for path in (args.ssl_ca_certs, args.ssl_certfile, args.ssl_keyfile) if path}
    assert used <= files, "every file a setting names is in a mounted Secret"
    for mount in spec.get("volumeMounts", []):
        if mount["mountPath"] in mounts:
            assert mount.get("readOnly") is True and "subPath" not in mount, mount  # subPath mounts never rotate
        else:
            assert not any(path.startswith(mount["mountPath"] + "/") for path in used), mount


def test_tls_base_and_plaintext_overlay_differ_in_security_only() -> None:
    plaintext = render("plaintext")
    for component in PARSERS:
        base_env, plain_env = environment(container(BASE_DOCS, component)), environment(container(plaintext, component))
        removed = set(base_env) - set(plain_env)
        assert removed and all("_SSL_" in name or name.endswith("API_KEY_FILE") for name in removed)
        assert {name: base_env[name] for name in plain_env} == plain_env
        assert secret_mounts(pod(plaintext, component), component) == {}
        assert secret_mounts(pod(BASE_DOCS, component), component) != {}


def test_generator_reaches_every_encoder_pod_through_the_headless_service(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    service = find(docs, "Service", "mmserve-encoder")
    assert service["spec"]["clusterIP"] == "None", "headless: DNS lists every ready pod, round_robin spreads calls"
    selector = service["spec"]["selector"]
    for deployment in deployments(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selected = selector.items() <= labels.items()
        assert selected == (deployment["metadata"]["name"] == "mmserve-encoder"), deployment["metadata"]["name"]
    (grpc_port,) = [port for port in service["spec"]["ports"] if port["name"] == "grpc"]
    assert grpc_port["targetPort"] == "grpc" and grpc_port["port"] == config(docs, "encoder", tmp_path).server.port
    address = config(docs, "generator", tmp_path).encoder_address
    (target,) = encoder_targets(address)
    fqdn = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert target == f"dns:///{fqdn}:{grpc_port['port']}"


@pytest.mark.parametrize("component", ["encoder", "generator", "redis"])
def test_services_select_their_pods_and_ports(docs: list[dict[str, Any]], component: str) -> None:
    service = find(docs, "Service", f"mmserve-{component}")
    selected = [
        deployment["metadata"]["name"]
        for deployment in deployments(docs)
        if service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert selected == [f"mmserve-{component}"]
    named = {port["name"]: port["containerPort"] for port in container(docs, component)["ports"]}
    for port in service["spec"]["ports"]:
        assert named[port["targetPort"]] == port["port"], port


def test_every_deployment_has_requests_and_limits(docs: list[dict[str, Any]]) -> None:
    for deployment in deployments(docs):
        for spec in deployment["spec"]["template"]["spec"]["containers"]:
            resources = spec["resources"]
            for resource in ("cpu", "memory"):
                request, limit = resources["requests"][resource], resources["limits"][resource]
                assert quantity(request) <= quantity(limit), (deployment["metadata"]["name"], resource)
    for component in PARSERS:
        assert container(docs, component)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_every_volume_mount_names_a_volume(docs: list[dict[str, Any]]) -> None:
    for deployment in deployments(docs):
        template = deployment["spec"]["template"]["spec"]
        volumes = {volume["name"] for volume in template.get("volumes", [])}
        mounts = [mount for spec in template["containers"] for mount in spec.get("volumeMounts", [])]
        assert {mount["name"] for mount in mounts} == volumes, deployment["metadata"]["name"]
    claims = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    for component in PARSERS:
        (model,) = [volume for volume in pod(docs, component)["spec"]["volumes"] if volume["name"] == "model"]
        assert model["persistentVolumeClaim"] == {"claimName": "mmserve-models", "readOnly": True}
        assert "mmserve-models" in claims
        (mount,) = [mount for mount in container(docs, component)["volumeMounts"] if mount["name"] == "model"]
        assert mount["readOnly"] is True and MODEL_PATH.startswith(mount["mountPath"] + "/")


def test_redis_is_a_bounded_volatile_cache(docs: list[dict[str, Any]]) -> None:
    spec = container(docs, "redis")
    args = spec["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
    assert flags == {"--maxmemory": "2gb", "--maxmemory-policy": "allkeys-lru", "--save": "", "--appendonly": "no"}
    assert quantity(spec["resources"]["limits"]["memory"]) > 2 * 2**30, "headroom above maxmemory"
    assert {port["containerPort"] for port in spec["ports"]} == {6379}


def test_network_policies_let_the_stack_talk(docs: list[dict[str, Any]]) -> None:
    def labels(component: str) -> dict[str, str]:
        return dict(pod(docs, component)["metadata"]["labels"])

    def admits(rule: dict[str, Any], component: str) -> bool:
        return any(
            peer["podSelector"].get("matchLabels", {}).items() <= labels(component).items()
            and all(
                labels(component).get(expression["key"]) in expression["values"]
                for expression in peer["podSelector"].get("matchExpressions", [])
            )
            for peer in rule.get("from", [])
        )

    for target, clients, port in (("redis", {"encoder", "generator"}, 6379), ("encoder", {"generator"}, 50051)):
        policy = find(docs, "NetworkPolicy", f"mmserve-{target}")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels(target).items()
        (rule,) = [rule for rule in policy["spec"]["ingress"] if {"port": port} in rule["ports"]]
        assert {component for component in ("encoder", "generator", "redis") if admits(rule, component)} == clients
