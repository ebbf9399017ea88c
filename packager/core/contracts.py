"""The facts that travel between yqpack's stages, as typed objects (standard library only).

Ground floor of the package: every stage imports from here, this module imports nothing of yqpack, and it runs
in the tritonserver image's bare Python (the compose `engines` step reads the repository index with it).

- one error hierarchy (`YqpackError`); the CLI converts it to `Error: ...` once, so stages never import Click;
- `ModelSpec`: what the exported detector is (head format, I/O tensors, classes, input size, stride);
- `BuildManifest`: `manifest.json` of a build, one reader/writer for every stage (older manifests migrate);
- `Endpoints`: where a server answers.

What a rendered repository serves (`RepositoryIndex`, `yqpack_repository.json`) stands on these in
repository_index.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Protocol


# --- errors -------------------------------------------------------------------------------------------------
class YqpackError(Exception):
    """A failure the user can act on: printed as `Error: <message>` with `exit_code`, never as a traceback."""

    exit_code = 1


class ConfigError(YqpackError, ValueError):
    """Bad options or inputs (a ValueError, so callers that expect one keep working)."""


class MissingInputError(YqpackError, FileNotFoundError):
    """A file or folder the user named (or a stage needs) does not exist."""


class ManifestError(YqpackError, ValueError):
    """manifest.json or yqpack_repository.json is missing fields, malformed, or from an unknown schema."""


class AccuracyGateError(YqpackError, ValueError):
    """A quantized model lost more accuracy than allowed; the message shows the numbers."""


class ServerError(YqpackError, RuntimeError):
    """A server could not be started, did not become ready, or died."""


class EngineBuildError(YqpackError, RuntimeError):
    """A TensorRT engine build failed; the message carries the builder log's tail."""


class DockerUnavailableError(YqpackError, RuntimeError):
    """No Docker engine or compose plugin where one is needed."""


class GpuProbeError(EngineBuildError):
    """No source could tell the GPU's compute capability (the message says what to set)."""


class QuantizationError(YqpackError, RuntimeError):
    """ModelOpt failed to produce a quantized model; its own log above says why."""


class DataOverlapError(ConfigError):
    """A validation image is also a calibration (or tuning) image: the accuracy gate would be measured on
    images the recipe has seen."""


class NotReadyError(ServerError):
    """The server did not report ready in time; `waited_s` says how long we tried."""

    def __init__(self, message: str, waited_s: float):
        super().__init__(message)
        self.waited_s = waited_s


class ServerGoneError(ServerError):
    """The server's process ended, or it stopped answering / unloaded a model while requests were running."""


class StateFileError(YqpackError):
    """A server record exists but cannot be read (truncated, edited, another version's schema)."""


class S3Error(YqpackError):
    """A user-facing S3 failure (bad URL, credentials, unreachable endpoint, verification mismatch)."""


class VerifyError(YqpackError, RuntimeError):
    """A plain-language reason why verify cannot start."""


# --- vocabulary ---------------------------------------------------------------------------------------------
class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"


class Role(str, Enum):
    PREPROCESS = "preprocess"
    DETECTOR = "detector"
    POSTPROCESS = "postprocess"
    ENSEMBLE = "ensemble"


class HeadFormat(str, Enum):
    RAW = "raw"  # YOLOv8 / YOLO11: (batch, 4 + classes, anchors), needs NMS
    END2END = "end2end"  # YOLO26 / YOLOv10: (batch, max_det, 6) = x1, y1, x2, y2, score, class; NMS-free


# Triton model names, and every name yqpack writes into a path or a pbtxt string.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_model_name(name: str) -> str:
    if not _SAFE_NAME.match(name or "") or name in (".", ".."):
        raise ConfigError(f"model name {name!r} must use only letters, digits, '_', '.' and '-'")
    return name


def parse_enum(kind: type[Enum], value: Any, what: str):
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ManifestError(f"{what} {value!r} is not one of {choices}") from None


# --- the model ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension (the batch)
    dtype: str = "float32"

    @property
    def dims(self) -> tuple[int, ...]:
        """The shape without the batch dimension, as Triton configs with max_batch_size > 0 want it."""
        return self.shape[1:]

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data.get("dtype", "float32")))


@dataclass(frozen=True)
class ModelSpec:
    """What the exported detector is; read from the graph and its metadata at export, never from names."""

    name: str
    head: HeadFormat
    input: TensorSpec
    output: TensorSpec
    class_names: tuple[str, ...]
    imgsz: tuple[int, int]
    stride: int = 32
    dynamic_batch: bool = True
    max_batch: int = 8

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ultralytics_metadata(self) -> dict:
        """The dict Ultralytics' Triton client reads from a detector's `metadata` config parameter
        (`BaseBackend.apply_metadata`, `AutoBackend.forward`): `batch` 1, since the client pads every call to `batch`
        images, and `args.dynamic` False, which keeps its letterbox square at our fixed imgsz."""
        end2end = self.head is HeadFormat.END2END
        return {
            "description": f"Ultralytics detector {self.name} served by yqpack",
            "task": "detect", "stride": self.stride, "batch": 1, "channels": 3, "imgsz": list(self.imgsz),
            "names": dict(enumerate(self.class_names)), "end2end": end2end,
            "args": {"batch": 1, "dynamic": False, "nms": False if end2end else None},
        }


# --- the build ----------------------------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 2
# Relative paths inside a build directory, per artifact variant.
ARTIFACT_FILES = {
    "fp32": "onnx/model.fp32.onnx",
    "fp16": "onnx/model.fp16.onnx",
    "int8": "onnx/model.int8.onnx",  # INT8 Q/DQ, FP16 elsewhere: TensorRT's input
    "int8-fp32": "onnx/model.int8-fp32.onnx",  # same scales, FP32 elsewhere: onnxruntime CPU and evaluation
    "fp8": "onnx/model.fp8.onnx",
    "fp8-fp32": "onnx/model.fp8-fp32.onnx",
    "calib": "calib.npy",
}


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the build directory
    sha256: str


@dataclass
class BuildManifest:
    """manifest.json. `quantization`, `calibration`, `evaluation` and `engines` are open records of what a stage
    did (their keys are listed in docs/architecture.md); everything a later stage decides on is typed."""

    model: ModelSpec
    source_model: str
    opset: int
    artifacts: dict[str, Artifact]
    quantization: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    evaluation: dict | None = None
    engines: dict | None = None
    yqpack_version: str | None = None

    def artifact_path(self, build_dir: str | Path, variant: str) -> Path:
        """Absolute path of an artifact; a clear error if the build lacks it or the file went missing."""
        if variant not in self.artifacts:
            have = ", ".join(self.artifacts) or "none"
            raise ConfigError(f"build {build_dir} has no {variant!r} artifact (has: {have})")
        path = Path(build_dir) / self.artifacts[variant].path
        if not path.is_file():
            raise MissingInputError(f"artifact {variant!r} listed in the manifest is missing: {path}")
        return path

    def to_dict(self) -> dict:
        spec = self.model
        data = {
            "schema": MANIFEST_SCHEMA,
            "yqpack_version": self.yqpack_version,
            "model_name": spec.name,
            "source_model": self.source_model,
            "head_format": spec.head.value,
            "imgsz": list(spec.imgsz),
            "stride": spec.stride,
            "class_names": list(spec.class_names),
            "input": spec.input.to_dict(),
            "output": spec.output.to_dict(),
            "dynamic_batch": spec.dynamic_batch,
            "max_batch": spec.max_batch,
            "opset": self.opset,
            "artifacts": {variant: asdict(artifact) for variant, artifact in self.artifacts.items()},
            "quantization": self.quantization,
            "calibration": self.calibration,
            "versions": self.versions,
        }
        if self.evaluation is not None:
            data["evaluation"] = self.evaluation
        if self.engines is not None:
            data["engines"] = self.engines
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> "BuildManifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where} does not hold a JSON object")
        schema = data.get("schema", 1)
        if schema not in (1, MANIFEST_SCHEMA):
            raise ManifestError(f"{where} has schema {schema}; this yqpack reads schemas 1-{MANIFEST_SCHEMA}: "
                                "rebuild with `yqpack build` or upgrade yqpack")
        missing = [key for key in ("model_name", "class_names", "input", "output", "artifacts", "imgsz")
                   if key not in data]
        if missing:
            raise ManifestError(f"{where} lacks {', '.join(missing)}: was it written by `yqpack build`?")
        try:
            output = TensorSpec.from_dict(data["output"])
            # Schema 1 (yqpack 0.1) knew only the raw head and wrote no head_format: migrate.
            head = parse_enum(HeadFormat, data.get("head_format", HeadFormat.RAW.value), f"{where}: head_format")
            spec = ModelSpec(
                name=check_model_name(str(data["model_name"])),
                head=head,
                input=TensorSpec.from_dict(data["input"]),
                output=output,
                class_names=tuple(str(name) for name in data["class_names"]),
                imgsz=(int(data["imgsz"][0]), int(data["imgsz"][1])),
                stride=int(data.get("stride", 32)),
                dynamic_batch=bool(data.get("dynamic_batch", True)),
                max_batch=int(data.get("max_batch", 8)),
            )
            artifacts = {str(v): Artifact(str(a["path"]), str(a["sha256"])) for v, a in data["artifacts"].items()}
            return cls(
                model=spec, source_model=str(data.get("source_model", "")), opset=int(data.get("opset", 0)),
                artifacts=artifacts, quantization=dict(data.get("quantization", {})),
                calibration=dict(data.get("calibration", {})), versions=dict(data.get("versions", {})),
                evaluation=data.get("evaluation"), engines=data.get("engines"),
                yqpack_version=data.get("yqpack_version"),
            )
        except ManifestError:
            raise
        except ConfigError as error:
            raise ManifestError(f"{where}: {error}") from None
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise ManifestError(f"{where} is malformed ({type(error).__name__}: {error})") from None

    @classmethod
    def load(cls, build_dir: str | Path) -> "BuildManifest":
        path = Path(build_dir) / MANIFEST_NAME
        if not path.is_file():
            raise MissingInputError(f"no {MANIFEST_NAME} in {build_dir}: is it a `yqpack build` output directory?")
        return cls.from_dict(read_json(path), str(path))

    def save(self, build_dir: str | Path) -> Path:
        return write_json_atomic(Path(build_dir) / MANIFEST_NAME, self.to_dict())


# --- servers ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def with_host(self, host: str) -> "Endpoints":
        return replace(self, host=host)


class ServerLifecycle(Protocol):
    """One interface for every way yqpack runs a tritonserver (embedded process, docker compose)."""

    endpoints: Endpoints

    def start(self) -> "ServerLifecycle": ...

    def wait_ready(self, timeout: float) -> None: ...

    def is_alive(self) -> bool: ...

    def stop(self, timeout: float = 30.0) -> Any: ...


# --- files --------------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}): remove it and run the stage that writes it") from None


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON so that a concurrent reader sees the old file or the new one, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)
    return path
