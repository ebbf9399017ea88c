"""Issue 27: `yqpack verify --data PATH/data.yaml [--split val|test]` (real tritonserver, real pycocotools, real
ONNX). The YOLO datasets are written here from the 128 sample val images (symlinked) and their COCO boxes, with
the 80 COCO names in class-id order (categories sorted by id), the order yolov8n's classes have."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from packager.core.contracts import ConfigError
from packager.core.manifest import BuildManifest
from packager.verify.labels import LabelSource, compare_sources, recorded_source

JUDGE = "yolov8n_fp32"
CORRUPT_IMAGES = 32  # the annotation check names a mistake reliably from 16 images (docs/robustness.md)


def _yolo_row(category_box, width, height):
    x, y, w, h = category_box
    return (x + w / 2) / width, (y + h / 2) / height, w / width, h / height


def write_yolo(root: Path, images_dir: Path, data: dict, names: list[str], files: list[str] | None = None,
               corrupt=None, shift_labels: bool = False) -> Path:
    """A YOLO copy of the COCO `data` (non-crowd boxes of the classes in `names`): images/val/ symlinks,
    labels/val/*.txt, data.yaml. `corrupt(class, cx, cy, w, h)` rewrites each row as a buggy converter would;
    `shift_labels` gives each image the labels of the next one (labels of other images)."""
    by_name = {category["name"]: category["id"] for category in data["categories"]}
    class_of = {by_name[name]: index for index, name in enumerate(names) if name in by_name}
    boxes = defaultdict(list)
    for annotation in data["annotations"]:
        if not annotation["iscrowd"] and annotation["category_id"] in class_of:
            boxes[annotation["image_id"]].append(annotation)
    images = [image for image in data["images"] if files is None or image["file_name"] in files]
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    lines_of = []
    for image in images:
        (root / "images" / "val" / image["file_name"]).symlink_to(images_dir / image["file_name"])
        lines = []
        for annotation in boxes[image["id"]]:
            row = (class_of[annotation["category_id"]], *_yolo_row(annotation["bbox"], image["width"], image["height"]))
            lines.append(" ".join(f"{value:.17g}" for value in (corrupt(*row) if corrupt else row)))
        lines_of.append(lines)
    if shift_labels:
        lines_of = lines_of[1:] + lines_of[:1]
    for image, lines in zip(images, lines_of):
        label = root / "labels" / "val" / (Path(image["file_name"]).stem + ".txt")
        label.write_text("".join(f"{line}\n" for line in lines))
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "val": "images/val", "names": list(names)}))
    return root / "data.yaml"


def non_crowd_json(data: dict, destination: Path) -> Path:
    """The same boxes as the YOLO copy, as a COCO file: crowd regions dropped, area = the box's (as the YOLO
    ground truth computes it)."""
    annotations = [{**a, "area": a["bbox"][2] * a["bbox"][3]} for a in data["annotations"] if not a["iscrowd"]]
    destination.write_text(json.dumps({**data, "annotations": annotations}))
    return destination


@pytest.fixture(scope="module")
def coco128(sample_val):
    return json.loads(sample_val[1].read_text())


@pytest.fixture(scope="module")
def yolo80(coco128, sample_val, coco_class_names, tmp_path_factory):
    """(data.yaml of all 128 images with their 80-class labels, the non-crowd COCO file of the same boxes)."""
    root = tmp_path_factory.mktemp("yolo80")
    return write_yolo(root / "coco128", sample_val[0], coco128, coco_class_names), \
        non_crowd_json(coco128, root / "non_crowd.json")


@pytest.fixture(scope="module")
def corruptible(coco128, coco_class_names):
    """The first images whose boxes survive ids + 1 (no toothbrush, the last class: 80 is refused by the reader)."""
    last = next(c["id"] for c in coco128["categories"] if c["name"] == coco_class_names[-1])
    with_last = {a["image_id"] for a in coco128["annotations"] if a["category_id"] == last}
    return [image["file_name"] for image in coco128["images"] if image["id"] not in with_last][:CORRUPT_IMAGES]


@pytest.fixture(scope="module")
def local_detections(yolov8n_build, sample_val):
    """The build's fp32 ONNX on the 128 images, run here (an independent check of what the server scored)."""
    from packager.core.manifest import BuildManifest
    from packager.evaluate.onnx_eval import detect_images
    from packager.metrics.coco_eval import CocoGroundTruth

    manifest = BuildManifest.load(yolov8n_build)
    files = CocoGroundTruth(sample_val[1]).image_files(sample_val[0])
    return detect_images(manifest.artifact_path(yolov8n_build, "fp32"), files, manifest.model.imgsz,
                         show_progress=False, head_format=manifest.model.head)


def _verify(server, build, report_dir, **source):
    """One verify run of the served fp32 ensemble with small load levels. One request at a time in the accuracy
    pass: the dynamic batcher then cannot group images differently between the runs compared to 1e-9."""
    from packager.verify.gates import AbsoluteGates
    from packager.verify.run import VerifyOptions, run_verify

    options = VerifyOptions(
        url=server.grpc_url, models=[JUDGE], build_dir=build, report_dir=report_dir, concurrency=(1,),
        requests_per_level=8, warmup_requests=0, detector_load=False, progress=False,
        accuracy_concurrency=1, absolute=AbsoluteGates(), server_log=server.log_path, **source,
    )
    return run_verify(options)


def _cli(server, build, report_dir, *args):
    command = [sys.executable, "-m", "packager.cli.main", "verify", "--url", server.grpc_url, "--models", JUDGE,
               "--build", str(build), "--concurrency", "1", "--requests", "8", "--warmup", "0",
               "--no-detector-load", "--report-dir", str(report_dir), "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


# --- options and the reference choice (no server) --------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--data", "x/data.yaml", "--images", "x", "--annotations", "y.json"], "not both"),
    ([], "give --data PATH/data.yaml [--split val|test], or --images DIR with --annotations FILE"),
    (["--images", "x"], "missing: --annotations"),
    (["--split", "test", "--images", "x", "--annotations", "y.json"], "--split test names a split of --data"),
])
def test_one_ground_truth_or_a_clear_error(args, words, tmp_path):
    completed = subprocess.run([sys.executable, "-m", "packager.cli.main", "verify", "--url", "127.0.0.1:9",
                                "--report-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1 and "Error: " in completed.stderr, completed.stderr
    assert words in completed.stderr and "Traceback" not in completed.stderr, completed.stderr


def test_a_recorded_evaluation_is_reused_only_like_with_like(yolo80, sample_val, coco_class_names):
    """The build's evaluation (its config names what it scored) against what this run scores."""
    data_yaml, non_crowd = yolo80
    images, annotations = sample_val
    names = frozenset(coco_class_names)
    coco, note = recorded_source({"val_images": str(images), "val_annotations": str(annotations)})
    assert note == "" and coco.format == "coco" and len(coco.images) == 128 and coco.classes == names
    yolo, note = recorded_source({"data": str(data_yaml), "split": "val"})
    assert note == "" and yolo.format == "yolo" and yolo.images == coco.images and yolo.classes == names
    same_yolo = LabelSource("yolo", data_yaml.resolve(), "val", coco.images, names)
    assert compare_sources(yolo, "", same_yolo) == (True, "")
    reuse, why = compare_sources(coco, "", same_yolo)
    assert not reuse and "score differently" in why
    other_file = LabelSource("coco", non_crowd.resolve(), None, coco.images, names)
    reuse, why = compare_sources(coco, "", other_file)
    assert reuse and f"not on this run's {non_crowd.resolve()}" in why  # said, not silent
    two = LabelSource("coco", non_crowd.resolve(), None, coco.images, frozenset({"person", "car"}))
    assert compare_sources(coco, "", two)[0] is False
    fewer = LabelSource("coco", annotations.resolve(), None, frozenset(sorted(coco.images)[:127]) | {"x.jpg"}, names)
    assert compare_sources(coco, "", fewer)[0] is False
    unknown, note = recorded_source({})
    assert unknown is None and compare_sources(None, note, same_yolo)[0] is True
    assert "does not record" in compare_sources(None, note, same_yolo)[1]


# --- the annotation check on YOLO labels (the real ONNX's detections, no server) --------------------------------

YOLO_MISTAKES = {  # name -> (row rewrite, words the cause must contain)
    "mirrored x": (lambda c, cx, cy, w, h: (c, 1 - cx, cy, w, h), "labels are mirrored left-right"),
    "mirrored y": (lambda c, cx, cy, w, h: (c, cx, 1 - cy, w, h), "labels are mirrored upside down"),
    "x1 y1 x2 y2": (lambda c, cx, cy, w, h: (c, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
                    "label rows hold corners 'class x1 y1 x2 y2'"),
    "top-left x y w h": (lambda c, cx, cy, w, h: (c, cx - w / 2, cy - h / 2, w, h), "the top-left corner"),
    "ids +1": (lambda c, cx, cy, w, h: (c + 1, cx, cy, w, h), "class ids are off by one, +1"),
}


def _check_yolo(data_yaml, detections, coco_class_names):
    from packager.datasets.yolo_labels import load_split
    from packager.inference.letterbox import read_image
    from packager.verify.annotation_check import check_annotations
    from packager.verify.annotation_labels import yolo_label_set

    split = load_split(data_yaml, "val")
    sizes = {path.name: read_image(path).shape[1::-1] for path in split.image_paths}
    labels = yolo_label_set(split.image_paths, split.names, sizes)
    class_ids = [split.names.index(name) if name in split.names else None for name in coco_class_names]
    return check_annotations(JUDGE, detections, labels.images, class_ids, labels.category_names, labels.mistakes)


def test_true_yolo_labels_pass_and_each_yolo_mistake_is_named(coco128, sample_val, coco_class_names, corruptible,
                                                              local_detections, tmp_path):
    check = _check_yolo(write_yolo(tmp_path / "true", sample_val[0], coco128, coco_class_names, corruptible),
                        local_detections, coco_class_names)
    assert check.verdict == "pass" and check.ids == "class ids", check.cause
    assert check.as_given.precision > 0.8 and check.class_agreement.agreement > 0.9, check
    for mistake, (corrupt, words) in YOLO_MISTAKES.items():
        data_yaml = write_yolo(tmp_path / mistake.replace(" ", "_"), sample_val[0], coco128, coco_class_names,
                               corruptible, corrupt)
        check = _check_yolo(data_yaml, local_detections, coco_class_names)
        assert check.verdict == "fail" and words in check.cause, (mistake, check.cause)
    other = write_yolo(tmp_path / "other", sample_val[0], coco128, coco_class_names, corruptible, shift_labels=True)
    check = _check_yolo(other, local_detections, coco_class_names)
    assert check.verdict == "fail" and "labels of another split or dataset?" in check.cause, check.cause
    # The data.yaml lists the names in another order; the labels were written with the model's class ids.
    last = len(coco_class_names) - 1
    model_order = write_yolo(tmp_path / "model_order", sample_val[0], coco128, coco_class_names[::-1], corruptible,
                             lambda c, cx, cy, w, h: (last - c, cx, cy, w, h))
    check = _check_yolo(model_order, local_detections, coco_class_names)
    assert check.verdict == "fail" and "class ids follow the model's class list" in check.cause, check.cause


def test_pixel_coordinates_are_refused_naming_the_mistake(coco128, sample_val, coco_class_names, tmp_path):
    """Pixel values exceed 1: the label reader refuses them, with file, line and the likely mistake."""
    from packager.datasets.yolo_labels import load_split

    first = coco128["images"][0]
    pixels = lambda c, cx, cy, w, h: (c, cx * first["width"], cy * first["height"], w * first["width"],
                                      h * first["height"])
    data_yaml = write_yolo(tmp_path / "pixels", sample_val[0], coco128, coco_class_names, [first["file_name"]],
                           pixels)
    with pytest.raises(ConfigError, match=r"line 1: value .* is outside \[0, 1\].*pixel coordinates instead of "
                                          r"normalised"):
        load_split(data_yaml, "val")


# --- verify --data against the real server -----------------------------------------------------------------------


@pytest.mark.slow
def test_verify_data_scores_the_yolo_copy_as_its_coco_file(local_server, yolov8n_build, yolo80, sample_val,
                                                           tmp_path):
    """(a) The same boxes, as YOLO labels and as a COCO file: the same served mAP to 1e-9; --data passes."""
    data_yaml, non_crowd = yolo80
    coco = _verify(local_server, yolov8n_build, tmp_path / "coco", images_dir=sample_val[0], annotations=non_crowd)
    yolo = _verify(local_server, yolov8n_build, tmp_path / "yolo", data=data_yaml)
    (coco_accuracy,), (yolo_accuracy,) = coco.accuracy, yolo.accuracy
    assert yolo_accuracy.images == coco_accuracy.images == 128 and yolo_accuracy.errors == 0
    for metric in ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large"):
        assert getattr(yolo_accuracy.metrics, metric) == pytest.approx(getattr(coco_accuracy.metrics, metric),
                                                                       abs=1e-9), metric
    assert yolo.status == "pass" and yolo.exit_code == 0, [g for g in yolo.failed_gates]
    assert yolo.images["load_payloads"] == 128 and yolo.labels["format"] == "yolo"
    assert "977 boxes" in yolo.labels["description"] and yolo.labels["unscored"] == {JUDGE: []}
    reference = yolo.references[JUDGE]
    if BuildManifest.load(yolov8n_build).evaluation is None:  # CI's session build: no evaluation to reuse
        for run in (yolo, coco):
            assert run.references[JUDGE].source.startswith("eval-onnx of model.fp32.onnx"), run.references[JUDGE]
        return
    # The build evaluated the COCO file with its crowd regions: no reference for YOLO labels, evaluated here.
    assert reference.annotations and "not the manifest's evaluation" in reference.source, reference.source
    assert "score differently" in reference.source
    # The COCO file is another file of the same images and classes: the build's number, with both files named.
    assert "manifest's evaluation" in coco.references[JUDGE].source
    assert f"not on this run's {non_crowd.resolve()}" in coco.references[JUDGE].source
    (check,) = yolo.annotation_checks
    assert check.verdict == "pass" and check.images == 128 and check.ids == "class ids", check.cause
    markdown = Path(yolo.report_files["markdown"]).read_text()
    assert "## Labels" in markdown and "(YOLO txt labels)" in markdown and "| class ids |" in markdown


@pytest.mark.slow
def test_a_two_class_yaml_scores_those_classes_only(local_server, yolov8n_build, coco128, sample_val,
                                                    coco_class_names, local_detections, tmp_path):
    """(b) names [car, person]: the order of the model's list does not matter; the other 78 classes are not
    scored, and the report says so. Checked against pycocotools restricted to those two categories."""
    from pycocotools.cocoeval import COCOeval

    from packager.metrics.coco_eval import CocoGroundTruth, to_coco_results

    data_yaml = write_yolo(tmp_path / "two", sample_val[0], coco128, ["car", "person"])
    result = _verify(local_server, yolov8n_build, tmp_path / "report", data=data_yaml)
    (accuracy,) = result.accuracy
    unscored = result.labels["unscored"][JUDGE]
    assert len(unscored) == 78 and "person" not in unscored and "car" not in unscored and "dog" in unscored
    non_crowd = CocoGroundTruth(non_crowd_json(coco128, tmp_path / "non_crowd.json"))
    results = non_crowd.coco.loadRes(to_coco_results(local_detections, non_crowd, coco_class_names))

    def local_map(category_names) -> float:
        evaluator = COCOeval(non_crowd.coco, results, "bbox")
        evaluator.params.catIds = [c["id"] for c in coco128["categories"] if c["name"] in category_names]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return float(evaluator.stats[0])

    two_classes, all_classes = local_map({"person", "car"}), local_map(set(coco_class_names))
    served = accuracy.metrics.map50_95
    print(f"served 2-class mAP50-95 {served:.4f}; local pycocotools: 2 classes {two_classes:.4f}, "
          f"80 classes {all_classes:.4f}")
    assert served == pytest.approx(two_classes, abs=0.002) and abs(two_classes - all_classes) > 0.02
    assert result.status == "pass", [g for g in result.failed_gates]
    (check,) = result.annotation_checks
    assert check.verdict == "pass" and check.unjudged_detections > 0, check.cause
    markdown = Path(result.report_files["markdown"]).read_text()
    assert f"**not scored: 78 classes of {JUDGE}** that the labels lack" in markdown
    assert "- classes scored: 2 (car, person)" in markdown


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["mirrored x", "x1 y1 x2 y2", "ids +1"])
def test_wrong_yolo_labels_fail_the_annotations_gate_in_yolo_terms(mistake, local_server, yolov8n_build, coco128,
                                                                   sample_val, coco_class_names, corruptible,
                                                                   tmp_path):
    """(c) Through the CLI: the reference is evaluated on the same wrong labels (the drift gate holds), the
    annotation check names the mistake as YOLO labels make it."""
    corrupt, words = YOLO_MISTAKES[mistake]
    data_yaml = write_yolo(tmp_path / "data", sample_val[0], coco128, coco_class_names, corruptible, corrupt)
    completed = _cli(local_server, yolov8n_build, tmp_path / "report", "--data", str(data_yaml), "--split", "val")
    assert completed.returncode == 1, completed.stderr
    assert f"gate failed: annotations on {JUDGE}: {words}" in completed.stderr, completed.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {g["gate"] for g in report["gates"] if not g["passed"]} == {"annotations"}
    assert report["images"]["accuracy"] == CORRUPT_IMAGES and report["labels"]["format"] == "yolo"
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"## Annotation check ({JUDGE}): **FAIL**" in markdown and "| class ids |" in markdown


@pytest.mark.slow
def test_a_yaml_class_the_model_lacks_is_refused(local_server, yolov8n_build, coco128, sample_val, tmp_path):
    """(d) The model could never detect 'unicorn': a clear error naming it, before any image is scored."""
    data_yaml = write_yolo(tmp_path / "data", sample_val[0], coco128, ["person", "car", "unicorn", "pegasus"])
    completed = _cli(local_server, yolov8n_build, tmp_path / "report", "--data", str(data_yaml))
    assert completed.returncode == 1 and "Traceback" not in completed.stderr, completed.stderr
    assert "Error: " in completed.stderr and "2 class(es) of data.yaml [val] are not classes of the model" \
        in completed.stderr, completed.stderr
    assert "'unicorn', 'pegasus'" in completed.stderr and JUDGE in completed.stderr
    assert not (tmp_path / "report" / "report.json").exists()
