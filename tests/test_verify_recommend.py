"""The precision to serve (pure function over measured numbers) and what runs each detector (the server's log):
unit cases over constructed numbers, then the real report of the session's served verify run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from packager.verify.gates import GateResult, ServedAccuracy
from packager.verify.loadtest import LatencyStats, LevelResult
from packager.verify.recommend import recommend_precisions
from packager.verify.report import render_markdown
from packager.verify.runtime_log import NOT_KNOWN_REMOTE, DetectorRuntime, find_server_log, runtime_lines

LEVELS = (1, 2, 4, 8)


def _levels(model: str, throughputs: tuple[float, ...]) -> list[LevelResult]:
    latency = LatencyStats(16, 10.0, 9.0, 12.0, 15.0, 16.0)
    return [LevelResult(model, c, 16, 0, [], 16 / t, t, latency) for c, t in zip(LEVELS, throughputs)]


def _family(peaks: dict[str, tuple[float, ...]]):
    """accuracy, load of yolov8n at the given per-level throughputs (accuracy numbers play no part here)."""
    accuracy = [ServedAccuracy(f"yolov8n_{p}", "yolov8n", p, None, 128, 0, []) for p in peaks]
    return accuracy, {f"yolov8n_{p}": _levels(f"yolov8n_{p}", t) for p, t in peaks.items()}


def _gate(model: str, passed: bool, gate: str = "--min-map-ratio", detail: str = "ratio 0.9700") -> GateResult:
    return GateResult(gate, model, passed, 0.97, 0.99, detail)


def _held(*precisions: str) -> list[GateResult]:
    return [_gate(f"yolov8n_{p}", True, "--max-errors", "0 failed request(s)") for p in precisions]


def test_the_fastest_passing_precision_with_its_speedup_over_each_other():
    accuracy, load = _family({"fp32": (10, 20, 20, 19), "fp16": (11, 22, 23, 21), "int8": (15, 28, 30.4, 29)})
    (rec,) = recommend_precisions(accuracy, load, _held("fp32", "fp16", "int8"))
    assert (rec.precision, rec.model, rec.passed_over) == ("int8", "yolov8n_int8", [])
    assert rec.speedups == pytest.approx({"fp32": 30.4 / 20, "fp16": 30.4 / 23})
    assert "serve int8 (30.4 images/s at concurrency 4): 1.52x fp32, 1.32x fp16" in rec.sentence
    assert "over concurrency 1, 2, 4, 8" in rec.sentence and "every gate held" in rec.sentence
    assert "not faster" not in rec.sentence


def test_a_faster_precision_that_fails_a_gate_is_passed_over_with_its_gate():
    accuracy, load = _family({"fp32": (10, 20, 20, 19), "fp16": (11, 22, 23, 21), "int8": (15, 28, 30, 29)})
    gates = _held("fp32", "fp16") + [_gate("yolov8n_int8", False, detail="mAP50-95 ratio vs yolov8n_fp32 is 0.9700")]
    (rec,) = recommend_precisions(accuracy, load, gates)
    assert rec.precision == "fp16" and rec.passed_over == ["int8"]
    assert "Passed over int8, 1.30x faster: it failed --min-map-ratio (mAP50-95 ratio vs yolov8n_fp32 is 0.9700)" \
        in rec.sentence
    assert [c.passed for c in rec.candidates] == [True, True, False]


def test_int8_not_faster_than_fp16_says_int8_costs_accuracy_for_nothing():
    """TensorRT 11 on a small YOLO: INT8 0.78 ms vs FP16 0.76 ms (Ultralytics PR #26167)."""
    accuracy, load = _family({"fp32": (5, 9, 10, 10), "fp16": (12, 25, 26, 26), "int8": (12, 24, 25.5, 25)})
    (rec,) = recommend_precisions(accuracy, load, _held("fp32", "fp16", "int8"))
    assert rec.precision == "fp16"
    assert "int8 is not faster than fp16 here (25.5 vs 26.0 images/s): serve fp16, INT8 would cost accuracy for " \
           "nothing" in rec.sentence


def test_fp16_not_faster_than_fp32_on_cpu_is_named_too():
    # OpenVINO runs an FP16 ONNX with the f32 hint: no faster than FP32 (the local target on CPU).
    accuracy, load = _family({"fp32": (10, 20, 21, 20), "fp16": (10, 20, 20.5, 20)})
    (rec,) = recommend_precisions(accuracy, load, _held("fp32", "fp16"))
    assert rec.precision == "fp32"
    assert "fp16 is not faster than fp32 here" in rec.sentence and "FP16 would cost accuracy for nothing" \
        in rec.sentence


def test_a_lead_under_the_noise_margin_is_called_so():
    accuracy, load = _family({"fp32": (10, 20, 20, 20), "int8": (10, 20, 20.6, 20)})
    (rec,) = recommend_precisions(accuracy, load, _held("fp32", "int8"))
    assert rec.precision == "int8" and "leads the more precise fp32 by only 1.03x" in rec.sentence


def test_no_passing_precision_is_said_with_every_failed_gate():
    accuracy, load = _family({"fp32": (10, 20, 20, 19), "int8": (15, 28, 30, 29)})
    gates = [_gate("yolov8n_fp32", False, "--max-errors", "3 failed request(s), 3 over"),
             _gate("yolov8n_int8", False, "--max-p99-ms", "worst p99 80.0 ms at concurrency 8, 30.0 ms over")]
    (rec,) = recommend_precisions(accuracy, load, gates)
    assert rec.precision is None and rec.model is None and rec.speedups == {}
    assert rec.sentence.startswith("yolov8n: no precision to serve: every precision measured failed a gate")
    assert "fp32 failed --max-errors (3 failed request(s), 3 over)" in rec.sentence
    assert "int8 failed --max-p99-ms (worst p99 80.0 ms" in rec.sentence


def test_gates_of_steps_and_of_the_family_count_against_a_precision():
    accuracy, load = _family({"fp32": (10, 20, 20, 19), "fp16": (11, 22, 23, 21), "int8": (15, 28, 30, 29)})
    steps = {f"yolov8n_{p}": ["yolov8n_preprocess", f"yolov8n_{p}_detector", "yolov8n_postprocess"]
             for p in ("fp32", "fp16", "int8")}
    detector_errors = _gate("yolov8n_int8_detector", False, "--max-errors", "2 failed request(s) (bare detector)")
    (rec,) = recommend_precisions(accuracy, load, _held("fp32", "fp16") + [detector_errors], steps)
    assert rec.precision == "fp16" and "(bare detector)" in rec.sentence
    # Wrong annotations (judged on fp32's detections) make every precision's accuracy meaningless.
    annotations = _gate("yolov8n_fp32", False, "annotations", "the annotated boxes do not match")
    (rec,) = recommend_precisions(accuracy, load, _held("fp32", "fp16", "int8") + [annotations], steps)
    assert rec.precision is None and all(not c.passed for c in rec.candidates)


def test_unmeasured_and_incomplete_recommend_nothing():
    accuracy, load = _family({"fp32": (10, 20, 20, 19), "int8": (15, 28, 30, 29)})
    (rec,) = recommend_precisions(accuracy, load, _held("fp32", "int8"), incomplete="the server went away")
    assert rec.precision is None and "the run is incomplete (the server went away)" in rec.sentence
    (rec,) = recommend_precisions(accuracy, {"yolov8n_fp32": load["yolov8n_fp32"]}, _held("fp32", "int8"))
    assert rec.precision == "fp32" and "Not weighed (no load numbers): int8" in rec.sentence
    (rec,) = recommend_precisions(accuracy, {}, _held("fp32", "int8"))
    assert rec.precision is None and "no load numbers" in rec.sentence


# --- what runs each detector: the server log ---

TRITON_LINES = [
    'I1206 20:23:13.585800 6711 model_lifecycle.cc:472] "loading: yolov8n_int8_detector:1"\n',
    'I1206 20:23:19.479333 6711 model.py:50] "yqpack-runtime {\\"model\\": \\"yolov8n_fp32_detector\\", '
    '\\"runtime\\": \\"openvino\\", \\"label\\": \\"openvino (f32 hint)\\", \\"notes\\": [], '
    '\\"self_check\\": null}"\n',
    'I1206 20:23:19.5 6711 model.py:50] "yqpack-runtime {\\"model\\": \\"yolov8n_fp16_detector\\", \\"runt\n',
    "I1206 20:23:19.6 6711 model.py:50] yqpack-runtime not json at all\n",
    'I1206 20:23:20.0 6711 model.py:50] "yqpack-runtime [\\"a list, not a record\\"]"\n',
    # an older Triton writes the message bare
    'I1206 20:23:22.4 6711 model.py:50] yqpack-runtime {"model": "yolov8n_int8_detector", "runtime": "openvino", '
    '"label": "openvino (f32 hint, INT8)", "notes": [], "self_check": null}\n',
    # a reload logs again: the last line is what runs now
    'I1206 20:25:00.0 6711 model.py:50] "yqpack-runtime {\\"model\\": \\"yolov8n_int8_detector\\", \\"runtime\\": '
    '\\"onnxruntime\\", \\"label\\": \\"onnxruntime (CPU)\\", \\"notes\\": [\\"INT8 moved to onnxruntime: its '
    'self-check against onnxruntime failed\\"], \\"self_check\\": {\\"passed\\": false, \\"distance\\": 3.2, '
    '\\"tolerance\\": 0.5, \\"images\\": 4}}"\n',
]


def test_runtime_lines_parse_triton_log_lines_and_skip_broken_ones(tmp_path):
    log = tmp_path / "tritonserver.log"
    log.write_text("".join(TRITON_LINES))
    records = runtime_lines(log)
    assert set(records) == {"yolov8n_fp32_detector", "yolov8n_int8_detector"}
    assert records["yolov8n_fp32_detector"]["label"] == "openvino (f32 hint)"
    int8 = records["yolov8n_int8_detector"]
    assert int8["runtime"] == "onnxruntime" and int8["self_check"]["passed"] is False
    assert int8["notes"] == ["INT8 moved to onnxruntime: its self-check against onnxruntime failed"]


def test_no_record_for_the_url_means_not_known(tmp_path, monkeypatch):
    monkeypatch.setenv("YQPACK_HOME", str(tmp_path))  # an empty state folder: no yqpack serve record
    assert find_server_log("10.1.2.3:8001") == (None, NOT_KNOWN_REMOTE)


@pytest.mark.slow
def test_the_serve_record_of_the_url_leads_to_its_log(local_server, served_verify, tmp_path, monkeypatch):
    """The record a `yqpack serve` writes, here for the session's real server, names the log verify reads."""
    from packager.serve.records import write_state
    from packager.verify.runtime_log import detector_runtimes

    monkeypatch.setenv("YQPACK_HOME", str(tmp_path))
    write_state(local_server.state())
    log, source = find_server_log(local_server.grpc_url.replace("127.0.0.1", "localhost"))
    assert log == local_server.log_path and "log of the yqpack serve" in source
    assert find_server_log("127.0.0.1:1") == (None, NOT_KNOWN_REMOTE)  # another port: not this machine's server
    runtimes, _ = detector_runtimes(served_verify.models, local_server.grpc_url)
    assert runtimes == served_verify.detector_runtimes


@pytest.mark.slow
def test_the_served_report_names_the_precision_to_serve_and_what_runs(served_verify, local_server):
    result = served_verify
    # Recomputed here from the run's own numbers: the fastest ensemble whose gates (and its detector's) all hold.
    peaks = {m.precision: max(level.throughput for level in result.load[m.name]) for m in result.models}
    failed = {m.precision for m in result.models for g in result.gates
              if not g.passed and (g.model in (m.name, m.detector) or g.gate == "annotations")}
    (rec,) = result.recommendations
    expected = max((p for p in peaks if p not in failed), key=peaks.get, default=None)
    assert rec.precision == expected
    if expected is not None:
        assert rec.speedups == pytest.approx({p: peaks[expected] / v for p, v in peaks.items() if p != expected})
    markdown = open(result.report_files["markdown"]).read()
    data = json.loads(open(result.report_files["json"]).read())
    assert f"## Precision to serve\n\n**{rec.sentence}.**" in markdown
    assert data["recommendations"][0]["precision"] == expected and data["recommendations"][0]["sentence"]

    # What runs each detector: one entry per served detector, as its own line in the real server log says.
    log_text = local_server.log_path.read_text()
    entries = {entry["detector"]: entry for entry in data["detector_runtimes"]}
    assert set(entries) == {m.detector for m in result.models} and len(entries) == 3
    for model in result.models:
        entry = entries[model.detector]
        assert entry["logged"] and entry["ensemble"] == model.name and entry["label"]
        assert f'\\"model\\": \\"{model.detector}\\", \\"runtime\\": \\"{entry["runtime"]}\\", \\"label\\": ' \
               f'\\"{entry["label"]}\\"' in log_text
        assert f"| {model.name} | {model.detector} | {entry['label']} |" in markdown
    assert data["detector_runtimes_source"] == str(local_server.log_path)
    assert "## What runs each detector" in markdown and NOT_KNOWN_REMOTE not in markdown


@pytest.mark.slow
def test_a_remote_server_says_not_known_and_nothing_else(served_verify):
    remote = dataclasses.replace(served_verify, detector_runtimes=[], detector_runtimes_source=NOT_KNOWN_REMOTE)
    section = render_markdown(remote).split("## What runs each detector\n\n", 1)[1].split("\n## ", 1)[0]
    assert section.strip() == NOT_KNOWN_REMOTE


@pytest.mark.slow
def test_a_fallback_stands_out_in_bold(served_verify):
    fell_back = DetectorRuntime("yolov8n_int8", "yolov8n_int8_detector", True, "onnxruntime", "onnxruntime (CPU)",
                                ["INT8 moved to onnxruntime: its self-check against onnxruntime failed"],
                                {"passed": False, "distance": 3.2, "tolerance": 0.5, "images": 4})
    markdown = render_markdown(dataclasses.replace(served_verify, detector_runtimes=[fell_back]))
    assert ("| yolov8n_int8 | yolov8n_int8_detector | onnxruntime (CPU) | **INT8 moved to onnxruntime: its "
            "self-check against onnxruntime failed** | **failed**: distance 3.2 (tolerance 0.5) on 4 images |") \
        in markdown
    assert fell_back.fell_back
