"""What a rendered Triton model repository serves, as typed objects (standard library only).

`RepositoryIndex` / `ServedModel`: per Triton model its role, precision, I/O, batch profile, served artifact and
platform, plus the target and the `ModelSpec`; written by `render` as `yqpack_repository.json` and mirrored into
each config's `parameters`, read by engines, serve, push, k8s and verify. It stands on contracts.py (the errors and
the model) and, like it, runs in the tritonserver image's bare Python (the compose `engines` step reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from packager.core.contracts import (
    ConfigError,
    ManifestError,
    MissingInputError,
    ModelSpec,
    Precision,
    Role,
    TensorSpec,
    YqpackError,
    parse_enum,
    read_json,
    write_json_atomic,
)

REPOSITORY_INDEX = "yqpack_repository.json"
REPOSITORY_SCHEMA = 2


def _model_entry(spec: ModelSpec) -> dict:
    """The model in the shape of a schema-2 build manifest without the build's facts: what earlier yqpack wrote and
    reads back (its reader wants a manifest's keys, `artifacts` included)."""
    model = spec.to_dict()
    return {"schema": 2, "yqpack_version": None, "model_name": model.pop("model_name"), "source_model": "", **model,
            "opset": 0, "artifacts": {}, "quantization": {}, "calibration": {}, "versions": {}}


@dataclass(frozen=True)
class ServedModel:
    """One Triton model of a rendered repository. Mirrored into its config.pbtxt `parameters` as yqpack_role,
    yqpack_precision and yqpack_target, so a client that sees only the server reads the same facts."""

    name: str
    role: Role
    precision: Precision | None = None  # None for the preprocess/postprocess shared by every precision
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    artifact: str | None = None  # build artifact variant a detector serves (or builds its engine from)
    platform: str = ""  # Triton backend/platform: python, onnxruntime, tensorrt_plan, openvino, ensemble
    runtime: str = ""  # what executes a detector's math, e.g. "openvino (f32 hint)": reports name it beside numbers
    # The NMS compiled into a detector's served graph (export/nms_graph.NmsSpec.served()), None for the raw head.
    in_graph_nms: dict | None = None

    def to_dict(self) -> dict:
        extra = {"in_graph_nms": self.in_graph_nms} if self.in_graph_nms is not None else {}
        return extra | {
            "name": self.name, "role": self.role.value, "precision": self.precision.value if self.precision else None,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "max_batch_size": self.max_batch_size, "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "artifact": self.artifact, "platform": self.platform, "runtime": self.runtime,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ServedModel":
        precision = data.get("precision")
        return cls(
            name=str(data["name"]), role=parse_enum(Role, data["role"], "role"),
            precision=parse_enum(Precision, precision, "precision") if precision else None,
            inputs=tuple(TensorSpec.from_dict(t) for t in data.get("inputs", [])),
            outputs=tuple(TensorSpec.from_dict(t) for t in data.get("outputs", [])),
            max_batch_size=int(data.get("max_batch_size", 0)),
            preferred_batch_sizes=tuple(int(b) for b in data.get("preferred_batch_sizes", [])),
            artifact=data.get("artifact"), platform=str(data.get("platform", "")),
            runtime=str(data.get("runtime", "")), in_graph_nms=data.get("in_graph_nms"),
        )


@dataclass(frozen=True)
class RepositoryIndex:
    """yqpack_repository.json: what a rendered repository serves, for engines, serve and verify."""

    model: ModelSpec
    target: str
    models: tuple[ServedModel, ...]
    default_thresholds: dict = field(default_factory=dict)
    source_build: str | None = None  # the build directory it was rendered from (verify's accuracy reference)

    def by_role(self, role: Role) -> list[ServedModel]:
        return [m for m in self.models if m.role is role]

    def ensembles(self) -> dict[Precision, str]:
        return {m.precision: m.name for m in self.by_role(Role.ENSEMBLE) if m.precision}

    def detectors(self) -> dict[Precision, ServedModel]:
        return {m.precision: m for m in self.by_role(Role.DETECTOR) if m.precision}

    def get(self, name: str) -> ServedModel:
        for model in self.models:
            if model.name == name:
                return model
        raise ConfigError(f"the repository serves no model named {name!r}")

    def to_dict(self) -> dict:
        spec = self.model
        return {
            "schema": REPOSITORY_SCHEMA,
            "model_name": spec.name,
            "target": self.target,
            "head_format": spec.head.value,
            # Kept flat for readers of yqpack 0.1's file: ensembles by precision, model names, class names.
            "ensembles": {p.value: name for p, name in self.ensembles().items()},
            "class_names": list(spec.class_names),
            "imgsz": list(spec.imgsz),
            "default_thresholds": self.default_thresholds,
            "model": _model_entry(spec),
            "models": [m.to_dict() for m in self.models],
            "source_build": self.source_build,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = REPOSITORY_INDEX) -> "RepositoryIndex":
        if not isinstance(data, dict) or data.get("schema") != REPOSITORY_SCHEMA:
            raise ManifestError(f"{where} was written by an older yqpack (no schema {REPOSITORY_SCHEMA}): "
                                "render the repository again with `yqpack render`")
        try:
            spec = ModelSpec.from_dict(data["model"], where)
            models = tuple(ServedModel.from_dict(m) for m in data["models"])
            return cls(spec, str(data["target"]), models, dict(data.get("default_thresholds", {})),
                       data.get("source_build"))
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, YqpackError):
                raise
            raise ManifestError(f"{where} is malformed ({type(error).__name__}: {error})") from None

    @classmethod
    def load(cls, repository: str | Path) -> "RepositoryIndex":
        path = Path(repository) / REPOSITORY_INDEX
        if not path.is_file():
            raise MissingInputError(f"{repository} is not a yqpack model repository (no {REPOSITORY_INDEX}): "
                                    "render one with `yqpack render` or `yqpack build --repository`")
        return cls.from_dict(read_json(path), str(path))

    @classmethod
    def load_servable(cls, repository: str | Path) -> "RepositoryIndex":
        """The index of a repository that has something to serve: the folder exists, is a yqpack repository with
        ensembles, and every ensemble's folder holds its config (what serve, push and k8s check before starting)."""
        repository = Path(repository)
        if not repository.is_dir():
            raise MissingInputError(f"model repository not found: {repository} (render one with `yqpack render` or "
                                    "`yqpack build --repository`)")
        index = cls.load(repository)
        ensembles = index.ensembles()
        if not ensembles:
            raise ConfigError(f"{repository} has no ensembles in {REPOSITORY_INDEX}: nothing to serve, re-render it")
        missing = [name for name in ensembles.values() if not (repository / name / "config.pbtxt").is_file()]
        if missing:
            raise ConfigError(f"{repository} lacks the ensemble folder(s) {', '.join(missing)}: re-render it")
        return index

    def save(self, repository: str | Path) -> Path:
        return write_json_atomic(Path(repository) / REPOSITORY_INDEX, self.to_dict())
