"""The Triton model repository entry (config.pbtxt)."""

from __future__ import annotations

from typing import Any


def _triton_config(name: str, platform: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                   batch: dict[str, int], static: bool, gpu: bool, labels: bool = True) -> str:
    """A Triton model configuration (protobuf text format, ModelConfig) for the bundle's model."""
    tmap = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "int32": "TYPE_INT32",
            "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
    batched = not static and all(isinstance(d["shape"][0], str) or d["shape"][0] is None for d in inputs)
    max_batch = batch["max"] if batched else 0

    def dims(d: dict[str, Any]) -> str:
        shp = d["shape"][1:] if batched else d["shape"]
        return ", ".join(str(s if isinstance(s, int) else -1) for s in shp)

    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}"]
    for key, items in (("input", inputs), ("output", outputs)):
        lines.append(f"{key} [")
        for i, d in enumerate(items):
            extra = '\n    label_filename: "labels.txt"' if key == "output" and i == 0 and labels else ""
            lines.append(f'  {{\n    name: "{d["name"]}"\n    data_type: {tmap[d["dtype"]]}\n    dims: [ {dims(d)} ]{extra}\n  }}'
                         + ("," if i < len(items) - 1 else ""))
        lines.append("]")
    if batched:
        preferred = sorted({b for b in (batch["opt"], batch["max"]) if b > 1})
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        lines.append("  max_queue_delay_microseconds: 100\n}")
    lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]")
    return "\n".join(lines) + "\n"
