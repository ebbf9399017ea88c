"""Label-free INT8 sensitivity: how much does quantizing each unit hurt, measured against the FP32 model itself.

Calibrate once with everything quantizable in INT8 (ModelOpt's default placement, no exclusions), then derive
every variant from that one graph by removing Q/DQ pairs (`qdq_graph.keep_precise`): scales stay valid, so a
variant costs one onnxruntime pass over the tuning images, not a calibration. For "only this unit in INT8" that
pass covers only the graph downstream of the unit's Q/DQ (`qdq_graph.downstream_submodel`), fed with FP32 tensors
cached once (late units first, within MAX_CACHE_BYTES); outputs are bit-identical to running the whole variant.
Two label-free signals per variant, both against the FP32 outputs cached once:

- **agreement**: COCO mAP50-95 (pycocotools) of the variant's detections (conf 0.01, iou 0.7, 100 per image) scored
  against the FP32 detections with score >= 0.25 as pseudo ground truth. 1.0 = same detections.
- **SQNR** of the raw head output, dB: class scores on all anchors (noise/signal power), and boxes on the anchors
  where FP32 sees an object (max class score >= 0.1) as errors relative to the box size (dx/w, dy/h, dw/w, dh/h;
  absolute pixels would hide a 1-pixel error on a small box behind the large coordinates), averaged.

Direction: the ranking uses **"only this unit quantized"** (loss): the rest of the model stays FP32, so the
drop is the unit's own damage, measured far above the measurement floor (one unit alone: agreement 0.975-1.0,
SQNR 20-70 dB on yolov8n). Quantization noise from different units adds up roughly independently, so a unit's
loss alone is its share of the full model's loss. The opposite direction ("everything quantized except this
unit", gain) asks for the small change one unit makes to a sum of ~35 contributions, within the variation of the
others, and its order is unstable. Units are ranked by agreement alone (the very metric the auto target is set
in), SQNR breaking ties. The gain direction is what the `auto` preset then walks: units are kept precise
greedily in this order while the *combined* model's agreement is measured after each step
(`greedy_keep_precise`), so the stopping decision never relies on the additivity assumption.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from packager.metrics.coco_eval import CocoEvaluation, CocoGroundTruth, evaluate, evaluate_images
from packager.inference.letterbox import preprocess, read_image
from packager.inference.postprocess import Thresholds, decode
from packager.quantize.qdq_graph import (
    Unit,
    conv_macs,
    downstream_submodel,
    find_units,
    int8_conv_mac_share,
    keep_precise,
    only_quantized,
)

PSEUDO_GT_CONF = 0.25  # FP32 detections at the production threshold are the pseudo ground truth
OBJECT_ANCHOR_CONF = 0.1  # anchors whose box regression matters for SQNR
BATCH = 8
MAX_CACHE_BYTES = 1 << 30  # FP32 intermediate tensors kept for the downstream-only variant runs
# Variant detections for the agreement: evaluation NMS settings, but conf 0.01 / 100 per image (not 0.001 / 300):
# the tail below 0.01 barely moves mAP and would triple pycocotools' time per variant.
AGREEMENT_THRESHOLDS = Thresholds(conf=0.01, iou=0.7, max_det=100, multi_label=True)


@dataclass
class Score:
    agreement: float  # pseudo-mAP50-95 vs FP32
    sqnr_db: float


@dataclass
class UnitScore:
    unit: str
    nodes: list[str]
    conv_macs: int
    alone: Score  # only this unit quantized (the ranking signal)


@dataclass
class SensitivityResult:
    images: int
    all_int8: Score  # everything quantized
    units: list[UnitScore]  # most sensitive first
    int8_coverage_all: float
    total_conv_macs: int
    timings_s: dict[str, float] = field(default_factory=dict)
    image_files: list[str] = field(default_factory=list)  # the tuning images, by name

    def ranking(self) -> list[str]:
        return [u.unit for u in self.units]

    def as_dict(self) -> dict:
        return asdict(self)


class PseudoGroundTruth(CocoGroundTruth):
    """FP32 detections as a COCO ground truth built in memory (no annotation file)."""

    def __init__(self, detections: dict[str, np.ndarray], class_names: list[str], imgsz: tuple[int, int]):
        from pycocotools.coco import COCO

        images, annotations = [], []
        for image_id, (name, dets) in enumerate(detections.items(), start=1):
            images.append({"id": image_id, "file_name": name, "height": imgsz[0], "width": imgsz[1]})
            for x1, y1, x2, y2, _, cls in dets[dets[:, 4] >= PSEUDO_GT_CONF].astype(np.float64):
                w, h = x2 - x1, y2 - y1
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                                    "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
        self.path = Path("<fp32 pseudo ground truth>")
        self.coco = COCO()
        self.coco.dataset = {"images": images, "annotations": annotations,
                             "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.image_ids = {img["file_name"]: img["id"] for img in images}


def agreement_per_image(detections: dict[str, np.ndarray], reference: dict[str, np.ndarray], class_names: list[str],
                        imgsz: tuple[int, int]) -> CocoEvaluation:
    """The agreement of `detections` with the `reference` (FP32) detections of the same images, with pycocotools'
    per-image results kept for a paired bootstrap between recipes (packager.metrics.intervals.paired_difference)."""
    return evaluate_images(detections, PseudoGroundTruth(reference, class_names, imgsz), class_names)


class AgreementScorer:
    """FP32 outputs of the tuning images, computed once; scores any Q/DQ variant of the same model against them."""

    def __init__(self, fp32_model, images: list[Path], imgsz: tuple[int, int], class_names: list[str]):
        self.names = [p.name for p in images]
        self.tensor = np.stack([preprocess(read_image(p), imgsz)[0] for p in images])
        self.class_names = class_names
        self.fp32 = fp32_model
        self.cache: dict[str, np.ndarray] = {}  # FP32 intermediate tensors, (N, ...) each
        self.reference = self._raw(fp32_model)
        self.reference_dets = self._detections(self.reference)
        self.ground_truth = PseudoGroundTruth(self.reference_dets, class_names, imgsz)
        self.object_anchors = self.reference[:, 4:].max(axis=1) >= OBJECT_ANCHOR_CONF  # (N, anchors)

    def score(self, model, cut: list[str] | None = None) -> Score:
        """Score a variant; with `cut`, `model` is a downstream submodel fed from the cached FP32 cut tensors."""
        raw = self._raw(model, cut)
        metrics = evaluate(self._detections(raw), self.ground_truth, self.class_names)
        return Score(round(metrics.map50_95, 5), round(self._sqnr_db(raw), 3))

    def cache_fp32(self, groups: list[list[str]]) -> set[str]:
        """Keep FP32 values of tensor groups (first groups first) within MAX_CACHE_BYTES; returns what is cached.

        Sizes come from a one-image probe, so the full pass only ever materializes what fits."""
        image_input = self.fp32.graph.input[0].name
        produced = {o for node in self.fp32.graph.node for o in node.output}
        candidates = sorted({n for group in groups for n in group if n in produced} - set(self.cache))
        if candidates:
            per_image = {n: v[:1].nbytes for n, v in zip(candidates, self._with_outputs(candidates, self.tensor[:1]))}
            budget = MAX_CACHE_BYTES - sum(v.nbytes for v in self.cache.values())
            wanted: list[str] = []
            for group in groups:
                new = [n for n in dict.fromkeys(group) if n in per_image and n not in wanted]
                cost = sum(per_image[n] for n in new) * len(self.tensor)
                if cost <= budget and all(n in produced or n == image_input or n in self.cache for n in group):
                    wanted += new
                    budget -= cost
            if wanted:
                self.cache.update(zip(wanted, self._with_outputs(wanted, self.tensor)))
        return set(self.cache) | {image_input}

    def _with_outputs(self, names: list[str], tensor: np.ndarray) -> list[np.ndarray]:
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.fp32)
        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
        image_input = model.graph.input[0].name
        return self._run(model, lambda i: {image_input: tensor[i:i + BATCH]}, len(tensor))

    def _raw(self, model, cut: list[str] | None = None) -> np.ndarray:
        image_input = self.fp32.graph.input[0].name
        if cut is None:
            return self._run(model, lambda i: {image_input: self.tensor[i:i + BATCH]})[0]
        source = {**self.cache, image_input: self.tensor}
        return self._run(model, lambda i: {name: source[name][i:i + BATCH] for name in cut})[0]

    def _run(self, model, feeds, count: int | None = None) -> list[np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        count = len(self.tensor) if count is None else count
        batches = [session.run(None, feeds(i)) for i in range(0, count, BATCH)]
        return [np.concatenate(outputs) for outputs in zip(*batches)]

    def _detections(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        return {name: decode(r, AGREEMENT_THRESHOLDS) for name, r in zip(self.names, raw)}

    def _sqnr_db(self, raw: np.ndarray) -> float:
        ref, noise = self.reference, raw - self.reference
        ratios = [float((noise[:, 4:] ** 2).sum() / max((ref[:, 4:] ** 2).sum(), 1e-12))]
        boxes = np.moveaxis(ref[:, :4], 1, 2)[self.object_anchors]  # (objects, 4): cx, cy, w, h
        if boxes.size:
            box_noise = np.moveaxis(noise[:, :4], 1, 2)[self.object_anchors]
            size = np.maximum(np.concatenate([boxes[:, 2:], boxes[:, 2:]], axis=1), 1.0)  # w, h, w, h
            ratios.append(float(((box_noise / size) ** 2).mean()))
        ratio = float(np.mean(ratios))
        return float(10 * np.log10(1 / ratio)) if ratio > 0 else float("inf")


def analyze(quantized_model, scorer: AgreementScorer, refine: int = 0, show_progress: bool = True) -> SensitivityResult:
    """Score every unit of `quantized_model` (everything INT8) alone; then split the `refine` most sensitive units
    that have several child blocks and score the children too. Units come back most sensitive first."""
    started, cpu_started = time.perf_counter(), time.process_time()
    all_int8 = scorer.score(quantized_model)
    units = find_units(quantized_model)
    scores = _score_alone(quantized_model, units, scorer, show_progress, "Sensitivity (one unit in INT8 at a time)")
    if refine > 0:
        # Split the most sensitive units that have more than one child block (a lone conv has nothing to split).
        split = find_units(quantized_model, refine=[s.unit for s in scores])
        parent = {u.name: next(s.unit for s in scores if _overlaps(u.name, s.unit)) for u in split}
        counts = {p: list(parent.values()).count(p) for p in set(parent.values())}
        to_split = [s.unit for s in ranked(scores) if counts.get(s.unit, 0) > 1][:refine]
        children = [u for u in split if parent[u.name] in to_split and u.name != parent[u.name]]
        scores += _score_alone(quantized_model, children, scorer, show_progress, "Refining " + ", ".join(to_split))
    return SensitivityResult(len(scorer.names), all_int8, ranked(scores), int8_conv_mac_share(quantized_model),
                             sum(conv_macs(quantized_model).values()),
                             {"analysis": round(time.perf_counter() - started, 1),
                              "analysis_cpu": round(time.process_time() - cpu_started, 1)}, list(scorer.names))


def _score_alone(model, units: list[Unit], scorer, show_progress: bool, label: str) -> list[UnitScore]:
    # Only the part downstream of the unit differs from FP32: run that part from cached FP32 tensors.
    variants = [downstream_submodel(only_quantized(model, unit.nodes), unit.nodes) for unit in units]
    # Late units first: their cut tensors are small (low resolution) and they skip most of the graph.
    cached = scorer.cache_fp32([cut for _, cut in sorted(variants, key=lambda v: len(v[0].graph.node))])
    scores = []
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(label, total=len(units))
        for unit, (sub, cut) in zip(units, variants):
            score = (scorer.score(sub, cut) if set(cut) <= cached
                     else scorer.score(only_quantized(model, unit.nodes)))
            scores.append(UnitScore(unit.name, list(unit.nodes), unit.conv_macs, score))
            progress.advance(task)
    return scores


def ranked(scores: list[UnitScore]) -> list[UnitScore]:
    # Lowest agreement alone first; SQNR breaks ties; the name keeps the order deterministic.
    return sorted(scores, key=lambda s: (s.alone.agreement, s.alone.sqnr_db, s.unit))


@dataclass
class GreedyStep:
    unit: str | None  # the unit tried at this step (None: the start, everything INT8)
    accepted: bool
    kept_precise: list[str]  # units precise after this step, in the order they were accepted
    score: Score  # of the configuration tried
    int8_coverage: float


def greedy_keep_precise(quantized_model, ranking: list[UnitScore], scorer: AgreementScorer, target: float,
                        max_trials: int | None = None, accept_all: bool = False,
                        show_progress: bool = True) -> list[GreedyStep]:
    """Try keeping units precise one at a time in sensitivity order until the agreement reaches `target`.

    A tried unit stays precise only if the combined model's agreement improves (quantization errors of
    neighbouring units can cancel: keeping one precise sometimes lowers the agreement); `accept_all` keeps every
    tried unit (the plain prefix walk, for frontier plots). Returns every step (step 0 = everything INT8); the
    choice is `chosen(steps)`. Deterministic: the ranking is a total order and onnxruntime CPU is deterministic
    for a fixed graph and input. A refined child unit is skipped when its parent is already precise and vice versa.
    """
    steps = [GreedyStep(None, True, [], scorer.score(quantized_model), int8_conv_mac_share(quantized_model))]
    kept: list[UnitScore] = []
    best = steps[0]
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"Auto preset: agreement target {target}", total=max_trials)
        for unit in ranking:
            if best.score.agreement >= target or (max_trials is not None and len(steps) > max_trials):
                break
            if any(_overlaps(unit.unit, k.unit) for k in kept):
                continue
            variant = keep_precise(quantized_model, [n for k in kept + [unit] for n in k.nodes])
            score = scorer.score(variant)
            accepted = accept_all or score.agreement > best.score.agreement
            if accepted:
                kept.append(unit)
            steps.append(GreedyStep(unit.unit, accepted, [k.unit for k in kept] if accepted else best.kept_precise,
                                    score, int8_conv_mac_share(variant)))
            best = steps[-1] if accepted else best
            progress.advance(task)
    return steps


def chosen(steps: list[GreedyStep]) -> GreedyStep:
    """The configuration greedy_keep_precise ends with: its last accepted step."""
    return next(step for step in reversed(steps) if step.accepted)


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")
