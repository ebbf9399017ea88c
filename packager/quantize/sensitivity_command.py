"""`yqpack sensitivity`: calibrate once (everything INT8), score each unit against FP32, write json + markdown + PNG."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packager.calibration.calibration import list_images, split_calibration_and_tuning
from packager.calibration.train_split import train_tuning_images
from packager.core.contracts import ConfigError, ManifestError
from packager.core.manifest import BuildManifest
from packager.datasets.data_yaml import read_data_yaml
from packager.quantize.sensitivity import AgreementScorer, SensitivityResult, analyze

DEFAULT_MAX_IMAGES = 64


@dataclass
class SensitivityOutputs:
    result: SensitivityResult
    json_path: Path
    markdown_path: Path
    plot_path: Path


def run_sensitivity(build_dir: str | Path, images_dir: str | Path | None = None,
                    out: str | Path = "sensitivity.json", max_images: int = DEFAULT_MAX_IMAGES, refine: int = 2, show_progress: bool = True,
                    data: str | Path | None = None) -> SensitivityOutputs:
    """Sensitivity of a build's model on unlabelled `images_dir`, or on `max_images` images spread over the train
    split of the dataset YAML `data`, recalibrated once from the build's calib.npy.

    The tuning images never include calibration images: when `images_dir` is the build's calibration folder, its
    first calibration-count images are skipped (the same split as `yqpack build`); from `data`, every train image
    with the bytes of one of the build's calibration images is.
    """
    import onnx

    from packager.quantize.int8 import QuantizeOptions, quantize_int8_twins

    if max_images < 1:
        raise ConfigError(f"--max-images must be at least 1, got {max_images}")
    build_dir = Path(build_dir)
    manifest = BuildManifest.load(build_dir)
    calibration, quantization = manifest.calibration, manifest.quantization
    if calibration is None or quantization is None:
        raise ManifestError(f"{build_dir} records no calibration or quantization: was it made by `yqpack build`?")
    if (images_dir is None) == (data is None):
        raise ConfigError("sensitivity needs tuning images: --images DIR or --data PATH/data.yaml (its train split), "
                          "one of the two")
    if data is not None:
        tuning = train_tuning_images(read_data_yaml(data), max_images, calibration.image_sha256)
        source = f"the train split of {data}"
    else:
        files = list_images(images_dir)
        same_folder = Path(calibration.source).resolve() == Path(images_dir).resolve()
        _, tuning = split_calibration_and_tuning(files, calibration.count if same_folder else 0, max_tune=max_images)
        source = str(images_dir)
    if not tuning:
        raise ConfigError(f"no tuning images left in {source} after the {calibration.count} calibration images")
    started, cpu_started = time.perf_counter(), time.process_time()
    options = QuantizeOptions(preset="auto", calibration_method=quantization.calibration_method)
    with tempfile.TemporaryDirectory(prefix="yqpack-sensitivity-") as tmp:
        quantized = quantize_int8_twins(manifest.artifact_path(build_dir, "fp32"), np.load(build_dir / "calib.npy"),
                                        Path(tmp), options)
        all_int8 = onnx.load(str(quantized.int8_fp32_path))
    calibrated = time.perf_counter() - started
    scorer = AgreementScorer(onnx.load(str(manifest.artifact_path(build_dir, "fp32"))), tuning, manifest.model.imgsz,
                             list(manifest.model.class_names))
    reference = time.perf_counter() - started - calibrated
    result = analyze(all_int8, scorer, refine=refine, show_progress=show_progress)
    result.timings_s = {"calibration": round(calibrated, 1), "fp32_reference": round(reference, 1),
                        **result.timings_s, "total": round(time.perf_counter() - started, 1),
                        "total_cpu": round(time.process_time() - cpu_started, 1)}
    return write_outputs(result, Path(out), manifest.model.name)


def write_outputs(result: SensitivityResult, json_path: Path, model_name: str) -> SensitivityOutputs:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    markdown_path = json_path.with_suffix(".md")
    markdown_path.write_text(markdown_table(result, model_name))
    plot_path = json_path.with_suffix(".png")
    plot(result, plot_path, model_name)
    return SensitivityOutputs(result, json_path, markdown_path, plot_path)


def markdown_table(result: SensitivityResult, model_name: str) -> str:
    total_macs = result.total_conv_macs
    lines = [
        f"# INT8 sensitivity of {model_name} ({result.images} unlabelled tuning images)",
        "",
        f"Everything INT8: agreement {result.all_int8.agreement:.4f} (pseudo-mAP50-95 vs FP32), "
        f"SQNR {result.all_int8.sqnr_db:.1f} dB. Each row: only that unit in INT8, the rest FP32; "
        "most sensitive (lowest agreement alone) first.",
        "",
        "| rank | unit | nodes | share of conv MACs | agreement | SQNR dB |",
        "|---|---|---|---|---|---|",
    ]
    for rank, unit in enumerate(result.units, start=1):
        share = unit.conv_macs / total_macs if total_macs else 0.0
        lines.append(f"| {rank} | `{unit.unit}` | {len(unit.nodes)} | {share:.1%} | {unit.alone.agreement:.4f} | "
                     f"{unit.alone.sqnr_db:.1f} |")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result.timings_s.items())
    return "\n".join(lines) + f"\n\nTimings: {timings}.\n"


def plot(result: SensitivityResult, path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    units = result.units
    fig, (ax_sqnr, ax_agree) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.22 * len(units) + 1.5)), sharey=True)
    y = np.arange(len(units))
    ax_sqnr.barh(y, [u.alone.sqnr_db for u in units], color="tab:blue")
    ax_sqnr.set_xlabel("SQNR of the head output, dB (lower = more sensitive)")
    ax_agree.barh(y, [1 - u.alone.agreement for u in units], color="tab:red")
    ax_agree.set_xlabel("1 - agreement (pseudo-mAP50-95 vs FP32)")
    ax_sqnr.set_yticks(y, [u.unit for u in units], fontsize=7)
    ax_sqnr.invert_yaxis()
    fig.suptitle(f"{model_name}: only one unit in INT8 ({result.images} tuning images; everything INT8: "
                 f"agreement {result.all_int8.agreement:.3f}, SQNR {result.all_int8.sqnr_db:.1f} dB)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
