"""`yqpack verify`: check a running Triton server the way a user would trust it.

Accuracy (served COCO mAP with evaluation thresholds sent as request parameters), load (concurrency levels,
latency percentiles, server-side step timings), precision comparison, gates, and a report. A server that dies
or a model that is unloaded mid-run makes the result "incomplete" - never "pass".
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from packager.metrics import coco_eval
from packager.core.contracts import ConfigError
from packager.verify.gates import (
    absolute_accuracy_gates,
    annotation_gates,
    compare_precisions,
    decide_status,
    evaluate_gates,
    readiness_gates,
)
from packager.verify.annotation_labels import check_served_annotations
from packager.verify.report import collect_versions, write_report
from packager.verify.inputs import ImageSet
from packager.verify.labels import VerifyLabels, load_labels
from packager.verify.recommend import recommend_precisions
from packager.verify.reference import ReferenceBuild, resolve_build
from packager.verify.runtime_log import detector_runtimes
from packager.verify.result import VerifyOptions, VerifyResult
from packager.verify.session import EVAL_PARAMETERS, Measurements, VerifySession


def run_verify(options: VerifyOptions, console: Console | None = None) -> VerifyResult:
    """Verify every ensemble of a running server; writes the report and returns the result (never raises for
    gate failures or a server that disappears mid-run - those are the result's status)."""
    console = console or Console(stderr=True)
    _check_options(options)
    labels = load_labels(options.images_dir, options.annotations, options.data, options.split)
    console.print(f"labels: {labels.description}")
    images = labels.scan(options.images_dir, options.max_images)
    for skipped in images.skipped:
        console.print(f"[yellow]image {skipped.file}: {skipped.reason}[/yellow]")
    _warn_decoder_mismatch(console)
    # One build for the whole run: class names, MAC coverage and accuracy references all come from it.
    build = resolve_build(options.build_dir, options.url)
    console.print(f"build: {build.describe()}" if build else "build: none (no --build, no detached yqpack serve "
                  "record for this URL): no MAC coverage or accuracy reference from a build")
    started, began = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    measured = asyncio.run(_measure(options, console, images, labels.ground_truth, build))
    result = _judge(options, measured, images, labels, build, started, began)
    result.report_files = write_report(result, Path(options.report_dir))
    for recommendation in result.recommendations:
        console.print(recommendation.sentence, markup=False, highlight=False, soft_wrap=True)  # one greppable line
    return result


async def _measure(options: VerifyOptions, console: Console, images: ImageSet,
                   ground_truth: coco_eval.CocoGroundTruth, build: ReferenceBuild | None) -> Measurements:
    # Created inside the running loop: the session's grpc.aio client belongs to the loop it is made in.
    return await VerifySession(options, console, build).measure(images, ground_truth)


def _judge(options: VerifyOptions, measured: Measurements, images: ImageSet, labels: VerifyLabels,
           build: ReferenceBuild | None, started: str, began: float) -> VerifyResult:
    """Comparisons and gates over what was measured. An incomplete run gets no accuracy reference: the build is
    not evaluated again for numbers that prove nothing."""
    comparisons = compare_precisions(measured.accuracy, measured.load, measured.per_image,
                                     build.coverage() if build else {})
    gates = evaluate_gates(options.gates, measured.accuracy, comparisons, measured.load, measured.detector_load)
    references = {}
    ground_truth = labels.ground_truth
    if build is not None and measured.incomplete is None:
        scored = labels.source(images.accuracy_files)
        references = {model.name: build.accuracy_reference(model.name, model.precision, images.accuracy_files,
                                                           ground_truth, model.class_names, scored, options.progress)
                      for model in measured.models}
    gates += absolute_accuracy_gates(options.absolute, measured.accuracy, references)
    annotation_checks = (check_served_annotations(measured.models, measured.confident,
                                                  labels.label_set(images.accuracy_files, images.sizes),
                                                  build.random_weights() if build else None)
                         if measured.incomplete is None else [])
    gates += annotation_gates(annotation_checks)
    gates += readiness_gates(measured.not_ready)
    runtimes, runtimes_source = detector_runtimes(measured.models, options.url, options.server_log)
    return VerifyResult(
        status=decide_status(gates, measured.incomplete),
        incomplete_reason=measured.incomplete,
        url=options.url,
        server=measured.server,
        models=measured.models,
        accuracy=measured.accuracy,
        load=measured.load,
        detector_load=measured.detector_load,
        comparisons=comparisons,
        gates=gates,
        images=_image_counts(options, images, labels),
        skipped_images=images.skipped,
        settings=_settings(options),
        versions=collect_versions(),
        started=started,
        wall_time_s=time.perf_counter() - began,
        not_ready=measured.not_ready,
        references=references,
        build=build.describe() if build else None,
        annotation_checks=annotation_checks,
        recommendations=recommend_precisions(measured.accuracy, measured.load, gates,
                                             {model.name: model.steps for model in measured.models},
                                             measured.incomplete),
        detector_runtimes=runtimes,
        detector_runtimes_source=runtimes_source,
        labels=_labels_record(labels, measured),
    )


def _image_counts(options: VerifyOptions, images: ImageSet, labels: VerifyLabels) -> dict:
    return {
        "folder_files": images.folder_files,
        "accuracy": len(images.accuracy_files),
        "load_payloads": len(images.load_payloads),
        "annotations": str(options.annotations) if options.annotations else None,
        "images_dir": str(options.images_dir) if options.images_dir else labels.where,
        "data": str(options.data) if options.data else None,
        "split": labels.split,
    }


def _labels_record(labels: VerifyLabels, measured: Measurements) -> dict:
    """The ground truth of the run and, per ensemble, its classes the labels lack (left out of scoring)."""
    return {
        "format": labels.format,
        "source": labels.where,
        "description": labels.description,
        "classes": list(labels.names),
        "unscored": {model.name: labels.ground_truth.class_mapping(model.class_names).unscored
                     for model in measured.models},
    }


def _warn_decoder_mismatch(console: Console) -> None:
    """The readability check above decodes with this env's OpenCV; the server's is pinned in server_env."""
    import cv2

    from packager.serve.server_env import SERVER_REQUIREMENTS

    server = next(r.split("==")[1] for r in SERVER_REQUIREMENTS if r.startswith("opencv"))
    if not server.startswith(cv2.__version__ + "."):
        console.print(f"[yellow]OpenCV {cv2.__version__} here, {server} in the server: an image readable here may "
                      "be refused there (it is then scored as an image without detections)[/yellow]")


def _check_options(options: VerifyOptions) -> None:
    if not options.concurrency or any(int(c) < 1 for c in options.concurrency):
        raise ConfigError(f"concurrency levels must be positive integers, got {list(options.concurrency)}")
    if options.duration_s is None and (options.requests_per_level or 0) < 1:
        raise ConfigError("give --requests N (>= 1) or --duration SECONDS per load level")
    if options.duration_s is not None and options.duration_s <= 0:
        raise ConfigError(f"--duration must be positive, got {options.duration_s}")
    if options.timeout_s is not None and options.timeout_s <= 0:
        raise ConfigError(f"--timeout must be positive, got {options.timeout_s}")


def _settings(options: VerifyOptions) -> dict:
    return {
        "concurrency": list(options.concurrency),
        "requests_per_level": options.requests_per_level if options.duration_s is None else None,
        "duration_s": options.duration_s,
        "warmup_requests": options.warmup_requests,
        "accuracy_concurrency": options.accuracy_concurrency,
        "timeout_s": options.timeout_s,
        "eval_parameters": EVAL_PARAMETERS,
        "gates": asdict(options.gates),
        "absolute_gates": asdict(options.absolute),
        "models": list(options.models) if options.models else None,
        "build_dir": str(options.build_dir) if options.build_dir else None,
        "data": str(options.data) if options.data else None,
        "split": options.split,
    }
