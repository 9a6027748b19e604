"""kdtoolkit.run and the declarative stage list: stages by name, RunDir, the typed summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_stage_list_is_declarative():
    from kdtoolkit.pipeline import STAGES

    names = [s.name for s in STAGES]
    assert names == ["teacher", "student", "distill", "export-teacher", "export", "quantize", "optimize", "profile", "build",
                     "report", "bundle"]
    known: set[str] = set()
    for s in STAGES:
        assert set(s.inputs) <= known, f"{s.name} takes a stage that runs later"
        assert s.alias is None or s.alias in known
        known.add(s.name)
    assert [s.folder for s in STAGES if s.artifact][:3] == ["00-teacher", "01-student", "02-distill"]


def test_run_and_pipeline_import_no_torch():
    code = "import kdtoolkit.run, kdtoolkit.pipeline, kdtoolkit.report, kdtoolkit.bundle, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rundir_finds_stages_by_name(tmp_path):
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.errors import InputError
    from kdtoolkit.run import RunDir

    run = RunDir(tmp_path)
    with pytest.raises(InputError, match="no final artifact"):
        run.final()
    for folder, stage in (("03-export-teacher", "export"), ("06-optimize", "optimize")):
        with ArtifactWriter(tmp_path / folder, kind="onnx", stage=stage) as w:
            w.path("model.onnx").write_bytes(folder.encode())
    onnx, engine = run.final()
    assert onnx.path.name == "06-optimize" and engine is None
    assert run.find("export") is None and run.find("export-teacher").path.name == "03-export-teacher"
    with pytest.raises(InputError, match="unknown stage 'nope'; known: teacher"):
        run.find("nope")


def test_summary_typed_and_refused_in_one_line(tmp_path):
    from kdtoolkit.errors import InputError
    from kdtoolkit.run import RunSummary

    (tmp_path / "summary.json").write_text(json.dumps({"teacher": {}, "student": {}}))
    with pytest.raises(InputError, match=r"summary.json: .*rerun compress"):
        RunSummary.load(tmp_path)
    row = {"accuracy": 0.9, "params": 10, "size_bytes": 5, "latency_ms": {"p50": 1.0, "p90": 2.0, "batch": 1},
           "latency_by_batch": {"1": {"p50": 1.0, "p90": 2.0}}}
    doc = {"profile": "ort-cpu", "backend": "onnxruntime", "teacher": row, "student": {**row, "precision": "int8", "kept_in_float": ["a"]},
           "speedup": {"b1": 1.0}, "accuracy_drop_points": 0.0, "latency_runtime": "onnxruntime-cpu", "future_field": 1}
    (tmp_path / "summary.json").write_text(json.dumps(doc))
    s = RunSummary.load(tmp_path)
    assert s.student.precision == "int8" and s.to_dict()["future_field"] == 1 and s.to_dict()["student"]["kept_in_float"] == ["a"]
    assert "accuracy_torch" not in s.to_dict()["teacher"]  # unset fields are not written as nulls


def test_speed_goal_of_the_search_is_rechecked_on_the_deployed_model():
    from types import SimpleNamespace

    from kdtoolkit.stages import _speed_goal

    def ctx(search, no_student=False):
        return SimpleNamespace(artifacts={"student": SimpleNamespace(info={"surgery": {"search": search}})},
                               cfg=SimpleNamespace(no_student=no_student))

    lat = {"teacher": {"1": {"p50": 10.0}}, "student": {"1": {"p50": 5.0}}}
    miss = _speed_goal(ctx({"batch": 1, "speedup_target": 2.5, "budget_ms": 4.0}), {"b1": 2.0}, lat)
    assert miss["met"] is False and miss["target"] == 2.5 and miss["measured"] == 2.0 and "loaded" in miss["why"]
    hit = _speed_goal(ctx({"batch": 1, "speedup_target": None, "budget_ms": 5.0}), {"b1": 2.0}, lat)
    assert hit["met"] is True and hit["target"] == pytest.approx(2.0)  # a 5 ms budget on a 10 ms teacher is 2x
    assert _speed_goal(ctx(None), {"b1": 2.0}, lat) is None  # the user chose the shape: no goal to check
    assert _speed_goal(ctx({"batch": 64, "speedup_target": 2.0}), {"b1": 2.0}, lat) is None  # that batch was not timed
