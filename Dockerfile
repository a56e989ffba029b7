# Two variants, chosen at build time (default: cpu):
#   docker build -t dataengine .                                  # CPU only: torch's CPU wheels, faiss-cpu
#   docker build -t dataengine:cuda --build-arg VARIANT=cuda .    # CUDA: torch's CUDA wheels, faiss on the GPU
# TORCH_INDEX is where the CPU variant takes torch and torchvision from.
FROM python:3.11-slim
ARG VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/dataengine
COPY pyproject.toml README.md ./
COPY dataengine ./dataengine
COPY indexes ./indexes
COPY trainer ./trainer
RUN set -e; \
    case "$VARIANT" in \
      cpu) pip install "torch<=2.14.1" "torchvision<=0.29.1" --index-url "$TORCH_INDEX" && pip install . ;; \
      cuda) pip install . && pip install --no-deps faiss-gpu-cu12 && pip uninstall -y faiss-cpu ;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1 ;; \
    esac
WORKDIR /work
ENTRYPOINT ["dataengine"]
CMD ["--help"]
