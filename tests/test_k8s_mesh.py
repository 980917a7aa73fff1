"""The shared-service topology (k8s/shared-service) and its gateway overlays, as a user applies them.

Every build is rendered by the real kustomize inside ``kubectl kustomize`` (as in
tests/test_k8s.py). Built-in kinds are validated strictly against the Kubernetes
schemas of the versions tests/test_k8s.py uses; custom resources (Envoy Gateway,
Gateway API, Istio, cert-manager) against the CRDs of the pinned releases in
tests/fixtures/crds/ (tests/crd_validation.py), and Istio's mesh config against the
release's .proto. Then what a cluster would only tell us after the fact: the policy
loads as the pod sees it (TLS files included), the gateways' policies point at the
Service and port that exist, the NetworkPolicies admit the gateway and nobody else,
the certificates' names are the ones the gateways check, the Redis URL reaches
the Redis the build runs, and the Envoy config Istio is handed passes a real Envoy.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes_validate.utils import SchemaNotFoundError  # type: ignore[import-untyped]

from extauthz.cli import build_parser
from extauthz.demo.processes import ENVOY_DIR, free_port, stop_process, validate_envoy_config
from extauthz.policy.loader import parse_policy
from extauthz.policy.model import Policy
from extauthz.relationships.redis_cache import RedisCache
from extauthz.server.validation import parse_grpc_address, serving_issues
from tests import crd_validation
from tests.e2e.k8s_pods import (
    K8S,
    REPO,
    container,
    container_filesystem,
    in_container,
    kustomize,
    objects,
    option,
    pod_spec,
    port_number,
    quantity,
    rendered,
    volume_files,
)
from tests.test_k8s import K8S_VERSIONS, check_restricted

SHARED, EG, ISTIO, IN_POD = "shared-service", "overlays/envoy-gateway", "overlays/istio", "overlays/istio-in-pod"
BUILDS = [SHARED, EG, ISTIO, IN_POD]
SHARED_BUILDS = [SHARED, EG, ISTIO]
OVERLAYS = [EG, ISTIO, IN_POD]
EXTAUTHZ = "extauthz"  # the shared service's Deployment, Service and container
IN_POD_DEPLOYMENT = "orders-api"  # the sidecar base's pod, which the in-pod overlay keeps
CRDS = crd_validation.FIXTURES
MESH_PROTO = CRDS / "istio-api-1.30.3" / "config.proto"

# The labels Envoy Gateway (v1.9) puts on the Envoy proxy pods of a Gateway, in its own namespace
# (internal/infrastructure/kubernetes/proxy/resource.go EnvoyAppLabel, plus the owning-gateway labels of
# internal/gatewayapi/translator.go), and those of the ingress gateway istioctl's default profile installs.
EG_NAMESPACE = "envoy-gateway-system"
ISTIO_GATEWAY = ("istio-system", {"app": "istio-ingressgateway", "istio": "ingressgateway"})


def envoy_gateway_pod(gateway: dict[str, Any]) -> tuple[str, dict[str, str]]:
    return EG_NAMESPACE, {
        "app.kubernetes.io/name": "envoy", "app.kubernetes.io/component": "proxy",
        "app.kubernetes.io/managed-by": "envoy-gateway",
        "gateway.envoyproxy.io/owning-gateway-name": gateway["metadata"]["name"],
        "gateway.envoyproxy.io/owning-gateway-namespace": gateway["metadata"]["namespace"],
    }


# --- helpers -----------------------------------------------------------------------------------------------


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def the(docs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {namespace or ''}/{name or ''}, found {len(found)}"
    return found[0]


def deployment_of(build: str) -> str:
    return IN_POD_DEPLOYMENT if build == IN_POD else EXTAUTHZ


def namespace_of(doc: dict[str, Any]) -> str:
    return str(doc["metadata"].get("namespace", "default"))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if not all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not ok:
            return False
    return True


def admits(policy: dict[str, Any], pod: dict[str, Any], port: int,
           source: tuple[str, dict[str, str]]) -> bool:
    """Does NetworkPolicy ``policy`` let a pod (namespace, labels) connect to ``pod``'s ``port``?"""
    namespace, labels = source
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(
                port_number(pod_container_with_port(pod, p["port"]), p["port"]) == port
                and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            assert "ipBlock" not in peer, "the manifests select pods, not addresses"
            in_namespace = (selects(peer["namespaceSelector"], namespace_labels) if "namespaceSelector" in peer
                            else namespace == namespace_of(policy))
            if in_namespace and selects(peer.get("podSelector", {}), labels):
                return True
    return False


def pod_container_with_port(pod: dict[str, Any], port: int | str) -> dict[str, Any]:
    """The container a NetworkPolicy's port (a number or a container port's name) refers to."""
    for c in pod["spec"]["template"]["spec"]["containers"]:
        if isinstance(port, int) or any(p.get("name") == port for p in c.get("ports", [])):
            return dict(c)
    raise AssertionError(f"no container of {pod['metadata']['name']} has a port named {port!r}")


def policies_for(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> list[dict[str, Any]]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return [p for p in find(docs, "NetworkPolicy", namespace=namespace_of(deployment))
            if selects(p["spec"]["podSelector"], labels)]


def service_port(service: dict[str, Any], port: int) -> dict[str, Any]:
    found = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert found, f"Service {service['metadata']['name']} has no port {port}"
    return dict(found[0])


def backend_service(docs: list[dict[str, Any]], ref: dict[str, Any], from_namespace: str) -> dict[str, Any]:
    """The Service a Gateway API / Envoy Gateway backendRef names (core group, kind Service)."""
    assert ref.get("group", "") == "" and ref.get("kind", "Service") == "Service", ref
    return the(docs, "Service", ref["name"], ref.get("namespace", from_namespace))


def serving_certificate(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The cert-manager Certificate whose Secret the extauthz pod mounts for server.tls."""
    mounted = {s["secret"]["name"] for v in pod_spec(docs, EXTAUTHZ)["volumes"]
               for s in v.get("projected", {}).get("sources", []) if "secret" in s}
    (certificate,) = [c for c in find(docs, "Certificate") if c["spec"]["secretName"] in mounted
                      and namespace_of(c) == namespace_of(the(docs, "Deployment", EXTAUTHZ))]
    return certificate


def mesh_config(build: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((K8S / build / "mesh-config.yaml").read_text())
    return values


def provider(build: str, name: str) -> dict[str, Any]:
    (entry,) = [p for p in mesh_config(build)["meshConfig"]["extensionProviders"] if p["name"] == name]
    grpc: dict[str, Any] = entry["envoyExtAuthzGrpc"]
    return grpc


def ext_proc_patch(envoy_filter: dict[str, Any]) -> dict[str, Any]:
    (patch,) = envoy_filter["spec"]["configPatches"]
    value: dict[str, Any] = patch["patch"]["value"]
    assert value["name"] == "envoy.filters.http.ext_proc"
    return value


def shipped_ext_proc() -> dict[str, Any]:
    """The ExternalProcessor of envoy/envoy.yaml, the sidecar's (inside its matcher wrapper)."""
    config = yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (wrapped,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    processor: dict[str, Any] = wrapped["typed_config"]["extension_config"]["typed_config"]
    return processor


# --- a stand-in for what cert-manager issues -----------------------------------------------------------------


class Issuer:
    """A CA standing in for the ClusterIssuer, issuing what a Certificate's spec asks for."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "extauthz-ca (test)")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=365))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def secret(self, certificate: dict[str, Any]) -> dict[str, Any]:
        """The kubernetes.io/tls Secret cert-manager writes for ``certificate`` (tls.crt, tls.key, ca.crt)."""
        spec = certificate["spec"]
        assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH}
        subject = spec.get("commonName") or spec["dnsNames"][0]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=int(spec["duration"].removesuffix("h"))))
                   .add_extension(x509.ExtendedKeyUsage([usages[u] for u in spec["usages"] if u in usages]),
                                  critical=False))
        if spec.get("dnsNames"):
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in spec["dnsNames"]]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pem = serialization.Encoding.PEM
        data = {
            "tls.crt": cert.public_bytes(pem),
            "tls.key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            "ca.crt": self.cert.public_bytes(pem),
        }
        return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": spec["secretName"], "namespace": namespace_of(certificate)},
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def with_issued_secrets(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The build plus the Secrets cert-manager would issue for its Certificates."""
    issuer = Issuer()
    return [*docs, *(issuer.secret(c) for c in find(docs, "Certificate"))]


def extauthz_policy(docs: list[dict[str, Any]], build: str, root: Path) -> tuple[Policy, str, dict[str, Path]]:
    """The policy as the extauthz container reads it, from its volumes laid out as kubelet does.

    One rewrite: the absolute pod paths of server.tls name the same files where this test laid the
    pod's volumes out (through the same links: ``tls -> ..data/tls``). The text loaded is returned.
    """
    deployment = deployment_of(build)
    mounts = container_filesystem(docs, "extauthz", root, deployment)
    args = build_parser().parse_args(container(docs, "extauthz", deployment)["args"])
    path = in_container(mounts, args.config)
    text = path.read_text()
    document = yaml.safe_load(text)
    tls = (document.get("server") or {}).get("tls") or {}
    if any(str(v).startswith("/") for v in tls.values()):
        for key, value in tls.items():
            tls[key] = str(in_container(mounts, value)) if str(value).startswith("/") else value
        text = yaml.safe_dump(document, sort_keys=False)
    return parse_policy(text, str(path), path.resolve().parent), text, mounts


# --- the builds -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_build_is_reproducible_from_k8s_alone(build: str, tmp_path: Path) -> None:
    """The same bytes every time, and from a copy of k8s/ alone: nothing outside it is read."""
    assert kustomize(K8S / build) == rendered(build)
    shutil.copytree(K8S, tmp_path / "k8s", symlinks=True)
    assert kustomize(tmp_path / "k8s" / build) == rendered(build)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_every_object_validates_against_kubernetes_or_its_pinned_crd(build: str, version: str) -> None:
    custom = 0
    for doc in objects(build):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if crd_validation.is_custom(doc):
            custom += 1
            crd_validation.validate(doc)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{build}: {name} is not valid Kubernetes {version}: {path}: {exc.message}")
        except SchemaNotFoundError as exc:
            pytest.fail(f"{build}: {name}: neither a built-in kind nor one of tests/fixtures/crds: {exc.message}")
    assert custom, f"{build} has no custom resource to check"


@pytest.mark.parametrize("build", BUILDS)
def test_build_holds_what_the_topology_needs(build: str) -> None:
    docs = objects(build)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    if build in SHARED_BUILDS:
        base = {("Deployment", EXTAUTHZ), ("Service", EXTAUTHZ), ("HorizontalPodAutoscaler", EXTAUTHZ),
                ("PodDisruptionBudget", EXTAUTHZ), ("NetworkPolicy", EXTAUTHZ), ("ConfigMap", "extauthz-policy"),
                ("Deployment", "extauthz-redis"), ("Service", "extauthz-redis"), ("NetworkPolicy", "extauthz-redis"),
                ("Certificate", "extauthz-tls")}
        assert base | {("Namespace", "extauthz")} <= kinds
        for kind, name in base:
            assert namespace_of(the(docs, kind, name)) == "extauthz", f"{kind} {name}"
    if build == EG:
        for kind in ("Gateway", "HTTPRoute", "SecurityPolicy", "EnvoyExtensionPolicy", "BackendTLSPolicy",
                     "ReferenceGrant", "ClientTrafficPolicy"):
            assert find(docs, kind), kind
    if build == ISTIO:
        for kind in ("AuthorizationPolicy", "EnvoyFilter", "DestinationRule"):
            assert find(docs, kind), kind
    if build == IN_POD:
        assert {c["name"] for c in pod_spec(docs)["containers"]} == {"app", "extauthz"}, \
            "istio-proxy takes the place of the base's Envoy"
        assert not [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("orders-api-envoy")]
        for kind in ("AuthorizationPolicy", "EnvoyFilter", "ServiceEntry"):
            assert find(docs, kind), kind


# --- the policy, as the pod sees it -----------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_policy_in_the_configmap_loads_and_serves_as_the_pod_mounts_it(build: str, tmp_path: Path) -> None:
    """Loaded by our loader from kubelet's layout, with the TLS Secret cert-manager would issue for the
    Certificate in the build; then the server's own checks (listen address, TLS material) pass too."""
    docs = with_issued_secrets(objects(build))
    policy, text, _ = extauthz_policy(docs, build, tmp_path)
    args = build_parser().parse_args(container(docs, "extauthz", deployment_of(build))["args"])
    assert serving_issues(policy, text) == []
    address = parse_grpc_address(args.grpc_address, policy.server.tls is not None)
    if build in SHARED_BUILDS:
        assert policy.server.tls is not None and policy.server.tls.client_ca_file, "the shared service is mTLS"
        assert not address.is_loopback and not args.grpc_address.startswith("unix:"), \
            "the gateways reach extauthz over the network"
    else:
        assert args.grpc_address.startswith("unix:/"), "in the pod, only istio-proxy may reach extauthz"


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_the_tls_secret_is_mounted_where_server_tls_points(build: str, tmp_path: Path) -> None:
    docs = with_issued_secrets(objects(build))
    policy, _, _ = extauthz_policy(docs, build, tmp_path)
    tls = policy.server.tls
    assert tls is not None
    certificate = serving_certificate(docs)
    secret = the(docs, "Secret", certificate["spec"]["secretName"], namespace_of(certificate))
    expected = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert Path(tls.cert_file).read_bytes() == expected["tls.crt"]
    assert Path(tls.key_file).read_bytes() == expected["tls.key"]
    assert Path(tls.client_ca_file).read_bytes() == expected["ca.crt"]
    # As written in the ConfigMap: absolute pod paths, through the mount's links. A relative path would be
    # resolved into the timestamped directory behind ..data, gone after the first renewal.
    written = yaml.safe_load(the(docs, "ConfigMap", "extauthz-policy")["data"]["policy.yaml"])["server"]["tls"]
    assert all(Path(v).is_absolute() for v in written.values()), written
    for c in pod_spec(docs, EXTAUTHZ)["containers"]:
        for mount in c.get("volumeMounts", []):
            assert "subPath" not in mount, "a subPath mount never sees a renewed certificate or a new policy"


@pytest.mark.parametrize("build", [SHARED])
def test_a_renewed_certificate_is_served_after_kubelet_swaps_it_in(build: str, tmp_path: Path) -> None:
    """cert-manager renews the Secret; kubelet writes the projected volume anew (new timestamped directory,
    ``..data`` swapped, the old directory removed): the reloader extauthz serves with picks up the new
    certificate. The policy's paths must therefore go through the mount's links, not into the timestamped
    directory a relative path resolves to."""
    from extauthz.server.tls import CertificateReloader, TlsMaterial

    docs = with_issued_secrets(objects(build))
    policy, _, mounts = extauthz_policy(docs, build, tmp_path)
    tls = policy.server.tls
    assert tls is not None
    reloader = CertificateReloader(tls, lambda material: material, interval=0)
    before: TlsMaterial = reloader.latest()

    renewed = [d for d in with_issued_secrets(objects(build)) if d["kind"] == "Secret"]
    volume = next(v for v in pod_spec(docs, EXTAUTHZ)["volumes"] if v["name"] == "extauthz-config")
    files = volume_files([*[d for d in docs if d["kind"] != "Secret"], *renewed], volume)
    directory = mounts[next(m["mountPath"] for m in container(docs, "extauthz", EXTAUTHZ)["volumeMounts"]
                            if m["name"] == "extauthz-config")]
    kubelet_swap(directory, files)

    after: TlsMaterial = reloader.latest()
    assert after.chain != before.chain
    assert after.chain == Path(tls.cert_file).read_bytes() == files["tls/tls.crt"]


def kubelet_swap(directory: Path, files: dict[str, bytes]) -> None:
    """Kubelet's atomic update of a mounted volume: a new timestamped directory, ``..data`` renamed over
    to point at it, the old directory removed."""
    old = (directory / "..data").resolve()
    stamp = directory / "..2026_01_02_00_00_00.000000000"
    for relative, content in files.items():
        target = stamp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    (directory / "..data_tmp").symlink_to(stamp.name)
    (directory / "..data_tmp").rename(directory / "..data")
    shutil.rmtree(old)


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_a_host_no_proxy_lists_is_denied_not_judged_by_another_proxy(build: str, tmp_path: Path) -> None:
    """Istio names no proxy: the policy chooses by host, and a policy's only (or default) proxy decides
    every host. The shared policy must leave an unknown host without a proxy (403 no_policy)."""
    from extauthz.core.authorizer import select_proxy
    from extauthz.core.request import HttpRequest

    policy, _, _ = extauthz_policy(with_issued_secrets(objects(build)), build, tmp_path)
    assert select_proxy(policy, HttpRequest("GET", "/v1/orders", host="unlisted.example.com")) is None
    for proxy in policy.proxies:
        for host in proxy.hosts:
            assert select_proxy(policy, HttpRequest("GET", "/", host=f"{host.upper()}:443")) is proxy


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_redis_url_reaches_the_redis_of_the_build(build: str, tmp_path: Path) -> None:
    docs = with_issued_secrets(objects(build))
    policy, _, _ = extauthz_policy(docs, build, tmp_path)
    url = urlsplit(policy.relationship_cache.redis_url)
    assert url.scheme == "redis" and url.hostname and url.port
    # A short name resolves in the pod's own namespace; a longer one names its namespace second.
    name, _, rest = url.hostname.partition(".")
    service = the(docs, "Service", name, rest.split(".")[0] if rest else namespace_of(
        the(docs, "Deployment", EXTAUTHZ)))
    redis = the(docs, "Deployment", "extauthz-redis")
    assert selects({"matchLabels": service["spec"]["selector"]}, redis["spec"]["template"]["metadata"]["labels"])
    target = service_port(service, url.port)["targetPort"]
    assert port_number(container(docs, "redis", "extauthz-redis"), target) == int(
        option(container(docs, "redis", "extauthz-redis")["args"], "--port"))


# --- the shared service's pods ----------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_every_container_runs_restricted_with_requests_and_limits(build: str) -> None:
    for deployment in find(objects(build), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        check_restricted(pod)
        for c in pod["containers"]:
            for resource in ("cpu", "memory"):
                assert quantity(c["resources"]["requests"][resource]) <= quantity(c["resources"]["limits"][resource])


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_extauthz_probes_use_the_metrics_port_and_the_service_only_grpc(build: str) -> None:
    docs = objects(build)
    c = container(docs, "extauthz", EXTAUTHZ)
    metrics = int(option(c["args"], "--metrics-address").rpartition(":")[2])
    grpc = int(option(c["args"], "--grpc-address").rpartition(":")[2])
    assert option(c["args"], "--metrics-address").startswith("0.0.0.0:"), "kubelet probes the pod IP"
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert c[probe]["httpGet"]["path"] == path
        assert port_number(c, c[probe]["httpGet"]["port"]) == metrics
    service = the(docs, "Service", EXTAUTHZ)
    assert selects({"matchLabels": service["spec"]["selector"]},
                   the(docs, "Deployment", EXTAUTHZ)["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port_number(c, port["targetPort"]) == grpc
    assert port["name"].startswith("grpc"), "Istio reads the protocol (gRPC: HTTP/2) from the port's name"


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_the_autoscaler_owns_the_replicas_and_the_budget_leaves_enough(build: str) -> None:
    docs = objects(build)
    deployment = the(docs, "Deployment", EXTAUTHZ)
    hpa = the(docs, "HorizontalPodAutoscaler", EXTAUTHZ)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": EXTAUTHZ}
    assert namespace_of(the(docs, "HorizontalPodAutoscaler", EXTAUTHZ)) == namespace_of(deployment)
    assert "replicas" not in deployment["spec"], "kubectl apply would reset what the autoscaler chose"
    assert hpa["minReplicas"] >= 3 and hpa["maxReplicas"] > hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in c["resources"]["requests"], "CPU utilisation is a share of the request"
    pdb = the(docs, "PodDisruptionBudget", EXTAUTHZ)["spec"]
    assert selects(pdb["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert pdb["maxUnavailable"] < hpa["minReplicas"]


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_shutdown_drains_before_the_grace_period_ends(build: str, tmp_path: Path) -> None:
    docs = with_issued_secrets(objects(build))
    policy, _, _ = extauthz_policy(docs, build, tmp_path)
    pod = pod_spec(docs, EXTAUTHZ)
    sleep = container(docs, "extauthz", EXTAUTHZ)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > sleep + policy.server.drain_seconds


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_redis_is_a_bounded_cache_that_persists_nothing(build: str) -> None:
    c = container(objects(build), "redis", "extauthz-redis")
    args = c["args"]
    assert option(args, "--save") == "" and option(args, "--appendonly") == "no"
    assert option(args, "--maxmemory-policy") in ("allkeys-lru", "volatile-lru", "volatile-ttl", "allkeys-lfu")
    assert quantity(option(args, "--maxmemory").replace("mb", "Mi")) < quantity(c["resources"]["limits"]["memory"])


@pytest.mark.redis
@pytest.mark.parametrize("build", [SHARED])
def test_redis_runs_with_the_manifests_arguments_and_serves_the_cache(build: str, tmp_path: Path) -> None:
    """The real redis-server, started with the container's command and args (only its port, bind address
    and working directory moved to this machine), is the cache extauthz's client writes and reads."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (make test installs it)"
    docs = objects(build)
    c = container(docs, "redis", "extauthz-redis")
    assert c["command"] == ["redis-server"]
    port = free_port()
    # --dir must be the container's emptyDir (mapped to a directory here), Redis's working directory.
    data = option(c["args"], "--dir")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == data]
    assert "emptyDir" in next(v for v in pod_spec(docs, "extauthz-redis")["volumes"] if v["name"] == mount["name"])
    on_this_machine = {"--port": str(port), "--dir": str(tmp_path)}
    args = [on_this_machine.get(c["args"][i - 1], a) if i else a for i, a in enumerate(c["args"])]
    process = subprocess.Popen([binary, *args, "--bind", "127.0.0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        config = _redis_config(port, process)
        assert config == {"save": "", "appendonly": "no", "maxmemory": str(192 * 2**20),
                          "maxmemory-policy": "allkeys-lru", "protected-mode": "no"}

        async def round_trip() -> dict[str, tuple[bool, float]]:
            cache = RedisCache(f"redis://127.0.0.1:{port}/0", timeout_ms=200)
            try:
                cache.put("user:1#viewer#doc:1", True, 30)
                await cache.drain()
                return await cache.get_many(["user:1#viewer#doc:1"])
            finally:
                await cache.aclose()

        found = asyncio.run(round_trip())
        assert found["user:1#viewer#doc:1"][0] is True
    finally:
        stop_process(process)


def _redis_config(port: int, process: subprocess.Popen[bytes]) -> dict[str, str]:
    """CONFIG GET of the settings the manifest makes, over a plain socket once the server answers."""
    keys = ["save", "appendonly", "maxmemory", "maxmemory-policy", "protected-mode"]
    for _ in range(100):
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"redis-server refused the manifest's arguments:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                command = ["CONFIG", "GET", *keys]
                s.sendall(f"*{len(command)}\r\n".encode() + b"".join(
                    f"${len(w)}\r\n{w}\r\n".encode() for w in command))
                data = b""
                while data.count(b"\r\n") < 1 + 4 * len(keys):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            lines = data.decode().split("\r\n")
            values = [lines[i] for i in range(2, len(lines), 2)][: 2 * len(keys)]
            return dict(zip(values[0::2], values[1::2], strict=True))
        except OSError:
            time.sleep(0.05)
    raise AssertionError("redis-server did not answer")


# --- who may connect ----------------------------------------------------------------------------------------


def gateway_pod(docs: list[dict[str, Any]], build: str) -> tuple[str, dict[str, str]]:
    if build == EG:
        return envoy_gateway_pod(the(docs, "Gateway"))
    assert build == ISTIO
    return ISTIO_GATEWAY


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_network_policy_admits_the_gateway_on_grpc_and_monitoring_on_metrics_only(build: str) -> None:
    docs = objects(build)
    deployment = the(docs, "Deployment", EXTAUTHZ)
    (policy,) = policies_for(docs, deployment)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    c = container(docs, "extauthz", EXTAUTHZ)
    grpc, metrics = port_number(c, "grpc"), port_number(c, "metrics")
    neighbour = (namespace_of(deployment), {"app.kubernetes.io/name": "something-else"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert not admits(policy, deployment, grpc, neighbour), "a pod of the same namespace is no gateway"
    assert not admits(policy, deployment, grpc, prometheus)
    assert admits(policy, deployment, metrics, prometheus)
    assert not admits(policy, deployment, metrics, neighbour)
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without peers or ports admits everyone or all"
    if build == SHARED:
        # The base admits no gateway until an overlay says which: nothing carries its placeholder labels.
        assert not admits(policy, deployment, grpc, ISTIO_GATEWAY)
        assert not admits(policy, deployment, grpc, (EG_NAMESPACE, {"app.kubernetes.io/name": "envoy"}))
        return
    gateway = gateway_pod(docs, build)
    assert admits(policy, deployment, grpc, gateway)
    assert not admits(policy, deployment, metrics, gateway)
    other_gateway = (gateway[0], {**gateway[1], "gateway.envoyproxy.io/owning-gateway-name": "other",
                                  "istio": "egressgateway"})
    assert not admits(policy, deployment, grpc, other_gateway), "only this gateway's pods"


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_only_extauthz_reaches_redis(build: str) -> None:
    """An entry in the cache is an authorization answer: writing it would grant access."""
    docs = objects(build)
    redis = the(docs, "Deployment", "extauthz-redis")
    (policy,) = policies_for(docs, redis)
    port = port_number(container(docs, "redis", "extauthz-redis"), "redis")
    namespace = namespace_of(redis)
    extauthz_labels = the(docs, "Deployment", EXTAUTHZ)["spec"]["template"]["metadata"]["labels"]
    assert admits(policy, redis, port, (namespace, extauthz_labels))
    assert not admits(policy, redis, port, (namespace, {"app.kubernetes.io/name": "other"}))
    assert not admits(policy, redis, port, ("orders", extauthz_labels)), "an extauthz look-alike elsewhere"


def test_the_sample_api_behind_envoy_gateway_admits_only_the_gateway() -> None:
    """Off the sidecar, the application listens on its pod IP: only the Gateway's Envoy may reach it."""
    docs = objects(EG)
    api = the(docs, "Deployment", "orders-api", "orders")
    (policy,) = policies_for(docs, api)
    port = port_number(container(docs, "app", "orders-api"), "http")
    assert admits(policy, api, port, gateway_pod(docs, EG))
    assert not admits(policy, api, port, ("orders", {"app.kubernetes.io/name": "curl"}))
    assert not admits(policy, api, port, ("extauthz", the(docs, "Deployment", EXTAUTHZ)["spec"]["template"]
                                          ["metadata"]["labels"]))


# --- certificates --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", SHARED_BUILDS)
def test_the_serving_certificate_names_the_service_in_its_namespace(build: str) -> None:
    docs = objects(build)
    certificate = serving_certificate(docs)
    service = the(docs, "Service", EXTAUTHZ)
    name = f"{service['metadata']['name']}.{namespace_of(service)}.svc"
    assert {name, f"{name}.cluster.local"} <= set(certificate["spec"]["dnsNames"])
    assert "server auth" in certificate["spec"]["usages"]
    assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Always"


def client_certificate(docs: list[dict[str, Any]], secret: str, namespace: str) -> dict[str, Any]:
    (certificate,) = [c for c in find(docs, "Certificate", namespace=namespace) if c["spec"]["secretName"] == secret]
    return certificate


def assert_client_certificate_from_the_same_issuer(docs: list[dict[str, Any]], secret: str, namespace: str) -> None:
    """extauthz's clientCaFile is its own Secret's ca.crt: the issuing CA. A client certificate must come
    from the same issuer (a ClusterIssuer, since the namespaces differ) and be meant for client auth."""
    client = client_certificate(docs, secret, namespace)
    server = serving_certificate(docs)
    assert client["spec"]["issuerRef"] == server["spec"]["issuerRef"]
    assert server["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    assert "client auth" in client["spec"]["usages"]


# --- Envoy Gateway ------------------------------------------------------------------------------------------


def eg_backend_refs(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(policy, backendRef) of the SecurityPolicy's ext_authz and the EnvoyExtensionPolicy's ext_proc."""
    refs = [(p, r) for p in find(docs, "SecurityPolicy") for r in p["spec"]["extAuth"]["grpc"]["backendRefs"]]
    refs += [(p, r) for p in find(docs, "EnvoyExtensionPolicy") for e in p["spec"]["extProc"]
             for r in e["backendRefs"]]
    return refs


def test_envoy_gateway_policies_point_at_extauthz_grpc_port_through_a_reference_grant() -> None:
    docs = objects(EG)
    refs = eg_backend_refs(docs)
    assert len(refs) == 2
    grpc = int(option(container(docs, "extauthz", EXTAUTHZ)["args"], "--grpc-address").rpartition(":")[2])
    for policy, ref in refs:
        service = backend_service(docs, ref, namespace_of(policy))
        assert service["metadata"]["name"] == EXTAUTHZ
        target = service_port(service, ref["port"])["targetPort"]
        assert port_number(container(docs, "extauthz", EXTAUTHZ), target) == grpc
        if namespace_of(service) != namespace_of(policy):
            grants = [g for g in find(docs, "ReferenceGrant", namespace=namespace_of(service))
                      if any(f == {"group": "gateway.envoyproxy.io", "kind": policy["kind"],
                                   "namespace": namespace_of(policy)} for f in g["spec"]["from"])
                      and any(t["group"] == "" and t["kind"] == "Service" and t.get("name", EXTAUTHZ) == EXTAUTHZ
                              for t in g["spec"]["to"])]
            assert grants, f"{policy['kind']} in {namespace_of(policy)} may not use {namespace_of(service)}'s Service"


def test_envoy_gateway_policies_cover_the_route_and_fail_closed(tmp_path: Path) -> None:
    docs = with_issued_secrets(objects(EG))
    route = the(docs, "HTTPRoute")
    for kind in ("SecurityPolicy", "EnvoyExtensionPolicy"):
        policy = the(docs, kind)
        assert policy["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                                 "name": route["metadata"]["name"]}]
        assert namespace_of(policy) == namespace_of(route), "targetRefs are local to the policy's namespace"
    ext_auth = the(docs, "SecurityPolicy")["spec"]["extAuth"]
    assert ext_auth["failOpen"] is False and ext_auth["statusOnError"] == 503
    assert ext_auth["timeout"] == "1s", "the sidecar's Envoy waits 1 s too (Envoy Gateway's default is 10 s)"
    headers = ext_auth.get("headersToExtAuth")
    assert headers is None or "authorization" in [h.lower() for h in headers]
    loaded, _, _ = extauthz_policy(docs, EG, tmp_path)
    (extension,) = ext_auth["contextExtensions"]
    assert extension["name"] == "proxy" and extension["type"] == "Value"
    chosen = loaded.proxy_named(extension["value"])
    assert chosen is not None, "the route names a proxy the policy lacks (every request 403 no_policy)"
    assert set(route["spec"]["hostnames"]) <= set(chosen.hosts), \
        "Istio-style selection by host would pick another proxy than the route names"
    gateway = the(docs, "Gateway")
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == gateway["metadata"]["name"]
    assert parent["sectionName"] in {li["name"] for li in gateway["spec"]["listeners"]}
    for ref in (r for rule in route["spec"]["rules"] for r in rule["backendRefs"]):
        service = backend_service(docs, ref, namespace_of(route))
        api = the(docs, "Deployment", service["metadata"]["name"], namespace_of(service))
        assert selects({"matchLabels": service["spec"]["selector"]}, api["spec"]["template"]["metadata"]["labels"])
        app = container(docs, "app", "orders-api")
        assert port_number(app, service_port(service, ref["port"])["targetPort"]) == int(option(app["args"], "--port"))


def test_envoy_gateway_ext_proc_is_the_sidecars_with_a_buffered_response_body() -> None:
    (ext_proc,) = the(objects(EG), "EnvoyExtensionPolicy")["spec"]["extProc"]
    shipped = shipped_ext_proc()
    assert ext_proc["failOpen"] is False and shipped["failure_mode_allow"] is False
    assert ext_proc["statusOnError"] == 503 and shipped["status_on_error"] == {"code": "ServiceUnavailable"}
    assert ext_proc["messageTimeout"] == shipped["message_timeout"] == "2s"
    mode = ext_proc["processingMode"]
    assert "request" not in mode, "request headers and bodies are not extauthz's business here"
    assert mode["response"]["body"] == "Buffered"
    assert mode["response"]["attributes"] == shipped["response_attributes"]
    assert mode["allowModeOverride"] is shipped["allow_mode_override"] is True
    assert ext_proc["metadata"]["accessibleNamespaces"] == \
        shipped["metadata_options"]["forwarding_namespaces"]["untyped"] == ["envoy.filters.http.ext_authz"]
    assert "writableNamespaces" not in ext_proc["metadata"]


def test_envoy_gateway_buffers_what_extauthz_may_filter(tmp_path: Path) -> None:
    """The response body is buffered for ext_proc within the listener's buffer: Envoy Gateway's default
    (32 KiB) would turn every larger response of the route into an error."""
    docs = with_issued_secrets(objects(EG))
    gateway = the(docs, "Gateway")
    (client,) = [p for p in find(docs, "ClientTrafficPolicy", namespace=namespace_of(gateway))
                 if {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                     "name": gateway["metadata"]["name"]} in p["spec"]["targetRefs"]]
    policy, _, _ = extauthz_policy(docs, EG, tmp_path)
    assert quantity(client["spec"]["connection"]["bufferLimit"]) >= policy.server.max_body_bytes
    assert client["spec"]["path"] == {"escapedSlashesAction": "UnescapeAndRedirect", "disableMergeSlashes": False}


def test_envoy_gateway_talks_mtls_to_extauthz() -> None:
    docs = objects(EG)
    service = the(docs, "Service", EXTAUTHZ)
    (btls,) = [p for p in find(docs, "BackendTLSPolicy", namespace=namespace_of(service))
               if {"group": "", "kind": "Service", "name": EXTAUTHZ} in p["spec"]["targetRefs"]]
    validation = btls["spec"]["validation"]
    certificate = serving_certificate(docs)
    assert validation["hostname"] in certificate["spec"]["dnsNames"]
    (ca,) = validation["caCertificateRefs"]
    assert (ca["kind"], ca["name"]) == ("Secret", certificate["spec"]["secretName"]), \
        "the CA that issued extauthz's certificate (the Secret's ca.crt)"
    backend = the(docs, "Gateway")["spec"]["tls"]["backend"]["clientCertificateRef"]
    assert backend.get("kind", "Secret") == "Secret" and "namespace" not in backend
    assert_client_certificate_from_the_same_issuer(docs, backend["name"], namespace_of(the(docs, "Gateway")))


# --- Istio ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [ISTIO, IN_POD])
def test_mesh_config_patch_is_istios_mesh_config(build: str) -> None:
    proto = crd_validation.parse_proto(MESH_PROTO.read_text())
    values = mesh_config(build)
    assert set(values) == {"meshConfig"}
    assert crd_validation.check_proto_json(values["meshConfig"], "MeshConfig", proto) == []
    for entry in values["meshConfig"]["extensionProviders"]:
        grpc = entry["envoyExtAuthzGrpc"]
        assert grpc["failOpen"] is False and grpc["statusOnError"] == "503" and grpc["timeout"] == "1s"
        assert "includeRequestBodyInCheck" not in grpc


def test_the_mesh_config_check_refuses_a_misspelt_field_and_a_wrong_type() -> None:
    proto = crd_validation.parse_proto(MESH_PROTO.read_text())
    good = mesh_config(ISTIO)["meshConfig"]
    cases: list[tuple[str, Any, str]] = [
        ("failopen", False, "unknown field"), ("port", "9001", "expected uint32"), ("timeout", "1 second", "duration"),
        ("includeRequestBodyInCheck", {"maxRequestBytes": "8k"}, "expected uint32"),
    ]
    for key, value, words in cases:
        bad = copy.deepcopy(good)
        bad["extensionProviders"][0]["envoyExtAuthzGrpc"][key] = value
        problems = crd_validation.check_proto_json(bad, "MeshConfig", proto)
        assert len(problems) == 1 and words in problems[0].message, problems


def test_istio_gateway_authorizes_every_request_through_extauthz_over_mtls() -> None:
    docs = objects(ISTIO)
    service = the(docs, "Service", EXTAUTHZ)
    host = f"{service['metadata']['name']}.{namespace_of(service)}.svc.cluster.local"
    grpc = provider(ISTIO, "extauthz")
    assert grpc["service"] == host
    port = service_port(service, grpc["port"])
    assert port_number(container(docs, "extauthz", EXTAUTHZ), port["targetPort"]) == \
        int(option(container(docs, "extauthz", EXTAUTHZ)["args"], "--grpc-address").rpartition(":")[2])

    gateway_namespace, gateway_labels = ISTIO_GATEWAY
    authz = the(docs, "AuthorizationPolicy")
    assert namespace_of(authz) == gateway_namespace and selects(authz["spec"]["selector"], gateway_labels)
    assert authz["spec"]["action"] == "CUSTOM" and authz["spec"]["provider"]["name"] == "extauthz"
    assert authz["spec"]["rules"] == [{}], "a narrower rule would let what it misses skip authorization"

    rule = the(docs, "DestinationRule")
    assert rule["spec"]["host"] == host and namespace_of(rule) == gateway_namespace
    assert rule["spec"]["exportTo"] == ["."]
    tls = rule["spec"]["trafficPolicy"]["tls"]
    assert tls["mode"] == "MUTUAL"
    names = serving_certificate(docs)["spec"]["dnsNames"]
    assert tls["sni"] in names and set(tls["subjectAltNames"]) <= set(names)
    # Istio reads credentialName from the gateway's own namespace.
    assert_client_certificate_from_the_same_issuer(docs, tls["credentialName"], gateway_namespace)

    envoy_filter = the(docs, "EnvoyFilter")
    assert namespace_of(envoy_filter) == gateway_namespace
    assert selects({"matchLabels": envoy_filter["spec"]["workloadSelector"]["labels"]}, gateway_labels)
    assert envoy_filter["spec"]["configPatches"][0]["match"]["context"] == "GATEWAY"
    cluster = ext_proc_patch(envoy_filter)["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert cluster == f"outbound|{grpc['port']}||{host}", "the cluster the DestinationRule's mTLS applies to"


def test_istio_leaves_extauthz_out_of_the_mesh() -> None:
    """extauthz terminates the gateway's mTLS itself: an injected istio-proxy would take its TLS for gRPC."""
    docs = objects(ISTIO)
    assert the(docs, "Namespace", "extauthz")["metadata"]["labels"]["istio-injection"] == "disabled"
    for name in (EXTAUTHZ, "extauthz-redis"):
        labels = the(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert labels["sidecar.istio.io/inject"] == "false"


def test_istio_in_pod_reaches_the_extauthz_socket_of_its_own_pod() -> None:
    docs = objects(IN_POD)
    deployment = the(docs, "Deployment", IN_POD_DEPLOYMENT)
    pod = deployment["spec"]["template"]
    socket_path = option(container(docs, "extauthz")["args"], "--grpc-address").removeprefix("unix:")

    grpc = provider(IN_POD, "extauthz-in-pod")
    entry = the(docs, "ServiceEntry")
    assert entry["spec"]["hosts"] == [grpc["service"]] and entry["spec"]["exportTo"] == ["."]
    assert namespace_of(entry) == namespace_of(deployment)
    (port,) = entry["spec"]["ports"]  # Istio: exactly one service port with a Unix endpoint
    assert port["number"] == grpc["port"] and port["protocol"] == "GRPC"
    (endpoint,) = entry["spec"]["endpoints"]
    assert endpoint == {"address": f"unix://{socket_path}"}, "a Unix endpoint carries no ports"
    assert entry["spec"]["resolution"] == "STATIC"

    # istio-proxy mounts the socket's volume, read-only; the app does not mount it at all.
    mounts = yaml.safe_load(pod["metadata"]["annotations"]["sidecar.istio.io/userVolumeMount"])
    volume = next(m["name"] for m in container(docs, "extauthz")["volumeMounts"]
                  if socket_path.startswith(m["mountPath"].rstrip("/") + "/"))
    assert mounts == {volume: {"mountPath": str(Path(socket_path).parent), "readOnly": True}}
    assert volume not in {m["name"] for m in container(docs, "app").get("volumeMounts", [])}
    assert "emptyDir" in next(v for v in pod["spec"]["volumes"] if v["name"] == volume)
    # extauthz makes the socket 0660 in its group; istio-proxy (user 1337) is in the pod's fsGroup.
    sc = {**pod["spec"]["securityContext"], **container(docs, "extauthz").get("securityContext", {})}
    assert sc["runAsGroup"] == pod["spec"]["securityContext"]["fsGroup"]

    labels = pod["metadata"]["labels"]
    authz = the(docs, "AuthorizationPolicy")
    assert selects(authz["spec"]["selector"], labels) and authz["spec"]["action"] == "CUSTOM"
    assert authz["spec"]["provider"]["name"] == "extauthz-in-pod" and authz["spec"]["rules"] == [{}]
    envoy_filter = the(docs, "EnvoyFilter")
    assert selects({"matchLabels": envoy_filter["spec"]["workloadSelector"]["labels"]}, labels)
    assert envoy_filter["spec"]["configPatches"][0]["match"]["context"] == "SIDECAR_INBOUND"
    cluster = ext_proc_patch(envoy_filter)["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert cluster == f"outbound|{grpc['port']}||{grpc['service']}"

    # istio-proxy forwards to the pod IP: the Service's port must land on the app, listening there.
    service = the(docs, "Service", IN_POD_DEPLOYMENT)
    (service_port_entry,) = service["spec"]["ports"]
    app = container(docs, "app")
    listen = option(app["args"], "-listen")
    assert port_number(app, service_port_entry["targetPort"]) == int(listen.rpartition(":")[2])
    assert not listen.startswith("127.0.0.1"), "istio-proxy forwards inbound requests to the pod IP"
    # Prometheus scrapes extauthz's metrics port past istio-proxy, as it does in the sidecar base: through
    # istio-proxy, the CUSTOM policy would send each scrape to extauthz for a token.
    metrics = option(container(docs, "extauthz")["args"], "--metrics-address").rpartition(":")[2]
    assert pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeInboundPorts"] == metrics
    assert the(docs, "Namespace", "orders")["metadata"]["labels"]["istio-injection"] == "enabled"


@pytest.mark.envoy
@pytest.mark.parametrize("build", [ISTIO, IN_POD])
def test_envoy_filter_value_is_an_ext_proc_config_envoy_accepts(build: str, tmp_path: Path) -> None:
    """Istio hands the EnvoyFilter's value to Envoy as it is: the real Envoy validates it, inserted before the
    router as the patch says, on a cluster of the name Istio gives the provider's host and port."""
    value = ext_proc_patch(the(objects(build), "EnvoyFilter"))
    config = value["typed_config"]
    shipped = shipped_ext_proc()
    for key in ("failure_mode_allow", "status_on_error", "message_timeout", "allow_mode_override",
                "response_attributes", "metadata_options"):
        assert config[key] == shipped[key], f"{key} differs from envoy/envoy.yaml's"
    assert config["processing_mode"] == {**shipped["processing_mode"], "response_body_mode": "BUFFERED"}
    cluster = config["grpc_service"]["envoy_grpc"]["cluster_name"]
    bootstrap = {
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                                 ".v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
                        "http_filters": [value, {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    }}]}],
            }],
            "clusters": [{
                "name": cluster, "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9001}}}}]}]},
            }],
        },
    }
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    result = validate_envoy_config(path)
    assert result.returncode == 0, result.stdout + result.stderr
    # And a misspelt field in the value is refused, so the check above can fail.
    config["processing_mode"]["response_body_mod"] = "BUFFERED"
    path.write_text(yaml.safe_dump(bootstrap))
    assert validate_envoy_config(path).returncode != 0


def test_the_custom_resources_in_the_docs_validate_against_their_crds() -> None:
    """docs/gateways.md shows resources to apply by hand (the private CA): those with a pinned CRD are checked."""
    text = (REPO / "docs" / "gateways.md").read_text()
    checked = 0
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and "kind" in doc and crd_validation.is_custom(doc):
                crd_validation.validate(doc)
                checked += 1
    assert checked >= 1


# --- the images -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_images_are_pinned(build: str) -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for deployment in find(objects(build), "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            image = c["image"]
            assert re.search(r":[^/:]+$", image) and not image.endswith(":latest"), image
            if c["name"] == "extauthz" or image.rpartition(":")[0].endswith("extauthz"):
                assert image.endswith(f"extauthz:{version}"), f"{image} is not the image of this source"


# --- the fixtures and the validator ---------------------------------------------------------------------------


def fixture_table() -> dict[str, str]:
    """path -> sha256, from the fixtures' README."""
    text = (CRDS / "README.md").read_text()
    return dict(re.findall(r"^\| `([^`]+)` \|[^|]*\|[^|]*\| `([0-9a-f]{64})` \|$", text, re.M))


def test_the_crd_fixtures_are_the_files_the_readme_names() -> None:
    table = fixture_table()
    on_disk = {str(p.relative_to(CRDS)) for p in CRDS.rglob("*") if p.is_file() and p.name != "README.md"}
    assert set(table) == on_disk
    for relative, digest in table.items():
        assert hashlib.sha256((CRDS / relative).read_bytes()).hexdigest() == digest, \
            f"{relative} differs from the upstream file the README names"


def every_custom_resource() -> list[tuple[str, str, int]]:
    return [(build, f"{d['kind']}/{d['metadata']['name']}", i) for build in BUILDS
            for i, d in enumerate(objects(build)) if crd_validation.is_custom(d)]


def _set(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


_WRONG_TYPE = {"string": 7, "integer": "7", "number": "7", "boolean": "true", "object": ["x"], "array": {"x": 1}}


@pytest.mark.parametrize(("build", "name", "index"), every_custom_resource(),
                         ids=[f"{b}:{n}" for b, n, _ in every_custom_resource()])
def test_every_field_of_every_custom_resource_is_checked(build: str, name: str, index: int) -> None:
    """At every node of the resource: a field the CRD does not declare, a value outside an enum and a value
    of another type are each refused, at that node. This is what makes the validation above worth anything."""
    original = objects(build)[index]
    assert crd_validation.check(original).violations == []
    mutations = 0
    for path, value, schema in list(crd_validation.nodes(original)):
        where = crd_validation._dotted(path)
        cases: list[tuple[tuple[str | int, ...], Any, str]] = []
        if isinstance(value, dict) and crd_validation.closed(schema):
            cases.append(((*path, "misspeltField"), True, crd_validation._dotted((*path, "misspeltField"))))
        if "enum" in schema and isinstance(value, str):
            cases.append((path, value + "X", where))
        if schema.get("type") in _WRONG_TYPE and not schema.get("x-kubernetes-int-or-string"):
            cases.append((path, _WRONG_TYPE[schema["type"]], where))
        for target, bad, expected in cases:
            mutated = copy.deepcopy(original)
            _set(mutated, target, bad)
            found = [v.path for v in crd_validation.check(mutated).violations]
            assert expected in found, f"{name}: {target} = {bad!r} was not refused at {expected} ({found})"
            mutations += 1
    assert mutations >= 5, f"{name}: too few fields to prove anything ({mutations})"


# Named cases a reader recognises: one misspelt field, one wrong enum, one wrong type per overlay.
NAMED = [
    (EG, "SecurityPolicy", ("spec", "extAuth", "failopen"), False, "unknown field (did you mean 'failOpen'?)"),
    (EG, "EnvoyExtensionPolicy", ("spec", "extProc", 0, "processingMode", "response", "body"), "Buffer",
     "is not one of"),
    (EG, "SecurityPolicy", ("spec", "extAuth", "failOpen"), "false", "expected boolean, found a string"),
    (EG, "BackendTLSPolicy", ("spec", "validation", "hostName"), "x", "unknown field (did you mean 'hostname'?)"),
    (EG, "ClientTrafficPolicy", ("spec", "connection", "bufferLimit"), "1 MiB", "does not match"),
    (ISTIO, "AuthorizationPolicy", ("spec", "action"), "Custom", "is not one of"),
    (ISTIO, "DestinationRule", ("spec", "trafficPolicy", "tls", "credentialname"), "x", "unknown field"),
    (ISTIO, "EnvoyFilter", ("spec", "configPatches", 0, "applyTo"), "HTTP_FILTERS", "is not one of"),
    (ISTIO, "AuthorizationPolicy", ("spec", "rules"), {}, "expected array, found an object"),
    (IN_POD, "ServiceEntry", ("spec", "ports", 0, "number"), "9001", "expected integer, found a string"),
    (IN_POD, "ServiceEntry", ("spec", "resolution"), "STATIC_IP", "is not one of"),
    (IN_POD, "EnvoyFilter", ("spec", "workloadSelecter"), {}, "unknown field"),
    (SHARED, "Certificate", ("spec", "usages", 0), "serverauth", "is not one of"),
    (SHARED, "Certificate", ("spec", "dnsName"), [], "unknown field (did you mean 'dnsNames'?)"),
    (SHARED, "Certificate", ("spec", "privateKey", "size"), "256", "expected integer, found a string"),
]


@pytest.mark.parametrize(("build", "kind", "path", "value", "words"), NAMED,
                         ids=[f"{b}:{k}:{'.'.join(map(str, p))}" for b, k, p, _, _ in NAMED])
def test_the_crd_check_rejects(build: str, kind: str, path: tuple[str | int, ...], value: Any, words: str) -> None:
    doc = the(objects(build), kind)
    _set(doc, path, value)
    with pytest.raises(crd_validation.CrdValidationError) as caught:
        crd_validation.validate(doc)
    assert any(words in v.message and v.path == crd_validation._dotted(path) for v in caught.value.violations), \
        str(caught.value)


def test_the_crd_check_rejects_an_unserved_version_and_an_unknown_kind() -> None:
    policy = the(objects(EG), "SecurityPolicy")
    policy["apiVersion"] = "gateway.envoyproxy.io/v1"
    assert "not served" in crd_validation.check(policy).violations[0].message
    policy["apiVersion"], policy["kind"] = "gateway.envoyproxy.io/v1alpha1", "SecurityPolicie"
    assert "no CRD" in crd_validation.check(policy).violations[0].message
    route = the(objects(EG), "HTTPRoute")
    route["metadata"]["nmae"] = "x"
    route["metadata"]["name"] = "Orders_API"
    found = {str(v) for v in crd_validation.check(route).violations}
    assert any("metadata.nmae: unknown field" in f for f in found) and any("not a DNS subdomain" in f for f in found)


@pytest.mark.parametrize(("schema", "good", "bad", "words"), [
    ({"type": "object", "additionalProperties": {"type": "integer"}}, {"a": 1}, {"a": "1"}, "expected integer"),
    ({"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
     {"a": "x", "anything": {"goes": 1}}, {"a": 1}, "expected string"),
    ({"type": "object", "properties": {"p": {"x-kubernetes-int-or-string": True,
                                             "anyOf": [{"type": "integer"}, {"type": "string"}]}}},
     {"p": "80%"}, {"p": 1.5}, "integer or a string"),
    ({"type": "object", "properties": {"p": {"x-kubernetes-int-or-string": True}}}, {"p": 80}, {"p": True},
     "integer or a string"),
    ({"type": "string", "pattern": "^[a-z]+$"}, "abc", "ABC", "does not match"),
    ({"type": "string", "minLength": 2, "maxLength": 3}, "ab", "abcd", "longer than"),
    ({"type": "integer", "minimum": 1, "maximum": 65535}, 443, 0, "below the minimum"),
    ({"type": "integer", "format": "int32"}, 2**31 - 1, 2**31, "does not fit int32"),
    ({"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}}, {"a": "x"}, {}, "required"),
    ({"type": "object", "properties": {"a": {"type": "string"}}}, {"a": "x"}, {"a": None}, "null is not allowed"),
    ({"type": "object", "properties": {"a": {"type": "string", "nullable": True}}}, {"a": None}, {"a": 1},
     "expected string"),
    ({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
      "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
     [{"name": "a"}, {"name": "b"}], [{"name": "a"}, {"name": "a"}], "duplicate entry"),
    ({"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}, ["a", "b"], ["a", "a"],
     "duplicate item"),
    ({"type": "array", "maxItems": 1, "items": {"type": "string"}}, ["a"], ["a", "b"], "at most 1"),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
      "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}, {"a": "x"}, {"a": "x", "b": "y"}, "exclusive"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "not": {"required": ["a"]}}, {}, {"a": "x"},
     "forbidden"),
    ({"type": "string", "format": "byte"}, "aGk=", "not base64!", "base64"),
    ({"type": "string", "format": "ipv4"}, "10.0.0.1", "::1", "ipv4"),
    ({"type": "boolean"}, False, 0, "expected boolean"),
    ({"type": "integer"}, 1, True, "expected integer"),
])
def test_the_validator_applies_each_schema_rule(schema: dict[str, Any], good: Any, bad: Any, words: str) -> None:
    assert crd_validation.check_value(good, schema) == []
    problems = crd_validation.check_value(bad, schema)
    assert any(words in p.message for p in problems), problems


def test_cel_rules_are_counted_not_evaluated() -> None:
    """The one part of a CRD the validator skips (CEL); the count says how much went unchecked."""
    skipped = sum(crd_validation.check(d).cel_rules_skipped for build in BUILDS for d in objects(build)
                  if crd_validation.is_custom(d))
    assert skipped > 0
