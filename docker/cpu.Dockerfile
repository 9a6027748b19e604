# kdtoolkit on CPU: installs the CPU build of torch and kdtoolkit, runs the built-in demo (teacher ->
# student -> distill -> ONNX -> ONNX Runtime -> bundle), verifies the bundle and classifies its
# reference images with the bundle's numpy + pillow + onnxruntime script.
#
#   docker build -f docker/cpu.Dockerfile -t kdtoolkit:cpu .
#   docker run --rm -v "$PWD/runs:/runs" kdtoolkit:cpu            # demo -> /runs/demo, then verify + infer
#   docker run --rm -v "$PWD/runs:/runs" kdtoolkit:cpu kdtoolkit --help
# Never built on the project's machines (no Docker engine there); see docs/docker.md.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KDTOOLKIT_CACHE=/tmp/kdtoolkit-cache

# torch first, from the CPU wheel index (the default index would pull the multi-GB CUDA build)
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.3,<2.15"

WORKDIR /opt/kdtoolkit
COPY pyproject.toml README.md ./
COPY kdtoolkit ./kdtoolkit
COPY deploy ./deploy
RUN pip install .

# bundles copy the deploy scripts from here (a wheel install does not carry deploy/)
ENV KDTOOLKIT_DEPLOY_DIR=/opt/kdtoolkit/deploy

WORKDIR /runs
# demo run -> its bundle verified -> the deploy script (numpy + pillow + onnxruntime) on the reference images
CMD ["sh", "-c", "set -e; kdtoolkit demo --out /runs/demo; kdtoolkit verify /runs/demo/compress/bundle; python /opt/kdtoolkit/deploy/infer_onnx.py /runs/demo/compress/bundle /runs/demo/compress/bundle/reference/images"]
