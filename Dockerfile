# mvi-node container image.
#   docker build -t mvi-node .
#   docker run -d -p 11112:11112 -p 9464:9464 -v mvi-data:/var/lib/mvi-node \
#       -v $PWD/site.toml:/etc/mvi-node/node.toml:ro mvi-node
# GPU hosts: --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 (python3.11 is
# installed on it below) and docker run --gpus all.
#
# Reproducible builds: every Python package comes from requirements.lock at its version and
# hash (`make lock` re-resolves it). Base images go by tag unless pinned by digest: pass
#   --build-arg BASE_DIGEST=sha256:…     (python:3.11-slim-bookworm, both stages)
#   --build-arg RUNTIME_DIGEST=sha256:…  (the BASE of the runtime stage, when it is another image)
# `docker buildx imagetools inspect python:3.11-slim-bookworm` prints the current digest.
ARG BASE=python:3.11-slim-bookworm
ARG BASE_DIGEST=
ARG RUNTIME_DIGEST=${BASE_DIGEST}

FROM python:3.11-slim-bookworm${BASE_DIGEST:+@${BASE_DIGEST}} AS build
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/mvi-node \
 && /opt/mvi-node/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/mvi-node/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY node node
COPY model model
COPY dicom_sr dicom_sr
COPY config config
RUN /opt/mvi-node/bin/pip install --no-cache-dir --no-deps .

FROM ${BASE}${RUNTIME_DIGEST:+@${RUNTIME_DIGEST}} AS runtime
# A CUDA base has no Python 3.11; the slim Python base already has it at the same path.
RUN if [ ! -x /usr/local/bin/python3.11 ]; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 \
      && ln -s /usr/bin/python3.11 /usr/local/bin/python3.11 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/mvi-node /opt/mvi-node
COPY config/node.toml /etc/mvi-node/node.toml
RUN useradd --system --uid 10001 --home-dir /var/lib/mvi-node --create-home --shell /usr/sbin/nologin mvi \
 && chown -R mvi:mvi /var/lib/mvi-node
ENV PATH=/opt/mvi-node/bin:$PATH \
    MVI_CONFIG=/etc/mvi-node/node.toml \
    MVI_NODE__DATA_DIR=/var/lib/mvi-node \
    MVI_METRICS__PORT=9464 \
    XDG_CACHE_HOME=/var/lib/mvi-node/cache \
    PYTHONUNBUFFERED=1
USER mvi
VOLUME ["/var/lib/mvi-node"]
# DICOM, then Prometheus /metrics and /healthz.
EXPOSE 11112 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3.11", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["mvi-node"]
CMD ["serve"]
