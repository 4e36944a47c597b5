# The ftw training worker as a RunPod serverless image.
#   docker build -t ftw-train .
# CUDA runtime base + Python 3.12; torch from PyTorch's CUDA 12.8 wheel index (pinned), then ftw's
# pinned direct dependencies (requirements.txt) on top. The worker process (handler.py) never
# imports torch; the preprocess/train children do. Everything that grows lives on the network
# volume: run folders, prepared-data caches and the local store under BASE_VOLUME, and the
# Hugging Face caches under HF_HOME, so a retried job on another worker finds them again.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

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
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV

RUN pip install torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt bitsandbytes==0.50.2  # QLoRA and 8-bit optimizers (CUDA only)

COPY pyproject.toml handler.py ./
COPY schemas/ schemas/
COPY worker/ worker/
COPY kernels/ kernels/
COPY examples/ examples/
RUN pip install --no-deps -e . && python -c "import handler, worker.job.pipeline"

# The SDK's heartbeat and job loop; SIGTERM (preemption) reaches the handler, which lets training
# save a checkpoint before the container goes.
STOPSIGNAL SIGTERM
CMD ["python", "-u", "handler.py"]
