# dnnpar on an NVIDIA GPU: the hand-written kernels in cuda/*.cu are compiled at run time by
# NVRTC through CuPy. The devel image carries NVRTC, the CUDA headers the kernels include and
# nvcc (for `dnnpar kernels`, the static ptxas report).
#
#   docker build -t dnnpar .
#   docker run --rm --gpus all dnnpar                 # dnnpar demo on the cuda backend
#   docker run --rm --gpus all dnnpar dnnpar kernels  # registers / spills / shared memory per kernel
#
# Without --gpus the demo falls back to the numpy backend and names it in its first line.
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive

# Python and g++ from Ubuntu 24.04, each pinned to its noble series: the trailing * lets apt take
# the newest security rebuild of that series, so a pin does not break when the archive drops an
# old one. g++ is nvcc's host compiler (`dnnpar kernels`) and builds the emu backend.
# Ubuntu 24.04 refuses pip installs into the system Python (PEP 668), hence the virtual env.
# The run-time user gets a fixed numeric id so `USER` resolves without /etc/passwd on the host.
ENV VIRTUAL_ENV=/opt/venv
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        'python3=3.12.3-*' \
        'python3-venv=3.12.3-*' \
        'g++=4:13.2.0-*' \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 10001 dnnpar \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --shell /bin/bash dnnpar

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The package from the build context (see .dockerignore) with the GPU extra: cupy-cuda13x
# matches this image's CUDA 13 (use "[cuda12]" on a CUDA 12 base image).
WORKDIR /opt/dnnpar
COPY . .
RUN pip install --no-cache-dir "/opt/dnnpar[cuda13]"

# An ordinary user; kernel caches (CuPy's NVRTC cache, the emu backend's builds) go to its home.
USER 10001:10001
WORKDIR /home/dnnpar

CMD ["dnnpar", "demo"]
