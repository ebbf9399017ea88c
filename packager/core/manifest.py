"""`manifest.json` of a build: one reader/writer for every stage (standard library only).

`BuildManifest` holds the model contract (`ModelSpec`), the artifacts with their hashes and the typed records of
what the build's stages did (build_records.py); older manifests migrate (schema 1: no head_format or stride; records
without a format number). A manifest is read once per command and handed on as this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.core.build_records import CalibrationRecord, EvaluationRecord, QuantizationRecord
from packager.core.contracts import (
    ConfigError,
    JsonFields,
    ManifestError,
    MissingInputError,
    ModelSpec,
    read_json,
    write_json_atomic,
)

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 2
# Relative paths inside a build directory, per artifact variant.
ARTIFACT_FILES = {
    "fp32": "onnx/model.fp32.onnx",
    "fp16": "onnx/model.fp16.onnx",
    "int8": "onnx/model.int8.onnx",  # INT8 Q/DQ, FP16 elsewhere: TensorRT's input
    "int8-fp32": "onnx/model.int8-fp32.onnx",  # same scales, FP32 elsewhere: onnxruntime CPU and evaluation
    # The same values with uint8 activations (zero point 128): OpenVINO on VNNI CPUs without AMX (inference/int8_cpu.py)
    "int8-u8": "onnx/model.int8-u8.onnx",
    # A few calibration images, letterboxed uint8: the runtime's INT8 self-check against onnxruntime
    "int8-check": "int8_check_images.npy",
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
    """manifest.json. `calibration`, `quantization` and `evaluation` are typed records (None: not recorded, e.g. a
    build without --val-images has no evaluation); `config` is the resolved `yqpack build` configuration (the keys
    of a --config file, read by packager/pipeline/config.py); `engines` and `versions` are open records."""

    model: ModelSpec
    source_model: str
    opset: int
    artifacts: dict[str, Artifact]
    quantization: QuantizationRecord | None = None
    calibration: CalibrationRecord | None = None
    versions: dict = field(default_factory=dict)
    evaluation: EvaluationRecord | None = None
    engines: dict | None = None
    yqpack_version: str | None = None
    config: dict | None = None

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
        model = self.model.to_dict()
        data = {
            "schema": MANIFEST_SCHEMA,
            "yqpack_version": self.yqpack_version,
            "model_name": model.pop("model_name"),
            "source_model": self.source_model,
            **model,
            "opset": self.opset,
            "artifacts": {variant: {"path": a.path, "sha256": a.sha256} for variant, a in self.artifacts.items()},
            "quantization": self.quantization.to_dict() if self.quantization else {},
            "calibration": self.calibration.to_dict() if self.calibration else {},
            "versions": self.versions,
        }
        if self.evaluation is not None:
            data["evaluation"] = self.evaluation.to_dict()
        if self.engines is not None:
            data["engines"] = self.engines
        if self.config is not None:
            data["config"] = self.config
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> "BuildManifest":
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
        spec = ModelSpec.from_dict(data, where)
        fields = JsonFields(data, where)

        def record(key: str, kind):  # an empty object: not recorded (what earlier builders wrote for none)
            return fields.optional(key, lambda value, at: kind.from_dict(value, at) if value != {} else None)

        try:
            artifacts = {str(v): Artifact(str(a["path"]), str(a["sha256"])) for v, a in data["artifacts"].items()}
        except (KeyError, TypeError, AttributeError) as error:
            raise ManifestError(f"{where}: artifacts is malformed ({type(error).__name__}: {error})") from None
        return cls(
            model=spec, source_model=fields.text("source_model", ""), opset=fields.integer("opset", 0),
            artifacts=artifacts, quantization=record("quantization", QuantizationRecord),
            calibration=record("calibration", CalibrationRecord),
            versions=fields.take("versions", {}, lambda v: isinstance(v, dict), "an object"),
            evaluation=record("evaluation", EvaluationRecord),
            engines=fields.take("engines", None, lambda v: v is None or isinstance(v, dict), "an object"),
            yqpack_version=fields.optional_text("yqpack_version"),
            config=fields.take("config", None, lambda v: v is None or isinstance(v, dict), "an object"),
        )

    @classmethod
    def load(cls, build_dir: str | Path) -> "BuildManifest":
        path = Path(build_dir) / MANIFEST_NAME
        if not path.is_file():
            raise MissingInputError(f"no {MANIFEST_NAME} in {build_dir}: is it a `yqpack build` output directory?")
        return cls.from_dict(read_json(path), str(path))

    def save(self, build_dir: str | Path) -> Path:
        return write_json_atomic(Path(build_dir) / MANIFEST_NAME, self.to_dict())
