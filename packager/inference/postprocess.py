"""The one postprocess of yqpack (decode + class-aware NMS, or the end-to-end selection), numpy only.

Used by local ONNX evaluation and, copied next to `model.py` at render time, by the served postprocess model,
so served and local detections come from the same code. Runs under numpy 1 (server) and numpy 2 (build tools).

Two head formats (manifest `head_format`):
- `raw`: (batch, 4 + num_classes, anchors) with boxes as centre-x, centre-y, width, height in letterboxed input
  pixels and per-class scores (already sigmoid-ed), as exported by Ultralytics for YOLOv8/YOLO11 (and YOLO26 with
  --no-end2end) without embedded NMS: `decode` (confidence filter + class-aware NMS).
- `end2end`: (batch, k, 6) rows x1, y1, x2, y2, score, class_id in letterboxed pixels, sorted by score, from
  the NMS-free one-to-one head (YOLO26, YOLOv10): `select_end2end` (confidence filter + max_det, no NMS).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

try:
    from .letterbox import LetterboxInfo, resized_size
except ImportError:  # served: both modules are copied flat next to model.py
    from letterbox import LetterboxInfo, resized_size

# Class offset for class-aware NMS: boxes of different classes never overlap after shifting by cls * offset.
_CLASS_OFFSET = 7680.0
# Candidates kept before NMS, highest scores first, as Ultralytics does (bounds the NMS cost at conf 0.001).
MAX_CANDIDATES = 30000
# Candidates NMS compares at a time (see nms): bounds its work by max_det, not by the candidate count.
NMS_BLOCK = 1024


class Thresholds(NamedTuple):
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 100
    multi_label: bool = False


# Ultralytics' validation settings: what COCO evaluation uses, served or local.
EVAL_THRESHOLDS = Thresholds(conf=0.001, iou=0.7, max_det=300, multi_label=True)
PRODUCTION_THRESHOLDS = Thresholds()


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int) -> np.ndarray:
    """Greedy NMS over xyxy boxes; returns kept indices, highest score first, at most `max_keep`.

    Candidates are visited in blocks of NMS_BLOCK (score order): a block is first thinned by the boxes kept so
    far (one matrix), then greedily within itself. The same boxes as one greedy sweep over all candidates,
    but the work stops with the block that fills `max_keep`: 1000 barely overlapping boxes out of 30,000
    candidates cost a few ms instead of a second.
    """
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep: list[int] = []
    for start in range(0, order.size, NMS_BLOCK):
        block = order[start : start + NMS_BLOCK]
        if keep:
            kept = np.asarray(keep)
            block = block[(_iou(boxes, areas, kept[:, None], block[None, :]) <= iou_threshold).all(axis=0)]
        while block.size and len(keep) < max_keep:
            best = block[0]
            keep.append(best)
            rest = block[1:]
            block = rest[_iou(boxes, areas, best, rest) <= iou_threshold]
        if len(keep) >= max_keep:
            break
    return np.asarray(keep, dtype=np.int64)


def _iou(boxes: np.ndarray, areas: np.ndarray, first, second) -> np.ndarray:
    """IoU of boxes[first] with boxes[second] (index arrays broadcast); the same float ops in every caller."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    inter_w = (np.minimum(x2[first], x2[second]) - np.maximum(x1[first], x1[second])).clip(0)
    inter_h = (np.minimum(y2[first], y2[second]) - np.maximum(y1[first], y1[second])).clip(0)
    inter = inter_w * inter_h
    return inter / (areas[first] + areas[second] - inter + 1e-7)


def decode(raw: np.ndarray, thresholds: Thresholds = PRODUCTION_THRESHOLDS) -> np.ndarray:
    """One image's raw head output (4 + nc, anchors) -> detections (n, 6): x1, y1, x2, y2, score, class_id.

    Coordinates are in letterboxed input pixels. Sorted by score, descending.
    """
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 2 or raw.shape[0] < 5:
        raise ValueError(f"expected a (4 + num_classes, anchors) head output, got shape {raw.shape}")
    predictions = raw.T  # (anchors, 4 + nc)
    if thresholds.multi_label:
        class_scores = predictions[:, 4:]
        anchor_idx, class_idx = np.nonzero(class_scores > thresholds.conf)
        scores = class_scores[anchor_idx, class_idx]
    else:
        # Reduce along the contiguous rows of `raw` (5x faster than along the transposed view), then take the
        # argmax only for the anchors that pass: the same first-maximum class as an argmax over all of them.
        best = raw[4:].max(axis=0)
        anchor_idx = np.nonzero(best > thresholds.conf)[0]
        class_idx = raw[4:, anchor_idx].argmax(axis=0)
        scores = best[anchor_idx]
    if scores.size == 0:
        return np.zeros((0, 6), dtype=np.float32)
    if scores.size > MAX_CANDIDATES:
        top = top_candidates(scores, MAX_CANDIDATES)
        anchor_idx, class_idx, scores = anchor_idx[top], class_idx[top], scores[top]
    boxes = _xywh_to_xyxy(predictions[anchor_idx, :4])
    shifted = boxes + class_idx[:, None].astype(np.float32) * _CLASS_OFFSET
    keep = nms(shifted, scores, thresholds.iou, thresholds.max_det)
    detections = np.empty((keep.size, 6), dtype=np.float32)
    detections[:, :4] = boxes[keep]
    detections[:, 4] = scores[keep]
    detections[:, 5] = class_idx[keep]
    return detections


def top_candidates(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` best scores, best first, ties by index: argsort(-scores, stable)[:count] without
    sorting all of them (672,000 candidates at conf 0 with multi_label: a partition, not a 0.4 s sort)."""
    cutoff = np.partition(scores, scores.size - count)[scores.size - count]  # the count-th largest score
    above = np.nonzero(scores > cutoff)[0]
    ties = np.nonzero(scores == cutoff)[0][: count - above.size]
    chosen = np.sort(np.concatenate([above, ties]))
    return chosen[np.argsort(-scores[chosen], kind="stable")]


def map_to_original(detections: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map boxes from letterboxed input pixels back to original image pixels, clipped to the image."""
    out = detections.copy()
    # Per-axis gains from the rounded resized size, as Ultralytics' scale_boxes: one rounded side of a very
    # thin image is far from orig * scale.
    resized_w, resized_h = resized_size(info.orig_h, info.orig_w, info.scale)
    gain_x, gain_y = resized_w / info.orig_w, resized_h / info.orig_h
    out[:, [0, 2]] = ((out[:, [0, 2]] - info.pad_x) / gain_x).clip(0, info.orig_w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - info.pad_y) / gain_y).clip(0, info.orig_h)
    return out


def select_end2end(rows: np.ndarray, thresholds: Thresholds = PRODUCTION_THRESHOLDS) -> np.ndarray:
    """One image's end-to-end head output (k, 6) -> detections (n, 6) in letterboxed input pixels.

    The one-to-one head already picked one box per object and sorted the rows by score, so this is only the
    confidence filter (score > conf) and the first `max_det` rows, exactly as Ultralytics' own end-to-end path.
    `thresholds.iou` and `thresholds.multi_label` do not apply (there is no NMS) and are ignored.
    """
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != 6:
        raise ValueError(f"expected a (k, 6) end-to-end head output, got shape {rows.shape}")
    return rows[rows[:, 4] > thresholds.conf][: thresholds.max_det].copy()


def select_in_graph(rows: np.ndarray, profile: int, thresholds: Thresholds = PRODUCTION_THRESHOLDS) -> np.ndarray:
    """One image's in-graph NMS output (profiles, k, 6) -> detections (n, 6) in letterboxed input pixels.

    The detector already decoded and suppressed (export/nms_graph.py) with the IoU threshold and multi_label of
    `profile` (request_params.compiled_nms_profile picks it) and sorted its rows by score, padded with score 0:
    what is left is the request's confidence filter and max_det, exact for conf >= the graph's floor.
    """
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 3 or rows.shape[2] != 6 or not 0 <= profile < rows.shape[0]:
        raise ValueError(f"expected (profiles, k, 6) in-graph NMS rows with profile {profile}, got {rows.shape}")
    return select_end2end(rows[profile], thresholds)


def postprocess(
    raw: np.ndarray, info: LetterboxInfo, thresholds: Thresholds = PRODUCTION_THRESHOLDS, head_format: str = "raw"
) -> np.ndarray:
    """One image's head output -> detections (n, 6) in original image pixels.

    `head_format` `raw` decodes and runs NMS; `end2end` only filters by conf and max_det (iou_threshold and
    multi_label are ignored: the NMS-free head has no duplicates to suppress).
    """
    if head_format == "end2end":
        return map_to_original(select_end2end(raw, thresholds), info)
    if head_format != "raw":
        raise ValueError(f"unknown head format {head_format!r}: expected raw or end2end")
    return map_to_original(decode(raw, thresholds), info)


def _xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    xyxy = np.empty_like(xywh)
    half_w, half_h = xywh[:, 2] / 2, xywh[:, 3] / 2
    xyxy[:, 0] = xywh[:, 0] - half_w
    xyxy[:, 1] = xywh[:, 1] - half_h
    xyxy[:, 2] = xywh[:, 0] + half_w
    xyxy[:, 3] = xywh[:, 1] + half_h
    return xyxy
