"""What `yqpack verify` is asked (`VerifyOptions`), the ensembles it finds on the server (`ServedEnsemble`) and what
it answers (`VerifyResult`: the measured numbers, gates and status that report.py writes out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packager.verify.annotation_check import AnnotationCheck
from packager.verify.gates import AbsoluteGates, AccuracyReference, Comparison, GateResult, GateThresholds, ServedAccuracy
from packager.verify.loadtest import LevelResult
from packager.verify.inputs import SkippedImage
from packager.verify.recommend import Recommendation
from packager.verify.runtime_log import NOT_KNOWN_REMOTE, DetectorRuntime

EXIT_CODES = {"pass": 0, "fail": 1, "incomplete": 3}


@dataclass
class VerifyOptions:
    images_dir: Path | None = None  # with annotations (a COCO file) ...
    annotations: Path | None = None
    data: Path | None = None  # ... or a dataset YAML, its `split` verified (YOLO txt labels)
    split: str | None = None  # val unless given; only with data
    url: str = "127.0.0.1:8001"
    models: Sequence[str] | None = None  # ensemble names; default: every ready ensemble
    build_dir: Path | None = None  # the build to compare with [the detached yqpack serve's]
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
    server_log: Path | None = None  # the server's log when no yqpack serve record names it (the test server's)


@dataclass
class ServedEnsemble:
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
    runtime: str | None = None  # what executes its detector (config parameter yqpack_runtime), for the report


@dataclass
class VerifyResult:
    status: str  # pass | fail | incomplete
    incomplete_reason: str | None
    url: str
    server: dict
    models: list[ServedEnsemble]
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
    build: str | None = None  # the one build the run compared with (its path and how it was found)
    annotation_checks: list[AnnotationCheck] = field(default_factory=list)  # one per model family
    recommendations: list[Recommendation] = field(default_factory=list)  # the precision to serve, per family
    detector_runtimes: list[DetectorRuntime] = field(default_factory=list)  # from the server log
    detector_runtimes_source: str = NOT_KNOWN_REMOTE  # the log read, or why what runs is not known
    labels: dict = field(default_factory=dict)  # the ground truth: source, format, classes, unscored per ensemble

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
