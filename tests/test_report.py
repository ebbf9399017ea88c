"""Report rendering from real measurements: pycocotools metrics on the sample annotations and latency stats."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest

from packager.metrics import coco_eval
from packager.verify.gates import GateThresholds, ServedAccuracy, compare_precisions, decide_status, evaluate_gates
from packager.verify.loadtest import RequestOutcome, StepTiming, summarize_level
from packager.verify.report import render_markdown, write_report
from packager.verify.inputs import SkippedImage
from packager.verify.result import ServedEnsemble, VerifyResult


def _detections_from_ground_truth(ground_truth, class_names, jitter_px: float, seed: int) -> dict:
    """Ground-truth boxes as detections, moved by up to `jitter_px`: a known, imperfect 'model'."""
    rng = np.random.default_rng(seed)
    class_of = {cat_id: index for index, cat_id in enumerate(ground_truth.category_ids_for(class_names))}
    by_image = {image_id: [] for image_id in ground_truth.image_ids.values()}
    for ann in ground_truth.coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-jitter_px, jitter_px, 2)
        by_image[ann["image_id"]].append([x + dx, y + dy, x + w + dx, y + h + dy, 0.9, class_of[ann["category_id"]]])
    names = {image_id: name for name, image_id in ground_truth.image_ids.items()}
    return {names[i]: np.asarray(rows, dtype=np.float32).reshape(-1, 6) for i, rows in by_image.items()}


def _level(model: str, concurrency: int, latencies_ms: list[float], wall_s: float, errors: int = 0):
    outcomes = [RequestOutcome(i, ms / 1000, None, None) for i, ms in enumerate(latencies_ms)]
    outcomes += [RequestOutcome(len(outcomes) + i, 0.001, None, "UNAVAILABLE: gone") for i in range(errors)]
    steps = [StepTiming(f"{model}_step", len(latencies_ms), len(latencies_ms) // 2, 2.0, 1.5, 0.1, 20.0, 0.2)]
    return summarize_level(model, concurrency, outcomes, wall_s, steps)


def make_result(coco_ground_truth, coco_class_names, incomplete_reason=None, thresholds=None) -> VerifyResult:
    accuracy = []
    for precision, jitter in (("fp32", 2.0), ("int8", 6.0)):
        detections = _detections_from_ground_truth(coco_ground_truth, coco_class_names, jitter, seed=1)
        metrics = coco_eval.evaluate(detections, coco_ground_truth, coco_class_names)
        accuracy.append(ServedAccuracy(f"yolov8n_{precision}", "yolov8n", precision, metrics, 128, 0, []))
    load = {
        "yolov8n_fp32": [_level("yolov8n_fp32", c, list(np.linspace(40, 60, 20) * c), 20 * 0.05) for c in (1, 2, 4)],
        "yolov8n_int8": [_level("yolov8n_int8", c, list(np.linspace(30, 50, 20) * c), 20 * 0.04) for c in (1, 2, 4)],
    }
    comparisons = compare_precisions(accuracy, load)
    thresholds = thresholds or GateThresholds(min_map_ratio=0.5, max_p99_ms=300.0)
    gates = evaluate_gates(thresholds, accuracy, comparisons, load)
    models = [ServedEnsemble(f"yolov8n_{p}", "yolov8n", p, [], coco_class_names, "test") for p in ("fp32", "int8")]
    return VerifyResult(
        status=decide_status(gates, incomplete_reason), incomplete_reason=incomplete_reason, url="127.0.0.1:18501",
        server={"name": "triton", "version": "2.51.0", "extensions": []}, models=models, accuracy=accuracy,
        load=load, detector_load={}, comparisons=comparisons, gates=gates,
        images={"folder_files": 129, "accuracy": 128, "load_payloads": 128, "images_dir": "val2017"},
        skipped_images=[SkippedImage("broken.jpg", "unreadable, excluded: could not decode image")],
        settings={}, versions={"python": "3.11", "cpu": "test cpu", "cpu_count": 2}, started="now", wall_time_s=1.0,
    )


def test_jittered_boxes_lower_map_through_real_pycocotools(coco_ground_truth, coco_class_names):
    result = make_result(coco_ground_truth, coco_class_names)
    fp32, int8 = (item.metrics for item in result.accuracy)
    assert 0.5 < fp32.map50_95 <= 1.0
    assert int8.map50_95 < fp32.map50_95  # more jitter, lower IoU
    comparison = result.comparisons[0]
    assert comparison.reference_model == "yolov8n_fp32"
    assert comparison.map_ratio == pytest.approx(int8.map50_95 / fp32.map50_95)
    assert comparison.speedup == pytest.approx(comparison.peak_throughput / comparison.reference_peak_throughput)


def test_report_files_numbers_and_plots(tmp_path, coco_ground_truth, coco_class_names):
    result = make_result(coco_ground_truth, coco_class_names)
    paths = write_report(result, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())  # strict JSON: NaN would have been written as NaN
    assert data["status"] == "pass"
    assert data["accuracy"][0]["metrics"]["map50_95"] == pytest.approx(result.accuracy[0].metrics.map50_95)
    level = data["load"]["yolov8n_fp32"][2]
    assert level["concurrency"] == 4
    assert level["latency"]["p99_ms"] == pytest.approx(result.load["yolov8n_fp32"][2].latency.p99_ms)
    assert level["server_steps"][0]["compute_ms"] == pytest.approx(0.1 + 20.0 + 0.2)
    assert data["skipped_images"][0]["file"] == "broken.jpg"
    for kind in ("throughput_latency", "map"):
        image = matplotlib.image.imread(paths[kind])
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# yqpack verify: PASS")
    assert "| yolov8n_int8 | yolov8n_fp32 |" in markdown
    assert "throughput_vs_p99.png" in markdown and "map_per_precision.png" in markdown
    assert "broken.jpg" in markdown


def test_failed_gate_is_named_with_its_margin(coco_ground_truth, coco_class_names):
    result = make_result(coco_ground_truth, coco_class_names, thresholds=GateThresholds(max_p99_ms=150.0))
    assert result.status == "fail"
    p99 = {gate.model: gate for gate in result.gates if gate.gate == "--max-p99-ms"}
    # Latencies scale with concurrency: at c=4 the fp32 p99 is ~240 ms > 150 ms.
    assert not p99["yolov8n_fp32"].passed
    assert "at concurrency 4" in p99["yolov8n_fp32"].detail and "ms over" in p99["yolov8n_fp32"].detail
    markdown = render_markdown(result)
    assert "| --max-p99-ms | yolov8n_fp32 | **FAIL** |" in markdown
    assert markdown.startswith("# yqpack verify: FAIL")
    ratio = next(gate for gate in result.gates if gate.gate == "--min-map-ratio")
    assert ratio.model == "yolov8n_int8" and not ratio.passed and "below the minimum" in ratio.detail


def test_incomplete_report_never_says_pass(tmp_path, coco_ground_truth, coco_class_names):
    result = make_result(coco_ground_truth, coco_class_names,
                         incomplete_reason="server at 127.0.0.1:18501 is not live")
    write_report(result, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "INCOMPLETE" in markdown and "is not live" in markdown
    assert "PASS" not in markdown and "| pass |" not in markdown
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "incomplete"


def test_level_without_successes_has_null_latency_in_json(tmp_path, coco_ground_truth, coco_class_names):
    result = make_result(coco_ground_truth, coco_class_names)
    result.load["yolov8n_int8"].append(_level("yolov8n_int8", 8, [], 1.0, errors=3))
    write_report(result, tmp_path)
    level = json.loads((tmp_path / "report.json").read_text())["load"]["yolov8n_int8"][-1]
    assert level["errors"] == 3 and level["latency"]["p99_ms"] is None and level["throughput"] == 0.0
    assert level["error_messages"] == ["UNAVAILABLE: gone"]


def test_comparison_interval_and_coverage_in_the_report(tmp_path, coco_ground_truth, coco_class_names):
    """Real per-image pycocotools results -> paired bootstrap interval on the ratio, in the gate detail, report.md
    and report.json; the more jittered 'int8' model's whole interval lies below 1."""
    per_image, accuracy = {}, []
    for precision, jitter in (("fp32", 2.0), ("int8", 6.0)):
        detections = _detections_from_ground_truth(coco_ground_truth, coco_class_names, jitter, seed=1)
        evaluation = coco_eval.evaluate_images(detections, coco_ground_truth, coco_class_names)
        per_image[f"yolov8n_{precision}"] = evaluation.per_image
        accuracy.append(ServedAccuracy(f"yolov8n_{precision}", "yolov8n", precision, evaluation.metrics, 128, 0, []))
    result = make_result(coco_ground_truth, coco_class_names)
    result.comparisons = compare_precisions(accuracy, result.load, per_image, {"int8": 0.98})
    result.gates = evaluate_gates(GateThresholds(min_map_ratio=0.5), accuracy, result.comparisons, result.load)
    comparison = result.comparisons[0]
    interval = comparison.interval
    assert interval is not None and interval.images == 128 and interval.resamples == 1000
    assert interval.ratio == pytest.approx(comparison.map_ratio, abs=1e-12)
    assert interval.low < interval.ratio < interval.high < 1.0
    gate = next(g for g in result.gates if g.gate == "--min-map-ratio")
    assert f"95% interval {interval.low:.4f}-{interval.high:.4f}" in gate.detail
    write_report(result, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert f"| {interval.low:.4f}-{interval.high:.4f} | 98.0% |" in markdown
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["comparisons"][0]["interval"]["high"] == pytest.approx(interval.high)
    assert data["comparisons"][0]["mac_coverage"] == 0.98
