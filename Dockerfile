# nemo_kd on NVIDIA's PyTorch container: the container's CUDA torch, Transformer Engine and apex,
# plus the project's pins (megatron-core 0.16.1, nemo_toolkit[core,common-only] 3.0.0) with their
# dependencies resolved by pip around the container's stack.
#
#   docker build -t nemo_kd .
#   docker run --gpus all --ipc=host nemo_kd bash scripts/container_check.sh --require-te   # the GPU + TE check
#   docker run --gpus all --ipc=host -v $PWD/data:/data nemo_kd \
#       torchrun --nproc_per_node=8 examples/train_gpt_kd.py --config-name gpt_kd
#   Multi-node: examples/slurm/*.sbatch with CONTAINER=<this image>.
#
# Base image: nvcr.io/nvidia/pytorch:25.12-py3. From NVIDIA's "PyTorch Release 25.12" release notes
# (docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-25-12.html, dated 2025-12-22):
#
#   | component          | 25.12                                                                   |
#   |--------------------|-------------------------------------------------------------------------|
#   | Python             | 3.12 (torch installed in /usr/local/lib/python3.12/dist-packages)       |
#   | PyTorch            | 2.10.0a0+b4e4ee81d3                                                     |
#   | CUDA               | 13.1.0                                                                  |
#   | Transformer Engine | in the image; its version is not in the copy of the notes read here     |
#   | apex               | in the image; its version is not in the copy of the notes read here     |
#   | pip constraints    | /etc/pip/constraint.txt (since 25.03): every Python package of the image |
#
# The TE and apex versions of the built image are printed by the check at the end of this file
# (`container_check: transformer_engine ...`, `apex ...`) and kept in /opt/nemo_kd/container_check.txt.
# megatron-core 0.16.1 publishes a cp312 manylinux_2_28 x86_64 wheel and nemo_toolkit 3.0.0 a
# py3-none-any wheel (checked with `pip download --python-version 3.12 --only-binary=:all:`); both
# require torch>=2.6.0, which the image's 2.10.0a0 satisfies (pip accepts an installed pre-release).
#
# Not built in this project's CI: there is no Docker daemon and no access to nvcr.io there. What the
# image runs at build time (scripts/container_check.sh) is run in the CPU test suite in a venv
# (tests/test_container_check.py).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# NVIDIA's constraints file pins every Python package the image was built with (the release notes:
# remove a pin only to override it; other versions are not tested in the image), and the image's
# environment points PIP_CONSTRAINT at it. The install below keeps those pins, so pip resolves
# NeMo's and Megatron's dependencies around them, backtracking unpinned packages (transformers,
# torchmetrics...) to versions that fit. If a dependency cannot fit (pip's ResolutionImpossible
# names the package), relax that pin only:
#   docker build --build-arg NGC_PIP_RELAX="regex safetensors" -t nemo_kd .
# The GPU stack (torch, TE, apex, triton, flash-attn, NVIDIA's CUDA wheels) can never be relaxed.
ARG NGC_PIP_RELAX=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1

WORKDIR /opt/nemo_kd
COPY pyproject.toml setup.py README.md requirements.txt ./
COPY nemo_kd ./nemo_kd
COPY conf ./conf
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY scripts ./scripts

# 1. The constraints of the install: the container's GPU stack as installed (stack-pins.txt, taken
#    before anything changes) plus NVIDIA's file less the NGC_PIP_RELAX names (constraints.txt).
ARG STACK_RE='^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn|nvidia[-_][-_a-z0-9]+|cuda[-_]python|cuda[-_]bindings)=='
RUN python -m pip list --format=freeze | grep -iE "${STACK_RE}" > stack-pins.txt \
 && grep -qiE '^torch==' stack-pins.txt && cat stack-pins.txt \
 && ngc="${PIP_CONSTRAINT:-/etc/pip/constraint.txt}" && : > constraints.txt \
 && if [ -f "$ngc" ]; then \
      relax=$(for n in ${NGC_PIP_RELAX}; do printf '%s|' "$(echo "$n" | sed 's/[-_.]/[-_.]/g')"; done); \
      if [ -n "$relax" ]; then \
        if grep -iE "^(${relax%|})==" stack-pins.txt; then echo "NGC_PIP_RELAX names the GPU stack" >&2; exit 1; fi; \
        grep -viE "^(${relax%|})[[:space:]]*[=<>!~]" "$ngc" > constraints.txt || true; \
      else cp "$ngc" constraints.txt; fi; \
    else echo "no NVIDIA constraints file at $ngc: the GPU stack pins only"; fi \
 && cat stack-pins.txt >> constraints.txt

# 2. nemo_kd with its dependencies resolved: megatron-core==0.16.1 (pyproject), the `nemo` extra
#    (nemo_toolkit[core,common-only]==3.0.0), `hf` (transformers, tokenizers, sentencepiece,
#    safetensors) and `test` (pytest, matplotlib: the main job's loss curves). Not `kernels`: triton
#    comes with the container's torch.
RUN PIP_CONSTRAINT=/opt/nemo_kd/constraints.txt python -m pip install --no-cache-dir -e ".[nemo,hf,test]"

# 3. The GPU stack is still the one the image shipped: every distribution of stack-pins.txt is
#    installed at the same version (new packages may be added; none may be replaced or removed).
RUN python -m pip list --format=freeze | grep -iE "${STACK_RE}" | sort > /tmp/stack-after.txt \
 && changed=$(sort stack-pins.txt | comm -23 - /tmp/stack-after.txt) \
 && if [ -n "$changed" ]; then echo "the install replaced or removed part of the GPU stack: $changed" >&2; exit 1; fi

# 4. Versions, every nemo_kd module imported, a 2-step training smoke. A build has no GPU: the smoke
#    runs Megatron's CPU path (TE and apex hidden from it, their fused kernels are CUDA-only), and the
#    TE smoke waits for `docker run --gpus all nemo_kd bash scripts/container_check.sh --require-te`.
RUN bash scripts/container_check.sh --python python | tee /opt/nemo_kd/container_check.txt
