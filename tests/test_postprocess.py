"""decode + class-aware NMS must give Ultralytics' non_max_suppression detections on real YOLOv8n outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from packager.core.paths import ultralytics_offline_env
from packager.inference.letterbox import LetterboxInfo, preprocess, read_image
from packager.inference.postprocess import EVAL_THRESHOLDS, PRODUCTION_THRESHOLDS, Thresholds, decode, map_to_original, postprocess

ultralytics_offline_env()
from ultralytics.utils.nms import non_max_suppression  # noqa: E402
from ultralytics.utils.ops import scale_boxes  # noqa: E402

IMAGES = 6


@pytest.fixture(scope="module")
def raw_outputs(assets):
    """Real head outputs of the sample yolov8n.onnx (static batch 1) on a few val images, with their geometry."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(assets / "weights" / "yolov8n.onnx"), providers=["CPUExecutionProvider"])
    files = sorted((assets / "coco" / "val2017").glob("*.jpg"))[:IMAGES]
    outputs = []
    for path in files:
        chw, info = preprocess(read_image(path))
        outputs.append((session.run(None, {"images": chw[None]})[0][0], info))
    return outputs


def ultralytics_nms(raw: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    result = non_max_suppression(
        torch.from_numpy(raw[None].copy()), thresholds.conf, thresholds.iou,
        multi_label=thresholds.multi_label, max_det=thresholds.max_det,
    )[0]
    return result.numpy()


def assert_same_detections(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape, f"{len(ours)} detections vs Ultralytics' {len(theirs)}"
    # Both sort by score; equal scores may swap places, so compare in a canonical order.
    key = lambda d: np.lexsort((d[:, 0], d[:, 5], -np.round(d[:, 4], 5)))  # noqa: E731
    np.testing.assert_allclose(ours[key(ours)], theirs[key(theirs)], rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "thresholds",
    [EVAL_THRESHOLDS, PRODUCTION_THRESHOLDS, Thresholds(0.1, 0.5, 20, True), Thresholds(0.001, 0.7, 300, False)],
    ids=["eval", "production", "tight-max-det", "single-label-low-conf"],
)
def test_decode_matches_ultralytics_nms(raw_outputs, thresholds):
    total = 0
    for raw, _ in raw_outputs:
        ours = decode(raw, thresholds)
        assert_same_detections(ours, ultralytics_nms(raw, thresholds))
        assert len(ours) <= thresholds.max_det
        total += len(ours)
    assert total > 0, "the sample images must produce detections for this comparison to mean anything"


def test_boxes_map_back_like_scale_boxes(raw_outputs):
    for raw, info in raw_outputs:
        detections = decode(raw, PRODUCTION_THRESHOLDS)
        expected = scale_boxes((640, 640), torch.from_numpy(detections[:, :4].copy()), (info.orig_h, info.orig_w))
        np.testing.assert_allclose(postprocess(raw, info, PRODUCTION_THRESHOLDS)[:, :4], expected.numpy(), atol=1e-3)


def test_thin_image_geometry_matches_scale_boxes():
    # 17 x 999 letterboxed to 640: the 17 px side becomes 11 px, a gain far from the nominal scale.
    info = LetterboxInfo(640 / 999, 0.0, 314.0, 17, 999)
    boxes = np.array([[10, 315, 600, 324, 0.9, 1], [0, 314, 640, 325, 0.5, 2]], dtype=np.float32)
    expected = scale_boxes((640, 640), torch.from_numpy(boxes[:, :4].copy()), (17, 999))
    np.testing.assert_allclose(map_to_original(boxes, info)[:, :4], expected.numpy(), atol=1e-3)


def test_empty_and_malformed_outputs():
    assert decode(np.zeros((84, 100), np.float32)).shape == (0, 6)
    with pytest.raises(ValueError, match="head output"):
        decode(np.zeros((3, 100), np.float32))
