"""`yqpack build`: export -> calibration -> INT8 twins + FP16 -> manifest -> optional eval gate -> optional render.

The options are checked and the data decided before any heavy work: which images calibrate and tune
(`CalibrationPlan`; with --data, spread over the YAML's train split), which validate, and that the two never share
an image. Everything is built in a temporary sibling of `--out` and moved into place only when complete (and, if an
evaluation was asked for, only when the accuracy gate passed), so `--out` never holds half a build. A build that
misses the gate (after preset auto, when the preset was left to yqpack: pipeline/gate.py) is kept as
`<out>.failed-gate/` instead.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from packager.pipeline.config import config_from_options
from packager.pipeline.dataset_options import dataset_inputs
from packager.pipeline.gate import evaluate_and_gate, fallback_blocker, keep_failed_build
from packager.pipeline.manifest import assemble_manifest
from packager.pipeline.result import BuildOptions, BuildResult
from packager.calibration.calibration import CalibrationPlan, CalibrationResult, plan_calibration
from packager.calibration.train_split import plan_train_calibration
from packager.core.build_records import ConvCoverage
from packager.core.contracts import AccuracyGateError, ConfigError, MissingInputError
from packager.core.files import replace_directory
from packager.core.manifest import ARTIFACT_FILES, MANIFEST_NAME
from packager.evaluate.ground_truth import validation_set
from packager.export.onnx_export import check_model_path, export_onnx, model_imgsz, parse_imgsz
from packager.metrics.coco_eval import CocoGroundTruth
from packager.metrics.mac_coverage import conv_coverage
from packager.quantize.auto_preset import apply_auto_preset
from packager.quantize.fp8 import Fp8Result, quantize_fp8_twins
from packager.quantize.int8 import QuantizeOptions, QuantizeResult, convert_fp16, quantize_int8_twins
from packager.quantize.u8_activations import write_check_images

# Random-init models (.yaml) get their BatchNorm statistics from this many calibration images.
BATCHNORM_IMAGES = 16


@dataclass(frozen=True)
class BuildInputs:
    """What a build works from, decided once before any heavy work: its resolved configuration (recorded in the
    manifest), the calibration and tuning images, the validation images (checked against those two)."""

    config: dict
    calibration: CalibrationPlan
    ground_truth: CocoGroundTruth | None = None  # with --val-images or --data
    validation_files: tuple[Path, ...] = ()
    overlaps: tuple[str, ...] = ()  # --allow-overlap: validation images that are calibration/tuning images too
    validation_description: str = ""  # one line: the ground truth and its images


def validate_options(options: BuildOptions) -> BuildInputs:
    """Every check before any heavy work, so mistakes fail in seconds with a plain message; the build's data,
    with the one overlap check of a build (validation vs calibration/tuning images, by content)."""
    options.quantize.validate()
    if not 0 < options.min_map_ratio <= 1.5:
        raise ConfigError(f"--min-map-ratio must be in (0, 1.5], got {options.min_map_ratio}")
    data = dataset_inputs(options)
    if (options.val_images is None) != (options.val_annotations is None):
        raise ConfigError("evaluation needs both --val-images and --val-annotations")
    if options.val_annotations is not None and not Path(options.val_annotations).is_file():
        raise MissingInputError(f"annotation file not found: {options.val_annotations}")
    if options.val_images is not None and not Path(options.val_images).is_dir():
        raise MissingInputError(f"validation image folder not found: {options.val_images}")
    ground_truth, validation, described = None, [], ""
    if data is not None or options.val_images is not None:
        chosen = validation_set(options.val_images, options.val_annotations, data, options.split)
        ground_truth, validation, described = chosen.ground_truth, chosen.image_files, chosen.description
    check_model_path(options.model)
    options.imgsz = parse_imgsz(options.imgsz) if options.imgsz is not None else model_imgsz(options.model)
    if options.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {options.max_batch}")
    out = Path(options.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise ConfigError(f"--out {out} exists and is not a yqpack build directory: refusing to overwrite it")
    needs_tuning = options.quantize.preset == "auto"
    if data is not None and options.calib_images is None and options.calib_data is None:
        calibration = plan_train_calibration(data, options.calib_size, options.tune_images, options.max_tune_images,
                                             needs_tuning)
    else:
        calibration = plan_calibration(options.calib_images, options.calib_data, options.calib_size,
                                       options.tune_images, options.max_tune_images, needs_tuning)
    overlaps = calibration.check_disjoint(validation, allow=options.allow_overlap) if validation else []
    return BuildInputs(config_from_options(options), calibration, ground_truth, tuple(validation), tuple(overlaps),
                       described)


def run_build(options: BuildOptions, console: Console | None = None) -> BuildResult:
    console = console or Console(stderr=True)
    inputs = validate_options(options)
    if inputs.calibration.split is not None:
        console.print(f"Calibration: {inputs.calibration.selection}", markup=False)
    if inputs.validation_description:  # e.g. "data.yaml [val]: ...", not rich markup
        console.print(f"Evaluation: {inputs.validation_description}", markup=False)
    if inputs.overlaps:
        console.print(f"[bold red]WARNING: {len(inputs.overlaps)} validation image(s) are calibration/tuning "
                      "images; the accuracy gate below is measured partly on seen data[/]")
    out = Path(options.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would follow the build into --out
    try:
        try:
            result = _build_into(staging, options, inputs, console)
        except AccuracyGateError as failure:  # the work is kept for inspection, never in --out
            kept = keep_failed_build(staging, out)
            raise AccuracyGateError(f"{failure}; nothing was written to {options.out}; the failed build is kept in "
                                    f"{kept} (its manifest.json records the failed gate)") from None
        replace_directory(staging, out)
        result.build_dir = out
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if options.repository is not None:
        result.repository = _render_repository(out, options, console)
    return result


def _build_into(build_dir: Path, options: BuildOptions, inputs: BuildInputs, console: Console) -> BuildResult:
    timings: dict[str, float] = {}
    (build_dir / "onnx").mkdir(parents=True)

    started = time.perf_counter()
    calibration = inputs.calibration.make_tensor(options.imgsz, options.show_progress)
    calibration.save(build_dir / ARTIFACT_FILES["calib"])
    timings["calibration"] = time.perf_counter() - started
    if calibration.skipped:
        console.print(f"[yellow]Skipped {len(calibration.skipped)} unreadable calibration image(s):[/] "
                      + ", ".join(calibration.skipped))

    started = time.perf_counter()
    random_init = Path(options.model).suffix.lower() in (".yaml", ".yml")
    with console.status(f"Exporting {Path(options.model).name} to ONNX"):
        exported = export_onnx(
            options.model, build_dir / ARTIFACT_FILES["fp32"], options.imgsz, options.dynamic_batch, options.opset,
            batchnorm_images=calibration.data[:BATCHNORM_IMAGES] if random_init else None, end2end=options.end2end,
        )
    timings["export"] = time.perf_counter() - started
    if inputs.ground_truth is not None:  # a ground-truth class the model lacks stops here, not after quantizing
        inputs.ground_truth.class_mapping(exported.class_names)
    if random_init:
        console.print(f"Random-init model: BatchNorm statistics re-estimated on "
                      f"{min(BATCHNORM_IMAGES, calibration.count)} calibration images")

    tuning = list(inputs.calibration.tuning_files)
    quantization, coverage, fp8 = _quantized_twins(build_dir, options, options.quantize, calibration, tuning,
                                                   exported.class_names, console, timings)
    write_check_images(calibration.data, build_dir / ARTIFACT_FILES["int8-check"])

    started = time.perf_counter()
    with console.status("FP16 baseline (ModelOpt AutoCast)"):
        convert_fp16(build_dir / ARTIFACT_FILES["fp32"], build_dir / ARTIFACT_FILES["fp16"])
    timings["fp16"] = time.perf_counter() - started

    manifest = assemble_manifest(build_dir, exported, inputs.calibration, calibration, quantization,
                                 options.quantize, coverage, fp8, options.max_batch, inputs.config)
    manifest.save(build_dir)
    result = BuildResult(build_dir, manifest, exported, quantization, timings_s=timings, coverage=coverage, fp8=fp8)
    if inputs.ground_truth is None:
        return result

    def requantize_with_auto() -> None:
        """The same calibration tensor, preset auto tuned on the tuning images; the INT8 (and FP8) twins replaced."""
        started = time.perf_counter()
        auto = replace(options.quantize, preset="auto")
        result.quantization, result.coverage, result.fp8 = _quantized_twins(
            build_dir, options, auto, calibration, tuning, exported.class_names, console, {})
        result.manifest = assemble_manifest(build_dir, exported, inputs.calibration, calibration,
                                            result.quantization, auto, result.coverage, result.fp8,
                                            options.max_batch, inputs.config)
        timings["auto_fallback"] = time.perf_counter() - started

    started = time.perf_counter()
    blocker = fallback_blocker(options, len(tuning))
    evaluate_and_gate(result, options, inputs.ground_truth, list(inputs.validation_files), console,
                      None if blocker else requantize_with_auto, blocker)
    timings["evaluation"] = time.perf_counter() - started - timings.get("auto_fallback", 0.0)
    result.manifest.save(build_dir)
    return result


def _quantized_twins(build_dir: Path, options: BuildOptions, quantize: QuantizeOptions,
                     calibration: CalibrationResult, tuning: list[Path], class_names: list[str], console: Console,
                     timings: dict[str, float]) -> tuple[QuantizeResult, dict[str, ConvCoverage], Fp8Result | None]:
    """The INT8 twins (`_quantize`) and, with --fp8, the FP8 twins from the same calibration and exclusions, with
    the MAC coverage of each."""
    quantization = _quantize(build_dir, options, quantize, calibration, tuning, class_names, console, timings)
    coverage = {"int8": conv_coverage(quantization.int8_fp32_path)}
    fp8 = None
    if options.build_fp8:  # from the same export, calibration tensor and exclusions as INT8
        started = time.perf_counter()
        with console.status(f"ModelOpt FP8 PTQ (same calibration, {calibration.count} images)"):
            fp8 = quantize_fp8_twins(build_dir / ARTIFACT_FILES["fp32"], calibration.data, build_dir / "onnx",
                                     quantization.excluded_nodes, quantization.excluded_ops, quantize)
        timings["fp8"] = time.perf_counter() - started
        coverage["fp8"] = conv_coverage(fp8.fp8_fp32_path)
    return quantization, coverage, fp8


def _quantize(build_dir: Path, options: BuildOptions, quantize: QuantizeOptions, calibration: CalibrationResult,
              tuning: list[Path], class_names: list[str], console: Console,
              timings: dict[str, float]) -> QuantizeResult:
    """INT8 twins from one calibration; preset auto then picks what to keep precise on the `tuning` images."""
    started = time.perf_counter()
    method = quantize.calibration_method
    with console.status(f"ModelOpt INT8 PTQ ({quantize.preset}, "
                        f"{'max + MSE scales' if method == 'mse' else method} calibration on {calibration.count} "
                        "images)"):
        quantization = quantize_int8_twins(
            build_dir / ARTIFACT_FILES["fp32"], calibration.data, build_dir / "onnx", quantize
        )
    timings["quantize"] = time.perf_counter() - started
    if quantize.preset == "auto":
        started = time.perf_counter()
        apply_auto_preset(quantization, build_dir / ARTIFACT_FILES["fp32"], tuning, options.imgsz,
                          class_names, quantize, options.show_progress)
        timings["auto_preset"] = time.perf_counter() - started
        console.print(f"Auto preset: {quantization.auto.reason()}")
    if quantize.adaround:
        from packager.quantize.adaround_step import apply_adaround

        started = time.perf_counter()
        apply_adaround(quantization, build_dir / ARTIFACT_FILES["fp32"], calibration.data, quantize,
                       options.show_progress)
        timings["adaround"] = time.perf_counter() - started
        console.print(f"AdaRound: learned INT8 rounding of {quantization.adaround.convolutions} convolutions on "
                      f"{quantization.adaround.device} in {quantization.adaround.seconds:.0f} s")
    if quantize.preset != "auto" and quantization.excluded_nodes:
        console.print(f"Kept in high precision ({len(quantization.excluded_nodes)} nodes): "
                      + ", ".join(quantization.excluded_nodes))
    if quantization.excluded_ops:
        console.print("Op types kept in high precision: " + ", ".join(quantization.excluded_ops))
    return quantization


def _render_repository(build_dir: Path, options: BuildOptions, console: Console) -> Path:
    from packager.repository.render import RenderOptions, render
    from packager.repository.targets import default_precisions

    with console.status(f"Rendering the Triton model repository into {options.repository}"):
        target = options.repository_target
        # FP8 is served by TensorRT only (gpu target); CPU targets never serve it (see README).
        fp8 = ("fp8",) if target == "gpu" and (build_dir / ARTIFACT_FILES["fp8"]).is_file() else ()
        render(build_dir, Path(options.repository), RenderOptions(
            target=target, precisions=default_precisions(target) + fp8, runtime=options.runtime.runtime,
            precision_hint=options.runtime.precision_hint))
    return Path(options.repository)
