# syntax=docker/dockerfile:1
# The one image of the system: every component is `iot run ...` of this image (deploy/).
# Multi-arch by construction (linux/arm64 for the Raspberry Pi cluster, linux/amd64): nothing
# below names an architecture; build with
#   docker buildx build --platform linux/arm64,linux/amd64 -t REGISTRY/iot-backend:VERSION --push .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with the project and its dependencies ---------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# A compiler only for a dependency without a wheel for the target platform; it stays here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/iot
WORKDIR /src
# README.md: pyproject.toml names it as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY iot ./iot
COPY infra ./infra
COPY domain ./domain
COPY commands ./commands
COPY projections ./projections
COPY bridges ./bridges
COPY gateway ./gateway
COPY analytics ./analytics
RUN /opt/iot/bin/pip install --no-compile . \
 && /opt/iot/bin/python -m compileall -q /opt/iot/lib

# --- runtime: Python, the venv, pg_dump/pg_restore for `iot backup`/`iot restore`, no compiler -
FROM ${PYTHON_IMAGE} AS runtime
# postgresql-client-15 matches the cluster's PostgreSQL 15 (pg_dump refuses older servers only).
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 iot \
 && useradd --system --uid 10001 --gid iot --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin iot
COPY --from=build /opt/iot /opt/iot
ENV PATH=/opt/iot/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IOT_HTTP_HOST=0.0.0.0
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080 8081 8082 8083 8084
ENTRYPOINT ["iot"]
CMD ["--help"]
