"""One `yqpack verify` session against one server (the async half of run_verify): wait for it, discover its
ensembles, then the accuracy pass, the load levels and the bare-detector levels. A server that dies or unloads a
model mid-run ends the session with `Measurements.incomplete` set, keeping what was measured until then."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tritonclient.utils import InferenceServerException

from packager.metrics import coco_eval
from packager.core.contracts import ConfigError, Precision, ServerGoneError, VerifyError
from packager.verify.annotation_check import confident_rows
from packager.verify.gates import ServedAccuracy
from packager.inference.letterbox import preprocess_bytes
from packager.verify.loadtest import LevelResult, TritonLoad, first_distinct, image_inputs, tensor_inputs
from packager.inference.postprocess import EVAL_THRESHOLDS
from packager.verify.inputs import ImageSet, config_parameter, served_class_names, served_identity
from packager.verify.reference import ReferenceBuild
from packager.verify.result import ServedEnsemble, VerifyOptions

PRECISIONS = tuple(p.value for p in Precision)
# Request parameters of the accuracy pass (see docs/architecture.md): Ultralytics' validation settings.
EVAL_PARAMETERS = {
    "conf_threshold": float(EVAL_THRESHOLDS.conf),
    "iou_threshold": float(EVAL_THRESHOLDS.iou),
    "max_det": int(EVAL_THRESHOLDS.max_det),
    "multi_label": bool(EVAL_THRESHOLDS.multi_label),  # accepted by the served postprocess, as local eval uses it
}


@dataclass
class Measurements:
    """What one session measured; partial when the run was interrupted (`incomplete` says why)."""

    server: dict = field(default_factory=dict)  # name, version, extensions; empty: never reached a ready server
    models: list[ServedEnsemble] = field(default_factory=list)
    accuracy: list[ServedAccuracy] = field(default_factory=list)
    load: dict[str, list[LevelResult]] = field(default_factory=dict)
    detector_load: dict[str, list[LevelResult]] = field(default_factory=dict)
    per_image: dict[str, object] = field(default_factory=dict)  # ensemble -> pycocotools per-image results
    not_ready: dict[str, str] = field(default_factory=dict)  # model -> state: reason
    incomplete: str | None = None
    confident: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # ensemble -> image -> rows (check)


def _precision_order(model: ServedEnsemble) -> tuple[str, int]:
    order = PRECISIONS.index(model.precision) if model.precision in PRECISIONS else len(PRECISIONS)
    return model.family, order


class VerifySession:
    """One verify run against one server: `measure` runs it; the other methods are its steps."""

    def __init__(self, options: VerifyOptions, console: Console, build: ReferenceBuild | None = None):
        self.options = options
        self.console = console
        self.build = build  # the run's build: class names when the configs carry none
        self.load = TritonLoad(options.url, options.timeout_s)
        self.client = self.load.client
        self.per_image: dict[str, object] = {}  # ensemble -> pycocotools per-image results (bootstrap intervals)
        self.not_ready: dict[str, str] = {}
        self.confident: dict[str, dict[str, np.ndarray]] = {}  # for the annotation check

    async def measure(self, images: ImageSet, ground_truth: coco_eval.CocoGroundTruth) -> Measurements:
        """Everything verify measures, in order; closes the client. Raises VerifyError only when no ready server
        was ever reached (a setup problem); a server lost later makes the measurements incomplete instead."""
        measured = Measurements()
        try:
            await self.wait_ready()
            measured.server = await self.server_metadata()
            measured.models = await self.discover()
            for model in measured.models:  # before any request: a class it cannot detect is a setup problem
                _check_classes(model, ground_truth)
            self.console.print(f"verifying {', '.join(m.name for m in measured.models)} on {self.options.url} "
                               f"({measured.server.get('name')} {measured.server.get('version')})")
            with self.progress() as progress:
                await self.measure_models(measured, images, ground_truth, progress)
        except ServerGoneError as gone:
            measured.incomplete = str(gone)
        except InferenceServerException as error:
            if not measured.server:  # never reached a ready server: a setup problem, not an interrupted run
                raise VerifyError(f"cannot talk to Triton at {self.options.url}: {error.message() or error}") from error
            measured.incomplete = f"server error mid-run: {error.message() or error}"
        finally:
            await self.load.close()
        measured.per_image, measured.not_ready, measured.confident = self.per_image, self.not_ready, self.confident
        return measured

    async def measure_models(self, measured: Measurements, images: ImageSet,
                             ground_truth: coco_eval.CocoGroundTruth, progress: Progress) -> None:
        """Accuracy of every ensemble, then their load levels, then each bare detector's (filled in as they
        finish, so an interrupted run keeps what it measured)."""
        for model in measured.models:
            measured.accuracy.append(await self.accuracy(model, images, ground_truth, progress))
        for model in measured.models:
            measured.load[model.name] = await self.load_levels(
                model.name, image_inputs(images.load_payloads), progress, model.steps
            )
        if not self.options.detector_load:
            return
        for model in measured.models:
            if model.detector and model.detector_dims and len(model.detector_dims) == 3:
                tensor, _ = preprocess_bytes(images.load_payloads[0], tuple(model.detector_dims[1:]))
                measured.detector_load[model.detector] = await self.load_levels(
                    model.detector, tensor_inputs(tensor, model.detector_input), progress
                )

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

    async def discover(self) -> list[ServedEnsemble]:
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

    async def describe(self, name: str, config: dict) -> ServedEnsemble:
        steps = [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])]
        step_configs = {step: await self.config(step) for step in steps}
        family, precision = served_identity(config)
        class_names, source = served_class_names(name, {name: config, **step_configs},
                                                 self.build.class_names() if self.build else None, self.options.url)
        detector = next((step for step in steps if config_parameter(step_configs[step], "yqpack_role") == "detector"),
                        None)
        model = ServedEnsemble(name, family, precision, steps, class_names, source, detector,
                            runtime=config_parameter(config, "yqpack_runtime"))
        if detector:
            tensor_input = step_configs[detector].get("input", [{}])[0]
            model.detector_input = tensor_input.get("name")
            model.detector_dims = [int(d) for d in tensor_input.get("dims", [])]
            head_dims = step_configs[detector].get("output", [{}])[0].get("dims", [])
            # A raw head's output is (4 + classes, anchors): a name list of another model would map ids to wrong
            # categories. (An end-to-end head's (max_det, 6) says nothing about the class count, nor do the
            # (profiles, rows, 6) of a detector ending in NMS, docs/gpu-prepost.md.)
            raw_head = (config_parameter(step_configs[detector], "yqpack_head_format") in (None, "raw")
                        and len(head_dims) == 2)
            if raw_head and head_dims and int(head_dims[0]) - 4 != len(class_names):
                raise VerifyError(
                    f"{name}: the detector predicts {int(head_dims[0]) - 4} classes but {source} lists "
                    f"{len(class_names)} class names"
                )
        return model

    async def accuracy(
        self, model: ServedEnsemble, images: ImageSet, ground_truth: coco_eval.CocoGroundTruth, progress: Progress
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
            self.confident[model.name] = {name: confident_rows(rows) for name, rows in detections.items()}
        return ServedAccuracy(model.name, model.family, model.precision, evaluation and evaluation.metrics,
                              len(files), errors, messages, failed)

    async def load_levels(
        self, target: str, make_inputs, progress: Progress, step_models: Sequence[str] = ()
    ) -> list[LevelResult]:
        options = self.options
        gone = await self.load.server_gone_reason(target)
        if gone:
            raise ServerGoneError(gone)
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


def _check_classes(model: ServedEnsemble, ground_truth: coco_eval.CocoGroundTruth) -> None:
    """Labels are matched to the model's classes by name; a labelled class the model lacks is refused."""
    try:
        ground_truth.class_mapping(model.class_names)
    except ConfigError as error:
        raise ConfigError(f"{model.name} (class names from {model.class_names_source}): {error}") from None


def _real_rows(output: np.ndarray) -> np.ndarray:
    """DETECTIONS [1, n, 6] -> (n, 6) without batch padding rows (class_id -1)."""
    rows = np.asarray(output, dtype=np.float32).reshape(-1, 6)
    return rows[rows[:, 5] >= 0]
