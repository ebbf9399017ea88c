"""Issue 12: `yqpack verify` cannot pass on garbage (real tritonserver, real pycocotools, real onnxruntime)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from packager.metrics.coco_eval import CocoMetrics
from packager.verify.gates import AbsoluteGates, AccuracyReference, ServedAccuracy, absolute_accuracy_gates, readiness_gates

IMAGES = 16


def _accuracy(model: str, map50_95: float | None) -> ServedAccuracy:
    metrics = None if map50_95 is None else CocoMetrics(map50_95, 0, 0, 0, 0, 0, 16, 100)
    return ServedAccuracy(model, "m", model.rsplit("_", 1)[-1], metrics, 16, 0, [])


def test_absolute_gates_hold_a_single_precision():
    reference = {"m_fp32": AccuracyReference("m_fp32", "fp32", 0.4344, 16, "test")}
    ok, = absolute_accuracy_gates(AbsoluteGates(), [_accuracy("m_fp32", 0.4341)], reference)
    assert ok.passed and ok.gate == "--max-map-drift"
    bad, = absolute_accuracy_gates(AbsoluteGates(), [_accuracy("m_fp32", 0.03)], reference)
    assert not bad.passed and "off by 0.4044" in bad.detail
    missing, = absolute_accuracy_gates(AbsoluteGates(), [_accuracy("m_fp32", 0.43)], {})
    assert not missing.passed and "no reference" in missing.detail
    floor = absolute_accuracy_gates(AbsoluteGates(min_map=0.3), [_accuracy("m_fp32", 0.03)], {})
    assert [(g.gate, g.passed) for g in floor] == [("--min-map", False)]
    none = absolute_accuracy_gates(AbsoluteGates(min_map=0.3), [_accuracy("m_fp32", None)], reference)
    assert [g.passed for g in none] == [False, False]
    assert not readiness_gates({"m_int8": "UNAVAILABLE: unloaded"})[0].passed


def _subset_annotations(source, names, destination, mirror: bool, id_shift: int = 0):
    data = json.loads(source.read_text())
    images = [image for image in data["images"] if image["file_name"] in names]
    ids = {image["id"]: image for image in images}
    annotations = [dict(a) for a in data["annotations"] if a["image_id"] in ids]
    if mirror:  # left-right mirrored boxes: plausible-looking, wrong ground truth
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            annotation["bbox"] = [ids[annotation["image_id"]]["width"] - x - w, y, w, h]
    for annotation in annotations:  # a converter off by one: every category id one too high
        annotation["category_id"] += id_shift
    destination.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return destination


@pytest.fixture(scope="module")
def val_subset(sample_val, tmp_path_factory):
    """The first 16 annotated val images, their true annotations and a mirrored copy."""
    images_dir, annotations = sample_val
    names = [image["file_name"] for image in json.loads(annotations.read_text())["images"]][:IMAGES]
    folder = tmp_path_factory.mktemp("val16")
    for name in names:
        shutil.copy(images_dir / name, folder / name)
    true = _subset_annotations(annotations, names, folder.parent / "true16.json", mirror=False)
    mirrored = _subset_annotations(annotations, names, folder.parent / "mirrored16.json", mirror=True)
    return folder, true, mirrored


@pytest.fixture(scope="module")
def evaluated_build(yolov8n_build, val_subset, coco_class_names, tmp_path_factory):
    """The session build's manifest (artifacts by absolute path) with an fp32 `evaluation` on the true 16."""
    from packager.metrics.coco_eval import CocoGroundTruth, evaluate
    from packager.evaluate.onnx_eval import detect_images

    folder, true, _ = val_subset
    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    for artifact in manifest["artifacts"].values():
        artifact["path"] = str((yolov8n_build / artifact["path"]).resolve())
    files = sorted(folder.iterdir())
    detections = detect_images(manifest["artifacts"]["fp32"]["path"], files, tuple(manifest["imgsz"]),
                               show_progress=False)
    metrics = evaluate(detections, CocoGroundTruth(true), manifest["class_names"])
    build = tmp_path_factory.mktemp("evaluated-build")
    # What a build evaluated on these 16 records: verify reuses its number only for the same images and classes.
    config = {**(manifest.get("config") or {}), "val_images": str(folder), "val_annotations": str(true), "data": None}
    (build / "manifest.json").write_text(json.dumps({**manifest, "evaluation": {"fp32": metrics.as_dict()},
                                                     "config": config}))
    return build, metrics


def _verify(server, folder, annotations, report_dir, *extra):
    command = [sys.executable, "-m", "packager.cli.main", "verify", "--url", server.grpc_url, "--images", str(folder),
               "--annotations", str(annotations), "--models", "yolov8n_fp32", "--concurrency", "1",
               "--requests", "2", "--warmup", "0", "--no-detector-load", "--report-dir", str(report_dir),
               "--no-progress", *extra]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    return completed, json.loads((report_dir / "report.json").read_text())


@pytest.mark.slow
def test_mirrored_annotations_fail_a_single_precision(local_server, val_subset, evaluated_build, tmp_path):
    folder, true, mirrored = val_subset
    build, metrics = evaluated_build
    completed, report = _verify(local_server, folder, mirrored, tmp_path / "mirrored", "--build", str(build))
    assert completed.returncode == 1, completed.stderr
    assert "gate failed: --max-map-drift on yolov8n_fp32" in completed.stderr
    # another file of the same images and classes: the build's own number, with both files named
    assert f"not on this run's {mirrored.resolve()}" in completed.stderr
    served = report["accuracy"][0]["metrics"]["map50_95"]
    assert served < metrics.map50_95 / 2, (served, metrics.map50_95)
    # the same served model against the true annotations: equal to the build's own evaluation, exit 0
    completed, report = _verify(local_server, folder, true, tmp_path / "true", "--build", str(build))
    assert completed.returncode == 0, completed.stderr
    drift = next(g for g in report["gates"] if g["gate"] == "--max-map-drift")
    assert drift["passed"] and drift["value"] < 1e-3 and "manifest's evaluation" in drift["detail"]
    assert next(g for g in report["gates"] if g["gate"] == "annotations")["passed"]


@pytest.mark.slow
def test_wrong_annotations_fail_without_an_independent_reference(local_server, val_subset, yolov8n_build, tmp_path):
    """Issue 19: the build evaluated other images, so the drift gate's reference is eval-onnx on these 16 images
    with the same wrong annotations - it holds; the annotation check fails, naming the mistake."""
    folder, true, mirrored = val_subset
    completed, report = _verify(local_server, folder, mirrored, tmp_path / "mirrored", "--build", str(yolov8n_build))
    assert completed.returncode == 1, completed.stderr
    failed = {g["gate"]: g for g in report["gates"] if not g["passed"]}
    assert set(failed) == {"annotations"}, failed  # the drift gate alone compares two runs on the same labels
    assert "gate failed: annotations on yolov8n_fp32: annotated boxes are mirrored horizontally" in completed.stderr
    markdown = (tmp_path / "mirrored" / "report.md").read_text()
    assert "evaluated here on the same images and annotation file" in markdown
    assert "## Annotation check (yolov8n_fp32): **FAIL**" in markdown
    shifted = _subset_annotations(true, [p.name for p in sorted(folder.iterdir())], tmp_path / "shifted16.json",
                                  mirror=False, id_shift=1)
    completed, report = _verify(local_server, folder, shifted, tmp_path / "shifted", "--build", str(yolov8n_build))
    assert completed.returncode == 1, completed.stderr
    assert "gate failed: annotations on yolov8n_fp32: category ids are shifted by +1" in completed.stderr


@pytest.mark.slow
def test_without_a_reference_min_map_still_holds_the_model(local_server, val_subset, tmp_path, monkeypatch):
    folder, _, mirrored = val_subset
    monkeypatch.setenv("YQPACK_HOME", str(tmp_path / "home"))  # no detached server record to find a build by
    completed, report = _verify(local_server, folder, mirrored, tmp_path / "r1")
    assert completed.returncode == 1 and "gate failed: --max-map-drift on yolov8n_fp32: no reference" in completed.stderr
    completed, report = _verify(local_server, folder, mirrored, tmp_path / "r2", "--min-map", "0.2")
    assert completed.returncode == 1 and "gate failed: --min-map on yolov8n_fp32" in completed.stderr


@pytest.mark.slow
def test_failed_images_stay_in_the_denominator(local_server, val_subset, yolov8n_build, tmp_path):
    """A corrupt JPEG the server refuses is scored as an image without detections, and reported."""
    folder, true, _ = val_subset
    damaged = tmp_path / "images"
    shutil.copytree(folder, damaged)
    victim = sorted(damaged.iterdir())[0]
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    victim.write_bytes(bytes(data))
    completed, report = _verify(local_server, damaged, true, tmp_path / "r", "--build", str(yolov8n_build))
    assert completed.returncode == 1, completed.stderr
    accuracy = report["accuracy"][0]
    assert accuracy["failed_files"] == [victim.name] and accuracy["errors"] == 1
    assert accuracy["metrics"]["images"] == IMAGES and accuracy["images"] == IMAGES
    assert any("Corrupt JPEG data" in message for message in accuracy["error_messages"])
    failed = {g["gate"] for g in report["gates"] if not g["passed"]}
    assert "--max-errors" in failed
