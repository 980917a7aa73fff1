# syntax=docker/dockerfile:1
# The extauthz sidecar image:   docker build -t extauthz:0.1.0 .
# (The Kubernetes quickstart also runs its demo IdP and sample API from it:
# `extauthz demo-idp`, `extauthz demo-api`.)
# Slim Python; the project and its dependencies installed from wheels built in a
# throw-away stage (no compilers or caches in the image); a numeric non-root
# user, so Kubernetes can verify runAsNonRoot. The process writes nothing to
# disk (bytecode is compiled at install time, logs go to stdout), so the root
# filesystem can be mounted read-only.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY extauthz ./extauthz
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheels are bind-mounted from the build stage, so they add no layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels extauthz
# The same uid:gid as the pod's securityContext (runAsUser/runAsGroup 65532).
USER 65532:65532
# --metrics-address: /metrics, /healthz, /readyz (the probes and Prometheus).
# The gRPC port (9001) is bound to 127.0.0.1 for Envoy in the same pod only; the Kubernetes
# manifests give Envoy a Unix socket in a volume only the two share (docs/kubernetes.md).
EXPOSE 9090
ENTRYPOINT ["extauthz"]
CMD ["serve", "--config", "/etc/extauthz/policy.yaml", "--grpc-address", "127.0.0.1:9001", \
     "--metrics-address", "0.0.0.0:9090"]
