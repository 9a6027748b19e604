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
# Not built on the project's development machines (no Docker engine there); standard steps only.
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
# the [tensorrt] extra: tensorrt (pinned to the container's own, so pip keeps it) and pycuda (built
# against the container's CUDA); cuda-python as well, the binding TensorRT's samples use since 10.14
RUN TRT="$(python3 -c 'import tensorrt; print(tensorrt.__version__)')" \
 && echo "tensorrt==${TRT}" > /tmp/constraints.txt \
 && python3 -m pip install -c /tmp/constraints.txt ".[tensorrt]" cuda-python "pytest>=8" \
 && python3 -c "import tensorrt, kdtoolkit; print('TensorRT', tensorrt.__version__)"

ENV KDTOOLKIT_DEPLOY_DIR=/opt/kdtoolkit/deploy
# The documented test command: the real-TensorRT tests (build, run, compare with ONNX Runtime).
CMD ["python3", "-m", "pytest", "-m", "tensorrt", "tests/test_tensorrt_real.py", "-v"]
