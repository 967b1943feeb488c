# The CPU server image: `sparseinfer serve` with the bundled ReLU² model, as a non-root user.
#   docker build -t sparseinfer:0.1.0 .
#   docker run --rm -p 50051:50051 -p 8000:8000 sparseinfer:0.1.0
# It lives at the root because its build context is the whole checkout (server, client, csrc, setup.py) and
# Docker reads .dockerignore from the context's root. Kubernetes manifests: deploy/k8s/; docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the README's install, compiled here so that the runtime image carries no compiler ----
FROM ${PYTHON_IMAGE} AS build

# g++ builds sparseinfer._C. Debian's own version for this release is the one wanted; pinning it would only
# break the build when the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# The README's first command, torch from the CPU wheel index (PyPI's Linux wheel would pull in CUDA), with
# the build tools pinned to the versions the project is built with. Before the COPY: this layer outlives
# source edits.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install setuptools==84.2.1 wheel==0.48.0 ninja==1.13.2 pybind11==3.1.0

WORKDIR /src
COPY . .
# The README's second command, not editable: the packages (and the bundled model, package data of
# sparseinfer) are copied into the venv, so the runtime stage needs nothing from /src.
RUN pip install --no-build-isolation ./client .

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric id, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 sparseinfer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sparseinfer

COPY --from=build /opt/venv /opt/venv

# Everything the server writes at run time goes under /tmp (matplotlib's font cache, torch's scratch
# directory), so the root filesystem can be mounted read-only (deploy/k8s/deployment.yaml).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TMPDIR=/tmp

USER 10001
# gRPC (the server's default --port) and the OpenAI HTTP API, whose /metrics Prometheus scrapes.
EXPOSE 50051 8000

# For `docker run`: healthy while the server answers grpc.health.v1 (draining too; the CLI prints the status
# and fails only when nothing answers). Kubernetes ignores this and runs its own gRPC probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["sparseinfer-client", "--target", "127.0.0.1:50051", "--timeout", "2", "health"]

# SIGTERM drains for --grace-period (10 s) and the server exits by itself; `docker stop -t 15` gives it time.
ENTRYPOINT ["sparseinfer", "serve"]
# --host 0.0.0.0: the default 127.0.0.1 is unreachable from outside the container. --threads 1: torch would
# otherwise start a thread per host core, whatever CPU the container is given (docs/deployment.md).
CMD ["--host", "0.0.0.0", "--http-port", "8000", "--sparsity", "predicted", "--threads", "1"]
