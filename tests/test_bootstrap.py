"""Paired bootstrap intervals on real pycocotools results, and the calibration/validation overlap check."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from packager.metrics.intervals import (
    CategoryResults,
    PerImageResults,
    paired_difference,
    paired_ratio,
    resample_weights,
    resampled_interval,
    weighted_map,
)
from packager.calibration.calibration import check_no_overlap, find_overlap, image_hashes
from packager.core.contracts import DataOverlapError
from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
from packager.metrics.weighted_ap import _padded_uniform_thresholds, _plan, _thresholds_reached
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


# --- the scalable bootstrap (packager.metrics.weighted_ap) against pycocotools and the implementation it replaced ---


def synthetic_detections(ground_truth: CocoGroundTruth, class_names: list[str], seed: int, miss: float, noise: float,
                         false_positives: int) -> dict[str, np.ndarray]:
    """Detections made from the annotations by a seeded generator (uniform draws only, stable across machines):
    each box (crowd regions too) found unless drawn as missed, its corners moved by up to +-noise/2 of its size,
    plus `false_positives` random boxes per image; scores distinct within an image at pycocotools' 5 decimals and
    mostly higher for found boxes."""
    rng = np.random.default_rng(seed)
    class_of = dict(zip(ground_truth.category_ids_for(class_names), range(len(class_names))))
    coco = ground_truth.coco
    detections = {}
    for image in sorted(coco.dataset["images"], key=lambda record: record["id"]):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        found = rng.random(len(anns)) >= miss
        xyxy = np.column_stack([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]])
        xyxy += (rng.random(xyxy.shape) - 0.5) * noise * np.tile(boxes[:, 2:], 2)
        size = np.array([image["width"], image["height"]], dtype=np.float64)
        corner = rng.random((false_positives, 2)) * size
        wrong = np.column_stack([corner, corner + (0.05 + 0.3 * rng.random((false_positives, 2))) * size])
        classes = np.concatenate([[class_of[a["category_id"]] for a in anns],
                                  rng.integers(0, len(class_names), false_positives)])
        keep = np.concatenate([found, np.ones(false_positives, bool)])
        rows, classes = np.vstack([xyxy, wrong])[keep], classes[keep]
        is_found = np.concatenate([np.ones(found.sum()), np.zeros(false_positives)])
        levels = np.sort(rng.choice(np.arange(1000, 100000), len(rows), replace=False))[::-1]
        scores = np.empty(len(rows))
        scores[np.argsort(-(rng.random(len(rows)) + 0.6 * is_found), kind="stable")] = levels / 1e5
        detections[image["file_name"]] = np.column_stack([rows, scores, classes])
    return detections


@pytest.fixture(scope="module")
def synthetic_pair(coco_ground_truth, coco_class_names):
    """pycocotools' evaluations of two synthetic models on the 128 sample images: (reference, candidate)."""
    reference = synthetic_detections(coco_ground_truth, coco_class_names, 1, 0.15, 0.15, 40)
    candidate = synthetic_detections(coco_ground_truth, coco_class_names, 2, 0.2, 0.25, 40)
    return (evaluate_images(reference, coco_ground_truth, coco_class_names),
            evaluate_images(candidate, coco_ground_truth, coco_class_names), reference)


# Recorded from the dense implementation this one replaced (packager/metrics/intervals.py at commit 479ffc6, which
# held per-image running counts as (images x true positives) matrices) on `synthetic_pair`, 1000 resamples, seed 0.
PREVIOUS_RATIO = (0.7376357167563257, 0.6588853159616049, 0.8539122883873066)
PREVIOUS_DIFFERENCE = (-0.10215836213827201, -0.14757400950963204, -0.05639544529972553)
PREVIOUS_OWN_INTERVAL = (0.3893760266270354, 0.3744604523856177, 0.4474853668514552)
PREVIOUS_RESAMPLE_SUMS = (411.06683147995557, 310.7819195767626)  # sum of the 1000 resampled mAPs of each model


def test_scalable_bootstrap_equals_the_previous_implementation_on_the_128_images(synthetic_pair):
    reference, candidate, _ = synthetic_pair
    assert reference.per_image.images == 128
    ratio = paired_ratio(candidate.per_image, reference.per_image, resamples=1000, seed=0)
    assert (ratio.ratio, ratio.low, ratio.high) == pytest.approx(PREVIOUS_RATIO, abs=1e-12)
    difference = paired_difference(candidate.per_image, reference.per_image, resamples=1000, seed=0)
    assert (difference.difference, difference.low, difference.high) == pytest.approx(PREVIOUS_DIFFERENCE, abs=1e-12)
    assert resampled_interval(reference.per_image, resamples=1000, seed=0) == pytest.approx(PREVIOUS_OWN_INTERVAL,
                                                                                            abs=1e-12)
    weights = resample_weights(128, 1000, 0)
    sums = (weighted_map(reference.per_image, weights).sum(), weighted_map(candidate.per_image, weights).sum())
    assert sums == pytest.approx(PREVIOUS_RESAMPLE_SUMS, abs=1e-9)
    # and both models' point values are pycocotools' own
    assert ratio.ratio == pytest.approx(candidate.metrics.map50_95 / reference.metrics.map50_95, abs=1e-12)


def test_integer_weights_equal_pycocotools_on_the_images_repeated_that_often(synthetic_pair, coco_ground_truth,
                                                                              coco_class_names, tmp_path):
    """A resample counts image i w_i times: real pycocotools on an annotation file where image i (its boxes and its
    detections) appears w_i times gives the same mAP50-95, to rounding (scores are distinct within an image, so
    the copies of a detection are adjacent in pycocotools' order too). Crowd regions are among the boxes: some
    detections are ignored at some IoU thresholds only (the correction path, checked to be taken)."""
    import json

    reference, _, detections = synthetic_pair
    results = reference.per_image
    assert any(t.extra_counts is not None for c in _plan(results).categories for t in c.thresholds)
    dataset = coco_ground_truth.coco.dataset
    by_id = {image["id"]: image for image in dataset["images"]}
    for row in resample_weights(results.images, 2, seed=11):
        repeated = {"images": [], "annotations": [], "categories": dataset["categories"]}
        repeated_detections = {}
        for image_id, weight in zip(map(int, results.image_ids), row):
            for copy in range(weight):  # ids image_id * 10 + copy keep copies adjacent in pycocotools' order
                image = {**by_id[image_id], "id": image_id * 10 + copy,
                         "file_name": f"{copy}_{by_id[image_id]['file_name']}"}
                repeated["images"].append(image)
                for ann in coco_ground_truth.coco.imgToAnns[image_id]:
                    repeated["annotations"].append({**ann, "id": len(repeated["annotations"]) + 1,
                                                    "image_id": image["id"]})
                repeated_detections[image["file_name"]] = detections[by_id[image_id]["file_name"]]
        path = tmp_path / "repeated.json"
        path.write_text(json.dumps(repeated))
        exact = evaluate_images(repeated_detections, CocoGroundTruth(path), coco_class_names).metrics.map50_95
        assert row.max() >= 3 and (row == 0).any()
        assert weighted_map(results, row[None])[0] == pytest.approx(exact, abs=1e-12)


def test_counting_reached_recall_thresholds_equals_searchsorted():
    thresholds = np.linspace(0.0, 1.0, 101)  # pycocotools' recThrs
    padded = _padded_uniform_thresholds(thresholds)
    recalls = np.concatenate([np.random.default_rng(0).random(100_000), thresholds, np.nextafter(thresholds, 2),
                              np.nextafter(thresholds[1:], -1)] + [np.arange(n + 1) / n for n in range(1, 300)])
    assert (_thresholds_reached(recalls, thresholds, padded) == np.searchsorted(thresholds, recalls, "right")).all()
    assert _padded_uniform_thresholds(np.array([0.0, 0.3, 0.9])) is None  # other thresholds: searchsorted itself


def tiled(results: PerImageResults, copies: int) -> PerImageResults:
    """`copies` copies of every image, the copies of each detection adjacent in the score order (where pycocotools
    puts equally scored detections of consecutive images): its mAP with all weights 1 is the original's."""
    n = results.images
    categories = [CategoryResults((c.image_index[:, None] + n * np.arange(copies)).ravel().astype(np.int32),
                                  np.repeat(c.true_positive, copies, axis=1), np.repeat(c.counted, copies, axis=1),
                                  np.tile(c.ground_truth, copies)) for c in results.categories]
    return PerImageResults(list(range(n * copies)), categories, results.recall_thresholds)


# What the paired bootstrap of 2 models x 5,120 images x ~800k detections each x 1000 resamples may allocate (it
# measured 223 MB; the implementation it replaced needed (images x true positives) and (images x detections of one
# category) float64 matrices: tens of GB).
BOOTSTRAP_MEMORY_BOUND = 512 * 2**20


def _rss(field: str) -> int:
    from pathlib import Path

    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def test_bootstrap_of_5000_images_stays_within_its_memory_bound(coco_ground_truth, coco_class_names):
    import tracemalloc
    from pathlib import Path

    # ~157 detections per image, as yolov8n at conf 0.001 gives (~185)
    evaluations = [evaluate_images(synthetic_detections(coco_ground_truth, coco_class_names, seed, miss, noise, 150),
                                   coco_ground_truth, coco_class_names) for seed, miss, noise in ((1, 0.15, 0.15),
                                                                                                  (2, 0.2, 0.25))]
    reference, candidate = (tiled(e.per_image, 40) for e in evaluations)
    assert reference.images == 5120 and reference.detections > 750_000 and candidate.detections > 750_000
    assert weighted_map(reference, np.ones((1, 5120)))[0] == pytest.approx(evaluations[0].metrics.map50_95, abs=1e-12)
    reference._plan = None  # the precomputation is part of what is measured
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS to its current RSS
    before = _rss("VmRSS")
    tracemalloc.start()
    try:
        interval = paired_ratio(candidate, reference, resamples=1000, seed=0)
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_growth = _rss("VmHWM") - before
    assert interval.images == 5120 and interval.low < interval.ratio < interval.high
    assert traced_peak < BOOTSTRAP_MEMORY_BOUND, f"{traced_peak / 2**20:.0f} MB allocated"
    assert rss_growth < BOOTSTRAP_MEMORY_BOUND, f"RSS grew by {rss_growth / 2**20:.0f} MB"
