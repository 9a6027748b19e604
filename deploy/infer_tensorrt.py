#!/usr/bin/env python3
"""Classify an image or a folder with a kdtoolkit bundle's TensorRT engine (numpy + pillow + tensorrt + cuda-python or pycuda).

Reads everything from the bundle's manifest.json, like infer_onnx.py. Written against the
TensorRT 8.5 to 10.x public API with named tensors (set_input_shape, set_tensor_address,
execute_async_v3); device memory through cuda-python (``cuda.bindings.runtime`` or the older
``cuda.cudart``) or, failing that, pycuda.

    python infer_tensorrt.py BUNDLE IMAGE_OR_FOLDER [--engine model/model.plan] [--json]

The engine must have been built on this device (bash build_on_device.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_onnx import list_images, load_manifest, preprocess, softmax  # noqa: E402  (numpy + pillow only)


class _CudaPython:
    """Device memory and a stream through cuda-python (what TensorRT's own samples use since 10.14)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())

    def _ok(self, res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def alloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(1, nbytes))))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    @property
    def handle(self) -> int:
        return int(self.stream)

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))


class _PyCuda:
    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401  (creates the context)
        import pycuda.driver as cuda

        self.cuda = cuda
        self.stream = cuda.Stream()
        self._mem: dict[int, object] = {}

    def alloc(self, nbytes: int) -> int:
        mem = self.cuda.mem_alloc(max(1, nbytes))
        self._mem[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        self._mem.pop(ptr, None)

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(ptr, host, self.stream)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self.cuda.memcpy_dtoh_async(host, ptr, self.stream)

    @property
    def handle(self) -> int:
        return self.stream.handle

    def sync(self) -> None:
        self.stream.synchronize()


def cuda_adapter():
    try:
        return _CudaPython()
    except ImportError:
        try:
            return _PyCuda()
        except ImportError:
            sys.exit("error: install cuda-python (pip install cuda-python) or pycuda for device memory")


class EngineRunner:
    """One engine, one execution context; named input/output tensors; dynamic batch via set_input_shape."""

    def __init__(self, plan: Path) -> None:
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            sys.exit(f"error: TensorRT {trt.__version__} cannot load {plan}: engines are tied to the GPU and TensorRT version; "
                     "rebuild it here with build_on_device.sh")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.cuda = cuda_adapter()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        trt, eng, ctx, cu = self.trt, self.engine, self.context, self.cuda
        name = self.inputs[0]
        x = np.ascontiguousarray(x.astype(trt.nptype(eng.get_tensor_dtype(name))))
        if not ctx.set_input_shape(name, tuple(x.shape)):
            raise SystemExit(f"error: the engine does not accept input shape {x.shape} for {name} (outside its optimisation profile)")
        ptrs = [cu.alloc(x.nbytes)]
        ctx.set_tensor_address(name, ptrs[0])
        cu.htod(ptrs[0], x)
        hosts = {}
        for out in self.outputs:
            shape = tuple(ctx.get_tensor_shape(out))
            host = np.empty(shape, dtype=trt.nptype(eng.get_tensor_dtype(out)))
            ptr = cu.alloc(host.nbytes)
            ptrs.append(ptr)
            ctx.set_tensor_address(out, ptr)
            hosts[out] = (host, ptr)
        try:
            if not ctx.execute_async_v3(cu.handle):
                raise SystemExit("error: TensorRT execute_async_v3 failed")
            for host, ptr in hosts.values():
                cu.dtoh(host, ptr)
            cu.sync()
        finally:
            for p in ptrs:
                cu.free(p)
        return {k: h for k, (h, _) in hosts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--engine", default=None, help="plan file relative to the bundle (default: the manifest's, else model/model.plan)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batch", type=int, default=0)
    args = ap.parse_args(argv)

    m = load_manifest(args.bundle)
    plan = args.bundle / (args.engine or m["runtime"].get("engine") or "model/model.plan")
    if not plan.is_file():
        sys.exit(f"error: no engine at {plan}; build it on this device first: bash {args.bundle / 'build_on_device.sh'}")
    pre, classes = m["preprocessing"], m["classes"]
    inp = m["inputs"][0]
    static = isinstance(inp["shape"][0], int)
    batch = inp["shape"][0] if static else (args.batch or m["profile"]["batch"]["max"])
    runner = EngineRunner(plan)
    out_name = m["outputs"][0]["name"]
    results = []
    files = list_images(args.images)
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        x = np.stack([preprocess(f, pre) for f in chunk])
        n = len(chunk)
        if static and n < batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), np.float32)])
        outs = runner(x)
        logits = (outs.get(out_name) if out_name in outs else next(iter(outs.values())))[:n].astype(np.float64)
        prob = softmax(logits)
        for f, z, p in zip(chunk, logits, prob):
            k = int(np.argmax(z))
            results.append({"path": str(f), "index": k, "label": classes[k], "score": float(p[k])})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}\t{r['label']}\t{r['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
