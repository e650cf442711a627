# The phi3flow image: the project and its pinned environment, for the nightly `main` chain
# (k8s/cronjob-main.yaml) and for serving the champion (k8s/deployment-serve.yaml, the default command).
# Build: docker build -t phi3flow:0.1.0 .
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # The Hugging Face cache (fetch_model downloads here): a volume in k8s/cronjob-main.yaml
    HF_HOME=/cache/huggingface \
    # The steps' cache of fetched model files (docs/disk.md): on the same volume, so a rerun downloads nothing
    PHI3FLOW_CACHE_DIR=/cache/phi3flow \
    PHI3FLOW_ENV_MANAGER=local

WORKDIR /app

# Dependencies first, so code changes reuse this layer. torch from PyTorch's CPU index: the
# default wheel on PyPI is the multi-GB CUDA build. `pip install .` then finds torch==2.13.0
# satisfied (2.13.0+cpu) and installs the other pins of pyproject.toml.
COPY pyproject.toml README.md ./
COPY phi3flow/ phi3flow/
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir .

COPY MLproject python_env.yaml conda.yaml ./
COPY steps/ steps/
COPY data/ data/
COPY scripts/ scripts/

# A non-root user that owns only the cache; the code stays read-only to it.
RUN useradd --create-home --uid 10001 phi3 \
    && mkdir -p /cache/huggingface \
    && chown -R phi3:phi3 /cache
USER 10001

EXPOSE 8000
# `serve` answers GET /health with 200 once the model is loaded (a large model loads for minutes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
CMD ["python", "-m", "steps.serve", "--model-uri", "models:/phi3-onnx@champion", "--host", "0.0.0.0", "--port", "8000"]
