"""`yqpack verify` compares the server with one build: --build, else the detached server's recorded build; the
report names it, and the MAC coverage and the accuracy references both come from it (a real tritonserver)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from packager.core.build_records import CocoMetrics, EvaluationRecord
from packager.core.manifest import BuildManifest
from packager.serve.records import ServerState, write_state
from packager.verify.result import VerifyOptions
from packager.verify.run import run_verify

MARKED_MAP = 0.1234  # a reference no real evaluation gives: it can only have come from the other build


def _other_build(build: Path, folder: Path, sample_val) -> Path:
    """The session build's artifacts (links) under a manifest of its own that records other facts: half of the
    INT8 MACs quantized, an fp32 mAP of MARKED_MAP on the first 8 sample images (its config names their annotation
    file: verify reuses a recorded evaluation only for the images and classes it scores)."""
    (folder / "onnx").mkdir(parents=True)
    for path in build.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            (folder / path.relative_to(build)).symlink_to(path)
    images, annotations = sample_val
    data = json.loads(annotations.read_text())
    first = data["images"][:8]
    ids = {image["id"] for image in first}
    evaluated = folder / "first8.json"
    evaluated.write_text(json.dumps({**data, "images": first,
                                     "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    manifest = BuildManifest.load(build)
    coverage = manifest.quantization.conv_coverage["int8"]
    halved = replace(coverage, quantized_macs={**coverage.quantized_macs, "int8": coverage.total_macs // 2})
    manifest.quantization = replace(manifest.quantization, conv_coverage={"int8": halved}, int8_mac_coverage=0.5)
    manifest.evaluation = EvaluationRecord({"fp32": CocoMetrics(MARKED_MAP, 0.2, 0.1, 0.0, 0.1, 0.2, 8, 100)})
    manifest.config = {**(manifest.config or {}), "val_images": str(images), "val_annotations": str(evaluated),
                       "data": None}
    manifest.save(folder)
    return folder


@pytest.mark.slow
def test_coverage_and_accuracy_reference_come_from_the_one_build(local_server, model_repository, yolov8n_build,
                                                                 sample_val, tmp_path, monkeypatch):
    other = _other_build(yolov8n_build, tmp_path / "other-build", sample_val)
    monkeypatch.setenv("YQPACK_HOME", str(tmp_path / "home"))  # the detached record names the session build
    write_state(ServerState(
        pid=local_server.process.pid, grpc_port=local_server.ports["grpc"], http_port=local_server.ports["http"],
        metrics_port=local_server.ports["metrics"], repository=str(model_repository.path), shm_prefix="unused",
        log_path=str(local_server.log_path), started_at=time.time()))
    images, annotations = sample_val
    options = VerifyOptions(images, annotations, url=local_server.grpc_url, models=("yolov8n_fp32", "yolov8n_int8"),
                            concurrency=(1,), requests_per_level=2, warmup_requests=0, detector_load=False,
                            max_images=8, progress=False)

    chosen = run_verify(replace(options, build_dir=other, report_dir=tmp_path / "with-build"))
    assert chosen.build == f"{other} (--build)"
    assert chosen.references["yolov8n_fp32"].map50_95 == MARKED_MAP
    assert all(str(other) in reference.source for reference in chosen.references.values())
    int8 = next(c for c in chosen.comparisons if c.model == "yolov8n_int8")
    assert int8.mac_coverage == pytest.approx(0.5, abs=1e-6)
    report = (tmp_path / "with-build" / "report.md").read_text()
    assert f"- build: {other} (--build)" in report
    assert json.loads((tmp_path / "with-build" / "report.json").read_text())["build"] == chosen.build

    recorded = run_verify(replace(options, report_dir=tmp_path / "recorded"))
    session_build = Path(yolov8n_build).resolve()
    assert recorded.build.startswith(f"{session_build} (the build of {model_repository.path}")
    assert "detached yqpack serve" in recorded.build
    assert recorded.references["yolov8n_fp32"].map50_95 != MARKED_MAP
    assert all(str(session_build) in reference.source for reference in recorded.references.values())
    int8 = next(c for c in recorded.comparisons if c.model == "yolov8n_int8")
    assert int8.mac_coverage == pytest.approx(BuildManifest.load(yolov8n_build).quantization.mac_coverage("int8"))
    assert int8.mac_coverage > 0.9


def test_a_build_folder_without_manifest_is_refused_before_any_request(sample_val, tmp_path):
    images, annotations = sample_val
    (tmp_path / "empty").mkdir()
    options = VerifyOptions(images, annotations, url="127.0.0.1:1", build_dir=tmp_path / "empty",
                            report_dir=tmp_path / "report", wait_s=0.1, progress=False)
    with pytest.raises(FileNotFoundError, match="is not a build directory"):
        run_verify(options)
