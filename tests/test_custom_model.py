"""A user's own model and dataset through the whole path, with nothing of COCO left: build --data -> render ->
serve -> verify --data, on a real custom model (the sample assets' sign-language yolov8n, 26 classes, trained at
416 px) whose classes are renamed with spaces and punctuation, served at a non-square 384x448, scored on a dataset
YAML that lists the classes in another order than the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

LETTERS = [chr(ord("A") + index) for index in range(26)]
# Names a user might really write: spaces, punctuation, quotes, a slash, a colon, non-ASCII.
NAMES = [f'sign "{letter}", hand/{index}: Ü' if index % 3 == 0 else f"letter {letter} (ASL)"
         for index, letter in enumerate(LETTERS)]
IMGSZ = (384, 448)
TRAIN_IMAGES, VAL_IMAGES = 24, 48


@pytest.fixture(scope="module")
def custom_checkpoint(assets, tmp_path_factory) -> Path:
    """yolov8n-asl.pt with its classes renamed (weights untouched)."""
    import torch

    checkpoint = torch.load(assets / "custom" / "asl" / "yolov8n-asl.pt", map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        if checkpoint.get(key) is not None:
            checkpoint[key].names = dict(enumerate(NAMES))
    out = tmp_path_factory.mktemp("custom-model") / "signs.pt"
    torch.save(checkpoint, out)
    return out


@pytest.fixture(scope="module")
def dataset_yaml(assets, tmp_path_factory) -> Path:
    """An Ultralytics dataset (images/ + labels/, data.yaml) from a spread of asl's train and valid images, names
    listed in reverse order with the label class ids remapped to that order."""
    source = assets / "custom" / "asl"
    root = tmp_path_factory.mktemp("custom-dataset")
    order = list(reversed(range(len(NAMES))))  # YAML index -> model index
    to_yaml = {model: yaml_index for yaml_index, model in enumerate(order)}
    for split, folder, count in (("train", "train", TRAIN_IMAGES), ("val", "valid", VAL_IMAGES)):
        images = sorted((source / folder / "images").glob("*.jpg"))
        step = max(1, len(images) // count)
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in images[::step][:count]:
            (root / "images" / split / image.name).symlink_to(image)
            rows = (source / folder / "labels" / f"{image.stem}.txt").read_text().split("\n")
            remapped = [" ".join([str(to_yaml[int(row.split()[0])]), *row.split()[1:]]) for row in rows if row.strip()]
            (root / "labels" / split / f"{image.stem}.txt").write_text("\n".join(remapped) + "\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": {index: NAMES[model] for index, model in enumerate(order)}},
                                   allow_unicode=True))
    return data


@pytest.fixture(scope="module")
def custom_build(custom_checkpoint, dataset_yaml, tmp_path_factory):
    """build --data (calibration from its train split, gate on its val split) at a non-square size, rendered for
    the local target."""
    from packager.pipeline.run import BuildOptions, run_build

    root = tmp_path_factory.mktemp("custom-build")
    result = run_build(BuildOptions(model=custom_checkpoint, out=root / "signs", data=dataset_yaml, imgsz=IMGSZ,
                                    calib_size=16, min_map_ratio=0.95, repository=root / "repository",
                                    show_progress=False))
    return result


@pytest.fixture(scope="module")
def custom_server(custom_build, server_env, tmp_path_factory):
    from packager.serve.embedded import LocalTritonServer, find_free_ports

    grpc_port, http_port, metrics_port = find_free_ports(3)
    log = tmp_path_factory.mktemp("custom-serve") / "tritonserver.log"
    with LocalTritonServer(custom_build.repository, server_env, grpc_port=grpc_port, http_port=http_port,
                           metrics_port=metrics_port, log_path=log) as running:
        yield running


def test_build_keeps_the_models_names_and_size(custom_build):
    spec = custom_build.manifest.model
    assert spec.name == "signs" and list(spec.class_names) == NAMES and spec.imgsz == IMGSZ
    assert spec.input.dims == (3, *IMGSZ) and spec.output.dims[0] == 4 + len(NAMES)
    assert custom_build.gate is not None and custom_build.gate.passed
    assert custom_build.manifest.evaluation.metrics["fp32"].images == VAL_IMAGES


def test_the_repository_carries_the_names_for_every_client(custom_build):
    """labels.txt, the ensemble's class_names parameter and the metadata Ultralytics' Triton client reads all hold
    the model's own names, quotes, commas and non-ASCII included."""
    import ast

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repository = Path(custom_build.repository)
    for precision in ("fp32", "int8"):
        ensemble = repository / f"signs_{precision}"
        assert (ensemble / "labels.txt").read_text(encoding="utf-8").splitlines() == NAMES
        config = text_format.Parse((ensemble / "config.pbtxt").read_text(encoding="utf-8"),
                                   model_config_pb2.ModelConfig())
        assert json.loads(config.parameters["class_names"].string_value) == NAMES
        detector = text_format.Parse((repository / f"signs_{precision}_detector" / "config.pbtxt").read_text(
            encoding="utf-8"), model_config_pb2.ModelConfig())
        metadata = ast.literal_eval(detector.parameters["metadata"].string_value)
        assert metadata["names"] == dict(enumerate(NAMES)) and list(metadata["imgsz"]) == list(IMGSZ)


def test_served_and_verified_on_the_users_dataset(custom_server, custom_build, dataset_yaml, tmp_path):
    """verify --data scores the served ensembles on the YAML's val split (its classes listed in another order than
    the model's), equal to the build's own evaluation; the report speaks of the model's classes, nothing of COCO's."""
    from click.testing import CliRunner

    from packager.cli.main import main

    result = CliRunner().invoke(main, [
        "verify", "--url", custom_server.grpc_url, "--data", str(dataset_yaml), "--build", str(custom_build.build_dir),
        "--report-dir", str(tmp_path / "report"), "--requests", "8", "--concurrency", "1,2", "--min-map-ratio", "0.95"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    served = {row["precision"]: row for row in report["accuracy"]}
    recorded = custom_build.manifest.evaluation.metrics
    assert served["fp32"]["metrics"]["images"] == VAL_IMAGES
    assert served["fp32"]["metrics"]["map50_95"] == pytest.approx(recorded["fp32"].map50_95, abs=1e-4)
    assert served["int8"]["metrics"]["map50_95"] == pytest.approx(recorded["int8-fp32"].map50_95, abs=5e-3)
    assert served["fp32"]["metrics"]["map50_95"] > 0.5  # a real model on its own data
    markdown = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "signs_int8" in markdown and "person" not in markdown
    # a gate that cannot hold fails the run, as the exit code says
    failing = CliRunner().invoke(main, [
        "verify", "--url", custom_server.grpc_url, "--data", str(dataset_yaml), "--build", str(custom_build.build_dir),
        "--report-dir", str(tmp_path / "failing"), "--requests", "4", "--concurrency", "1", "--min-map", "0.99"])
    assert failing.exit_code == 1, failing.output
