"""Ultralytics datasets (data.yaml + YOLO txt labels) as ground truth: read as Ultralytics reads them, and scored
exactly as the same boxes in a COCO annotation file. The datasets are written here from the sample assets."""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

from packager.core.contracts import ConfigError, MissingInputError
from packager.datasets.data_yaml import label_path, read_data_yaml
from packager.datasets.yolo_labels import load_split, read_label_file
from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images

PACKAGE = Path(__file__).resolve().parent.parent / "packager"
NO_LABEL = "000000000139.jpg"  # an image with boxes whose label file is left out: background in both truths
POLYGON = "000000017627.jpg"  # an image whose boxes are written as polygons


@dataclass
class Written:
    yaml: Path
    root: Path
    coco_json: Path  # the same boxes as a COCO annotation file
    names: list[str]
    boxes: int
    background: int


@pytest.fixture(scope="module")
def coco(assets) -> dict:
    return json.loads((assets / "coco" / "annotations" / "instances_val2017_128.json").read_text())


@pytest.fixture(scope="module")
def coco_names(coco) -> list[str]:
    """The 80 names in YOLO class order (categories sorted by id)."""
    return [cat["name"] for cat in sorted(coco["categories"], key=lambda cat: cat["id"])]


def write_dataset(coco: dict, images: Path, root: Path, category_ids: list[int], names_as_dict: bool) -> Written:
    """A YOLO dataset of the 128 images (symlinked) with the non-crowd boxes of `category_ids` (class i =
    category_ids[i]), in the plain layout with `path:`, and a COCO annotation file of exactly the same boxes."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    class_of = {category: index for index, category in enumerate(category_ids)}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        if not ann["iscrowd"] and ann["category_id"] in class_of:
            by_image[ann["image_id"]].append(ann)
    images_json, annotations, background = [], [], 0
    for image in coco["images"]:
        name, width, height = image["file_name"], image["width"], image["height"]
        (root / "images" / "val" / name).symlink_to(images / name)
        images_json.append({key: image[key] for key in ("id", "file_name", "width", "height")})
        anns = [] if name == NO_LABEL else by_image[image["id"]]
        background += not anns
        if name == NO_LABEL:
            assert by_image[image["id"]], "the image left without a label file should have boxes"
            continue
        lines = []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            cls = class_of[ann["category_id"]]
            if name == POLYGON:  # four points touching each side of the box
                points = [(x, y + h / 3), (x + w / 2, y), (x + w, y + h * 3 / 4), (x + w / 3, y + h)]
                lines.append(" ".join([str(cls)] + [repr(v) for px, py in points for v in (px / width, py / height)]))
            else:
                lines.append(f"{cls} {(x + w / 2) / width!r} {(y + h / 2) / height!r} {w / width!r} {h / height!r}")
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": ann["category_id"],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        (root / "labels" / "val" / f"{Path(name).stem}.txt").write_text("".join(line + "\n" for line in lines))
    categories = [cat for cat in coco["categories"] if cat["id"] in class_of]
    coco_json = root / "instances.json"
    coco_json.write_text(json.dumps({"images": images_json, "annotations": annotations, "categories": categories}))
    by_id = {cat["id"]: cat["name"] for cat in coco["categories"]}
    names = [by_id[category] for category in category_ids]
    listed = "".join(f"  {i}: {json.dumps(n)}\n" for i, n in enumerate(names)) if names_as_dict \
        else f"  [{', '.join(map(json.dumps, names))}]\n"
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames:\n{listed}")
    return Written(yaml_path, root, coco_json, names, len(annotations), background)


@pytest.fixture(scope="module")
def plain(coco, assets, tmp_path_factory) -> Written:
    category_ids = sorted(cat["id"] for cat in coco["categories"])
    return write_dataset(coco, assets / "coco" / "val2017", tmp_path_factory.mktemp("plain"), category_ids, True)


@pytest.fixture(scope="module")
def person_car(coco, assets, tmp_path_factory) -> Written:
    return write_dataset(coco, assets / "coco" / "val2017", tmp_path_factory.mktemp("person-car"), [1, 3], False)


def model_detections(coco: dict, coco_names: list[str], seed: int) -> dict[str, np.ndarray]:
    """An 80-class model's detections on all 128 images: ground-truth boxes (crowd regions too) jittered, some
    missed or mislabelled, plus false positives; distinct scores, so no tie depends on image order."""
    rng = np.random.default_rng(seed)
    class_of = {cat["id"]: coco_names.index(cat["name"]) for cat in coco["categories"]}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    rows = {}
    for image in coco["images"]:
        width, height = image["width"], image["height"]
        boxes = []
        for ann in by_image[image["id"]]:
            if rng.random() < 0.15:
                continue
            x, y, w, h = ann["bbox"]
            x1, x2 = sorted(np.array([x, x + w]) + rng.normal(0, 0.08 * w + 1, 2))
            y1, y2 = sorted(np.array([y, y + h]) + rng.normal(0, 0.08 * h + 1, 2))
            cls = class_of[ann["category_id"]] if rng.random() > 0.05 else int(rng.integers(80))
            boxes.append([x1, y1, x2, y2, 0.0, cls])
        for _ in range(rng.poisson(2)):
            x1, y1 = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            boxes.append([x1, y1, x1 + rng.uniform(10, 200), y1 + rng.uniform(10, 200), 0.0, int(rng.integers(80))])
        rows[image["file_name"]] = np.array(boxes, dtype=np.float64).reshape(-1, 6)
    total = sum(len(r) for r in rows.values())
    scores = iter(rng.permutation(total) / total * 0.99 + 0.005)
    for r in rows.values():
        r[:, 4] = [next(scores) for _ in range(len(r))]
    return rows


def test_yolo_labels_score_exactly_as_the_same_boxes_in_a_coco_file(plain, coco, coco_names):
    data = read_data_yaml(plain.yaml)
    assert data.names == coco_names and data.root == plain.root
    split = load_split(data, "val")
    assert split.counts.images == 128 and split.counts.boxes == plain.boxes
    assert split.counts.background_images == plain.background and split.counts.missing_label_files == 1
    assert split.counts.polygons == sum(1 for line in label_path(plain.root / "images" / "val" / POLYGON)
                                        .read_text().splitlines()) > 0
    sizes = {image["file_name"]: (image["width"], image["height"]) for image in coco["images"]}
    assert {image["file_name"]: (image["width"], image["height"]) for image in split.dataset["images"]} == sizes
    yolo, reference = split.ground_truth(), CocoGroundTruth(plain.coco_json)
    assert [path.name for path in yolo.image_files()] == sorted(sizes)
    for seed in (0, 1):
        detections = model_detections(coco, coco_names, seed)
        ours, theirs = evaluate_images(detections, yolo, coco_names), evaluate_images(detections, reference, coco_names)
        assert 0.15 < theirs.metrics.map50_95 < 0.95 and theirs.metrics.detections > 900
        for key, value in asdict(theirs.metrics).items():
            assert asdict(ours.metrics)[key] == pytest.approx(value, abs=1e-9), key
        assert ours.unscored_classes == [] and ours.per_image.images == theirs.per_image.images == 128


def test_a_two_class_dataset_scores_an_80_class_model_on_its_own_classes(person_car, plain, coco, coco_names):
    split = load_split(person_car.yaml, "val")
    assert split.names == ["person", "car"] and split.counts.boxes == person_car.boxes
    detections = model_detections(coco, coco_names, 2)
    ours = evaluate_images(detections, split.ground_truth(), coco_names)
    theirs = evaluate_images(detections, CocoGroundTruth(person_car.coco_json), coco_names)
    for key, value in asdict(theirs.metrics).items():
        assert asdict(ours.metrics)[key] == pytest.approx(value, abs=1e-9), key
    assert len(ours.unscored_classes) == 78 and "dog" in ours.unscored_classes and "car" not in ours.unscored_classes
    all_classes = evaluate_images(detections, load_split(plain.yaml).ground_truth(), coco_names).metrics
    assert ours.metrics.detections < all_classes.detections  # the other 78 classes' detections were dropped


def test_a_dataset_class_the_model_lacks_is_refused(person_car, coco, coco_names):
    ground_truth = load_split(person_car.yaml, "val").ground_truth()
    detections = model_detections(coco, coco_names, 3)
    without_car = [name for name in coco_names if name != "car"] + ["automobile"]
    with pytest.raises(ConfigError, match=r"1 class\(es\) of data.yaml \[val\] are not classes of the model.*'car'"):
        evaluate_images(detections, ground_truth, without_car)
    with pytest.raises(ConfigError, match="'car'"):  # an annotation file is held to the same rule
        evaluate_images(detections, CocoGroundTruth(person_car.coco_json), without_car)


def test_the_roboflow_layout_resolves_as_ultralytics_resolves_it(plain, tmp_path):
    """Roboflow writes `../valid/images` relative to a folder below the YAML; Ultralytics drops the `../` when that
    path does not exist, and keeps it when it does."""
    export = tmp_path / "export"
    for kind in ("images", "labels"):
        (export / "valid").mkdir(parents=True, exist_ok=True)
        (export / "valid" / kind).symlink_to(plain.root / kind / "val")
    yaml_text = f"train: ../train/images\nval: ../valid/images\nnc: 80\nnames: {json.dumps(plain.names)}\n"
    (export / "data.yaml").write_text(yaml_text)
    data = read_data_yaml(export / "data.yaml")
    assert data.root == export and data.splits["val"] == ((plain.root / "images" / "val").resolve(),)
    assert load_split(data, "val").dataset == load_split(plain.yaml, "val").dataset
    sibling = tmp_path / "valid" / "images"
    sibling.mkdir(parents=True)
    (sibling / NO_LABEL).symlink_to(plain.root / "images" / "val" / NO_LABEL)
    assert [p.name for p in read_data_yaml(export / "data.yaml").split_images("val")] == [NO_LABEL]
    with pytest.raises(ConfigError, match=r"data.yaml, line 1: 'train:' .*train/images does not exist"):
        data.split_images("train")


def test_an_image_list_file_and_a_list_of_folders(plain, tmp_path, monkeypatch):
    images = sorted((plain.root / "images" / "val").iterdir())
    (plain_list := tmp_path / "val.txt").write_text(
        "".join(f"./images/{path.name}\n" for path in images[10:20]) + f"\n{images[3]}\n")
    (tmp_path / "images").symlink_to(plain.root / "images" / "val")
    (tmp_path / "labels").symlink_to(plain.root / "labels" / "val")
    (tmp_path / "other" / "images").mkdir(parents=True)
    (tmp_path / "other" / "images" / images[5].name).symlink_to(images[5])
    (tmp_path / "data.yaml").write_text(f"val: val.txt\ntest: [images, other/images]\n"
                                        f"train: [images, {plain.root}/images/val]\nnames: {json.dumps(plain.names)}\n")
    data = read_data_yaml(tmp_path / "data.yaml")
    listed = data.split_images("val")
    assert [p.name for p in listed] == [images[3].name] + [p.name for p in images[10:20]]
    split = load_split(data, "val")
    assert split.counts.images == 11 and split.counts.boxes > 0
    with pytest.raises(ConfigError, match=f"two images share the file name {images[5].name}"):
        load_split(data, "test")
    with pytest.raises(ConfigError, match="is listed twice"):  # one folder, twice: Ultralytics resolves links too
        load_split(data, "train")
    monkeypatch.chdir(tmp_path)  # lines not starting with ./ are relative to the current directory
    plain_list.write_text(f"images/{images[0].name}\nimages/{images[1].name}\nmissing/x.jpg\n")
    with pytest.raises(ConfigError, match=re.escape(f"{plain_list}, line 3: image ") + ".*relative to the current"):
        data.split_images("val")
    plain_list.write_text(f"images/{images[0].name}\nlabels/{Path(images[0].name).stem}.txt\n")
    with pytest.raises(ConfigError, match=re.escape(f"{plain_list}, line 2: ") + ".*is not an image"):
        data.split_images("val")


def test_custom_asl_reads_with_its_26_classes_and_three_splits(assets):
    data = read_data_yaml(assets / "custom" / "asl" / "data.yaml")
    assert data.names == [chr(ord("A") + i) for i in range(26)] and data.root == assets / "custom" / "asl"
    assert [len(data.split_images(split)) for split in ("train", "val", "test")] == [1512, 144, 72]
    val = load_split(data, "val")
    assert val.counts.images == 144 and val.counts.boxes >= 144 and val.counts.missing_label_files == 0
    assert {(image["width"], image["height"]) for image in val.dataset["images"]} == {(416, 416)}
    assert val.ground_truth().image_files() == data.split_images("val")


@pytest.fixture
def small(assets, tmp_path) -> Path:
    """Two images, names person and car: the bench for broken labels."""
    for kind in ("images", "labels"):
        (tmp_path / kind).mkdir()
    for name in sorted(p.name for p in (assets / "coco" / "val2017").iterdir())[:2]:
        (tmp_path / "images" / name).symlink_to(assets / "coco" / "val2017" / name)
    (tmp_path / "data.yaml").write_text("val: images\nnames: [person, car]\n")
    return tmp_path


GOOD = "0 0.5 0.5 0.2 0.2\n1 0.25 0.3 0.1 0.1\n"
POLYGON_GOOD = "0 0.1 0.1 0.3 0.1 0.2 0.4\n1 0.5 0.5 0.6 0.5 0.6 0.7 0.5 0.7\n"


@pytest.mark.parametrize("good, bad, message", [
    (GOOD, "2 0.5 0.5 0.1 0.1", "class 2 is not a class index of the dataset (0-1"),
    (GOOD, "-1 0.5 0.5 0.1 0.1", "class -1 is not a class index"),
    (GOOD, "0.5 0.5 0.5 0.1 0.1", "class 0.5 is not a class index"),
    (GOOD, "0 1.2 0.5 0.1 0.1", "value 1.2 is outside [0, 1]"),
    (GOOD, "0 0.5 -0.02 0.1 0.1", "value -0.02 is outside [0, 1]"),
    (GOOD, "0 0.5 0.5 -0.005 0.1", "negative box size"),
    (GOOD, "0 0.5 0.5 0.1 0.1 0.9", "a box row is 'class cx cy w h' (5 values), found 6"),
    (GOOD, "0 0.5 0.5 0.1", "found 4"),
    (GOOD, "0 0.5 abc 0.1 0.1", "'abc' is not a number"),
    (GOOD, "0 0.5 nan 0.1 0.1", "'nan' is not a finite number"),
    (POLYGON_GOOD, "0 0.1 0.1 0.3 0.1 0.2", "at least 3 points, found 5 coordinates"),
    (POLYGON_GOOD, "0 0.1 0.1 0.3 0.1", "a box row in a polygon label file"),
    (POLYGON_GOOD, "1 0.1 0.1 1.3 0.1 0.2 0.4", "coordinate 1.3 is outside [0, 1]"),
])
def test_each_broken_label_names_its_file_and_line(small, good, bad, message):
    label = small / "labels" / f"{Path(sorted((small / 'images').iterdir())[1].name).stem}.txt"
    label.write_text(good + bad + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{label}, line 3: ") + ".*" + re.escape(message)):
        load_split(small / "data.yaml", "val")


def test_labels_within_ultralytics_tolerance_are_clipped_and_duplicates_dropped(small):
    images = sorted((small / "images").iterdir())
    label = label_path(images[0])
    label.write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n\n1 1.005 0.5 0.02 0.1\n0 -0.005 0.5 0.0 0.1\n")
    (label.parent / f"{images[1].stem}.txt").write_text("")
    split = load_split(small / "data.yaml", "val")
    counts = split.counts
    assert (counts.images, counts.boxes, counts.duplicates_removed, counts.background_images) == (2, 3, 1, 1)
    assert counts.missing_label_files == 0
    width = split.dataset["images"][0]["width"]
    x, _, w, _ = split.dataset["annotations"][1]["bbox"]  # 0.995..1.015 of the width, clipped at the edge
    assert x == pytest.approx(0.995 * width) and x + w == width
    assert split.dataset["annotations"][2]["bbox"][0] == 0.0 and split.dataset["annotations"][2]["area"] == 0.0
    assert "1 duplicate rows dropped" in counts.describe() and "1 background" in counts.describe()


def test_image_size_is_measured_after_exif_rotation(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise when shown
    Image.new("RGB", (64, 32), (200, 10, 10)).save(tmp_path / "images" / "rotated.jpg", exif=exif)
    (tmp_path / "labels" / "rotated.txt").write_text("0 0.5 0.25 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("val: images\nnames: {0: thing}\n")
    split = load_split(tmp_path / "data.yaml")
    assert split.dataset["images"][0] | {"id": 1} == {"id": 1, "file_name": "rotated.jpg", "width": 32, "height": 64}
    assert split.dataset["annotations"][0]["bbox"] == [8.0, 0.0, 16.0, 32.0]


@pytest.mark.parametrize("text, message", [
    ("val: images\nnames: [person, car]\nnc: 3\n", "data.yaml, line 3: 'nc: 3' does not match the 2 class names"),
    ("val: images\nnames: {0: person, 2: car}\n", "data.yaml, line 2: 'names:' indices must be 0-1"),
    ("val: images\nnames: [person, Person]\n", "class names must be distinct (ignoring case)"),
    ("val: images\nnames: person\n", "data.yaml, line 2: 'names:' must be a list or a mapping, not str"),
    ("val: images\n", "the dataset needs 'names:'"),
    ("val: [images\nnames: [a]\n", "data.yaml, line 2: not valid YAML"),
    ("- val\n", "must be a mapping of keys"),
])
def test_a_broken_data_yaml_is_a_clear_error(small, text, message):
    (small / "data.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_data_yaml(small / "data.yaml")


def test_missing_splits_and_files_are_clear_errors(small):
    data = read_data_yaml(small / "data.yaml")
    with pytest.raises(ConfigError, match=r"data.yaml has no 'test:' split \(it has: val\)"):
        data.split_images("test")
    with pytest.raises(ConfigError, match="split 'valid' is not one of train, val, test"):
        data.split_images("valid")
    (small / "data.yaml").write_text("val: elsewhere\nnames: [person]\n")
    with pytest.raises(ConfigError, match=r"data.yaml, line 1: 'val:' .*elsewhere does not exist"):
        read_data_yaml(small / "data.yaml").split_images("val")
    (small / "data.yaml").write_text("val: labels\nnames: [person]\n")
    with pytest.raises(ConfigError, match="'val:' has no images"):
        read_data_yaml(small / "data.yaml").split_images("val")
    with pytest.raises(MissingInputError, match="dataset YAML not found"):
        read_data_yaml(small / "nothing.yaml")
    assert read_label_file(small / "labels" / "none.txt", 2).found is False


def test_a_relative_path_key_is_the_yaml_folder_then_the_current_directory(small, tmp_path, monkeypatch):
    (small / "sub").mkdir()
    (small / "sub" / "data.yaml").write_text("path: ..\nval: images\nnames: [person, car]\n")
    assert read_data_yaml(small / "sub" / "data.yaml").split_images("val")[0].parent == (small / "images").resolve()
    monkeypatch.chdir(small.parent)
    (small / "sub" / "data.yaml").write_text(f"path: {small.name}\nval: images\nnames: [person, car]\n")
    assert read_data_yaml(small / "sub" / "data.yaml").root == small.parent / small.name


def test_the_datasets_stage_imports_only_core_inference_and_metrics():
    allowed = {"core", "inference", "metrics", "datasets"}
    for module in (PACKAGE / "datasets").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("packager."):
                assert node.module.split(".")[1] in allowed, f"{module.name} imports {node.module}"


def test_eval_onnx_on_a_dataset_yaml_equals_eval_onnx_on_the_same_boxes_as_coco(yolov8n_build, plain, tmp_path):
    """`eval-onnx --data` and `--val-images/--val-annotations` on the same 128 images and boxes: the same FP32
    figures (a real build, its FP32 ONNX run by the default runtime)."""
    from click.testing import CliRunner

    from packager.cli.main import main

    common = ["eval-onnx", "--build", str(yolov8n_build), "--variants", "fp32", "--min-map-ratio", "0"]
    by_yaml = CliRunner().invoke(main, [*common, "--data", str(plain.yaml), "--json", str(tmp_path / "yaml.json")])
    assert by_yaml.exit_code == 0, by_yaml.output
    assert f"ground truth: {plain.yaml} [val]: 128 images (" in by_yaml.output
    by_coco = CliRunner().invoke(main, [*common, "--val-images", str(plain.root / "images" / "val"),
                                        "--val-annotations", str(plain.coco_json), "--json", str(tmp_path / "coco.json")])
    assert by_coco.exit_code == 0, by_coco.output
    ours, theirs = (json.loads((tmp_path / name).read_text())["fp32"] for name in ("yaml.json", "coco.json"))
    assert theirs["images"] == 128 and 0.3 < theirs["map50_95"] < 0.6
    for key in ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large", "images", "detections"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key
    both = CliRunner().invoke(main, [*common, "--data", str(plain.yaml), "--val-annotations", str(plain.coco_json)])
    assert both.exit_code != 0 and "Error: give either --data or --val-images" in both.output
    neither = CliRunner().invoke(main, common)
    assert neither.exit_code != 0 and "Error: evaluation needs --data" in neither.output
    no_test = CliRunner().invoke(main, [*common, "--data", str(plain.yaml), "--split", "test"])
    assert no_test.exit_code != 0 and "has no 'test:' split" in no_test.output
