"""What `yqpack build` and `eval-onnx` print: the evaluation table (mAP, ratios vs FP32 with their intervals, MAC
coverage) and the build's summary."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from packager.pipeline.result import BuildResult
from packager.core.build_records import CocoMetrics, RatioInterval
from packager.inference.runtime import RuntimeOptions, runtime_on_this_machine


def metrics_table(metrics: dict[str, CocoMetrics], runtime_label: str = "onnxruntime",
                  intervals: dict[str, RatioInterval] | None = None, coverage: dict[str, float] | None = None) -> Table:
    """Per variant: mAP, the ratio vs fp32 with its 95 % paired bootstrap interval, and quantized MAC coverage."""
    intervals, coverage = intervals or {}, coverage or {}
    table = Table(title=f"ONNX COCO evaluation ({runtime_label}, CPU)")
    columns = ["variant", "mAP50-95", "mAP50", "ratio vs fp32", "95% interval", "images", "detections"]
    if coverage:
        columns.append("quantized MACs")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, m in metrics.items():
        interval = intervals.get(variant)
        row = [variant, f"{m.map50_95:.4f}", f"{m.map50:.4f}", f"{interval.ratio:.4f}" if interval else "-",
               f"{interval.low:.4f}-{interval.high:.4f}" if interval else "-", str(m.images), str(m.detections)]
        if coverage:
            row.append(f"{coverage[variant]:.1%}" if variant in coverage else "-")
        table.add_row(*row)
    if intervals:
        any_interval = next(iter(intervals.values()))
        table.caption = (f"interval: paired bootstrap over images, {any_interval.resamples} resamples, "
                         f"seed {any_interval.seed}"
                         + ("; fp8 variants run on onnxruntime, graph optimizations off" if any(
                             v.startswith("fp8") for v in metrics) else ""))
    return table


def int8_cpu_line(runtime: RuntimeOptions) -> str:
    """What runs this build's INT8 on this machine's CPU, said plainly where it is emulated (slower than FP32)."""
    choice = runtime_on_this_machine(runtime, quantized=True)
    if choice.runtime == "openvino":
        return (f"INT8 on this CPU: {choice.label} (integer kernels, checked against onnxruntime on "
                "the build's check images whenever it is opened)")
    if runtime.runtime == "onnxruntime":
        return "INT8 on this CPU: onnxruntime, as asked (exact Q/DQ emulation, slower than FP32)"
    return ("INT8 on this CPU: EMULATED by onnxruntime, correct but SLOWER than FP32 here: no VNNI/AMX instructions "
            "in effect. INT8 speed needs a CPU with AVX512-VNNI, AVX-VNNI or AMX, or a GPU (--target gpu).")


def summary_table(result: BuildResult, runtime: RuntimeOptions | None = None) -> Table:
    manifest = result.manifest
    table = Table(title=f"yqpack build: {manifest.model.name} ({manifest.model.head.value} head) -> {result.build_dir}")
    table.add_column("artifact")
    table.add_column("path")
    table.add_column("MB", justify="right")
    for variant, entry in manifest.artifacts.items():
        size = (result.build_dir / entry.path).stat().st_size / 1e6
        table.add_row(variant, entry.path, f"{size:.1f}")
    quant = manifest.quantization
    table.caption = (
        f"preset {quant.preset}, {quant.calibration_method} calibration on {manifest.calibration.count} "
        f"images of {escape(manifest.calibration.source)}, {quant.quantized_nodes} quantized nodes, "
        f"{len(quant.excluded_nodes)} kept precise, "
        + (f"auto: {result.quantization.auto.reason()}; " if result.quantization.auto else "")
        + ", ".join(f"{k} {c.share(k):.1%} of conv MACs in {k.upper()}" for k, c in result.coverage.items()) + "; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items())
        + "".join(f"; gate {gate.message()}" for gate in (result.gates or ([result.gate] if result.gate else [])))
        + ("; gate attempts: " + ", ".join(a.describe() for a in result.attempts) if len(result.attempts) > 1 else "")
        + f"; {int8_cpu_line(runtime or RuntimeOptions())}"
    )
    return table
