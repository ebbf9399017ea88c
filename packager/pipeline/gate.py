"""The build's accuracy gate, and what the build does when the default INT8 preset misses it.

With the preset left to yqpack (`--preset` not given) and `mixed` below `--min-map-ratio`, the build searches
label-free before giving up: it re-quantizes with preset `auto` (units kept precise by their agreement with FP32 on
the tuning images, which are never validation images: the build's overlap check covers them too), evaluates the new
INT8 (and FP8) twins on the same validation images, and gates again. Every attempt is printed and recorded in
manifest.json (`evaluation.attempts`). When no attempt passes, the build is not thrown away: run_build keeps it as
`<out>.failed-gate/` (its manifest records the failed gate) and the AccuracyGateError names what is left to try.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from packager.core.contracts import AccuracyGateError
from packager.core.files import replace_directory
from packager.core.manifest import MANIFEST_NAME
from packager.evaluate.onnx_eval import (
    DEFAULT_VARIANTS,
    GATED_VARIANT,
    BuildEvaluation,
    BuildGateResult,
    coverage_by_variant,
    evaluate_variants,
)
from packager.inference.runtime import evaluation_label
from packager.pipeline.manifest import evaluation_record
from packager.pipeline.result import BuildOptions, BuildResult
from packager.pipeline.summary import metrics_table

FAILED_GATE_SUFFIX = ".failed-gate"


@dataclass
class GateAttempt:
    """One INT8 recipe gated: its preset, the gates (INT8, and FP8 with --fp8) and its INT8 share of conv MACs."""

    preset: str
    gates: list[BuildGateResult]
    int8_mac_coverage: float | None = None
    note: str = ""  # preset auto: its label-free selection

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    @property
    def failed_gate(self) -> BuildGateResult | None:
        return next((gate for gate in self.gates if not gate.passed), None)

    def describe(self) -> str:
        ratios = ", ".join(f"{gate.variant} ratio {gate.ratio:.4f}" + (
            f" [{gate.interval.low:.4f}-{gate.interval.high:.4f}]" if gate.interval else "") for gate in self.gates)
        coverage = f", {self.int8_mac_coverage:.1%} of conv MACs in INT8" if self.int8_mac_coverage is not None else ""
        return f"preset {self.preset}: {ratios}{coverage}, {'passed' if self.passed else 'FAILED'}"

    def as_dict(self) -> dict:
        gates = [{"variant": gate.variant, "ratio": round(gate.ratio, 5), "passed": gate.passed,
                  "decidable": gate.decidable,
                  **({"low": round(gate.interval.low, 5), "high": round(gate.interval.high, 5),
                      "images": gate.interval.images} if gate.interval else {})} for gate in self.gates]
        return {"preset": self.preset, "passed": self.passed, "int8_mac_coverage": self.int8_mac_coverage,
                "gates": gates, **({"note": self.note} if self.note else {})}


def fallback_blocker(options: BuildOptions, tuning_images: int) -> str:
    """Why a build that misses the gate with `mixed` cannot go on to preset auto ("" when it can)."""
    if not options.auto_fallback or options.quantize.preset != "mixed":
        return f"--preset {options.quantize.preset} was chosen"
    if options.quantize.dq_only:
        return "preset auto does not support --dq-only"
    if tuning_images == 0:
        return ("there are no tuning images besides the calibration images (--tune-images DIR, or more "
                "--calib-images than --calib-size)")
    return ""


def evaluate_and_gate(result: BuildResult, options: BuildOptions, ground_truth, image_files: list[Path],
                      console: Console, retry_with_auto: Callable[[], None] | None = None,
                      blocker: str = "") -> list[GateAttempt]:
    """mAP of every variant, ratios vs fp32 with paired bootstrap intervals, the gate on each quantized one; when
    it fails and `retry_with_auto` is given, that re-quantizes the build with preset auto and only the quantized
    variants are evaluated and gated again (`blocker`: why there is no retry, for the message). Records the
    evaluation in `result.manifest`; when the last attempt failed, saves the manifest and raises
    AccuracyGateError."""
    gated = [GATED_VARIANT] + (["fp8-fp32"] if result.fp8 is not None else [])
    evaluation = evaluate_variants(result.build_dir, result.manifest, ground_truth, image_files,
                                   tuple(DEFAULT_VARIANTS) + tuple(gated[1:]), show_progress=options.show_progress,
                                   runtime=options.runtime)
    label = evaluation.runtime_label() or evaluation_label(options.runtime)
    console.print(metrics_table(evaluation.metrics, label, evaluation.intervals, evaluation.coverage))
    attempts = [_judge(result, evaluation, gated, options.min_map_ratio, console)]
    if not attempts[0].gates[0].passed and retry_with_auto is not None:  # the INT8 gate: auto is an INT8 search
        console.print(f"[bold yellow]Preset mixed missed the gate ({attempts[0].failed_gate.message()}); "
                      f"trying preset auto: re-quantized with units kept precise by their label-free agreement "
                      f"with FP32 on the tuning images (never validation images), then gated again[/]")
        retry_with_auto()
        again = evaluate_variants(result.build_dir, result.manifest, ground_truth, image_files, gated,
                                  show_progress=options.show_progress, runtime=options.runtime)
        evaluation = _merged(evaluation, again, coverage_by_variant(result.build_dir, result.manifest, gated))
        label = evaluation.runtime_label() or label
        console.print(metrics_table(evaluation.metrics, label, evaluation.intervals, evaluation.coverage))
        attempts.append(_judge(result, evaluation, gated, options.min_map_ratio, console))
        console.print("Gate attempts: " + "; ".join(attempt.describe() for attempt in attempts), markup=False)
    final = attempts[-1]
    result.metrics, result.intervals = evaluation.metrics, evaluation.intervals
    result.gates, result.gate, result.attempts = final.gates, final.gates[0], attempts
    result.manifest.evaluation = evaluation_record(evaluation, final.gates, options.min_map_ratio, label,
                                                   [attempt.as_dict() for attempt in attempts])
    if not final.passed:
        result.manifest.save(result.build_dir)
        raise AccuracyGateError(failure_message(attempts, options, blocker))
    return attempts


def _judge(result: BuildResult, evaluation: BuildEvaluation, gated: list[str], min_ratio: float,
           console: Console) -> GateAttempt:
    gates = []
    for variant in gated:
        gate = BuildGateResult(variant, evaluation.metrics["fp32"].map50_95, evaluation.metrics[variant].map50_95,
                               min_ratio, evaluation.intervals.get(variant))
        if gate.passed and gate.decidable is False:
            console.print(f"[bold yellow]Gate: {gate.message()}[/]")
        gates.append(gate)
    quantization = result.manifest.quantization
    auto = result.quantization.auto
    return GateAttempt(result.quantization.preset, gates, quantization.int8_mac_coverage if quantization else None,
                       auto.reason() if auto is not None else "")


def _merged(first: BuildEvaluation, again: BuildEvaluation, coverage: dict[str, float]) -> BuildEvaluation:
    """The first evaluation with the re-quantized variants' results in place of its own (fp32 and fp16 are the
    same files, so their detections stand), intervals recomputed against fp32."""
    merged = BuildEvaluation({**first.metrics, **again.metrics}, {**first.per_image, **again.per_image},
                             runtimes={**first.runtimes, **again.runtimes},
                             runtime_notes={**first.runtime_notes, **again.runtime_notes})
    merged.intervals = merged.ratios()
    merged.coverage = {**first.coverage, **coverage}
    return merged


def failure_message(attempts: list[GateAttempt], options: BuildOptions, blocker: str = "") -> str:
    """The failed gate, every attempt, and what is left to try (`blocker`: why preset auto was not tried)."""
    final = attempts[-1]
    failed = final.failed_gate
    kind = "FP8" if failed.variant.startswith("fp8") else "INT8"
    tried = "; ".join(attempt.describe() for attempt in attempts)
    options_left = []
    interval = failed.interval
    if interval is None:
        options_left.append("validate on more images")
    elif interval.high < failed.min_ratio:
        options_left.append(f"more validation images (though the {interval.images}-image interval "
                            f"{interval.low:.4f}-{interval.high:.4f} lies wholly below the required "
                            f"{failed.min_ratio}: more images are unlikely to change the verdict)")
    else:
        options_left.append(f"more validation images (the {interval.images}-image interval {interval.low:.4f}-"
                            f"{interval.high:.4f} reaches the required {failed.min_ratio}; about "
                            f"{interval.images_needed(failed.margin / 2):,} images would narrow it to "
                            f"+-{failed.margin / 2:.3f})")
    best = max(attempt_gate.ratio for attempt in attempts for attempt_gate in attempt.gates
               if attempt_gate.variant == failed.variant)
    options_left.append(f"a lower --min-map-ratio (now {options.min_map_ratio}; the best {failed.variant} ratio "
                        f"was {best:.4f})")
    if any(attempt.preset == "auto" for attempt in attempts):
        options_left.append(f"a higher --auto-target than {options.quantize.auto_target} (auto keeps more units "
                            "precise: fewer MACs in INT8)")
    elif kind == "INT8" and options.auto_fallback:
        options_left.append(f"preset auto, not tried here because {blocker}")
    elif kind == "INT8":
        options_left.append("--preset auto, or leave --preset out (mixed, then auto when mixed misses the gate)")
    if kind == "FP8":
        options_left.append("--no-fp8")
    return (f"{kind} accuracy gate failed: {failed.message()}. Tried {tried}. Options left: "
            + "; ".join(options_left))


def keep_failed_build(staging: Path, out: Path) -> Path:
    """Move a build that failed its gate to `<out>.failed-gate` (replacing an earlier failed build there, never a
    folder that is not a yqpack build) and return where it is."""
    for number in itertools.count(1):
        target = out.with_name(out.name + FAILED_GATE_SUFFIX + ("" if number == 1 else f".{number}"))
        if not target.exists() or (target.is_dir() and (target / MANIFEST_NAME).is_file()):
            break
    replace_directory(staging, target)
    return target
