# mvi-node container image. Build: docker build -t mvi-node .
# GPU hosts: docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 ...
# (a CUDA base needs python3.11 installed on it; the slim Python base runs on CPU).
ARG BASE=python:3.11-slim-bookworm

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node node
COPY model model
COPY dicom_sr dicom_sr
COPY config config
RUN python -m venv /opt/mvi-node \
 && /opt/mvi-node/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/mvi-node/bin/pip install --no-cache-dir .

FROM ${BASE} AS runtime
COPY --from=build /opt/mvi-node /opt/mvi-node
COPY config/node.toml /etc/mvi-node/node.toml
RUN useradd --system --uid 10001 --home-dir /var/lib/mvi-node --create-home mvi \
 && chown -R mvi:mvi /var/lib/mvi-node
ENV PATH=/opt/mvi-node/bin:$PATH \
    MVI_CONFIG=/etc/mvi-node/node.toml \
    MVI_NODE__DATA_DIR=/var/lib/mvi-node \
    PYTHONUNBUFFERED=1
USER mvi
VOLUME ["/var/lib/mvi-node"]
EXPOSE 11112
ENTRYPOINT ["mvi-node"]
CMD ["config", "check"]
