"""Configuration files of `yqpack build` and `yqpack render` (`--config FILE`).

A file holds the command's options under their long names with `_` (`calib_images: coco/calib2017`), in YAML or
JSON; options given on the command line override it. Relative paths in a file are relative to the file's folder.
Every build records its resolved configuration in manifest.json (`config`, absolute paths), so
`yqpack build --config <build>/manifest.json --out DIR` repeats that build, and `--print-config` writes the resolved
configuration as YAML (a file to keep beside the data). An unknown key or a value of the wrong type is a
ConfigError naming the file and the key.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.pipeline.result import BuildOptions
from packager.core.contracts import ConfigError, MissingInputError
from packager.core.manifest import MANIFEST_NAME, BuildManifest
from packager.evaluate.ground_truth import EVAL_SPLITS
from packager.export.onnx_export import DEFAULT_OPSET, model_imgsz, parse_imgsz
from packager.inference.runtime import DEFAULT_RUNTIME, RUNTIMES, RuntimeOptions
from packager.quantize.int8 import CALIBRATION_METHODS, DEFAULT_CALIBRATION_METHOD, PRESETS, QuantizeOptions
from packager.repository.targets import TARGETS

PRECISION_HINTS = ("f32", "bf16")


@dataclass(frozen=True)
class ConfigKey:
    """One option of a config file: its kind (path, int, float, bool, text, texts, imgsz), whether null is allowed,
    the choices of a text, and the command's default."""

    kind: str
    default: Any = None
    optional: bool = False
    choices: tuple[str, ...] = ()


BUILD_KEYS = {
    "model": ConfigKey("path"),
    "out": ConfigKey("path", "build"),
    "calib_images": ConfigKey("path", optional=True),
    "calib_data": ConfigKey("path", optional=True),
    "calib_size": ConfigKey("int", 64),
    "imgsz": ConfigKey("imgsz", None, optional=True),  # null: the size the model was trained at
    "max_batch": ConfigKey("int", 8),
    "static_batch": ConfigKey("bool", False),
    "opset": ConfigKey("int", DEFAULT_OPSET),
    "end2end": ConfigKey("bool", None, optional=True),
    "preset": ConfigKey("text", None, optional=True, choices=PRESETS),  # null: mixed, then auto if the gate fails
    "stride4_precise": ConfigKey("bool", True),
    "auto_target": ConfigKey("float", 0.97),
    "tune_images": ConfigKey("path", optional=True),
    "max_tune_images": ConfigKey("int", 64),
    "calibration_method": ConfigKey("text", DEFAULT_CALIBRATION_METHOD, choices=CALIBRATION_METHODS),
    "adaround": ConfigKey("bool", False),
    "adaround_iterations": ConfigKey("int", 1500),
    "adaround_device": ConfigKey("text", "auto"),
    "calibration_eps": ConfigKey("texts", ["cpu"]),
    "dq_only": ConfigKey("bool", False),
    "exclude_nodes": ConfigKey("texts", []),
    "exclude_ops": ConfigKey("texts", []),
    "calibrate_per_node": ConfigKey("bool", False),
    "trt_plugins": ConfigKey("texts", []),
    "val_images": ConfigKey("path", optional=True),
    "val_annotations": ConfigKey("path", optional=True),
    "data": ConfigKey("path", optional=True),
    "split": ConfigKey("text", "val", choices=EVAL_SPLITS),
    "min_map_ratio": ConfigKey("float", 0.99),
    "repository": ConfigKey("path", optional=True),
    "target": ConfigKey("text", "local", choices=TARGETS),
    "fp8": ConfigKey("bool", None, optional=True),
    "allow_overlap": ConfigKey("bool", False),
    "runtime": ConfigKey("text", DEFAULT_RUNTIME, choices=RUNTIMES),
    "precision_hint": ConfigKey("text", "f32", choices=PRECISION_HINTS),
}

RENDER_KEYS = {
    "build": ConfigKey("path", "build"),
    "repository": ConfigKey("path", "model_repository"),
    "target": ConfigKey("text", "local", choices=TARGETS),
    "precisions": ConfigKey("texts", None, optional=True),
    "max_batch": ConfigKey("int", None, optional=True),
    "preprocess": ConfigKey("text", None, optional=True, choices=("dali", "python")),
    "nms": ConfigKey("text", None, optional=True, choices=("graph", "python")),
    "runtime": ConfigKey("text", DEFAULT_RUNTIME, choices=RUNTIMES),
    "precision_hint": ConfigKey("text", "f32", choices=PRECISION_HINTS),
}


@dataclass(frozen=True)
class ConfigFile:
    """The checked options of one file (only the keys it sets), and the build it came from for a manifest.json."""

    path: Path
    values: dict[str, Any]
    manifest_of: Path | None = None  # the build directory whose manifest.json this is


# Keys added after builds recorded their config, with the behaviour of the builds that predate them.
BEHAVIOUR_BEFORE_KEY = {"stride4_precise": False, "adaround": False}


def read_config_file(path: str | Path, keys: dict[str, ConfigKey] = BUILD_KEYS) -> ConfigFile:
    """A YAML/JSON config file, or a build's manifest.json (its recorded `config`), checked against `keys`."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"config file not found: {path}")
    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:  # the parser's message has the line
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({error})") from None
    manifest_of = None
    if isinstance(data, dict) and path.name == MANIFEST_NAME and "artifacts" in data:
        manifest = BuildManifest.from_dict(data, str(path))
        if manifest.config is None:
            raise ConfigError(f"{path} records no build configuration (built by an older yqpack): write a "
                              "build.yaml of its options instead")
        data, manifest_of = dict(manifest.config), path.parent
        if keys is BUILD_KEYS:  # a build made before a key existed ran without what the key's default turns on
            data = {**BEHAVIOUR_BEFORE_KEY, **data}
        else:  # render: the build's repository options, and the build itself
            data = {key: value for key, value in data.items() if key in keys and value is not None}
            data["build"] = str(manifest_of.resolve())
    if data is None:
        data = {}
    return ConfigFile(path, check_config(data, keys, str(path), base=path.parent), manifest_of)


def check_config(data: Any, keys: dict[str, ConfigKey], where: str, base: Path | None = None) -> dict[str, Any]:
    """{key: value} with every value checked and normalised (paths absolute against `base`, imgsz [h, w])."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of option: value, got {type(data).__name__}")
    checked = {}
    for key, value in data.items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), list(keys), n=1)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; keys: {', '.join(keys)}")
        checked[key] = _check_value(key, value, keys[key], where, base)
    return checked


def _check_value(key: str, value: Any, spec: ConfigKey, where: str, base: Path | None) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} must be {expected}{' or null' if spec.optional else ''}, got {value!r}")

    if value is None:
        if spec.optional:
            return None
        raise wrong(_KIND_NAMES[spec.kind])
    if spec.kind == "path":
        if not isinstance(value, str) or not value:
            raise wrong("a path")
        path = Path(value).expanduser()
        return str(path if path.is_absolute() or base is None else (base / path).resolve())
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if spec.kind == "text":
        if not isinstance(value, str):
            raise wrong("a string")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(spec.choices)}, got {value!r}")
        return value
    if spec.kind == "texts":  # a list, or one comma-separated string as on the command line
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise wrong("a list of strings")
        return list(value)
    if spec.kind == "imgsz":
        if isinstance(value, bool) or not isinstance(value, (int, str, list)):
            raise wrong("an integer, 'H,W' or [H, W]")
        try:
            return list(parse_imgsz(value))
        except (ConfigError, TypeError, ValueError) as error:
            raise ConfigError(f"{where}: {key}: {error}") from None
    raise AssertionError(spec.kind)


_KIND_NAMES = {"path": "a path", "int": "an integer", "float": "a number", "bool": "true or false",
               "text": "a string", "texts": "a list of strings", "imgsz": "an integer, 'H,W' or [H, W]"}


def options_from_config(config: dict[str, Any], show_progress: bool = True) -> BuildOptions:
    """BuildOptions from a build configuration (missing keys take the command's defaults)."""
    value = {key: config.get(key, spec.default) for key, spec in BUILD_KEYS.items()}
    if value["model"] is None:
        raise ConfigError("no model: pass --model or set model in the config file")

    def path(key: str) -> Path | None:
        return None if value[key] is None else Path(value[key])

    return BuildOptions(
        model=path("model"), out=path("out"), calib_images=path("calib_images"), calib_data=path("calib_data"),
        calib_size=value["calib_size"], imgsz=parse_imgsz(value["imgsz"]) if value["imgsz"] is not None else None, max_batch=value["max_batch"],
        dynamic_batch=not value["static_batch"], opset=value["opset"], end2end=value["end2end"],
        quantize=QuantizeOptions(
            preset=value["preset"] or "mixed", calibration_method=value["calibration_method"],
            calibration_eps=list(value["calibration_eps"]), dq_only=value["dq_only"],
            exclude_nodes=list(value["exclude_nodes"]), exclude_ops=list(value["exclude_ops"]),
            calibrate_per_node=value["calibrate_per_node"], trt_plugins=list(value["trt_plugins"]),
            auto_target=value["auto_target"], stride4_precise=value["stride4_precise"], adaround=value["adaround"],
            adaround_iterations=value["adaround_iterations"], adaround_device=value["adaround_device"],
        ),
        tune_images=path("tune_images"), max_tune_images=value["max_tune_images"],
        val_images=path("val_images"), val_annotations=path("val_annotations"), min_map_ratio=value["min_map_ratio"],
        data=path("data"), split=value["split"], auto_fallback=value["preset"] is None,
        repository=path("repository"), repository_target=value["target"],
        runtime=RuntimeOptions(value["runtime"], value["precision_hint"]), fp8=value["fp8"],
        allow_overlap=value["allow_overlap"], show_progress=show_progress,
    )


def config_from_options(options: BuildOptions) -> dict[str, Any]:
    """The resolved configuration of a build, every key, paths absolute: what manifest.json records (`imgsz` as
    checked: (h, w))."""

    def path(value: Path | str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().resolve())

    quantize = options.quantize
    return {
        "model": path(options.model), "out": path(options.out), "calib_images": path(options.calib_images),
        "calib_data": path(options.calib_data), "calib_size": options.calib_size,
        "imgsz": list(options.imgsz if options.imgsz is not None else model_imgsz(options.model)), "max_batch": options.max_batch,
        "static_batch": not options.dynamic_batch, "opset": options.opset, "end2end": options.end2end,
        "preset": None if options.auto_fallback and quantize.preset == "mixed" else quantize.preset,
        "stride4_precise": quantize.stride4_precise, "auto_target": quantize.auto_target,
        "tune_images": path(options.tune_images),
        "max_tune_images": options.max_tune_images, "calibration_method": quantize.calibration_method,
        "calibration_eps": list(quantize.calibration_eps), "dq_only": quantize.dq_only,
        "exclude_nodes": list(quantize.exclude_nodes), "exclude_ops": list(quantize.exclude_ops),
        "calibrate_per_node": quantize.calibrate_per_node, "trt_plugins": list(quantize.trt_plugins),
        "adaround": quantize.adaround, "adaround_iterations": quantize.adaround_iterations,
        "adaround_device": quantize.adaround_device, "val_images": path(options.val_images), "val_annotations": path(options.val_annotations),
        "data": path(options.data), "split": options.split,
        "min_map_ratio": options.min_map_ratio, "repository": path(options.repository),
        "target": options.repository_target, "fp8": options.fp8, "allow_overlap": options.allow_overlap,
        "runtime": options.runtime.runtime, "precision_hint": options.runtime.precision_hint,
    }


def config_yaml(config: dict[str, Any]) -> str:
    """A configuration as a YAML file, keys in the command's order."""
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
