"""The build a verify run compares the server with, resolved once: `--build`, else the build behind the repository a
detached `yqpack serve` serves at the URL. Its manifest, read once, gives the class names (when the configs carry
none), the quantized MAC coverage of each precision and the accuracy references - all from the same build.

An accuracy reference is the mAP a served ensemble must reproduce: the build's own `eval-onnx` of the ONNX it
serves. Served pre/post are the package's own code and the detector runs the same ONNX, so served mAP equals the
local evaluation to 4 decimals on CPU (a GPU engine drifts a little: `--max-map-drift`). The reference comes
from the build manifest's `evaluation` when it scored the same images with labels of the same kind and classes
(labels.py `compare_sources`: then independent of the label file verify was given, so a mirrored copy cannot pass;
the report names both files), else it is computed here on exactly the images and labels verify scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from packager.core.contracts import MissingInputError, StateFileError, YqpackError
from packager.core.manifest import MANIFEST_NAME, BuildManifest
from packager.core.repository_index import RepositoryIndex
from packager.metrics import coco_eval
from packager.verify.gates import AccuracyReference
from packager.verify.labels import LabelSource, compare_sources, recorded_source

# The ONNX each served precision is evaluated from (as `eval-onnx`; the fp32 INT8 twin has the served scales).
REFERENCE_VARIANT = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32"}
# The artifact whose graph gives a precision's MAC coverage, for builds made before the manifest recorded it.
COVERAGE_VARIANT = {"int8": "int8-fp32", "fp8": "fp8-fp32"}


@dataclass(frozen=True)
class ReferenceBuild:
    """The one build of a verify run, with its manifest."""

    path: Path
    manifest: BuildManifest
    origin: str  # how it was found: "--build", or the detached server's repository it was rendered for

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"

    def class_names(self) -> tuple[list[str], str]:
        """The model's class names and where they are written."""
        return list(self.manifest.model.class_names), str(self.path / MANIFEST_NAME)

    def random_weights(self) -> str | None:
        """Why this build's model cannot judge annotations, if it was exported from a model YAML (random init)."""
        source = self.manifest.source_model
        if Path(source).suffix.lower() in (".yaml", ".yml"):
            return (f"the build's model has random weights (exported from {Path(source).name}): its detections "
                    "cannot tell right annotations from wrong ones")
        return None

    def coverage(self) -> dict[str, float]:
        """precision -> share of conv MACs it runs quantized: as the build recorded it, else read from its graphs."""
        from packager.metrics.mac_coverage import conv_coverage

        coverage = {}
        for precision, variant in COVERAGE_VARIANT.items():
            recorded = self.manifest.quantization.mac_coverage(precision) if self.manifest.quantization else None
            if recorded is not None:
                coverage[precision] = recorded
            elif variant in self.manifest.artifacts:
                coverage[precision] = conv_coverage(self.manifest.artifact_path(self.path, variant)).share(precision)
        return coverage

    @cached_property
    def evaluated(self) -> tuple[LabelSource | None, str]:
        """What the manifest's evaluation scored (read once a run), and what could not be known about it."""
        return recorded_source(self.manifest.config)

    def accuracy_reference(self, model: str, precision: str, files: list[Path],
                           ground_truth: coco_eval.CocoGroundTruth, class_names: list[str],
                           scored: LabelSource, show_progress: bool = False) -> AccuracyReference | None:
        """Reference mAP50-95 of `model` (one served precision) for the images `files` with the labels `scored`;
        None if the build lacks it."""
        variant = REFERENCE_VARIANT.get(precision)
        if variant is None:
            return None
        evaluation = self.manifest.evaluation
        recorded = evaluation.map50_95(variant, len(files)) if evaluation is not None else None
        note = ""
        if recorded is not None:
            reuse, note = compare_sources(*self.evaluated, scored)
            if reuse:
                return AccuracyReference(model, variant, recorded, len(files),
                                         f"the manifest's evaluation of {variant} ({len(files)} images) of build "
                                         f"{self.path}" + (f" ({note})" if note else ""))
        if variant not in self.manifest.artifacts:
            return None
        onnx = self.manifest.artifact_path(self.path, variant)
        metrics = self._evaluate_onnx(variant, files, ground_truth, class_names, show_progress)
        return AccuracyReference(model, variant, metrics.map50_95, len(files),
                                 f"eval-onnx of {onnx.name} of build {self.path} on the same {len(files)} images"
                                 + (f" (not the manifest's evaluation: {note})" if note else ""),
                                 str(ground_truth.path))

    def _evaluate_onnx(self, variant: str, files, ground_truth, class_names, show_progress) -> coco_eval.CocoMetrics:
        from packager.evaluate.onnx_eval import detect_with, open_variant

        # The default runtime, as the `local` target serves (another runtime's drift stays within --max-map-drift).
        spec = self.manifest.model
        model = open_variant(self.path, self.manifest, variant)
        detections = detect_with(model, files, spec.imgsz, label=f"reference {model.path.name}",
                                 show_progress=show_progress, head_format=spec.head)
        return coco_eval.evaluate(detections, ground_truth, class_names)


def resolve_build(build_dir: Path | None, url: str) -> ReferenceBuild | None:
    """--build (which must be a build), else the build behind the repository a detached `yqpack serve` serves at
    `url` (None when there is no such server, record or build)."""
    if build_dir is not None:
        if not (Path(build_dir) / MANIFEST_NAME).is_file():
            raise MissingInputError(f"--build {build_dir} is not a build directory (no {MANIFEST_NAME})")
        return ReferenceBuild(Path(build_dir), BuildManifest.load(build_dir), "--build")
    from packager.serve.records import read_state

    try:
        state = read_state()
        if state is None or state.grpc_url != url.replace("localhost", "127.0.0.1"):
            return None
        source = RepositoryIndex.load(Path(state.repository)).source_build
        if not source or not (Path(source) / MANIFEST_NAME).is_file():
            return None
        manifest = BuildManifest.load(source)
    except (OSError, ValueError, TypeError, StateFileError, YqpackError):  # no usable record: no build from it
        return None
    return ReferenceBuild(Path(source), manifest,
                          f"the build of {state.repository}, served by the detached yqpack serve at {url}")
