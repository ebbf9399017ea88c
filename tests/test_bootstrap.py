"""Paired bootstrap intervals on real pycocotools results, and the calibration/validation overlap check."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from packager.metrics.intervals import paired_difference, paired_ratio, resample_weights, resampled_interval, weighted_map
from packager.calibration.calibration import check_no_overlap, find_overlap, image_hashes
from packager.core.contracts import DataOverlapError
from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
from packager.evaluate.onnx_eval import BuildGateResult, detect_images

VAL_IMAGES = 32


@pytest.fixture(scope="module")
def fp32_detections(yolov8n_build, assets):
    """Real FP32 detections (onnxruntime) on the first 32 sample val images and their ground truth."""
    import json

    ground_truth = CocoGroundTruth(assets / "coco" / "annotations" / "instances_val2017_128.json")
    files = ground_truth.image_files(assets / "coco" / "val2017")[:VAL_IMAGES]
    names = json.loads((yolov8n_build / "manifest.json").read_text())["class_names"]
    detections = detect_images(yolov8n_build / "onnx" / "model.fp32.onnx", files, (640, 640), show_progress=False)
    return detections, ground_truth, names


def test_full_sample_reproduces_pycocotools(fp32_detections):
    detections, ground_truth, names = fp32_detections
    evaluation = evaluate_images(detections, ground_truth, names)
    ones = np.ones((1, evaluation.per_image.images))
    assert evaluation.metrics.map50_95 > 0.3
    assert weighted_map(evaluation.per_image, ones)[0] == pytest.approx(evaluation.metrics.map50_95, abs=1e-12)


def test_identical_models_give_ratio_one_and_zero_width(fp32_detections):
    detections, ground_truth, names = fp32_detections
    a = evaluate_images(detections, ground_truth, names).per_image
    b = evaluate_images({k: v.copy() for k, v in detections.items()}, ground_truth, names).per_image
    interval = paired_ratio(a, b, resamples=1000, seed=3)
    assert interval.ratio == 1.0 and interval.low == 1.0 and interval.high == 1.0 and interval.width == 0.0
    assert interval.images == VAL_IMAGES and interval.resamples == 1000


def test_deleting_one_images_detections_moves_the_interval_down(fp32_detections):
    detections, ground_truth, names = fp32_detections
    reference = evaluate_images(detections, ground_truth, names).per_image
    # The image with the most detections loses all of them: the candidate can only be worse, never better.
    victim = max(detections, key=lambda name: len(detections[name]))
    damaged = {**detections, victim: np.zeros((0, 6), np.float32)}
    candidate = evaluate_images(damaged, ground_truth, names).per_image
    worse = paired_ratio(candidate, reference, resamples=1000, seed=0)
    assert worse.ratio < 1 and worse.low < worse.ratio <= worse.high <= 1.0
    # Swapping the roles moves the interval above 1 by the same mechanism.
    better = paired_ratio(reference, candidate, resamples=1000, seed=0)
    assert better.ratio > 1 and 1.0 <= better.low <= better.ratio < better.high


def test_resamples_are_seeded_and_draw_every_image_count():
    a, b = resample_weights(50, 200, seed=7), resample_weights(50, 200, seed=7)
    assert (a == b).all() and (a.sum(axis=1) == 50).all()
    assert not (a == resample_weights(50, 200, seed=8)).all()


def test_gate_message_says_when_the_set_is_too_small(fp32_detections):
    detections, ground_truth, names = fp32_detections
    reference = evaluate_images(detections, ground_truth, names).per_image
    victim = sorted(detections)[0]
    candidate = evaluate_images({**detections, victim: detections[victim][:1]}, ground_truth, names).per_image
    interval = paired_ratio(candidate, reference, "int8-fp32", "fp32")
    gate = BuildGateResult("int8-fp32", 0.43, 0.43 * interval.ratio, 0.99, interval)
    assert f"{interval.low:.4f}-{interval.high:.4f}" in gate.message()
    if interval.width > 0.01:
        assert gate.decidable is False and "TOO FEW IMAGES TO DECIDE" in gate.message()
    wide_margin = BuildGateResult("int8-fp32", 0.43, 0.43 * interval.ratio, 0.5, interval)
    assert wide_margin.decidable and "TOO FEW" not in wide_margin.message()


def test_overlap_detected_by_content_even_under_another_name(assets, tmp_path):
    calib = sorted((assets / "coco" / "calib2017").glob("*.jpg"))[:4]
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    val = sorted((assets / "coco" / "val2017").glob("*.jpg"))[:3]
    for path in val:
        shutil.copy(path, val_dir / path.name)
    used = {"calibration": image_hashes(calib)}
    assert find_overlap(sorted(val_dir.iterdir()), used) == []
    shutil.copy(calib[2], val_dir / "renamed_copy.jpg")  # same bytes, another name
    overlaps = find_overlap(sorted(val_dir.iterdir()), used)
    assert overlaps == [f"renamed_copy.jpg = calibration image {calib[2].name}"]
    with pytest.raises(DataOverlapError, match="renamed_copy.jpg"):
        check_no_overlap(sorted(val_dir.iterdir()), used)
    assert check_no_overlap(sorted(val_dir.iterdir()), used, allow=True) == overlaps


def test_eval_onnx_refuses_validation_images_recorded_as_calibration(yolov8n_build, assets, tmp_path):
    """The build records calibration hashes in the manifest; eval-onnx checks its validation images against them."""
    import json

    from click.testing import CliRunner

    from packager.cli.main import main

    build = tmp_path / "build"
    build.mkdir()
    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    first = sorted((assets / "coco" / "val2017").glob("*.jpg"))[0]
    shutil.copy(first, val_dir / first.name)
    manifest["calibration"]["image_sha256"] = image_hashes([first])
    (build / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["eval-onnx", "--build", str(build), "--val-images", str(val_dir),
                                       "--val-annotations",
                                       str(assets / "coco" / "annotations" / "instances_val2017_128.json")])
    assert result.exit_code != 0 and f"{first.name} = calibration image {first.name}" in result.output


def test_subset_equals_evaluating_only_those_images(fp32_detections):
    """Weight 0 outside a subset gives exactly pycocotools' mAP of the subset alone (what the README's image-count
    extrapolation relies on)."""
    detections, ground_truth, names = fp32_detections
    full = evaluate_images(detections, ground_truth, names).per_image
    names_sorted = sorted(detections, key=lambda n: ground_truth.image_ids[n])
    subset = np.arange(0, len(names_sorted), 3)
    alone = evaluate_images({names_sorted[i]: detections[names_sorted[i]] for i in subset}, ground_truth, names)
    weights = np.zeros((1, full.images))
    weights[0, subset] = 1
    assert weighted_map(full, weights)[0] == pytest.approx(alone.metrics.map50_95, abs=1e-12)


def test_paired_difference_of_identical_models_is_exactly_zero(fp32_detections):
    detections, ground_truth, names = fp32_detections
    a = evaluate_images(detections, ground_truth, names).per_image
    b = evaluate_images({k: v.copy() for k, v in detections.items()}, ground_truth, names).per_image
    same = paired_difference(a, b, "a", "b", resamples=500, seed=1)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and not same.decided
    assert same.images == VAL_IMAGES and same.candidate_map == same.reference_map


def test_paired_difference_separates_a_slightly_damaged_model(fp32_detections):
    """Drop the highest-scoring detection (nearly always a true positive) on every other image: a small loss,
    but on the same images in every resample, so the paired interval of the difference lies below zero
    (decided) while each model's own interval is over twice as wide; the point value is the plain difference of
    pycocotools' two mAPs."""
    detections, ground_truth, names = fp32_detections
    full = evaluate_images(detections, ground_truth, names)
    damaged_detections = {name: (np.delete(dets, np.argmax(dets[:, 4]), axis=0) if i % 2 == 0 and len(dets) else dets)
                          for i, (name, dets) in enumerate(sorted(detections.items()))}
    damaged = evaluate_images(damaged_detections, ground_truth, names)
    worse = paired_difference(damaged.per_image, full.per_image, "damaged", "fp32", resamples=1000, seed=0)
    assert worse.difference == pytest.approx(damaged.metrics.map50_95 - full.metrics.map50_95, abs=1e-12)
    assert worse.low <= worse.difference <= worse.high < 0 and worse.decided
    better = paired_difference(full.per_image, damaged.per_image, "fp32", "damaged", resamples=1000, seed=0)
    assert better.low == pytest.approx(-worse.high) and better.high == pytest.approx(-worse.low)
    # Unpaired, each model's own interval is far wider than the paired difference: pairing is what decides.
    own = resampled_interval(full.per_image, resamples=1000, seed=0)
    assert own[0] == pytest.approx(full.metrics.map50_95, abs=1e-12) and own[1] < own[0] < own[2]
    assert own[2] - own[1] > 2 * (worse.high - worse.low)


def test_difference_on_a_subset_equals_evaluating_only_those_images(fp32_detections):
    detections, ground_truth, names = fp32_detections
    ordered = sorted(detections, key=lambda n: ground_truth.image_ids[n])
    damaged_detections = {name: dets[::2] for name, dets in detections.items()}
    full = evaluate_images(detections, ground_truth, names).per_image
    damaged = evaluate_images(damaged_detections, ground_truth, names).per_image
    subset = np.arange(1, len(ordered), 2)
    alone = [evaluate_images({ordered[i]: d[ordered[i]] for i in subset}, ground_truth, names).metrics.map50_95
             for d in (damaged_detections, detections)]
    difference = paired_difference(damaged, full, resamples=200, subset=subset)
    assert difference.images == subset.size
    assert difference.difference == pytest.approx(alone[0] - alone[1], abs=1e-12)
