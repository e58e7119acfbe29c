# nemo_kd on NVIDIA's NeMo container (GPU: CUDA torch, transformer-engine, apex already inside).
# Not built or run in this project's CI (no GPU, no container registry there): see README.
#   docker build -t nemo_kd .
#   docker run --gpus all --ipc=host -v $PWD/data:/data nemo_kd \
#       torchrun --nproc_per_node=8 examples/train_gpt_kd.py --config-name gpt_kd
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:25.09
FROM ${NEMO_IMAGE}

WORKDIR /opt/nemo_kd
COPY pyproject.toml setup.py README.md ./
COPY nemo_kd ./nemo_kd
COPY conf ./conf
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY scripts ./scripts

# The container already provides torch, megatron-core, NeMo, TE and apex matched to its CUDA;
# install only our package (no dependency resolution, so nothing in the image is replaced).
RUN pip install --no-cache-dir --no-deps -e . && \
    python -c "import nemo_kd, megatron.core; print('nemo_kd', nemo_kd.__version__, 'megatron-core', megatron.core.__version__)"
# transformer-engine is inside the image: select it per run with
#   model.student.transformer_impl=transformer_engine (training) / the checkpoint's config (teachers).
# Multi-node: examples/slurm/*.sbatch with CONTAINER=<this image>.
