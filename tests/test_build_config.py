"""`yqpack build --config` / `render --config`: every option in a file, command-line flags win, the resolved
configuration recorded in manifest.json reproduces the build, mistakes are ConfigErrors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from packager.pipeline.config import BUILD_KEYS, RENDER_KEYS, read_config_file
from packager.cli.build import build, render
from packager.cli.main import main
from packager.core.contracts import ConfigError
from packager.core.manifest import BuildManifest
from packager.core.repository_index import RepositoryIndex

ONE_CALIBRATION_ARTIFACTS = ("fp32", "fp16", "int8", "int8-fp32", "int8-u8", "calib")
BUILD_CALIB_IMAGES = 64  # the session build's (conftest.py)


def _yqpack(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _printed_config(*args: str) -> dict:
    result = _yqpack("build", *args, "--print-config")
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


@pytest.mark.parametrize("command, keys, args", [(build, BUILD_KEYS, ["--model", "m.pt"]), (render, RENDER_KEYS, [])])
def test_every_option_is_a_config_key_with_the_commands_default(command, keys, args):
    """What the command resolves with no options given (--model aside) is each key's default."""
    resolved = command.make_context(command.name, list(args)).params
    resolved = {"build" if name == "build_dir" else name: value for name, value in resolved.items()
                if name not in ("config_file", "print_config")}
    assert set(resolved) == set(keys)
    for name, value in resolved.items():
        if name == "model":
            continue
        if name == "imgsz" and value is not None:  # None: the model's training size
            value = [int(value)] * 2
        elif name == "calibration_eps":
            value = value.split(",")
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        assert value == keys[name].default, name


def test_a_config_file_gives_every_option_and_flags_override_it(assets, tmp_path):
    config = tmp_path / "project" / "build.yaml"
    config.parent.mkdir()
    (tmp_path / "project" / "calib").symlink_to(assets / "coco" / "calib2017")
    config.write_text(yaml.safe_dump({
        "model": str(assets / "weights" / "yolov8n.pt"), "calib_images": "calib", "calib_size": 8,
        "imgsz": "320,640", "preset": "extreme", "exclude_ops": ["Concat"], "calibration_eps": "cpu,cuda:0",
        "fp8": True, "out": "builds/v1",
    }))
    resolved = _printed_config("--config", config)
    assert resolved["calib_images"] == str((tmp_path / "project" / "calib").resolve())  # beside the file
    assert resolved["out"] == str((tmp_path / "project" / "builds" / "v1").resolve())
    assert (resolved["calib_size"], resolved["imgsz"], resolved["preset"]) == (8, [320, 640], "extreme")
    assert resolved["exclude_ops"] == ["Concat"] and resolved["calibration_eps"] == ["cpu", "cuda:0"]
    assert resolved["fp8"] is True and resolved["opset"] == 17  # unset keys keep the command's defaults
    overridden = _printed_config("--config", config, "--calib-size", "16", "--preset", "mixed", "--no-fp8")
    assert (overridden["calib_size"], overridden["preset"], overridden["fp8"]) == (16, "mixed", False)
    assert overridden["imgsz"] == [320, 640]
    assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved  # what --print-config writes is a config file
    again = tmp_path / "again.yaml"
    again.write_text(_yqpack("build", "--config", config, "--print-config").output)
    assert _printed_config("--config", again) == resolved


@pytest.mark.parametrize("content, message", [
    ({"calib_sise": 8}, "unknown key 'calib_sise' (did you mean 'calib_size'?)"),
    ({"calib_size": "many"}, "calib_size must be an integer, got 'many'"),
    ({"dq_only": "yes"}, "dq_only must be true or false, got 'yes'"),
    ({"preset": "fast"}, "preset must be one of mixed, extreme, auto, got 'fast'"),
    ({"imgsz": 100}, "imgsz: --imgsz must be one or two positive multiples of 32"),
    ({"exclude_nodes": [1]}, "exclude_nodes must be a list of strings"),
    ({"end2end": "no"}, "end2end must be true or false or null"),
    (["model"], "must hold a mapping of option: value, got list"),
])
def test_a_bad_key_or_value_is_a_config_error_naming_it(tmp_path, content, message):
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as caught:
        read_config_file(config)
    assert message in str(caught.value) and str(config) in str(caught.value)
    result = _yqpack("build", "--config", config, "--print-config")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
    assert "Traceback" not in result.output


def test_a_manifest_of_an_older_yqpack_has_no_config_to_repeat(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text((Path(__file__).parent / "data" / "manifest_before_records.json").read_text())
    result = _yqpack("build", "--config", old / "manifest.json", "--print-config")
    assert result.exit_code == 1 and "records no build configuration" in result.output


@pytest.fixture(scope="module")
def config_build(assets, tmp_path_factory):
    """The one extra build of this file: the session build's options, given as a config file."""
    root = tmp_path_factory.mktemp("config-build")
    config = root / "build.yaml"
    config.write_text(yaml.safe_dump({"model": str(assets / "weights" / "yolov8n.pt"),
                                      "calib_images": str(assets / "coco" / "calib2017"),
                                      "calib_size": BUILD_CALIB_IMAGES, "out": "from-config"}))
    result = _yqpack("build", "--config", config)
    assert result.exit_code == 0, result.output
    return root / "from-config"


def _graph_and_weights(path: Path) -> bytes:
    """The ONNX model's bytes without Ultralytics' `date` metadata (the export's wall-clock time) and the shape
    annotations (`value_info`) that shape inference adds."""
    import onnx

    model = onnx.load(str(path))
    kept = [prop for prop in model.metadata_props if prop.key != "date"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    del model.graph.value_info[:]
    return model.SerializeToString()


@pytest.mark.slow
def test_a_build_from_a_config_file_equals_the_command_line_build(config_build, yolov8n_build, assets):
    """Same options as the session build (its conftest options = these flags): the same configuration recorded,
    the same calibration tensor byte for byte, and every ONNX the same graph and weights (the export's date
    aside)."""
    recorded = BuildManifest.load(config_build).config
    flags = _printed_config("--model", assets / "weights" / "yolov8n.pt", "--calib-images",
                            assets / "coco" / "calib2017", "--calib-size", str(BUILD_CALIB_IMAGES),
                            "--out", config_build)
    assert recorded == flags
    made, session = BuildManifest.load(config_build), BuildManifest.load(yolov8n_build)
    assert made.calibration.image_sha256 == session.calibration.image_sha256
    assert made.artifacts["calib"].sha256 == session.artifacts["calib"].sha256
    for variant in ONE_CALIBRATION_ARTIFACTS[:-1]:
        assert _graph_and_weights(made.artifact_path(config_build, variant)) == _graph_and_weights(
            session.artifact_path(yolov8n_build, variant)), variant


@pytest.mark.slow
def test_a_builds_manifest_repeats_it_but_never_over_itself(config_build, tmp_path):
    manifest = config_build / "manifest.json"
    recorded = json.loads(manifest.read_text())["config"]
    assert _printed_config("--config", manifest) == recorded
    elsewhere = _printed_config("--config", manifest, "--out", tmp_path / "again")
    assert elsewhere == {**recorded, "out": str((tmp_path / "again").resolve())}
    in_place = _yqpack("build", "--config", manifest)
    assert in_place.exit_code == 1 and "would rebuild" in in_place.output and "pass --out DIR" in in_place.output
    assert BuildManifest.load(config_build).config == recorded  # untouched

    render_config = tmp_path / "render.yaml"
    render_config.write_text(yaml.safe_dump({"build": str(config_build), "target": "gpu",
                                             "repository": "served"}))
    rendered = _yqpack("render", "--config", render_config, "--target", "cpu")
    assert rendered.exit_code == 0, rendered.output
    index = RepositoryIndex.load(tmp_path / "served")
    assert index.target == "cpu" and index.source_build == str(config_build.resolve())
    from_manifest = _yqpack("render", "--config", manifest, "--repository", tmp_path / "repo")
    assert from_manifest.exit_code == 0, from_manifest.output
    assert RepositoryIndex.load(tmp_path / "repo").target == recorded["target"]
