"""The bundle manifest (``manifest.json``, schema "kdtoolkit.bundle/1") as a pydantic model.

``kdtoolkit/schemas/bundle-manifest.schema.json`` is generated from it (``python -m
kdtoolkit.bundle.manifest`` rewrites the file; a test asserts the committed file equals the generated
one), and ``make_bundle`` validates every manifest against it before writing. Within a version,
fields may be added (objects allow extra keys), never removed or changed in meaning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_ID = "https://kdtoolkit.dev/schemas/bundle-manifest/1.json"
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "bundle-manifest.schema.json"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Batch(_Open):
    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)


class ProfileInfo(_Open):
    name: str
    backend: Literal["onnxruntime", "tensorrt"]
    device: str
    precision: Literal["int8", "fp16", "fp32", "auto"]
    batch: Batch
    static_input_shape: list[int] | None = None
    power_mode: str | None = None
    tensorrt: dict[str, Any] | None = None
    onnxruntime: dict[str, Any] | None = None


class Runtime(_Open):
    name: Literal["onnxruntime", "tensorrt"] = Field(description="the runtime that serves the model")
    onnx: str = Field(description="relative path of the ONNX model")
    engine: str | None = Field(description="relative path of the TensorRT plan, null when not built")
    execution_providers: list[str] = Field(default_factory=list)


class ModelInfo(_Open):
    format: Literal["onnx"]
    file: str
    opset: int | None = None
    precision: Literal["int8", "fp16", "fp32", "mixed"]
    precision_by_layer_group: dict[str, dict[str, int]] = Field(
        description="op type -> precision -> number of layers, read from the ONNX graph")
    qdq: bool = False
    ort_optimization: str | None = None


class Tensor(_Open):
    name: str
    shape: list[int | str | None] = Field(description="a string is a dynamic axis (batch)")
    dtype: str = Field(description="numpy dtype name")
    layout: str | None = None


class Preprocessing(_Open):
    input_size: list[int] = Field(min_length=2, max_length=2, description="H, W")
    channels: Literal[1, 3]
    color: Literal["L", "RGB"] = Field(description="PIL mode the image is converted to")
    resize: Literal["bilinear"]
    scale: float = Field(description="pixel multiplier before mean/std (1/255)")
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)
    layout: Literal["NCHW", "NHWC"]
    dtype: Literal["float32"]
    formula: str | None = None


class Postprocessing(_Open):
    output: str
    kind: Literal["logits", "raw"] = Field(description="logits: class scores over `classes`; raw: outputs that are not class "
                                                       "logits (a detector's, a segmenter's), handed over as the model computes them")
    outputs: list[str] | None = Field(None, description="raw: the names of every output, in order")
    scores: str | None = None
    labels_file: str | None = Field(None, description="labels.txt for logits; null for raw outputs")


class Percentiles(_Open):
    p50: float
    p90: float | None = None


class Accuracy(_Open):
    value: float | None = Field(ge=0, le=1, description="top-1 on the test split, a fraction")
    runtime: str = Field(description="what the accuracy was measured on (a proxy is labelled as such)")
    n_test: int | None = None
    teacher: float | None = None
    accuracy_drop_points: float | None = None


class Latency(_Open):
    runtime: str
    measured: Literal[True]
    by_batch: dict[str, Percentiles] = Field(description="batch size -> latency percentiles in milliseconds")
    teacher_by_batch: dict[str, Percentiles] = Field(default_factory=dict)
    speedup: dict[str, float] = Field(default_factory=dict)


class Metrics(_Open):
    accuracy: Accuracy
    latency_ms: Latency
    target_latency_ms: dict[str, Percentiles] | None = Field(description="null: not measured, needs the target device")
    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None


class Environment(_Open):
    device: str
    cpu: str | None = None
    gpu: str | None = None
    tensorrt: str | None = None
    onnxruntime: str | None = None
    cuda: str | None = None


class OnDevice(_Open):
    required: bool
    needs_device: list[str]
    statement: str = Field(description="plain statement of which figures need the device")
    commands: dict[str, str]
    build_script: str | None = None
    build: dict[str, Any] | None = None


class Tolerance(_Open):
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class Reference(_Open):
    input: str = Field(description=".npy, float32, normalised, model layout")
    expected: str = Field(description=".npy, float32 logits from kdtoolkit's ONNX Runtime evaluation (raw outputs: the first output)")
    expected_outputs: dict[str, str] | None = Field(None, description="raw outputs: output name -> .npy of its expected values, "
                                                                       "for every output")
    labels: str
    images: list[str] = Field(description="the same test images as PNG, in batch order")
    runtime: Literal["onnxruntime", "tensorrt"]
    count: int = Field(ge=1)
    tolerance: Tolerance
    tolerance_engine: Tolerance | None = Field(None, description="tolerance for the TensorRT engine (its precision) against expected")
    note: str | None = None


class Triton(_Open):
    path: str
    platform: Literal["onnxruntime_onnx", "tensorrt_plan"]
    needs_engine_from_device: bool = False


class LineageNode(_Open):
    stage: str
    kind: str
    folder: str | None = None
    fingerprint: str
    parents: list[str]
    model_file: str | None = None
    model_sha256: str | None = None
    source: str | None = None
    missing: bool = False


class FileHash(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TestSubset(_Open):
    """Seeded test images packed on request (``--test-subset N``) so the device measures top-1 like for like."""

    path: str
    images: int = Field(ge=1)
    seed: int
    onnxruntime_top1: float = Field(ge=0, le=1, description="model/model.onnx on exactly these images (ONNX Runtime CPU)")
    runtime: str
    note: str | None = None


class BundleManifest(_Open):
    """manifest.json of a kdtoolkit bundle (schema "kdtoolkit.bundle/1"): how to feed the model, what it was built and
    measured with, and the sha256 of every file. Readers must reject a schema_version newer than they support; fields may
    be added within a version, never removed or changed in meaning."""

    schema_: Literal["kdtoolkit.bundle/1"] = Field(alias="schema")
    schema_version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="model name; also the Triton entry's name")
    created: str = Field(description="ISO 8601 UTC time the bundle was written")
    kdtoolkit_version: str | None = None
    profile: ProfileInfo
    runtime: Runtime
    model: ModelInfo
    inputs: list[Tensor] = Field(min_length=1)
    outputs: list[Tensor] = Field(min_length=1)
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    classes: list[str] = Field(description="class names in logit order; empty when postprocessing.kind is raw")
    metrics: Metrics
    built_on: Environment
    measured_on: Environment
    on_device: OnDevice
    reference: Reference
    test_subset: TestSubset | None = None
    triton: Triton
    lineage: list[LineageNode] = Field(min_length=1)
    report: list[str] = Field(default_factory=list)
    files: dict[str, FileHash] = Field(min_length=1, description="every file of the bundle except manifest.json: relative path -> "
                                                                 "sha256 and size")

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _logits_have_classes(self) -> BundleManifest:
        if self.postprocessing.kind == "logits" and (not self.classes or not self.postprocessing.labels_file):
            raise ValueError("a logits bundle needs its classes and a labels_file")
        return self


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of manifest.json, generated from :class:`BundleManifest`."""
    schema = BundleManifest.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "kdtoolkit bundle manifest, version 1", **{k: v for k, v in schema.items() if k != "title"}}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":  # python -m kdtoolkit.bundle.manifest: rewrite the committed schema
    SCHEMA_FILE.write_text(schema_text())
    print(f"wrote {SCHEMA_FILE}")
