"""Issue 19 item 4: the annotation check judges an annotation file by the real FP32 model's detections, with no
reference mAP. The corruption matrix runs the pure function on detections computed once with the real ONNX (the
session build's fp32) on the 128 official val images and on 48 images of the person-heavy val2017-dev."""

from __future__ import annotations

import copy
import json
import random

import pytest

from packager.inference.letterbox import read_image
from packager.verify.annotation_check import MIN_IMAGES, check_annotations
from packager.verify.annotation_labels import annotated_images

DEV_IMAGES = 48


def _detect(build, images_dir, annotations, limit=None):
    """(parsed annotation file, {name: detections}, {name: (width, height)}) of the build's fp32 ONNX."""
    from packager.core.manifest import BuildManifest
    from packager.evaluate.onnx_eval import detect_images
    from packager.metrics.coco_eval import CocoGroundTruth

    manifest = BuildManifest.load(build)
    files = CocoGroundTruth(annotations).image_files(images_dir)[:limit]
    detections = detect_images(manifest.artifact_path(build, "fp32"), files, manifest.model.imgsz,
                               show_progress=False, head_format=manifest.model.head)
    sizes = {path.name: read_image(path).shape[1::-1] for path in files}
    return json.loads(annotations.read_text()), detections, sizes


@pytest.fixture(scope="module")
def val128(yolov8n_build, sample_val):
    return _detect(yolov8n_build, *sample_val)


@pytest.fixture(scope="module")
def dev48(yolov8n_build, assets):
    coco = assets / "coco"
    return _detect(yolov8n_build, coco / "val2017-dev", coco / "annotations" / "instances_val2017_dev640.json",
                   DEV_IMAGES)


def _judge(data, detections, sizes):
    categories = sorted(data["categories"], key=lambda category: category["id"])
    return check_annotations("yolov8n_fp32", detections, annotated_images(data, sizes),
                             [category["id"] for category in categories],
                             {category["id"]: category["name"] for category in categories})


def _corrupt(data: dict, mistake: str, other: dict | None = None) -> dict:
    """The annotation file as a buggy converter or a mix-up would leave it (`other`: another set's file)."""
    data = copy.deepcopy(data)
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    ids = sorted(category["id"] for category in data["categories"])
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        annotation["bbox"] = {
            "mirrored x": [width - x - w, y, w, h],
            "mirrored y": [x, height - y - h, w, h],
            "xyxy as xywh": [x, y, x + w, y + h],
            "centre xywh": [x + w / 2, y + h / 2, w, h],
            "normalised": [x / width, y / height, w / width, h / height],
        }.get(mistake, annotation["bbox"])
        annotation["category_id"] = {
            "ids +1": annotation["category_id"] + 1,
            "ids -1": annotation["category_id"] - 1,
            "0-based indices": ids.index(annotation["category_id"]),
            "1-based indices": ids.index(annotation["category_id"]) + 1,
        }.get(mistake, annotation["category_id"])
    if mistake == "another image's boxes":  # image ids rotated by one: right file names, other images' boxes
        image_ids = [image["id"] for image in data["images"]]
        rotate = dict(zip(image_ids, image_ids[1:] + image_ids[:1]))
        for annotation in data["annotations"]:
            annotation["image_id"] = rotate[annotation["image_id"]]
    if mistake == "another image set":  # another set's file with these images' names written in
        names = [image["file_name"] for image in data["images"]]
        data = copy.deepcopy(other)
        for image, name in zip(data["images"], names):
            image["file_name"] = name
    return data

MISTAKES = {  # mistake -> words the named cause must contain
    "mirrored x": "mirrored horizontally",
    "mirrored y": "mirrored vertically",
    "xyxy as xywh": "x1,y1,x2,y2 corners",
    "centre xywh": "centre x,y",
    "normalised": "normalised to 0-1",
    "ids +1": "shifted by +1",
    "ids -1": "shifted by -1",
    "0-based indices": "0-based class indices",
    "1-based indices": "1-based class indices",
    "another image's boxes": "annotations of another image set",
    "another image set": "annotations of another image set",
}


def test_true_annotations_pass(val128, dev48):
    for data, detections, sizes in (val128, dev48):
        check = _judge(data, detections, sizes)
        assert check.verdict == "pass", check.cause
        assert check.as_given.precision > 0.8 and check.class_agreement.agreement > 0.9, check
        assert all(fixed.matched < check.as_given.matched for fixed in check.boxes[1:])


def test_small_sets_pass_or_are_not_judged(val128):
    data, detections, sizes = val128
    names = list(sizes)
    few = _judge(data, detections, {name: sizes[name] for name in names[:MIN_IMAGES - 1]})
    assert few.verdict == "too few" and few.passed and "too few images to judge" in few.cause
    for seed in range(10):
        subset = random.Random(seed).sample(names, 16)
        check = _judge(data, detections, {name: sizes[name] for name in subset})
        assert check.verdict in ("pass", "too few"), (seed, check.cause)
        assert check.verdict == "pass" or "too few images" in check.cause


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_fails_with_its_cause(mistake, val128, dev48):
    for (data, detections, sizes), other in ((val128, dev48[0]), (dev48, val128[0])):
        check = _judge(_corrupt(data, mistake, other), detections, sizes)
        assert check.verdict == "fail" and not check.passed, (mistake, check.cause)
        assert MISTAKES[mistake] in check.cause, (mistake, check.cause)


def test_a_mistake_on_sixteen_images_is_still_named(val128):
    data, detections, sizes = val128
    subset = {name: sizes[name] for name in list(sizes)[:16]}
    for mistake in ("mirrored x", "ids +1", "xyxy as xywh"):
        check = _judge(_corrupt(data, mistake), detections, subset)
        assert check.verdict == "fail" and MISTAKES[mistake] in check.cause, (mistake, check.cause)


def test_annotations_of_the_full_size_images_fail_on_resized_copies(yolov8n_build, sample_val, tmp_path):
    """The folder holds half-size copies (the model runs on them for real); the file's boxes are full size."""
    import cv2

    images_dir, annotations = sample_val
    data = json.loads(annotations.read_text())
    for image in data["images"][:16]:
        full = read_image(images_dir / image["file_name"])
        cv2.imwrite(str(tmp_path / image["file_name"]), cv2.resize(full, (full.shape[1] // 2, full.shape[0] // 2)))
    _, detections, sizes = _detect(yolov8n_build, tmp_path, annotations)
    check = _judge(data, detections, sizes)
    assert check.size_mismatches == 16
    assert check.verdict == "fail" and "differently sized images" in check.cause, check.cause


def test_a_permutation_of_ids_is_named_with_the_confused_classes(val128):
    """No known shift explains swapped ids (person <-> car): the confusion says which classes."""
    data, detections, sizes = val128
    swapped = copy.deepcopy(data)
    swap = {1: 3, 3: 1}  # person, car
    for annotation in swapped["annotations"]:
        annotation["category_id"] = swap.get(annotation["category_id"], annotation["category_id"])
    check = _judge(swapped, detections, sizes)
    assert check.verdict == "fail" and "swapped between classes" in check.cause, check.cause
    assert "'person' detections lie on boxes annotated 3 'car'" in check.cause, check.cause
