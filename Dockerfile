# syntax=docker/dockerfile:1
# recsys: one image for every tier (`recsys serve all|gateway|retrieval|ranking|online-train`).
#   docker build -t recsys:cpu .                          CPU torch and faiss-cpu (default)
#   docker build -t recsys:gpu --build-arg VARIANT=gpu .  CUDA base, CUDA torch, faiss-gpu
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS python-cpu
# The CPU build of torch, so the image carries no CUDA libraries.
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    FAISS_PACKAGE=""

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS python-gpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
    FAISS_PACKAGE=faiss-gpu-cu12

FROM python-${VARIANT} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# faiss-cpu is a dependency; the GPU build swaps it for faiss-gpu (both provide the module `faiss`).
RUN pip install . \
 && if [ -n "${FAISS_PACKAGE}" ]; then pip uninstall -y faiss-cpu && pip install "${FAISS_PACKAGE}"; fi

FROM python-${VARIANT} AS runtime
RUN groupadd --system --gid 10001 recsys \
 && useradd --system --uid 10001 --gid recsys --no-create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECSYS_ARTIFACTS=/artifacts \
    RECSYS_HTTP_PORT=8000 \
    RECSYS_GRPC_PORT=50051
USER 10001:10001
# Writable paths are mounts (/artifacts, /tmp), so the root filesystem can be read-only.
WORKDIR /tmp
EXPOSE 8000 50051
# grpc.health.v1 of whichever tier runs (the gateway may use `service.probe http`).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "service.probe", "grpc"]
ENTRYPOINT ["recsys"]
CMD ["serve", "all"]
