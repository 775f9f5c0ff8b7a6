# The bptvlm image: the inference server (`bptvlm serve`, the default command) and the tuning client
# (`bptvlm tune`), with the embedded CLIP inside. Three stages: `deps` (a venv with torch and the declared
# dependencies: the big layer, rebuilt only when pyproject.toml or the build args change), `wheel` (the
# project itself) and the final image (the venv copied in, the wheel installed, a non-root user).
#
# Build args (README "Containers" says when to use which):
#   BASE_IMAGE     python:3.11-slim; any Debian-like image with Python >= 3.11 and venv works (the smoke
#                  script uses one it makes from Debian's packages with debootstrap)
#   TORCH_VERSION  2.13.0
#   TORCH_INDEX    where torch comes from: the CPU wheels by default; https://download.pytorch.org/whl/cu128
#                  for a GPU image; empty: from docker-extra/wheels/ (a local wheel folder) or the pip index
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   a package mirror for everything else (default: PyPI);
#                  PIP_DEFAULT_TIMEOUT (60 s) for a slow proxy
#   INSTALL_EXTRA_CA  1: also trust docker-extra/ca.crt in the final image (default 0: used by pip at build
#                  time only)
# Optional build-context files (git ignores docker-extra/): docker-extra/ca.crt, an extra CA bundle for a
# TLS-inspecting proxy; docker-extra/wheels/*.whl, wheels pip may take before its index (e.g. torch).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL
ARG INSTALL_EXTRA_CA=0
ARG PIP_DEFAULT_TIMEOUT=60
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# The glob copies docker-extra/'s files when the folder exists and nothing when it does not.
COPY pyproject.toml docker-extr[a] /tmp/build/
RUN set -eu; cd /tmp/build; \
    if [ -f ca.crt ]; then cat /etc/ssl/certs/ca-certificates.crt ca.crt > bundle.crt; export PIP_CERT=/tmp/build/bundle.crt; fi; \
    if [ -d wheels ]; then export PIP_FIND_LINKS=/tmp/build/wheels; fi; \
    mkdir /opt/trust; if [ "$INSTALL_EXTRA_CA" = 1 ]; then \
        [ -f ca.crt ] || { echo "INSTALL_EXTRA_CA=1 needs docker-extra/ca.crt in the build context" >&2; exit 1; }; \
        cp ca.crt /opt/trust/bptvlm-extra-ca.crt; fi; \
    python3 -m venv /opt/venv; \
    pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}; \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > requirements.txt; \
    pip install -r requirements.txt "setuptools>=68" wheel; \
    rm -rf /tmp/build

FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bptvlm ./bptvlm
COPY server ./server
COPY client ./client
COPY shared ./shared
RUN pip wheel --no-deps --no-build-isolation -w /wheel .

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface
COPY --from=deps /opt/trust/ /usr/local/share/ca-certificates/
RUN set -eu; if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then update-ca-certificates; fi; \
    useradd --create-home --uid 1000 bptvlm; \
    mkdir -p /cache/huggingface /runs /ledger; chown bptvlm /cache/huggingface /runs /ledger
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheel /tmp/wheel
RUN pip install --no-cache-dir --no-deps --disable-pip-version-check /tmp/wheel/*.whl && rm -rf /tmp/wheel
WORKDIR /runs
USER bptvlm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"
ENTRYPOINT ["bptvlm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "embedded"]
