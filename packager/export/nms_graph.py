"""Box decode + class-aware NMS appended to a raw-head detector graph, so a TensorRT engine ends in detections.

The `gpu` target's host CPU otherwise spends 1.5-2.3 ms per image in the Python postprocess (docs/gpu-prepost.md).
`append_nms` takes any raw-head ONNX of a build (FP32, FP16-mixed, ModelOpt INT8/FP8 Q/DQ) and appends, after its
head output, the same steps as `packager.inference.postprocess.decode`, in FP32 (outside every Q/DQ pair, since
they come after the last node of the original graph):

1. cx, cy, w, h -> x1, y1, x2, y2 (the same float ops as `_xywh_to_xyxy`);
2. candidates: per anchor its best class (single-label) or every (anchor, class) pair (multi-label), the
   `max_candidates` best by score (ties by index, as `top_candidates`); TensorRT's TopK takes k <= 3840 and its
   NMS considers at most 5000 boxes per image, so the default 3840 keeps ONNX runtimes and TensorRT on the same
   candidates (the Python NMS keeps 30,000: the difference is measured in docs/gpu-prepost.md);
3. class-aware NMS as one ONNX NonMaxSuppression over boxes shifted by class * 7680 (as the Python NMS);
4. the kept boxes sorted by score, best first, in rows x1, y1, x2, y2, score, class_id (letterboxed pixels),
   padded to `max_det` rows with score 0, class_id -1.

ONNX NMS takes its IoU and score thresholds as tensors, but TensorRT's parser and Triton's batcher need them fixed,
so they are compiled in: one NMS per `NmsProfile` (IoU threshold, multi-label), stacked in the output
(batch, profiles, max_det, 6). `conf_floor` is the score threshold of every profile; a request's own
conf_threshold >= conf_floor and max_det <= the graph's are then exact (greedy NMS never lets a lower score
suppress a higher one, so filtering its output by score equals running it with the higher threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from packager.core.contracts import ConfigError

# The Python NMS's class offset (postprocess._CLASS_OFFSET): boxes of different classes never overlap once shifted.
CLASS_OFFSET = 7680.0
TENSORRT_TOPK_LIMIT = 3840
OUTPUT_NAME = "detections"
PREFIX = "yqpack_nms/"


@dataclass(frozen=True)
class NmsProfile:
    """One compiled-in NMS setting: what a request's iou_threshold and multi_label must name to select it."""

    iou: float
    multi_label: bool

    def to_dict(self) -> dict:
        return {"iou": self.iou, "multi_label": self.multi_label}


# Production (postprocess.PRODUCTION_THRESHOLDS) and evaluation (EVAL_THRESHOLDS) settings: both served exactly.
DEFAULT_PROFILES = (NmsProfile(0.45, False), NmsProfile(0.7, True))


@dataclass(frozen=True)
class NmsSpec:
    """What `append_nms` compiles in. Recorded in the repository index and the postprocess config."""

    profiles: tuple[NmsProfile, ...] = DEFAULT_PROFILES
    conf_floor: float = 0.001  # EVAL_THRESHOLDS.conf: requests may ask for this or more
    max_det: int = 1000  # request_params.MAX_DET_LIMIT: every max_det a request may ask for is served
    max_candidates: int = TENSORRT_TOPK_LIMIT
    output_name: str = OUTPUT_NAME

    def __post_init__(self):
        if not self.profiles:
            raise ConfigError("in-graph NMS needs at least one (iou, multi_label) profile")
        if len({(p.iou, p.multi_label) for p in self.profiles}) != len(self.profiles):
            raise ConfigError(f"duplicate NMS profiles: {[p.to_dict() for p in self.profiles]}")
        for profile in self.profiles:
            if not 0.0 <= profile.iou <= 1.0:
                raise ConfigError(f"NMS iou threshold must be within [0, 1], got {profile.iou}")
        if not 0.0 <= self.conf_floor < 1.0:
            raise ConfigError(f"NMS confidence floor must be within [0, 1), got {self.conf_floor}")
        if not 1 <= self.max_det <= self.max_candidates <= TENSORRT_TOPK_LIMIT:
            raise ConfigError(f"need 1 <= max_det ({self.max_det}) <= max_candidates ({self.max_candidates}) <= "
                              f"{TENSORRT_TOPK_LIMIT} (TensorRT's TopK limit)")

    def to_dict(self) -> dict:
        return {"profiles": [p.to_dict() for p in self.profiles], "conf_floor": self.conf_floor,
                "max_det": self.max_det, "max_candidates": self.max_candidates, "output_name": self.output_name}

    def rows(self, classes: int, anchors: int) -> int:
        """Detections per profile in the output: max_det, or fewer where the input has fewer candidates."""
        return min(self.max_det, _candidates(self, None, classes, anchors))

    def served(self, classes: int, anchors: int) -> dict:
        """What the served models check requests against (request_params.compiled_nms_profile)."""
        return {**self.to_dict(), "rows": self.rows(classes, anchors)}

    @classmethod
    def from_dict(cls, data: dict) -> "NmsSpec":
        return cls(tuple(NmsProfile(float(p["iou"]), bool(p["multi_label"])) for p in data["profiles"]),
                   float(data["conf_floor"]), int(data["max_det"]), int(data["max_candidates"]),
                   str(data.get("output_name", OUTPUT_NAME)))


@dataclass
class _Builder:
    """Appends nodes and constants with unique names under PREFIX."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{PREFIX}{hint}_{self.count}"

    def const(self, value, dtype, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, **attrs):
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names


def append_nms(model: onnx.ModelProto, spec: NmsSpec = NmsSpec()) -> onnx.ModelProto:
    """A copy of `model` whose only output is `spec.output_name`: (batch, profiles, max_det, 6) FP32 detections.

    `model` must have one raw-head output (batch, 4 + classes, anchors) with fixed classes and anchors.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if len(graph.output) != 1:
        raise ConfigError(f"in-graph NMS needs a single raw head output, the graph has {len(graph.output)}")
    head = graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in head.type.tensor_type.shape.dim]
    if len(dims) != 3 or dims[1] < 5 or dims[2] < 1:
        raise ConfigError(f"in-graph NMS needs a (batch, 4 + classes, anchors) head output, got {dims}")
    if head.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ConfigError("in-graph NMS needs an FP32 head output (the build's ONNX all have one)")
    classes, anchors = dims[1] - 4, dims[2]
    b = _Builder()
    raw = head.name
    batch = b.op("Gather", [b.op("Shape", [raw]), b.const(0, np.int64)], "batch")  # scalar
    batch_1d = b.op("Unsqueeze", [batch, b.const([0], np.int64)], "batch_1d")
    # (B, 4 + C, A) -> boxes (B, A, 4) as x1, y1, x2, y2 and scores (B, C, A).
    xywh = b.op("Transpose", [b.op("Slice", [raw, b.const([0], np.int64), b.const([4], np.int64),
                                             b.const([1], np.int64)])], perm=[0, 2, 1])
    cx, cy, w, h = b.op("Split", [xywh, b.const([1, 1, 1, 1], np.int64)], "xywh", outputs=4, axis=2)
    two = b.const(2.0, np.float32)
    half_w, half_h = b.op("Div", [w, two]), b.op("Div", [h, two])
    boxes = b.op("Concat", [b.op("Sub", [cx, half_w]), b.op("Sub", [cy, half_h]), b.op("Add", [cx, half_w]),
                            b.op("Add", [cy, half_h])], "boxes", axis=2)
    flat_boxes = b.op("Reshape", [boxes, b.const([-1, 4], np.int64)], "flat_boxes")  # (B * A, 4)
    scores = b.op("Slice", [raw, b.const([4], np.int64), b.const([4 + classes], np.int64), b.const([1], np.int64)])
    opset = _onnx_opset(model)
    per_profile = [
        _profile_rows(b, profile, spec, scores, flat_boxes, batch_1d, classes, anchors, opset)
        for profile in spec.profiles
    ]
    detections = b.op("Concat", per_profile, "stacked", axis=1) if len(per_profile) > 1 else per_profile[0]
    b.nodes.append(helper.make_node("Identity", [detections], [spec.output_name], name=f"{PREFIX}output"))
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    rows = spec.rows(classes, anchors)
    batch_dim = head.type.tensor_type.shape.dim[0]
    output = helper.make_tensor_value_info(spec.output_name, TensorProto.FLOAT,
                                           [batch_dim.dim_param or batch_dim.dim_value or "batch",
                                            len(spec.profiles), rows, 6])
    del graph.output[:]
    graph.output.append(output)
    _require_opset(model, 11)
    onnx.checker.check_model(model)
    return model


def _candidates(spec: NmsSpec, profile: NmsProfile | None, classes: int, anchors: int) -> int:
    """How many candidates enter the NMS: max_candidates, or all there are (small inputs)."""
    if profile is None:  # the smallest over every profile: what fixes the output's row count
        return min(_candidates(spec, p, classes, anchors) for p in spec.profiles)
    return min(spec.max_candidates, anchors * classes if profile.multi_label else anchors)


def _profile_rows(b: _Builder, profile: NmsProfile, spec: NmsSpec, scores: str, flat_boxes: str, batch_1d: str,
                  classes: int, anchors: int, opset: int) -> str:
    """One profile's detections, (B, 1, rows, 6)."""
    k = _candidates(spec, profile, classes, anchors)
    rows = spec.rows(classes, anchors)
    int64 = np.int64
    if profile.multi_label:
        # Anchor-major (a * C + c), the order of np.nonzero over (anchors, classes): ties fall as in Python.
        flat = b.op("Reshape", [b.op("Transpose", [scores], perm=[0, 2, 1]), b.const([0, -1], int64)], "pairs")
        values, index = b.op("TopK", [flat, b.const([k], int64)], "candidates", outputs=2, axis=1, largest=1,
                             sorted=1)
        anchor = b.op("Div", [index, b.const(classes, int64)], "anchor")
        label = b.op("Mod", [index, b.const(classes, int64)], "label")
    else:
        best = _reduce_max_classes(b, scores, opset)  # (B, A)
        values, anchor = b.op("TopK", [best, b.const([k], int64)], "candidates", outputs=2, axis=1, largest=1,
                              sorted=1)
        # The first best class, as numpy's argmax: ArgMax of the candidates' own score columns.
        per_anchor = b.op("ArgMax", [scores], "argmax", axis=1, keepdims=0, select_last_index=0)  # (B, A)
        label = b.op("GatherElements", [per_anchor, anchor], "label", axis=1)
    # Gather boxes through the flattened batch: Gather on axis 0 is what every runtime (TensorRT too) supports.
    offsets = b.op("Mul", [b.op("Unsqueeze", [b.op("Range", [b.const(0, int64), b.op("Squeeze", [batch_1d]),
                                                                b.const(1, int64)]), b.const([1], int64)]),
                           b.const(anchors, int64)], "batch_offset")  # (B, 1)
    cand_boxes = b.op("Gather", [flat_boxes, b.op("Add", [anchor, offsets])], "cand_boxes", axis=0)  # (B, k, 4)
    label_f = b.op("Cast", [label], "label_f", to=TensorProto.FLOAT)
    shift = b.op("Mul", [b.op("Unsqueeze", [label_f, b.const([2], int64)]), b.const(CLASS_OFFSET, np.float32)])
    shifted = b.op("Add", [cand_boxes, shift], "shifted")
    selected = b.op("NonMaxSuppression", [shifted, b.op("Unsqueeze", [values, b.const([1], int64)]),
                                          b.const([rows], int64), b.const([profile.iou], np.float32),
                                          b.const([spec.conf_floor], np.float32)], "selected")  # (S, 3)
    # Kept candidates -> a (B, k) mask -> the best `rows` of them, sorted by score (kept order, ties by index).
    where = b.op("Gather", [selected, b.const([0, 2], int64)], "where", axis=1)  # (S, 2): batch, candidate
    shape_bk = b.op("Concat", [batch_1d, b.const([k], int64)], "shape_bk", axis=0)
    zeros = b.op("ConstantOfShape", [shape_bk], "zeros", value=numpy_helper.from_array(np.zeros(1, np.float32)))
    ones = b.op("Expand", [b.const(1.0, np.float32), b.op("Slice", [b.op("Shape", [selected]),
                                                                    b.const([0], int64), b.const([1], int64)])])
    kept = b.op("ScatterND", [zeros, where, ones], "kept")
    masked = b.op("Where", [b.op("Greater", [kept, b.const(0.5, np.float32)]), values, b.const(-1.0, np.float32)])
    top_scores, top = b.op("TopK", [masked, b.const([rows], int64)], "top", outputs=2, axis=1, largest=1, sorted=1)
    rows_offset = b.op("Mul", [b.op("Div", [offsets, b.const(anchors, int64)]), b.const(k, int64)])
    flat_index = b.op("Add", [top, rows_offset], "flat_index")  # (B, rows)
    out_boxes = b.op("Gather", [b.op("Reshape", [cand_boxes, b.const([-1, 4], int64)]), flat_index], axis=0)
    out_label = b.op("Gather", [b.op("Reshape", [label_f, b.const([-1], int64)]), flat_index], axis=0)
    valid = b.op("Greater", [top_scores, b.const(-0.5, np.float32)], "valid")  # (B, rows)
    score = b.op("Where", [valid, top_scores, b.const(0.0, np.float32)])
    label_out = b.op("Where", [valid, out_label, b.const(-1.0, np.float32)])
    box_out = b.op("Where", [b.op("Unsqueeze", [valid, b.const([2], int64)]), out_boxes,
                             b.const(0.0, np.float32)])
    row = b.op("Concat", [box_out, b.op("Unsqueeze", [score, b.const([2], int64)]),
                          b.op("Unsqueeze", [label_out, b.const([2], int64)])], "rows", axis=2)  # (B, rows, 6)
    return b.op("Unsqueeze", [row, b.const([1], int64)], "profile_rows")


def _reduce_max_classes(b: _Builder, scores: str, opset: int) -> str:
    if opset >= 18:  # ReduceMax's axes became an input in opset 18
        return b.op("ReduceMax", [scores, b.const([1], np.int64)], "best", keepdims=0)
    return b.op("ReduceMax", [scores], "best", axes=[1], keepdims=0)


def _onnx_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _require_opset(model: onnx.ModelProto, minimum: int) -> None:
    if _onnx_opset(model) < minimum:
        raise ConfigError(f"in-graph NMS needs ONNX opset >= {minimum}, the graph has {_onnx_opset(model)}")


def write_nms_graph(source: Path, destination: Path, spec: NmsSpec = NmsSpec()) -> Path:
    """`append_nms` from file to file (the detector's served model.onnx / engine source)."""
    model = append_nms(onnx.load(str(source)), spec)
    destination.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(destination))
    return destination
