# The ftw training worker as a RunPod serverless image.
#   docker build -t ftw-train .
# CUDA 13.0 runtime base + Python 3.12 (Ubuntu 24.04). Python packages: requirements-image.lock, the
# whole closure of requirements.txt + requirements-image.txt (torch 2.11.0, PyPI's CUDA 13.0 build,
# the build the GPU benchmarks ran on) resolved for linux x86_64 / Python 3.12 (`make image-lock`),
# installed without resolving again. The worker process (handler.py) never imports torch; the
# preprocess/train children do. Everything that grows lives on the network volume: run folders,
# prepared-data caches and the local store under BASE_VOLUME, and the Hugging Face caches under
# HF_HOME, so a retried job on another worker finds them again.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BASE_VOLUME=/runpod-volume \
    FTW_ALLOW_CPU=0 \
    HF_HOME=/runpod-volume/huggingface \
    HF_HUB_ENABLE_HF_TRANSFER=0 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# a switch of the tokenizers library, not a secret
# hadolint ignore=DL3064
ENV TOKENIZERS_PARALLELISM=false

# Ubuntu's archive keeps only the newest build of a package within a release, so a pinned apt version
# stops building once it is superseded; the base image's tag fixes the release. Triton compiles its
# launchers at run time: it needs the C compiler and the Python headers.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV

WORKDIR /app
COPY requirements-image.lock ./
RUN DS_BUILD_OPS=0 pip install --no-deps -r requirements-image.lock && pip check

COPY pyproject.toml handler.py ./
COPY schemas/ schemas/
COPY worker/ worker/
COPY kernels/ kernels/
COPY examples/ examples/
# kernels/ holds the package ftw_kernels (pyproject.toml maps it); `import kernels` stays Hugging Face's
RUN pip install --no-deps -e . && python -c "import handler, worker.job.pipeline, ftw_kernels.registry"

# The SDK's heartbeat and job loop; SIGTERM (preemption) reaches the handler, which lets training
# save a checkpoint before the container goes.
STOPSIGNAL SIGTERM
CMD ["python", "-u", "handler.py"]
