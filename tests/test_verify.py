"""`yqpack verify`: pure parts (statistics, gates, image scan, class mapping) and end to end against a real
tritonserver serving the session build (accuracy vs local ONNX eval, load, gates, server killed mid-run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from packager.metrics import coco_eval
from packager.verify.gates import GateThresholds, ServedAccuracy, compare_precisions, decide_status, evaluate_gates
from packager.verify.loadtest import RequestOutcome, latency_stats, step_timings, summarize_level
from packager.core.contracts import VerifyError
from packager.verify.inputs import parse_class_names, scan_images, served_identity
from packager.verify.session import _real_rows


# --- pure parts -------------------------------------------------------------------------------------------------


def test_latency_percentiles_match_known_values():
    stats = latency_stats([ms / 1000 for ms in range(1, 101)])  # 1..100 ms
    assert stats.count == 100
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.max_ms == pytest.approx(100.0) and stats.mean_ms == pytest.approx(50.5)
    assert np.isnan(latency_stats([]).p99_ms)


def test_level_summary_counts_errors_and_keeps_first_distinct_messages():
    outcomes = [RequestOutcome(i, 0.010, None, None) for i in range(8)]
    outcomes += [RequestOutcome(8 + i, 0.001, None, f"INTERNAL: bad image {i % 7}") for i in range(12)]
    level = summarize_level("m", 4, outcomes, wall_s=2.0, steps=[])
    assert (level.requests, level.errors) == (20, 12)
    assert level.throughput == pytest.approx(4.0)  # successes only
    assert level.error_messages == [f"INTERNAL: bad image {i}" for i in range(5)]
    assert level.latency.count == 8 and level.latency.p99_ms == pytest.approx(10.0)


def test_step_timings_from_statistics_snapshots():
    # The shape tritonclient returns with as_json=True: 64-bit counters as strings.
    def snapshot(count, queue_ns, infer_ns, executions):
        return {"model_stats": [{
            "name": "yolov8n_fp32_detector", "version": "1", "inference_count": str(count),
            "execution_count": str(executions),
            "inference_stats": {"success": {"count": str(count), "ns": "1"},
                                "queue": {"count": str(count), "ns": str(queue_ns)},
                                "compute_input": {"count": str(count), "ns": "0"},
                                "compute_infer": {"count": str(count), "ns": str(infer_ns)},
                                "compute_output": {"count": str(count), "ns": "0"}},
        }]}

    before, after = snapshot(10, 5_000_000, 100_000_000, 10), snapshot(50, 45_000_000, 900_000_000, 30)
    (timing,) = step_timings(before, after, ["yolov8n_fp32_detector", "not_served"])
    assert timing.requests == 40 and timing.executions == 20 and timing.avg_batch == pytest.approx(2.0)
    assert timing.queue_ms == pytest.approx(1.0) and timing.compute_infer_ms == pytest.approx(20.0)
    assert timing.compute_ms == pytest.approx(20.0)


def test_names_and_class_name_parameters():
    def config(name, **parameters):
        return {"name": name, "parameters": {k: {"string_value": v} for k, v in parameters.items()}}

    # Facts come from the parameters yqpack renders, never from the name.
    assert served_identity(config("a_b_c", yqpack_model="yolov8n", yqpack_precision="int8")) == ("yolov8n", "int8")
    assert served_identity(config("yolov8n_int8")) == ("yolov8n_int8", "unknown")
    assert parse_class_names('["person", "traffic light"]') == ["person", "traffic light"]
    assert parse_class_names("person\ntraffic light\n") == ["person", "traffic light"]
    assert parse_class_names("person,car") == ["person", "car"]


def test_padding_rows_are_dropped():
    output = np.array([[[1, 2, 3, 4, 0.9, 0], [0, 0, 0, 0, 0, -1]]], dtype=np.float32)
    assert _real_rows(output).shape == (1, 6)


def test_coco_mapping_by_class_name_scores_ground_truth_perfectly(coco_ground_truth, coco_class_names):
    """Ground-truth boxes sent through the served-detection path score ~1; a shifted class order does not."""
    class_of = {cat: i for i, cat in enumerate(coco_ground_truth.category_ids_for(coco_class_names))}
    names = {image_id: name for name, image_id in coco_ground_truth.image_ids.items()}
    detections = {name: [] for name in coco_ground_truth.image_ids}
    for ann in coco_ground_truth.coco.dataset["annotations"]:
        if not ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            detections[names[ann["image_id"]]].append([x, y, x + w, y + h, 0.9, class_of[ann["category_id"]]])
    served = {name: _real_rows(np.asarray(rows, dtype=np.float32).reshape(1, -1, 6))
              for name, rows in detections.items()}
    perfect = coco_eval.evaluate(served, coco_ground_truth, coco_class_names)
    assert perfect.map50_95 > 0.99 and perfect.images == 128
    rotated = coco_class_names[1:] + coco_class_names[:1]  # class ids mapped to the wrong categories
    assert coco_eval.evaluate(served, coco_ground_truth, rotated).map50_95 < 0.1


def test_scan_lists_unreadable_and_unannotated_files(tmp_path, assets, coco_ground_truth):
    val = assets / "coco" / "val2017"
    names = list(coco_ground_truth.image_ids)[:3]
    for name in names:
        shutil.copy(val / name, tmp_path / name)
    truncated = (val / names[0]).read_bytes()[:200]
    (tmp_path / names[1]).write_bytes(truncated)  # an annotated image, cut short
    (tmp_path / "notes.txt").write_text("not an image")
    shutil.copy(assets / "coco" / "calib2017" / sorted(p.name for p in (assets / "coco" / "calib2017").iterdir())[0],
                tmp_path / "extra.jpg")
    images = scan_images(tmp_path, coco_ground_truth, None)
    reasons = {item.file: item.reason for item in images.skipped}
    assert reasons[names[1]].startswith("unreadable") and reasons["notes.txt"].startswith("unreadable")
    assert "load test only" in reasons["extra.jpg"]
    assert [path.name for path in images.accuracy_files] == [names[0], names[2]]
    assert len(images.load_payloads) == 3 and images.folder_files == 5


def test_scan_without_any_annotated_image_is_a_plain_error(tmp_path, coco_ground_truth):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(VerifyError, match="no readable image"):
        scan_images(tmp_path, coco_ground_truth, None)
    with pytest.raises(FileNotFoundError):
        scan_images(tmp_path / "missing", coco_ground_truth, None)


def _accuracy(precision, map50_95, errors=0):
    metrics = coco_eval.CocoMetrics(map50_95, 0.5, 0.4, 0.2, 0.4, 0.5, 128, 1000)
    return ServedAccuracy(f"yolov8n_{precision}", "yolov8n", precision, metrics, 128, errors, [])


def _levels(model, throughputs, p99=50.0, errors=0):
    levels = []
    for concurrency, throughput in zip((1, 2, 4), throughputs):
        count = 20
        outcomes = [RequestOutcome(i, p99 / 1000, None, None) for i in range(count)]
        outcomes += [RequestOutcome(count + i, 0.0, None, "DEADLINE_EXCEEDED: timeout") for i in range(errors)]
        levels.append(summarize_level(model, concurrency, outcomes, count / throughput, []))
    return levels


def test_reference_is_fp32_when_served_else_fp16():
    load = {"yolov8n_fp32": _levels("yolov8n_fp32", [10, 15, 16]),
            "yolov8n_fp16": _levels("yolov8n_fp16", [12, 18, 20]),
            "yolov8n_int8": _levels("yolov8n_int8", [20, 30, 32])}
    accuracy = [_accuracy("fp32", 0.416), _accuracy("fp16", 0.415), _accuracy("int8", 0.405)]
    by_model = {c.model: c for c in compare_precisions(accuracy, load)}
    assert set(by_model) == {"yolov8n_fp16", "yolov8n_int8"}
    assert by_model["yolov8n_int8"].map_delta == pytest.approx(-0.011)
    assert by_model["yolov8n_int8"].speedup == pytest.approx(2.0)
    assert by_model["yolov8n_int8"].speedup_per_concurrency == pytest.approx({1: 2.0, 2: 2.0, 4: 2.0})
    without_fp32 = compare_precisions(accuracy[1:], load)
    assert [c.reference_model for c in without_fp32] == ["yolov8n_fp16"]


def test_gates_fail_with_names_and_margins():
    load = {"yolov8n_fp32": _levels("yolov8n_fp32", [10, 15, 16]),
            "yolov8n_int8": _levels("yolov8n_int8", [20, 30, 32], p99=80.0, errors=2)}
    accuracy = [_accuracy("fp32", 0.416), _accuracy("int8", 0.405)]
    comparisons = compare_precisions(accuracy, load)
    lenient = evaluate_gates(GateThresholds(min_map_ratio=0.9, max_errors=6), accuracy, comparisons, load)
    assert decide_status(lenient, None) == "pass"
    assert decide_status(lenient, "server died") == "incomplete"
    strict = GateThresholds(min_map_ratio=1.5, max_errors=0, min_throughput=20.0, max_p99_ms=60.0)
    failed = {(g.gate, g.model): g for g in evaluate_gates(strict, accuracy, comparisons, load) if not g.passed}
    assert set(failed) == {("--min-map-ratio", "yolov8n_int8"), ("--max-errors", "yolov8n_int8"),
                           ("--min-throughput", "yolov8n_fp32"), ("--max-p99-ms", "yolov8n_int8")}
    assert "below the minimum" in failed[("--min-map-ratio", "yolov8n_int8")].detail
    assert failed[("--max-errors", "yolov8n_int8")].value == 6  # 2 per level
    assert "4.00 img/s short" in failed[("--min-throughput", "yolov8n_fp32")].detail


def test_unmeasured_accuracy_fails_its_gate():
    accuracy = [_accuracy("fp32", 0.416), ServedAccuracy("yolov8n_int8", "yolov8n", "int8", None, 0, 128, ["x"])]
    gates = evaluate_gates(GateThresholds(max_errors=1000), accuracy, compare_precisions(accuracy, {}), {})
    assert decide_status(gates, None) == "fail"
    assert any(g.gate == "--min-map-ratio" and g.model == "yolov8n_int8" and not g.passed for g in gates)


# --- end to end: real tritonserver, real build ----------------------------------------------------------------


def _run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli.main", "verify", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


def _served_map(result, precision: str) -> float:
    return next(item.metrics.map50_95 for item in result.accuracy if item.precision == precision)


@pytest.mark.slow
def test_served_map_equals_local_onnx_eval(served_verify, onnx_eval_metrics):
    assert {item.precision for item in served_verify.accuracy} == {"fp32", "fp16", "int8"}
    # int8 is served on CPU from the fp32 twin, exactly what eval-onnx scores as int8-fp32.
    for precision, variant in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8-fp32")):
        served = _served_map(served_verify, precision)
        local = onnx_eval_metrics[variant].map50_95
        assert served == pytest.approx(local, abs=0.001), f"{precision}: served {served:.4f} vs local {local:.4f}"
    for item in served_verify.accuracy:
        assert item.images == 128 and item.errors == 0


@pytest.mark.slow
def test_the_report_names_the_runtime_behind_each_served_number(served_verify, model_repository):
    """The runtime comes from the server (config parameter yqpack_runtime), as the repository index records it."""
    from packager.core.repository_index import RepositoryIndex
    from packager.inference.runtime import RuntimeOptions, runtime_on_this_machine
    from packager.verify.report import render_markdown

    index = RepositoryIndex.load(model_repository.path)
    runtimes = {model.name: model.runtime for model in served_verify.models}
    assert runtimes == {name: index.get(name).runtime for name in runtimes}
    # the local target's default runtime; INT8 leaves OpenVINO on CPUs without VNNI/AMX (its kernels saturate)
    int8 = runtime_on_this_machine(RuntimeOptions("openvino"), quantized=True).label
    expected = {p: int8 if p == "int8" else "openvino (f32 hint)" for p in ("fp32", "fp16", "int8")}
    assert {model.precision: model.runtime for model in served_verify.models} == expected
    markdown = render_markdown(served_verify)
    for item in served_verify.accuracy:
        assert f"| {item.model} | {item.precision} | {expected[item.precision]} |" in markdown


def test_served_fp32_map_matches_ultralytics_reference(served_verify, ultralytics_reference_metrics):
    """Ultralytics' own evaluation of yolov8n.pt, computed in this run (square letterbox, as served)."""
    served = _served_map(served_verify, "fp32")
    reference = ultralytics_reference_metrics.map50_95
    assert served == pytest.approx(reference, abs=0.005), f"served fp32 {served:.4f} vs Ultralytics {reference:.4f}"


@pytest.mark.slow
def test_int8_ratio_gate_is_measured_and_judged(served_verify):
    (int8,) = [c for c in served_verify.comparisons if c.precision == "int8"]
    assert int8.reference_precision == "fp32"
    print(f"INT8 mAP50-95 {int8.map50_95:.4f} vs fp32 {int8.reference_map50_95:.4f}: ratio {int8.map_ratio:.4f}")
    assert int8.map_ratio > 0.97, "INT8 lost more than 3% mAP: quantization is broken, not merely imprecise"
    gate = next(g for g in served_verify.gates if g.gate == "--min-map-ratio" and g.model == int8.model)
    assert gate.passed == (int8.map_ratio >= 0.99)
    assert gate.passed, f"served INT8 (mixed preset) misses the default 0.99 gate: ratio {int8.map_ratio:.4f}"


@pytest.mark.slow
def test_zero_errors_up_to_concurrency_16_with_server_timings(served_verify):
    assert served_verify.incomplete_reason is None
    for model in ("yolov8n_fp32", "yolov8n_fp16", "yolov8n_int8"):
        levels = served_verify.load[model]
        assert [level.concurrency for level in levels] == [1, 2, 4, 8, 16]
        for level in levels:
            assert level.errors == 0 and level.requests == 16, level.error_messages
            assert level.throughput > 0 and level.latency.p50_ms <= level.latency.p99_ms
            steps = {step.model: step for step in level.server_steps}
            assert set(steps) == {model, "yolov8n_preprocess", f"{model}_detector", "yolov8n_postprocess"}
            assert steps[f"{model}_detector"].requests == 16 and steps[f"{model}_detector"].compute_infer_ms > 0
        assert all(level.errors == 0 for level in served_verify.detector_load[f"{model}_detector"])
    assert all(gate.passed for gate in served_verify.gates if gate.gate == "--max-errors")
    expected = "pass" if all(gate.passed for gate in served_verify.gates) else "fail"
    assert served_verify.status == expected and served_verify.exit_code == {"pass": 0, "fail": 1}[expected]


@pytest.mark.slow
def test_report_written_for_the_served_run(served_verify):
    files = served_verify.report_files
    data = json.loads(open(files["json"]).read())
    assert data["server"]["version"] and data["versions"]["tritonclient"]
    assert data["accuracy"][0]["metrics"]["map50_95"] == pytest.approx(served_verify.accuracy[0].metrics.map50_95)
    markdown = open(files["markdown"]).read()
    assert "yolov8n_int8" in markdown and "Ensemble vs bare detector" in markdown
    for kind in ("throughput_latency", "map"):
        assert os.path.getsize(files[kind]) > 10_000


@pytest.mark.slow
def test_the_official_annotations_pass_the_annotation_check(served_verify):
    """Judged by the served fp32 ensemble's detections; the report says what each mAP was held to."""
    (check,) = served_verify.annotation_checks
    assert check.model == "yolov8n_fp32" and check.verdict == "pass" and check.images == 128, check.cause
    assert check.as_given.precision > 0.8 and check.class_agreement.agreement > 0.9
    gate = next(g for g in served_verify.gates if g.gate == "annotations")
    assert gate.passed and gate.model == "yolov8n_fp32"
    markdown = open(served_verify.report_files["markdown"]).read()
    assert "## Accuracy reference" in markdown and "## Annotation check (yolov8n_fp32): pass" in markdown
    data = json.loads(open(served_verify.report_files["json"]).read())
    assert data["annotation_checks"][0]["boxes"][0]["fix"] == "as given"


@pytest.mark.slow
def test_impossible_map_ratio_fails_and_names_the_gate(local_server, yolov8n_build, sample_val, tmp_path):
    images, annotations = sample_val
    completed = _run_cli(
        "--url", local_server.grpc_url, "--images", str(images), "--annotations", str(annotations),
        "--build", str(yolov8n_build), "--models", "yolov8n_fp32,yolov8n_int8",
        "--max-images", "8", "--concurrency", "1", "--requests", "2", "--warmup", "0", "--no-detector-load",
        "--min-map-ratio", "1.5", "--report-dir", str(tmp_path),
    )
    assert completed.returncode == 1, completed.stderr
    assert "gate failed: --min-map-ratio on yolov8n_int8" in completed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "fail"
    failed = [g for g in report["gates"] if not g["passed"]]
    assert [(g["gate"], g["model"]) for g in failed] == [("--min-map-ratio", "yolov8n_int8")]
    assert "| --min-map-ratio | yolov8n_int8 | **FAIL** |" in (tmp_path / "report.md").read_text()
    # int8 failed its gate: serve fp32, said on the console too. No serve record names this server's log.
    (recommendation,) = report["recommendations"]
    assert recommendation["precision"] == "fp32" and recommendation["sentence"] in completed.stderr
    assert report["detector_runtimes"] == [] and report["detector_runtimes_source"] == "not known (remote server)"


def test_no_server_is_a_clear_error_after_wait(sample_val, tmp_path):
    from packager.serve.embedded import find_free_ports

    images, annotations = sample_val
    (port,) = find_free_ports(1)  # nothing listens there
    completed = _run_cli("--url", f"127.0.0.1:{port}", "--images", str(images), "--annotations", str(annotations),
                         "--wait", "2", "--report-dir", str(tmp_path), timeout=120)
    assert completed.returncode == 1
    assert "Error: Triton at" in completed.stderr and "not ready after 2 s" in completed.stderr
    assert "Traceback" not in completed.stderr


def _verify_interrupted(server, build_dir, sample_val, report_dir, interrupt) -> tuple[int, str]:
    """Run `yqpack verify` against `server`, call `interrupt()` once its load phase is under way; (exit code, stderr)."""
    import tritonclient.grpc as grpcclient

    images, annotations = sample_val
    verify = subprocess.Popen(
        [sys.executable, "-m", "packager.cli.main", "verify", "--url", server.grpc_url, "--images", str(images),
         "--annotations", str(annotations), "--build", str(build_dir), "--max-images", "4",
         "--concurrency", "2", "--duration", "300", "--warmup", "0", "--no-detector-load",
         "--report-dir", str(report_dir), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        served = 0
        while served < 8 and verify.poll() is None:  # 4 accuracy requests, then load requests
            time.sleep(0.5)
            stats = client.get_inference_statistics("yolov8n_fp32", as_json=True)
            served = int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))
        client.close()
        assert verify.poll() is None, f"verify ended before the interruption: {verify.communicate()}"
        interrupt()
        _, stderr = verify.communicate(timeout=240)
    finally:
        if verify.poll() is None:
            verify.kill()
            verify.wait()
    return verify.returncode, stderr


def _assert_incomplete_report(report_dir: Path) -> dict:
    report = json.loads((report_dir / "report.json").read_text())
    assert report["status"] == "incomplete" and report["incomplete_reason"]
    markdown = (report_dir / "report.md").read_text()
    assert markdown.startswith("# yqpack verify: INCOMPLETE") and "PASS" not in markdown
    return report


@pytest.fixture
def own_server(yolov8n_build, server_env, tmp_path):
    """A server of this test's own (never the shared one), fp32 only, whose models clients may unload."""
    from packager.repository.render import render_repository
    from packager.serve.embedded import LocalTritonServer, find_free_ports

    repository = render_repository(yolov8n_build, tmp_path / "repository", target="local", precisions=("fp32",))
    grpc_port, http_port, metrics_port = find_free_ports(3)
    server = LocalTritonServer(repository.path, server_env, grpc_port=grpc_port, http_port=http_port,
                               metrics_port=metrics_port, log_path=tmp_path / "tritonserver.log",
                               model_control_mode="explicit")
    with server:
        yield server


@pytest.mark.slow
def test_server_killed_mid_verify_reports_incomplete(own_server, yolov8n_build, sample_val, tmp_path):
    """SIGKILL to the server while verify's load phase runs."""
    report_dir = tmp_path / "report"
    code, stderr = _verify_interrupted(
        own_server, yolov8n_build, sample_val, report_dir, lambda: os.kill(own_server.pid, signal.SIGKILL)
    )
    assert code == 3, stderr
    assert "incomplete:" in stderr
    _assert_incomplete_report(report_dir)


@pytest.mark.slow
def test_model_unloaded_mid_verify_reports_incomplete(own_server, yolov8n_build, sample_val, tmp_path):
    """The ensemble is unloaded (explicit model control) while verify's load phase runs: never a pass."""
    import tritonclient.grpc as grpcclient

    def unload():
        client = grpcclient.InferenceServerClient(own_server.grpc_url)
        client.unload_model("yolov8n_fp32")
        client.close()

    report_dir = tmp_path / "report"
    code, stderr = _verify_interrupted(own_server, yolov8n_build, sample_val, report_dir, unload)
    assert code == 3, stderr
    assert "incomplete:" in stderr and "yolov8n_fp32" in stderr
    report = _assert_incomplete_report(report_dir)
    assert "yolov8n_fp32" in report["incomplete_reason"]
    assert own_server.is_alive(), "unloading a model must not take the server down"


def _rss_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


# What a verify run may add to its process's peak RSS per image scored (served detections, pycocotools per ensemble
# one after the other - ~2 KB per detection, ~200 detections per image at conf 0.001 -, the paired bootstrap), once a
# first small run has paid the one-off costs (imports, gRPC, the report's plots: ~150 MB): 256 images x 2 ensembles
# measured +134 MB. The bootstrap this replaced allocated (images x true positives) float64 matrices on top: +67 MB
# at 128 images, +1.8 GB at 640 (benchmarks/eval_scale.py), about +270 MB at 256.
VERIFY_MEMORY_PER_IMAGE = 2**20


@pytest.mark.slow
def test_verify_of_hundreds_of_images_stays_within_its_memory_bound(local_server, model_repository, assets, tmp_path):
    """A real served run over 256 val2017-dev images, fp32 and fp16 ensembles (both on OpenVINO: the cheaper pair
    on CPUs where INT8 runs emulated), the paired interval between them."""
    from packager.verify.gates import AbsoluteGates
    from packager.verify.run import VerifyOptions, run_verify

    images = 256
    ensembles = [model_repository.ensembles[p] for p in ("fp32", "fp16")]

    def options(count: int) -> VerifyOptions:
        return VerifyOptions(
            images_dir=assets / "coco" / "val2017-dev",
            annotations=assets / "coco" / "annotations" / "instances_val2017_dev640.json",
            url=local_server.grpc_url, models=ensembles, report_dir=tmp_path / str(count), concurrency=(1,),
            requests_per_level=2, warmup_requests=0, detector_load=False, max_images=count, progress=False,
            absolute=AbsoluteGates(min_map=0.0),  # no --build: no reference mAP to drift from
        )

    assert run_verify(options(8)).images["accuracy"] == 8  # the one-off costs, out of the measurement
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS to its current RSS
    before = _rss_bytes("VmRSS")
    result = run_verify(options(images))
    growth = _rss_bytes("VmHWM") - before
    assert result.status != "incomplete" and result.images["accuracy"] == images
    assert all(item.errors == 0 and item.metrics.detections > 20_000 for item in result.accuracy)
    interval = result.comparisons[0].interval
    assert interval is not None and interval.images == images and interval.low <= interval.ratio <= interval.high
    assert growth < images * VERIFY_MEMORY_PER_IMAGE, f"verify grew by {growth / 2**20:.0f} MB"
