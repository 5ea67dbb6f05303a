# The planner sidecar image: `pipeweaver serve` with the `server` extra (OR-Tools, numba, Prometheus client), no torch.
#
#   docker build -t pipeweaver-planner:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9464:9464 pipeweaver-planner:0.1.0 --workers 3
#
# Python packages come pinned from deploy/docker/requirements.txt (scripts/lock_server_image.sh writes it).
# Kubernetes manifests that run this image as a native sidecar are in deploy/ (see deploy/README.md).
# No Docker engine runs on the development or CI machines: CI lints this file with hadolint, it does not build it.

# ---- build: a virtual environment in /opt/venv with the pinned packages and the pipeweaver wheel ----
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The build backend lives in the builder's own Python only; it never reaches the image.
RUN pip install --no-cache-dir hatchling==1.33.0 \
 && python -m venv /opt/venv

COPY deploy/docker/requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: -r /tmp/requirements.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeweaver ./pipeweaver
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/pipeweaver-*.whl \
 && /opt/venv/bin/pip check

# ---- runtime: the same base (the venv's interpreter path must match), the venv, a non-root user ----
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="pipeweaver-planner" \
      org.opencontainers.image.description="PipeWeaver per-batch pipeline schedule planner (gRPC sidecar)" \
      org.opencontainers.image.licenses="Apache-2.0"

# NUMBA_CACHE_DIR: numba compiles its kernels on the first start and caches them here; Kubernetes mounts an
# emptyDir on it (the root filesystem is read-only there). MPLCONFIGDIR: matplotlib's cache, on /tmp for the
# same reason. PIPEWEAVER_HOST: a container is reached on its own network namespace, never its loopback (kubelet's
# gRPC probes dial the pod IP), so bind every address; the Kubernetes manifests restrict who may connect.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/var/cache/pipeweaver/numba \
    MPLCONFIGDIR=/tmp/matplotlib \
    PROMETHEUS_DISABLE_CREATED_SERIES=true \
    PIPEWEAVER_HOST=0.0.0.0

COPY --from=builder /opt/venv /opt/venv
# A numeric user (no passwd entry needed), so Kubernetes' runAsNonRoot can verify it without resolving a name.
RUN install -d -m 0755 -o 10001 -g 10001 /var/cache/pipeweaver /var/cache/pipeweaver/numba
USER 10001:10001

# 50051: gRPC (pipeweaver.v1.PlannerService, grpc.health.v1.Health, reflection); 9464: Prometheus /metrics.
EXPOSE 50051 9464
# Exec form, so SIGTERM reaches the server (graceful shutdown); arguments after the image name are flags of
# `pipeweaver serve`. No HEALTHCHECK: Kubernetes ignores it and probes the gRPC health service instead.
ENTRYPOINT ["pipeweaver", "serve"]
