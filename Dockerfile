# The bptvlm inference server. CPU by default; the GPU override (docker-compose.gpu.yml) reserves a GPU
# and the same image uses it when the CUDA build of torch is installed (TORCH_INDEX below).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# CPU wheels by default; for a GPU image build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY bptvlm ./bptvlm
COPY server ./server
COPY client ./client
COPY shared ./shared
RUN pip install ".[postgres]" && useradd --create-home --uid 1000 bptvlm \
    && mkdir -p /cache/huggingface /runs && chown -R bptvlm /cache /runs

USER bptvlm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"
ENTRYPOINT ["bptvlm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "embedded"]
