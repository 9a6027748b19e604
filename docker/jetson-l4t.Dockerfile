# kdtoolkit on a Jetson (Orin) with JetPack 6: builds engines on the device, GPU and DLA, and runs the
# real-TensorRT tests there. Engines are tied to the device and TensorRT version: build them here,
# on the Jetson that will run them.
#
# Base: l4t-jetpack r36.4.0 = JetPack 6.1 (L4T 36.4, TensorRT 10.3, CUDA 12.6, Python 3.10). For
# JetPack 6.0 use r36.3.0 (TensorRT 8.6); JetPack 5.x images (r35.x, TensorRT 8.5) work the same way.
# The L4T tag must match the Jetson's L4T release (cat /etc/nv_tegra_release).
#
#   docker build -f docker/jetson-l4t.Dockerfile -t kdtoolkit:jetson .           # on the Jetson
#   docker run --rm --runtime nvidia kdtoolkit:jetson                           # pytest -m tensorrt
#   docker run --rm --runtime nvidia -v "$PWD:/work" -w /work kdtoolkit:jetson \
#       kdtoolkit build runs/r1/06-optimize --profile jetson-agx-orin-dla --out runs/r1/engine-dla \
#       --calib-cache runs/r1/06-optimize/calibration.cache
#
# NEVER BUILT OR RUN: the project's development machines have no Docker engine, no NVIDIA GPU and no
# Jetson, so neither this image nor the tests it runs have been tried; see docs/docker.md.
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KDTOOLKIT_CACHE=/tmp/kdtoolkit-cache

RUN apt-get update && apt-get install -y --no-install-recommends python3-pip python3-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kdtoolkit
COPY pyproject.toml README.md ./
COPY kdtoolkit ./kdtoolkit
COPY deploy ./deploy
COPY tests ./tests
# (not the [dev] extra: its tensorrt-stubs pins a TensorRT of its own; the type check runs in CI, not here)
# TensorRT comes from JetPack (python3-libnvinfer), never from PyPI: the constraint pins the [tensorrt]
# extra's `tensorrt` to the installed one, so pip keeps JetPack's; pycuda builds against JetPack's CUDA.
# torch from PyPI (aarch64 CPU build) is enough here: it only exports ONNX; TensorRT runs the engines.
# pycuda has no aarch64 wheel: pip builds it against JetPack's CUDA, which needs nvcc and the headers.
# cuda-python, if wanted, must match JetPack 6's CUDA 12 (13.x needs a CUDA 13 driver): "cuda-python>=12.6,<13".
ENV CUDA_ROOT=/usr/local/cuda \
    CUDA_INC_DIR=/usr/local/cuda/include \
    PATH=/usr/local/cuda/bin:${PATH}
RUN TRT="$(python3 -c 'import tensorrt; print(tensorrt.__version__)')" \
 && echo "tensorrt==${TRT}" > /tmp/constraints.txt \
 && command -v nvcc && test -f "${CUDA_INC_DIR}/cuda.h" \
 && python3 -m pip install --upgrade pip \
 && python3 -m pip install -c /tmp/constraints.txt ".[tensorrt]" "pytest>=8" \
 && python3 -c "import tensorrt, kdtoolkit; print('TensorRT', tensorrt.__version__)"
# (pycuda is imported only at run time: its import needs the GPU, which `docker build` does not have)

ENV KDTOOLKIT_DEPLOY_DIR=/opt/kdtoolkit/deploy
# The documented test command: the real-TensorRT tests (build, run, compare with ONNX Runtime).
CMD ["python3", "-m", "pytest", "-m", "tensorrt", "tests/test_tensorrt_real.py", "tests/test_device_report.py", "-v"]
