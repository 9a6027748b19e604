# kdtoolkit on an x86 NVIDIA GPU with TensorRT: builds and runs real engines (`kdtoolkit build`,
# TrtRunner) and runs the real-TensorRT tests.
#
# Base: NVIDIA's TensorRT container 24.12 (TensorRT 10.7, CUDA 12.6, Python 3.12). For another
# TensorRT, change the tag (24.05 -> TensorRT 10.0.1, 25.xx -> newer); kdtoolkit reads the installed
# version and takes the matching build path (builder flags below 11, strongly typed from 11).
#
#   docker build -f docker/tensorrt-x86.Dockerfile -t kdtoolkit:tensorrt .
#   docker run --rm --gpus all kdtoolkit:tensorrt                         # pytest -m tensorrt (the default command)
#   docker run --rm --gpus all -v "$PWD:/work" -w /work kdtoolkit:tensorrt \
#       kdtoolkit build runs/r1/06-optimize --profile desktop-gpu --out runs/r1/engine
#
# NEVER BUILT OR RUN: the project's development machines have no Docker engine and no NVIDIA GPU, so
# neither this image nor the tests it runs have been tried; see docs/docker.md for what is and is not known.
FROM nvcr.io/nvidia/tensorrt:24.12-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KDTOOLKIT_CACHE=/tmp/kdtoolkit-cache

# torch only exports ONNX here (TensorRT runs the engines): the CPU wheel keeps the image small
RUN python3 -m pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.3,<2.15"

WORKDIR /opt/kdtoolkit
COPY pyproject.toml README.md ./
COPY kdtoolkit ./kdtoolkit
COPY deploy ./deploy
COPY tests ./tests
# (not the [dev] extra: its tensorrt-stubs pins a TensorRT of its own; the type check runs in CI, not here)
# pycuda has no wheel: pip builds it, which needs nvcc on PATH and the CUDA headers (CUDA_INC_DIR)
ENV CUDA_ROOT=/usr/local/cuda \
    CUDA_INC_DIR=/usr/local/cuda/include \
    PATH=/usr/local/cuda/bin:${PATH}
# the [tensorrt] extra: tensorrt (pinned to the container's own, so pip keeps it) and pycuda (built
# against the container's CUDA); cuda-python as well, the binding TensorRT's samples use since 10.14,
# PINNED to the container's CUDA major: cuda-python 13.x needs a CUDA 13 driver (R580.65+), this image is CUDA 12.6
RUN TRT="$(python3 -c 'import tensorrt; print(tensorrt.__version__)')" \
 && echo "tensorrt==${TRT}" > /tmp/constraints.txt \
 && command -v nvcc && test -f "${CUDA_INC_DIR}/cuda.h" \
 && python3 -m pip install -c /tmp/constraints.txt ".[tensorrt]" "cuda-python>=12.6,<13" "pytest>=8" \
 && python3 -c "import tensorrt, kdtoolkit; print('TensorRT', tensorrt.__version__)"

ENV KDTOOLKIT_DEPLOY_DIR=/opt/kdtoolkit/deploy
# The documented test command: the real-TensorRT tests (build, run, compare with ONNX Runtime).
CMD ["python3", "-m", "pytest", "-m", "tensorrt", "tests/test_tensorrt_real.py", "tests/test_device_report.py", "-v"]
