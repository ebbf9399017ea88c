"""The facts that travel between yqpack's stages, as typed objects (standard library only).

Ground floor of the package: every stage imports from here, this module imports nothing of yqpack, and it runs
in the tritonserver image's bare Python (the compose `engines` step reads the repository index with it).

- one error hierarchy (`YqpackError`); the CLI converts it to `Error: ...` once, so stages never import Click;
- `ModelSpec`: what the exported detector is (head format, I/O tensors, classes, input size, stride);
- `Endpoints`: where a server answers;
- `read_json` / `write_json_atomic` and `JsonFields`: the JSON files every stage writes, read with typed errors.

Standing on these, in the same folder: the build's manifest (`BuildManifest`, manifest.py) with its stage records
(build_records.py), and what a rendered repository serves (`RepositoryIndex`, repository_index.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Protocol


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

    def to_dict(self) -> dict:
        """The model's keys of manifest.json (and of the repository index's `model` entry)."""
        return {
            "model_name": self.name,
            "head_format": self.head.value,
            "imgsz": list(self.imgsz),
            "stride": self.stride,
            "class_names": list(self.class_names),
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "dynamic_batch": self.dynamic_batch,
            "max_batch": self.max_batch,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ModelSpec":
        """The model from manifest.json's keys; a ManifestError (naming `where`) when they are missing or malformed."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} does not hold a JSON object")
        missing = [key for key in ("model_name", "class_names", "input", "output", "imgsz") if key not in data]
        if missing:
            raise ManifestError(f"{where} lacks {', '.join(missing)}: was it written by `yqpack build`?")
        try:
            # Schema 1 (yqpack 0.1) knew only the raw head and wrote no head_format: migrate.
            head = parse_enum(HeadFormat, data.get("head_format", HeadFormat.RAW.value), f"{where}: head_format")
            return cls(
                name=check_model_name(str(data["model_name"])),
                head=head,
                input=TensorSpec.from_dict(data["input"]),
                output=TensorSpec.from_dict(data["output"]),
                class_names=tuple(str(name) for name in data["class_names"]),
                imgsz=(int(data["imgsz"][0]), int(data["imgsz"][1])),
                stride=int(data.get("stride", 32)),
                dynamic_batch=bool(data.get("dynamic_batch", True)),
                max_batch=int(data.get("max_batch", 8)),
            )
        except ManifestError:
            raise
        except ConfigError as error:
            raise ManifestError(f"{where}: {error}") from None
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise ManifestError(f"{where} is malformed ({type(error).__name__}: {error})") from None


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


REQUIRED = object()  # JsonFields: no default, the key must be there


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class JsonFields:
    """Typed reads from one JSON object of a file yqpack wrote: a missing or mistyped value is a ManifestError
    naming `where` and the key, never a KeyError or TypeError. `other()` is what was not read."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data, self.where, self.read = data, where, set()

    def take(self, key: str, default: Any, check: Callable[[Any], bool], kind: str) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is REQUIRED:
                raise ManifestError(f"{self.where} lacks {key}: was it written by `yqpack build`?")
            return default
        value = self.data[key]
        if not check(value):
            raise ManifestError(f"{self.where}: {key} must be {kind}, got {value!r}")
        return value

    def text(self, key: str, default: Any = REQUIRED) -> str:
        return self.take(key, default, lambda v: isinstance(v, str), "a string")

    def optional_text(self, key: str) -> str | None:
        return self.take(key, None, lambda v: v is None or isinstance(v, str), "a string or null")

    def integer(self, key: str, default: Any = REQUIRED) -> int | None:
        return self.take(key, default, lambda v: (v is None and default is None) or (
            isinstance(v, int) and not isinstance(v, bool)), "an integer")

    def number(self, key: str, default: Any = REQUIRED) -> float | None:
        value = self.take(key, default, lambda v: (v is None and default is None) or is_number(v), "a number")
        return value if value is None else float(value)

    def flag(self, key: str, default: Any = REQUIRED) -> bool | None:
        return self.take(key, default, lambda v: isinstance(v, bool) or (v is None and default is None),
                         "true or false")

    def texts(self, key: str, default: Any = ()) -> tuple[str, ...] | None:
        value = self.take(key, default, lambda v: (v is None and default is None) or (
            isinstance(v, list) and all(isinstance(item, str) for item in v)), "a list of strings")
        return value if value is None else tuple(value)

    def names(self, key: str) -> dict[str, str]:
        """An object of strings ({sha256: file name}, {variant: dtype}); empty when absent."""
        return dict(self.take(key, {}, lambda v: isinstance(v, dict) and all(
            isinstance(item, str) for item in v.values()), "an object of strings"))

    def counts(self, key: str) -> dict[str, int]:
        return dict(self.take(key, REQUIRED, lambda v: isinstance(v, dict) and all(
            isinstance(n, int) and not isinstance(n, bool) for n in v.values()), "an object of integers"))

    def objects(self, key: str, parse: Callable[[Any, str], Any]) -> dict[str, Any]:
        """{name: parse(value)} of an object of objects; empty when absent."""
        value = self.take(key, {}, lambda v: isinstance(v, dict), "an object")
        return {str(name): parse(item, f"{self.where}: {key}.{name}") for name, item in value.items()}

    def optional(self, key: str, parse: Callable[[Any, str], Any]) -> Any:
        value = self.take(key, None, lambda v: True, "")
        return None if value is None else parse(value, f"{self.where}: {key}")

    def other(self) -> dict:
        return {key: value for key, value in self.data.items() if key not in self.read}
