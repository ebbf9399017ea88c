"""`yqpack verify`: check a running Triton server the way a user would trust it.

Accuracy (served COCO mAP with evaluation thresholds sent as request parameters), load (concurrency levels,
latency percentiles, server-side step timings), precision comparison, gates, and a report. A server that dies
or a model that is unloaded mid-run makes the result "incomplete" - never "pass".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tritonclient.utils import InferenceServerException

from . import coco_eval
from .contracts import ConfigError, MissingInputError, Precision
from .gates import (
    AbsoluteGates,
    AccuracyReference,
    Comparison,
    GateResult,
    GateThresholds,
    ServedAccuracy,
    compare_precisions,
    decide_status,
    evaluate_gates,
    absolute_accuracy_gates,
    readiness_gates,
)
from .letterbox import preprocess_bytes
from .loadtest import LevelResult, ServerGone, TritonLoad, first_distinct, image_inputs, tensor_inputs
from .postprocess import EVAL_THRESHOLDS
from .verify_inputs import (
    ImageSet,
    SkippedImage,
    VerifyError,
    build_coverage,
    config_parameter,
    detached_server_class_names,
    manifest_class_names,
    parse_class_names,
    scan_images,
    served_identity,
)

PRECISIONS = tuple(p.value for p in Precision)
# Request parameters of the accuracy pass (see docs/architecture.md): Ultralytics' validation settings.
EVAL_PARAMETERS = {
    "conf_threshold": float(EVAL_THRESHOLDS.conf),
    "iou_threshold": float(EVAL_THRESHOLDS.iou),
    "max_det": int(EVAL_THRESHOLDS.max_det),
    "multi_label": bool(EVAL_THRESHOLDS.multi_label),  # accepted by the served postprocess, as local eval uses it
}
EXIT_CODES = {"pass": 0, "fail": 1, "incomplete": 3}


@dataclass
class VerifyOptions:
    images_dir: Path
    annotations: Path
    url: str = "127.0.0.1:8001"
    models: Sequence[str] | None = None  # ensemble names; default: every ready ensemble
    build_dir: Path | None = None  # manifest fallback for class names
    report_dir: Path = Path("reports/verify")
    wait_s: float = 60.0
    timeout_s: float = 30.0
    concurrency: Sequence[int] = (1, 2, 4, 8, 16)
    requests_per_level: int | None = 200
    duration_s: float | None = None  # per level; replaces requests_per_level when set
    warmup_requests: int = 16
    accuracy_concurrency: int = 4
    detector_load: bool = True  # also load the bare detector, for the ensemble overhead ratio
    max_images: int | None = None  # accuracy pass on the first N annotated images only
    gates: GateThresholds = field(default_factory=GateThresholds)
    progress: bool = True
    absolute: AbsoluteGates = field(default_factory=AbsoluteGates)  # served mAP == the build's own eval


@dataclass
class ServedModel:
    """An ensemble on the server and what verify needs to know about it."""

    name: str
    family: str
    precision: str
    steps: list[str]
    class_names: list[str]
    class_names_source: str
    detector: str | None = None
    detector_input: str | None = None
    detector_dims: list[int] | None = None


@dataclass
class VerifyResult:
    status: str  # pass | fail | incomplete
    incomplete_reason: str | None
    url: str
    server: dict
    models: list[ServedModel]
    accuracy: list[ServedAccuracy]
    load: dict[str, list[LevelResult]]
    detector_load: dict[str, list[LevelResult]]
    comparisons: list[Comparison]
    gates: list[GateResult]
    images: dict  # counts: folder, accuracy, load
    skipped_images: list[SkippedImage]
    settings: dict
    versions: dict
    started: str
    wall_time_s: float
    report_files: dict[str, str] = field(default_factory=dict)
    not_ready: dict[str, str] = field(default_factory=dict)  # model -> state: reason
    references: dict[str, AccuracyReference | None] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def failed_gates(self) -> list[GateResult]:
        return [gate for gate in self.gates if not gate.passed]

    def as_dict(self) -> dict:
        data = asdict(self)
        data["load"] = {model: [level.as_dict() for level in levels] for model, levels in self.load.items()}
        data["detector_load"] = {
            model: [level.as_dict() for level in levels] for model, levels in self.detector_load.items()
        }
        return data


def _precision_order(model: "ServedModel") -> tuple[str, int]:
    order = PRECISIONS.index(model.precision) if model.precision in PRECISIONS else len(PRECISIONS)
    return model.family, order


class _Session:
    """One verify run against one server: the async half of run_verify."""

    def __init__(self, options: VerifyOptions, console: Console):
        self.options = options
        self.console = console
        self.load = TritonLoad(options.url, options.timeout_s)
        self.client = self.load.client
        self.per_image: dict[str, object] = {}  # ensemble -> pycocotools per-image results (bootstrap intervals)
        self.not_ready: dict[str, str] = {}

    def progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.options.progress,
            transient=False,
        )

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.wait_s
        last = "no answer"
        while True:
            try:
                if await self.client.is_server_ready(client_timeout=5):
                    return
                last = "server is live but not ready (models still loading or failed)"
            except InferenceServerException as error:
                last = error.message() or str(error)
            if time.monotonic() >= deadline:
                raise VerifyError(
                    f"Triton at {self.options.url} not ready after {self.options.wait_s:g} s ({last}); "
                    "is it running (yqpack serve) and is this the gRPC port?"
                )
            await asyncio.sleep(1.0)

    async def server_metadata(self) -> dict:
        meta = await self.client.get_server_metadata(as_json=True, client_timeout=10)
        return {"name": meta.get("name"), "version": meta.get("version"), "extensions": meta.get("extensions", [])}

    async def config(self, model: str) -> dict:
        return (await self.client.get_model_config(model, as_json=True, client_timeout=10))["config"]

    async def discover(self) -> list[ServedModel]:
        index = await self.client.get_model_repository_index(as_json=True, client_timeout=10)
        states = {entry["name"]: entry.get("state", "") for entry in index.get("models", [])}
        self.not_ready = {
            entry["name"]: f"{entry.get('state') or 'no state'}: {entry.get('reason') or 'no reason given'}"
            for entry in index.get("models", [])
            if entry.get("state") != "READY" and (not self.options.models or entry["name"] in self.options.models)
        }
        if self.options.models:
            missing = [name for name in self.options.models if states.get(name) != "READY"]
            if missing:
                raise VerifyError(
                    f"model(s) not ready on the server: {', '.join(missing)}; "
                    f"ready: {', '.join(sorted(n for n, s in states.items() if s == 'READY')) or 'none'}"
                )
            names = list(self.options.models)
        else:
            names = sorted(name for name, state in states.items() if state == "READY")
        served = []
        for name in names:
            config = await self.config(name)
            if config.get("platform") != "ensemble":
                if self.options.models:
                    kind = config.get("platform") or config.get("backend")
                    raise VerifyError(f"{name} is not an ensemble (platform {kind}): name ensembles in --models")
                continue
            served.append(await self.describe(name, config))
        if not served:
            listed = ", ".join(states) or "none"
            raise VerifyError(f"no ensemble model is ready on {self.options.url} (models: {listed})")
        return served if self.options.models else sorted(served, key=_precision_order)

    async def describe(self, name: str, config: dict) -> ServedModel:
        steps = [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])]
        step_configs = {step: await self.config(step) for step in steps}
        family, precision = served_identity(config)
        class_names, source = None, ""
        for holder, holder_config in [(name, config), *step_configs.items()]:
            value = config_parameter(holder_config, "class_names")
            if value:
                class_names, source = parse_class_names(value), f"config parameter class_names of {holder}"
                break
        if class_names is None and self.options.build_dir is not None:
            class_names = manifest_class_names(Path(self.options.build_dir))
            source = f"{Path(self.options.build_dir) / 'manifest.json'}"
        if class_names is None:
            class_names, source = detached_server_class_names(self.options.url)
        if class_names is None:
            raise VerifyError(
                f"{name}: the served configs carry no class_names parameter; pass --build DIR so the "
                "manifest's class names map class ids to COCO categories"
            )
        detector = next((step for step in steps if config_parameter(step_configs[step], "yqpack_role") == "detector"),
                        None)
        model = ServedModel(name, family, precision, steps, class_names, source, detector)
        if detector:
            tensor_input = step_configs[detector].get("input", [{}])[0]
            model.detector_input = tensor_input.get("name")
            model.detector_dims = [int(d) for d in tensor_input.get("dims", [])]
            head_dims = step_configs[detector].get("output", [{}])[0].get("dims", [])
            # A raw head's output is (4 + classes, anchors): a name list of another model would map ids to wrong
            # categories. (An end-to-end head's (max_det, 6) says nothing about the class count.)
            raw_head = config_parameter(step_configs[detector], "yqpack_head_format") in (None, "raw")
            if raw_head and head_dims and int(head_dims[0]) - 4 != len(class_names):
                raise VerifyError(
                    f"{name}: the detector predicts {int(head_dims[0]) - 4} classes but {source} lists "
                    f"{len(class_names)} class names"
                )
        return model

    async def accuracy(
        self, model: ServedModel, images: ImageSet, ground_truth: coco_eval.CocoGroundTruth, progress: Progress
    ) -> ServedAccuracy:
        files = images.accuracy_files
        task = progress.add_task(f"accuracy {model.name}", total=len(files), status="")
        errors = 0

        def done(outcome) -> None:
            nonlocal errors
            errors += outcome.error is not None
            progress.update(task, advance=1, status=f"{errors} errors" if errors else "")

        outcomes, _ = await self.load.drive(
            model.name,
            image_inputs(images.accuracy_payloads),
            concurrency=self.options.accuracy_concurrency,
            requests=len(files),
            parameters=EVAL_PARAMETERS,
            output_name="DETECTIONS",
            on_done=done,
        )
        failed = sorted(files[o.index].name for o in outcomes if o.error is not None)
        # A failed image is scored as one without detections: leaving it out would let errors raise the mAP.
        detections = {file.name: np.zeros((0, 6), np.float32) for file in files}
        detections.update({files[o.index].name: _real_rows(o.output) for o in outcomes if o.error is None})
        messages = first_distinct([o.error for o in outcomes if o.error is not None], 5)
        answered = len(files) - len(failed)
        evaluation = coco_eval.evaluate_images(detections, ground_truth, model.class_names) if answered else None
        if evaluation is not None:
            self.per_image[model.name] = evaluation.per_image
        return ServedAccuracy(model.name, model.family, model.precision, evaluation and evaluation.metrics,
                              len(files), errors, messages, failed)

    async def load_levels(
        self, target: str, make_inputs, progress: Progress, step_models: Sequence[str] = ()
    ) -> list[LevelResult]:
        options = self.options
        gone = await self.load.server_gone_reason(target)
        if gone:
            raise ServerGone(gone)
        if options.warmup_requests:  # a level whose numbers are dropped: it also lets the statistics settle
            await self.load.run_level(
                target, make_inputs, max(options.concurrency), requests=options.warmup_requests, step_models=step_models
            )
        levels = []
        for concurrency in options.concurrency:
            total = options.requests_per_level if options.duration_s is None else None
            task = progress.add_task(f"load {target} c={concurrency}", total=total, status="")
            errors = 0

            def done(outcome, task=task) -> None:
                nonlocal errors
                errors += outcome.error is not None
                progress.update(task, advance=1, status=f"{errors} errors" if errors else "")

            level = await self.load.run_level(
                target,
                make_inputs,
                concurrency,
                requests=total,
                duration_s=options.duration_s,
                step_models=step_models,
                on_done=done,
            )
            progress.update(
                task, status=f"{level.throughput:.1f} img/s p99 {level.latency.p99_ms:.0f} ms, {level.errors} errors"
            )
            levels.append(level)
        return levels


def _real_rows(output: np.ndarray) -> np.ndarray:
    """DETECTIONS [1, n, 6] -> (n, 6) without batch padding rows (class_id -1)."""
    rows = np.asarray(output, dtype=np.float32).reshape(-1, 6)
    return rows[rows[:, 5] >= 0]


def run_verify(options: VerifyOptions, console: Console | None = None) -> VerifyResult:
    """Verify every ensemble of a running server; writes the report and returns the result (never raises for
    gate failures or a server that disappears mid-run - those are the result's status)."""
    from . import report  # the report module imports verify's dataclasses

    console = console or Console(stderr=True)
    _check_options(options)
    ground_truth = coco_eval.CocoGroundTruth(options.annotations)
    images = scan_images(Path(options.images_dir), ground_truth, options.max_images)
    for skipped in images.skipped:
        console.print(f"[yellow]image {skipped.file}: {skipped.reason}[/yellow]")
    _warn_decoder_mismatch(console)
    result = asyncio.run(_verify(options, console, ground_truth, images))
    result.report_files = report.write_report(result, Path(options.report_dir))
    return result


async def _verify(
    options: VerifyOptions, console: Console, ground_truth: coco_eval.CocoGroundTruth, images: ImageSet
) -> VerifyResult:
    started, began = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    session = _Session(options, console)
    accuracy: list[ServedAccuracy] = []
    load: dict[str, list[LevelResult]] = {}
    detector_load: dict[str, list[LevelResult]] = {}
    models: list[ServedModel] = []
    server: dict = {}
    incomplete = None
    try:
        await session.wait_ready()
        server = await session.server_metadata()
        models = await session.discover()
        console.print(f"verifying {', '.join(m.name for m in models)} on {options.url} "
                      f"({server.get('name')} {server.get('version')})")
        with session.progress() as progress:
            for model in models:
                accuracy.append(await session.accuracy(model, images, ground_truth, progress))
            for model in models:
                load[model.name] = await session.load_levels(
                    model.name, image_inputs(images.load_payloads), progress, model.steps
                )
            if options.detector_load:
                for model in models:
                    if model.detector and model.detector_dims and len(model.detector_dims) == 3:
                        tensor, _ = preprocess_bytes(images.load_payloads[0], tuple(model.detector_dims[1:]))
                        detector_load[model.detector] = await session.load_levels(
                            model.detector, tensor_inputs(tensor, model.detector_input), progress
                        )
    except ServerGone as gone:
        incomplete = str(gone)
    except InferenceServerException as error:
        if not server:  # never reached a ready server: a setup problem, not an interrupted run
            raise VerifyError(f"cannot talk to Triton at {options.url}: {error.message() or error}") from error
        incomplete = f"server error mid-run: {error.message() or error}"
    finally:
        await session.load.close()

    comparisons = compare_precisions(accuracy, load, session.per_image, build_coverage(options.build_dir))
    gates = evaluate_gates(options.gates, accuracy, comparisons, load, detector_load)
    references = _references(options, models, images, ground_truth) if incomplete is None else {}
    gates += absolute_accuracy_gates(options.absolute, accuracy, references) + readiness_gates(session.not_ready)
    status = decide_status(gates, incomplete)
    from .report import collect_versions

    return VerifyResult(
        status=status,
        incomplete_reason=incomplete,
        url=options.url,
        server=server,
        models=models,
        accuracy=accuracy,
        load=load,
        detector_load=detector_load,
        comparisons=comparisons,
        gates=gates,
        images={
            "folder_files": images.folder_files,
            "accuracy": len(images.accuracy_files),
            "load_payloads": len(images.load_payloads),
            "annotations": str(options.annotations),
            "images_dir": str(options.images_dir),
        },
        skipped_images=images.skipped,
        settings=_settings(options),
        versions=collect_versions(),
        started=started,
        wall_time_s=time.perf_counter() - began,
        not_ready=session.not_ready,
        references=references,
    )


def _references(options: VerifyOptions, models: list[ServedModel], images: ImageSet,
                ground_truth: coco_eval.CocoGroundTruth) -> dict[str, AccuracyReference | None]:
    """The build's own mAP of each served ONNX on the images scored here (None: no build to compare with)."""
    from .accuracy_reference import accuracy_reference, find_build_dir

    build_dir = find_build_dir(options.build_dir, options.url)
    if build_dir is None:
        return {}
    return {
        model.name: accuracy_reference(model.name, model.precision, build_dir, images.accuracy_files,
                                       ground_truth, model.class_names, options.progress)
        for model in models
    }


def _warn_decoder_mismatch(console: Console) -> None:
    """The readability check above decodes with this env's OpenCV; the server's is pinned in server_env."""
    import cv2

    from .server_env import SERVER_REQUIREMENTS

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
    if not Path(options.annotations).is_file():
        raise MissingInputError(f"annotation file not found: {options.annotations}")


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
    }
