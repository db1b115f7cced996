# The cache server and the trainer in one image. CPU torch by default; for NVIDIA GPUs build with
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# (or use docker-compose.gpu.yml, which does that).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY cache_server cache_server
COPY trainer trainer
RUN pip install --no-cache-dir torch --index-url ${TORCH_INDEX} \
 && pip install --no-cache-dir ".[ray]" \
 && rm -rf /src

RUN useradd --create-home --uid 1000 app && mkdir -p /data /runs && chown app:app /data /runs
USER app
WORKDIR /home/app
EXPOSE 8000
CMD ["cache-server", "--host", "0.0.0.0", "--port", "8000", "--store", "/data/store"]
