# syntax=docker/dockerfile:1
# recsys: one image for every tier. CPU torch by default.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU build of torch, so the image does not carry CUDA libraries.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install .

FROM ${PYTHON_IMAGE} AS runtime
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
WORKDIR /tmp
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"RECSYS_HTTP_PORT\"]}/readyz', timeout=2)"]
ENTRYPOINT ["recsys"]
CMD ["serve"]
