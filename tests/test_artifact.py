import json

import pytest

from kdtoolkit.artifact import SCHEMA_VERSION, Artifact, ArtifactWriter
from kdtoolkit.errors import CheckFailed, InputError


def test_manifest_round_trip(tmp_path):
    parent_dir = tmp_path / "a"
    with ArtifactWriter(parent_dir, kind="torch", stage="s1", config={"x": 1}) as w:
        w.path("model.pt").write_bytes(b"abc")
    parent = w.artifact
    with ArtifactWriter(tmp_path / "b", kind="onnx", stage="s2", config={"y": [1, 2]}, parents=[parent], input_key="k") as w2:
        w2.path("sub/model.onnx").write_bytes(b"xyz")
        w2.metrics["accuracy"] = 0.5
    art = Artifact.load(tmp_path / "b")
    assert art.kind == "onnx" and art.manifest.schema_version == SCHEMA_VERSION
    assert set(art.manifest.files) == {"sub/model.onnx"}
    assert art.manifest.files["sub/model.onnx"].size == 3
    assert art.manifest.parents[0].stage == "s1" and art.manifest.parents[0].fingerprint == parent.fingerprint()
    assert art.metrics["accuracy"] == 0.5 and art.manifest.input_key == "k"
    assert art.manifest.environment["python"]
    assert art.verify() == []


def test_verify_names_changed_and_missing_files(tmp_path):
    with ArtifactWriter(tmp_path / "a", kind="onnx", stage="s") as w:
        w.path("m.onnx").write_bytes(b"0123")
        w.path("x.txt").write_text("x")
    (tmp_path / "a" / "m.onnx").write_bytes(b"0124")
    (tmp_path / "a" / "x.txt").unlink()
    art = Artifact.load(tmp_path / "a")
    assert art.verify() == ["hash mismatch: m.onnx", "missing file: x.txt"]
    with pytest.raises(CheckFailed, match="m.onnx"):
        art.check()


def test_failed_stage_leaves_previous_artifact_untouched(tmp_path):
    with ArtifactWriter(tmp_path / "a", kind="torch", stage="s") as w:
        w.path("f").write_text("old")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "a", kind="torch", stage="s") as w:
            w.path("f").write_text("new")
            raise RuntimeError("killed mid-stage")
    assert (tmp_path / "a" / "f").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_newer_schema_and_bad_manifest_are_clear_errors(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "kind": "onnx", "stage": "s"}))
    with pytest.raises(InputError, match="newer than this kdtoolkit supports"):
        Artifact.load(d)
    (d / "manifest.json").write_text("{truncated")
    with pytest.raises(InputError, match="unreadable manifest"):
        Artifact.load(d)
    with pytest.raises(InputError, match="not an artifact folder"):
        Artifact.load(tmp_path)
