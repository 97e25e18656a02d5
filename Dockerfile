# CUDA training image, a separate target: `docker build --target train-cuda -t xray-train:cuda .`
# then `docker run --gpus all --shm-size 2g -e XRAY_STORAGE_URI=s3://... xray-train:cuda train --config configs/config.yaml`
# (the loader processes hand batches over in /dev/shm, which Docker caps at 64 MB by default)
# trains with torchrun on every GPU of the machine (README.md, "Distributed training").
# PyPI's torch wheels are CUDA builds that carry their CUDA libraries; the host's
# NVIDIA driver comes in through the container toolkit (--gpus).
FROM python:3.11.17-slim-trixie AS train-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true
WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
 && python -c "import torch; assert torch.version.cuda, 'a CPU torch in the CUDA image'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
COPY . .
RUN groupadd --gid 10001 xray \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin xray \
 && mkdir -p /app/store /app/artifacts /app/bentoml_home \
 && chown 10001:10001 /app/store /app/artifacts /app/bentoml_home
USER 10001:10001
ENV BENTOML_HOME=/app/bentoml_home
ENTRYPOINT ["torchrun", "--standalone", "--nproc_per_node", "gpu", "-m", "xray"]

# xray service image (the default target, built last): FastAPI on $PORT (8080 here, the
# App Runner default), CPU only.
# No model weights are baked in: at start the app pulls the production model from
# $XRAY_STORAGE_URI (see README.md, "Deploy to AWS").
FROM python:3.11.17-slim-trixie AS serve

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true

WORKDIR /app

# Dependencies, in their own layer so code changes do not reinstall them.
# 1. torch and torchvision at the versions requirements.txt pins, from PyTorch's CPU
#    index: App Runner has no GPU, and the CPU wheels carry no CUDA libraries.
#    Both come from the same index so that they pair (a CPU torch with the PyPI
#    torchvision fails at import).
# 2. everything else in requirements.txt, from PyPI, with those two left out so the
#    CPU builds stay in place.
# 3. fail the build if a CUDA build, an NVIDIA library or a test tool got in anyway
#    (requirements.txt is the runtime; tests and tools are in requirements-dev.txt).
COPY requirements.txt ./
RUN grep -E '^(torch|torchvision)==' requirements.txt > /tmp/requirements-torch-cpu.txt \
 && test "$(wc -l < /tmp/requirements-torch-cpu.txt)" -eq 2 \
 && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements-torch-cpu.txt \
 && grep -vE '^(torch|torchvision)==' requirements.txt > /tmp/requirements-rest.txt \
 && pip install --no-cache-dir -r /tmp/requirements-rest.txt \
 && python -c "import torch, torchvision; assert torch.version.cuda is None, torch.__version__; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
 && if pip list --format=freeze | grep -i '^nvidia-'; then echo 'NVIDIA/CUDA packages found in a CPU image' >&2; exit 1; fi \
 && if pip list --format=freeze | grep -iE '^(moto|pytest|selenium|ruff|ipykernel)=='; then echo 'test tools found in the runtime image' >&2; exit 1; fi \
 && rm /tmp/requirements-torch-cpu.txt /tmp/requirements-rest.txt

COPY . .

# A non-root user; it may write only to the folders the service writes at run time
# (local store, pipeline artifacts, BentoML home) and its own home (caches).
RUN groupadd --gid 10001 xray \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin xray \
 && mkdir -p /app/store /app/artifacts /app/bentoml_home \
 && chown 10001:10001 /app/store /app/artifacts /app/bentoml_home

# Numeric, so platforms that insist on a non-root user can check it without /etc/passwd.
USER 10001:10001

ENV PORT=8080 \
    BENTOML_HOME=/app/bentoml_home \
    XRAY_CONFIG=configs/config.yaml

EXPOSE 8080

# Liveness: /health answers 200 while the process serves HTTP, model or not, so an
# instance waiting for storage is not restarted in a loop. Readiness (/ready: 200 only
# with a model loaded) is for the load balancer: App Runner's health check asks it.
# slim has no curl: ask with Python's urllib (an HTTP error or a refused connection
# raises, so the check fails).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]

# bash runs the script, so it works even where git lost the executable bit; the
# script ends in `exec python app.py`, so python becomes PID 1 and gets SIGTERM.
CMD ["bash", "scripts/start_up.sh"]
