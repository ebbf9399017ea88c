"""The verify report: report.json (every number), report.md (tables people read), PNG plots (matplotlib Agg)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from packager.verify.report_labels import labels_section

if TYPE_CHECKING:
    from packager.verify.result import VerifyResult

STATUS_LINE = {
    "pass": "PASS - every gate holds",
    "fail": "FAIL - at least one gate does not hold",
    "incomplete": "INCOMPLETE - the run was interrupted; these numbers prove nothing",
}


def collect_versions() -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
                "cpu_count": os.cpu_count()}
    for package in ("yqpack", "tritonclient", "numpy", "pycocotools", "matplotlib", "grpcio"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(result: "VerifyResult", report_dir: Path) -> dict[str, str]:
    """Write report.json, report.md and the plots into `report_dir`; returns {kind: path}."""
    report_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": report_dir / "report.json", "markdown": report_dir / "report.md"}
    plots = {}
    if any(result.load.values()):
        plots["throughput_latency"] = plot_throughput_latency(result, report_dir / "throughput_vs_p99.png")
    if any(item.metrics for item in result.accuracy):
        plots["map"] = plot_map(result, report_dir / "map_per_precision.png")
    paths = {kind: str(path) for kind, path in {**files, **plots}.items()}
    result.report_files = paths
    files["json"].write_text(json.dumps(_json_safe(result.as_dict()), indent=2) + "\n")
    files["markdown"].write_text(render_markdown(result, {k: Path(v).name for k, v in plots.items()}))
    return paths


def _json_safe(value):
    """NaN/inf are not JSON: write null so any JSON reader can load the report."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _gate_number(gate: str, value: float) -> str:
    digits = {"--min-map-ratio": 4, "--max-errors": 0, "--max-map-drift": 4, "--min-map": 4, "annotations": 2}
    return _num(value, digits.get(gate, 1))


def _interval_cell(comparison) -> str:
    interval = comparison.interval
    return "-" if interval is None else f"{interval.low:.4f}-{interval.high:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_markdown(result: "VerifyResult", plots: dict[str, str] | None = None) -> str:
    """report.md: the verdict first, then one section per kind of number (a section without numbers is left out)."""
    plots = plots or {}
    sections = [
        _summary_section(result),
        _gates_section(result),
        _recommendation_section(result),
        _runtime_section(result),
        labels_section(result),
        _reference_section(result),
        _annotation_section(result),
        _accuracy_section(result, plots),
        _comparison_section(result),
        _load_section(result, plots),
        _detector_section(result),
        _errors_section(result),
        _skipped_section(result),
        _versions_section(result),
    ]
    return "\n".join(line for section in sections for line in section)


def _summary_section(result: "VerifyResult") -> list[str]:
    lines = [f"# yqpack verify: {result.status.upper()}", "", f"**{STATUS_LINE[result.status]}**", ""]
    if result.incomplete_reason:
        lines += [f"Incomplete because: {result.incomplete_reason}", ""]
    server = result.server or {}
    return lines + [
        f"- server: {result.url} ({server.get('name', '?')} {server.get('version', '?')})",
        f"- models: {', '.join(m.name for m in result.models) or 'none discovered'}",
        f"- build: {result.build or 'none (no --build, no detached yqpack serve for this URL)'}; MAC coverage and "
        "accuracy references come from it",
        f"- images: {result.images.get('accuracy')} annotated for accuracy, {result.images.get('load_payloads')} "
        f"for load, {len(result.skipped_images)} listed below ({result.images.get('images_dir')})",
        f"- started {result.started}, wall time {result.wall_time_s:.0f} s; machine: {result.versions.get('cpu')}, "
        f"{result.versions.get('cpu_count')} logical CPUs",
        "",
    ]


def _gates_section(result: "VerifyResult") -> list[str]:
    lines = ["## Gates", ""]
    if result.status == "incomplete":
        # Gates over a partial run would look like a verdict: show the numbers, not a pass.
        lines += ["Not judged: the run is incomplete. Partial values:", ""]
    if not result.gates:
        return lines + ["(no gate evaluated)", ""]
    verdict = {True: "pass", False: "**FAIL**"} if result.status != "incomplete" else {True: "n/a", False: "**FAIL**"}
    return lines + _table(
        ["gate", "model", "result", "value", "threshold", "detail"],
        [[g.gate, g.model, verdict[g.passed], _gate_number(g.gate, g.value), _gate_number(g.gate, g.threshold),
          g.detail]
         for g in result.gates],
    )


def _recommendation_section(result: "VerifyResult") -> list[str]:
    if not result.recommendations:
        return []
    lines = ["## Precision to serve", ""]
    for recommendation in result.recommendations:
        lines += [f"**{recommendation.sentence}.**", ""]
        lines += _table(["precision", "model", "peak img/s", "at concurrency", "gates"],
                        [[c.precision, c.model, _num(c.peak_throughput), str(c.peak_concurrency or "-"),
                          "held" if c.passed else "**failed** " + ", ".join(dict.fromkeys(g.gate for g in
                                                                                         c.failed_gates))]
                         for c in recommendation.candidates])
    return lines + ["Peak images/s of the ensemble over the load levels of this one run; the fastest precision "
                    "that holds every gate it faces is the one to serve.", ""]


def _runtime_section(result: "VerifyResult") -> list[str]:
    """What the server really runs: a fallback (INT8 moved to onnxruntime, say) stands out in bold."""
    lines = ["## What runs each detector", ""]
    if not result.detector_runtimes:
        return lines + [result.detector_runtimes_source, ""]
    rows = []
    for item in result.detector_runtimes:
        notes = "; ".join(f"**{note}**" for note in item.notes) or "-"
        check = item.self_check
        check_cell = "-" if check is None else (
            ("passed" if check.get("passed") else "**failed**") + f": distance {check.get('distance')} "
            f"(tolerance {check.get('tolerance')}) on {check.get('images')} images")
        rows.append([item.ensemble, item.detector,
                     item.label or item.runtime or "not in the server log (its detector does not log its runtime)",
                     notes.replace("|", "/"), check_cell])
    return lines + [f"From the server log {result.detector_runtimes_source}.", ""] + _table(
        ["ensemble", "detector", "runtime", "notes (fallbacks)", "INT8 self-check"], rows)


def _reference_section(result: "VerifyResult") -> list[str]:
    """What each served mAP was held to: a wrong annotation file fools a reference scored with the same file."""
    if not result.accuracy:
        return []
    min_map = (result.settings.get("absolute_gates") or {}).get("min_map")
    floor = f"; --min-map floor {min_map:g}" if min_map is not None else ""
    rows = []
    for item in result.accuracy:
        reference = result.references.get(item.model)
        if reference is not None and reference.annotations is None:
            kind = "the build's own evaluation, recorded in its manifest (scored with the build's annotations)"
        elif reference is not None:
            kind = ("the build's ONNX evaluated here on the same images and annotation file: it shows serving "
                    "matches the build, not that the annotations are right")
        else:
            kind = "none from the build" + ("" if min_map is not None else " (--max-map-drift fails)")
        rows.append([item.model, kind + floor, _num(reference.map50_95, 4) if reference else "-",
                     reference.source if reference else "-"])
    return ["## Accuracy reference", ""] + _table(["model", "reference", "mAP50-95", "source"], rows) + [
        "The annotation file itself is judged by the annotation check, which needs no reference.", ""]


def _annotation_section(result: "VerifyResult") -> list[str]:
    from packager.verify.annotation_check import CONFIDENT_SCORE, MATCH_IOU

    lines = []
    for check in result.annotation_checks:
        verdict = {"pass": "pass", "fail": "**FAIL**"}.get(check.verdict, "not judged")
        lines += [f"## Annotation check ({check.model}): {verdict}", "",
                  f"Confident detections (score >= {CONFIDENT_SCORE:g}) of {check.model} on {check.images} images "
                  f"against the annotated boxes (class-agnostic IoU >= {MATCH_IOU:g}), as given and with each known "
                  f"mistake undone (categories: on the boxes matched once a named box mistake is undone). "
                  f"{check.cause}.", ""]
        lines += _table(["boxes", "detections", "annotated boxes", "matched", "precision", "recall"],
                        [[b.fix, str(b.detections), str(b.boxes), str(b.matched), _num(b.precision, 3),
                          _num(b.recall, 3)] for b in check.boxes])
        lines += _table([check.ids, "matched pairs", "same category", "agreement"],
                        [[c.fix, str(c.pairs), str(c.agreeing), _num(c.agreement, 3)] for c in check.classes])
        notes = []
        if check.size_mismatches:
            notes.append(f"- {check.size_mismatches} of {check.images} images have another size in the annotation "
                         "file than the image file")
        if check.unknown_category_annotations:
            notes.append(f"- {check.unknown_category_annotations} annotations have a category id the file's "
                         "categories do not list")
        if check.confusions:
            notes.append(f"- most frequent disagreements: {', '.join(check.confusions)}")
        lines += notes + ([""] if notes else [])
    return lines


def _accuracy_section(result: "VerifyResult", plots: dict[str, str]) -> list[str]:
    lines = ["## Accuracy (served, COCO, conf 0.001 / iou 0.7 / max_det 300)", ""]
    # The same ONNX scores differently under emulated Q/DQ, integer kernels and TensorRT: name who ran it.
    runtimes = {model.name: model.runtime or "not stated by the server" for model in result.models}
    rows = []
    for item in result.accuracy:
        m = item.metrics
        rows.append([item.model, item.precision, runtimes.get(item.model, "-"), str(item.images), str(item.errors)]
                    + ([_num(v, 4) for v in (m.map50_95, m.map50, m.map75, m.map_small, m.map_medium, m.map_large)]
                       if m else ["-"] * 6))
    lines += _table(["model", "precision", "runtime", "images", "errors", "mAP50-95", "mAP50", "mAP75", "AP small",
                     "AP medium", "AP large"], rows)
    if "map" in plots:
        lines += [f"![mAP per precision]({plots['map']})", ""]
    return lines


def _comparison_section(result: "VerifyResult") -> list[str]:
    if not result.comparisons:
        return []
    lines = ["## Precision vs reference", ""]
    lines += _table(
        ["model", "reference", "mAP50-95", "reference mAP", "delta", "ratio", "95% interval",
         "quantized MACs", "peak img/s", "reference peak", "speed-up"],
        [[c.model, c.reference_model, _num(c.map50_95, 4), _num(c.reference_map50_95, 4),
          f"{c.map_delta:+.4f}", _num(c.map_ratio, 4), _interval_cell(c),
          "-" if c.mac_coverage is None else f"{c.mac_coverage:.1%}", _num(c.peak_throughput),
          _num(c.reference_peak_throughput), _num(c.speedup, 2) + "x"] for c in result.comparisons],
    )
    first = next((c.interval for c in result.comparisons if c.interval), None)
    if first is not None:
        lines += [f"Interval: paired bootstrap over the {first.images} images, {first.resamples} resamples "
                  f"(seed {first.seed}) of pycocotools' per-image results. Quantized MACs: share of "
                  "convolution multiply-accumulates whose input and weight are quantized (from the build above).", ""]
    return lines


def _load_section(result: "VerifyResult", plots: dict[str, str]) -> list[str]:
    if not result.load:
        return []
    lines = ["## Load (ensemble, one encoded image per request)", ""]
    rows = []
    for model, levels in result.load.items():
        for level in levels:
            rows.append([model, str(level.concurrency), str(level.requests), str(level.errors),
                         _num(level.throughput), _num(level.latency.p50_ms), _num(level.latency.p90_ms),
                         _num(level.latency.p99_ms)])
    lines += _table(["model", "concurrency", "requests", "errors", "img/s", "p50 ms", "p90 ms", "p99 ms"], rows)
    if "throughput_latency" in plots:
        lines += [f"![throughput vs p99 latency]({plots['throughput_latency']})", ""]
    return lines + _server_steps_section(result)


def _detector_section(result: "VerifyResult") -> list[str]:
    if not result.detector_load:
        return []
    rows = []
    for model in result.models:
        ensemble = {level.concurrency: level for level in result.load.get(model.name, [])}
        for level in result.detector_load.get(model.detector or "", []):
            whole = ensemble.get(level.concurrency)
            ratio = whole.throughput / level.throughput if whole and level.throughput else float("nan")
            rows.append([model.name, str(level.concurrency), _num(whole.throughput if whole else None),
                         _num(level.throughput), _num(ratio, 2), str(level.errors)])
    return ["## Ensemble vs bare detector (same concurrency)", ""] + _table(
        ["ensemble", "concurrency", "ensemble img/s", "detector img/s", "ensemble / detector", "detector errors"],
        rows)


def _errors_section(result: "VerifyResult") -> list[str]:
    errors = [(item.model, "accuracy", msg) for item in result.accuracy for msg in item.error_messages]
    for kind, load in (("load", result.load), ("detector load", result.detector_load)):
        errors += [(model, f"{kind} c={level.concurrency}", msg)
                   for model, levels in load.items() for level in levels for msg in level.error_messages]
    if not errors:
        return []
    return ["## First error messages", ""] + _table(
        ["model", "where", "message"], [[m, w, msg.replace("|", "/")] for m, w, msg in errors])


def _skipped_section(result: "VerifyResult") -> list[str]:
    if not result.skipped_images:
        return []
    return ["## Images not used for accuracy", ""] + _table(
        ["file", "reason"], [[s.file, s.reason.replace("|", "/")] for s in result.skipped_images])


def _versions_section(result: "VerifyResult") -> list[str]:
    server = result.server or {}
    return ["## Versions", ""] + _table(["component", "version"], [[k, str(v)] for k, v in result.versions.items()]
                                        + [["tritonserver", str(server.get("version"))]])


def _server_steps_section(result: "VerifyResult") -> list[str]:
    rows = []
    for model, levels in result.load.items():
        for level in levels:
            for step in level.server_steps:
                rows.append([model, str(level.concurrency), step.model, str(step.requests), _num(step.avg_batch, 2),
                             _num(step.queue_ms, 2), _num(step.compute_ms, 2)])
    if not rows:
        return []
    return ["### Server-side time per request (Triton statistics)", ""] + _table(
        ["ensemble", "concurrency", "step", "requests", "avg batch", "queue ms", "compute ms"], rows
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_throughput_latency(result: "VerifyResult", path: Path) -> Path:
    """One line per ensemble: p99 latency (x) vs throughput (y), points labelled with their concurrency."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for model, levels in result.load.items():
        points = [(lv.latency.p99_ms, lv.throughput, lv.concurrency) for lv in levels
                  if math.isfinite(lv.latency.p99_ms)]
        if not points:
            continue
        xs, ys, cs = zip(*points)
        ax.plot(xs, ys, marker="o", label=model)
        for x, y, c in points:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title("Throughput vs p99 latency across concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_map(result: "VerifyResult", path: Path) -> Path:
    """Grouped bars: mAP50-95 and mAP50 per served ensemble, values written on the bars."""
    plt = _pyplot()
    items = [item for item in result.accuracy if item.metrics]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(items) + 2), 4.5), dpi=110)
    width = 0.38
    positions = range(len(items))
    for offset, label, key in ((-width / 2, "mAP50-95", "map50_95"), (width / 2, "mAP50", "map50")):
        values = [getattr(item.metrics, key) for item in items]
        bars = ax.bar([p + offset for p in positions], values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(list(positions), [item.model for item in items])
    ax.set_ylabel("COCO mAP")
    # Headroom above the tallest bar for its label and the legend.
    ax.set_ylim(0, max(i.metrics.map50 for i in items) * 1.3 + 0.02)
    ax.set_title(f"Served accuracy on {result.images.get('accuracy')} images")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
