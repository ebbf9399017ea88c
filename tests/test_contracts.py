"""The typed contract between stages: manifest round trip and migration, errors, the render stage, no cycles."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from packager.cli.main import main
from packager.core.contracts import (
    ConfigError,
    HeadFormat,
    ManifestError,
    MissingInputError,
    YqpackError,
    check_model_name,
)
from packager.core.manifest import BuildManifest
from packager.pipeline.manifest import sha256_file
from packager.core.repository_index import RepositoryIndex

PACKAGE = Path(__file__).resolve().parent.parent / "packager"


@pytest.fixture
def build_copy(yolov8n_build, tmp_path) -> Path:
    """The session build's manifest beside links to its artifacts: cheap to edit, artifacts untouched."""
    copy = tmp_path / "build"
    (copy / "onnx").mkdir(parents=True)
    for path in yolov8n_build.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            (copy / path.relative_to(yolov8n_build)).symlink_to(path)
    shutil.copy2(yolov8n_build / "manifest.json", copy / "manifest.json")
    return copy


def test_manifest_round_trips_and_types_the_model(build_copy):
    manifest = BuildManifest.load(build_copy)
    assert manifest.model.head is HeadFormat.RAW
    assert manifest.model.input.shape == (-1, 3, 640, 640) and manifest.model.input.dims == (3, 640, 640)
    assert manifest.model.output.dims == (84, 8400) and manifest.model.num_classes == 80
    assert BuildManifest.from_dict(manifest.to_dict()) == manifest
    manifest.save(build_copy)
    on_disk = json.loads((build_copy / "manifest.json").read_text())
    assert on_disk["schema"] == 2 and on_disk["head_format"] == "raw" and on_disk["stride"] == 32


def test_a_manifest_of_yqpack_0_1_is_migrated(build_copy):
    """Schema 1 had no schema, head_format or stride keys; it knew only the raw head."""
    data = json.loads((build_copy / "manifest.json").read_text())
    for key in ("schema", "head_format", "stride"):
        data.pop(key, None)
    (build_copy / "manifest.json").write_text(json.dumps(data))
    manifest = BuildManifest.load(build_copy)
    assert manifest.model.head is HeadFormat.RAW and manifest.model.stride == 32
    assert manifest.artifact_path(build_copy, "fp32").is_file()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("class_names"), "lacks class_names"),
        (lambda d: d.update(schema=99), "schema 99"),
        (lambda d: d.update(head_format="yolo"), "head_format 'yolo' is not one of raw, end2end"),
        (lambda d: d.update(input={"name": "images"}), "malformed"),
        (lambda d: d.update(model_name="../../x"), "must use only letters"),
    ],
)
def test_a_broken_manifest_is_a_clear_error_not_a_key_error(build_copy, edit, message):
    data = json.loads((build_copy / "manifest.json").read_text())
    edit(data)
    (build_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        BuildManifest.load(build_copy)


def test_truncated_or_missing_manifest(build_copy, tmp_path):
    (build_copy / "manifest.json").write_text('{"model_name": ')
    with pytest.raises(ManifestError, match="not valid JSON"):
        BuildManifest.load(build_copy)
    with pytest.raises(MissingInputError, match="no manifest.json"):
        BuildManifest.load(tmp_path / "nowhere")


def test_missing_artifact_names_the_variant(build_copy):
    manifest = BuildManifest.load(build_copy)
    (build_copy / manifest.artifacts["fp16"].path).unlink()
    with pytest.raises(MissingInputError, match="'fp16' listed in the manifest is missing"):
        manifest.artifact_path(build_copy, "fp16")
    with pytest.raises(ConfigError, match="no 'fp4' artifact"):
        manifest.artifact_path(build_copy, "fp4")


def test_errors_share_one_base_and_keep_their_builtin_kind():
    assert issubclass(ConfigError, YqpackError) and issubclass(ConfigError, ValueError)
    assert issubclass(MissingInputError, FileNotFoundError)
    for name in ("x y", "a'b", "../x", "", ".."):
        with pytest.raises(ConfigError):
            check_model_name(name)
    assert check_model_name("yolo26n-v1.2_a") == "yolo26n-v1.2_a"


def test_render_changes_the_target_without_touching_the_build(build_copy, tmp_path):
    hashes = {p.name: sha256_file(p) for p in build_copy.rglob("*.onnx")}
    manifest_before = (build_copy / "manifest.json").read_bytes()
    repository = tmp_path / "model_repository"
    for target in ("local", "gpu"):
        result = CliRunner().invoke(main, ["render", "--build", str(build_copy), "--repository", str(repository),
                                           "--target", target])
        assert result.exit_code == 0, result.output
        assert RepositoryIndex.load(repository).target == target
    assert {p.value for p in RepositoryIndex.load(repository).ensembles()} == {"fp16", "int8"}
    assert {p.name: sha256_file(p) for p in build_copy.rglob("*.onnx")} == hashes
    assert (build_copy / "manifest.json").read_bytes() == manifest_before


def test_the_cli_turns_stage_errors_into_one_line(tmp_path):
    result = CliRunner().invoke(main, ["render", "--build", str(tmp_path), "--repository", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no manifest.json in") and "Traceback" not in result.output


def _module_name(path: Path) -> str:
    """packager/core/contracts.py -> 'core.contracts'."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(module: Path) -> set[str]:
    """packager modules (dotted, e.g. 'core.contracts' or a folder 'engines') imported anywhere in `module`
    (module level or inside functions) when it runs."""
    package = _module_name(module).rpartition(".")[0]  # the folder a relative import starts from
    found = set()
    tree = ast.parse(module.read_text())
    for block in ast.walk(tree):  # imports for type checkers only never run: not a dependency
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = ".".join(filter(None, [package, node.module]))
            elif node.module and (node.module == "packager" or node.module.startswith("packager.")):
                base = node.module.partition(".")[2]
            else:
                continue
            # `from packager.engines import gpu_probe` imports a module; `from packager.core.contracts import X`
            # a name of one
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if base else alias.name)
            found.add(base)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    return {name: _imports(PACKAGE / f"{name.replace('.', '/')}.py") & modules for name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return path + [dep]
                if dep not in path:
                    stack.append((dep, path + [dep]))
        return None

    return [cycle for cycle in map(cycle_from, sorted(graph)) if cycle]


def test_packager_has_no_import_cycles_and_contracts_is_the_ground_floor():
    graph = _import_graph()
    assert "core.contracts" in graph and graph["core.contracts"] == set(), \
        "core/contracts.py must import nothing of yqpack"
    outside = {name: {dep for dep in deps if dep.split(".")[0] != name.split(".")[0]} for name, deps in graph.items()}
    for folder in ("core", "inference"):  # the ground floor; the code copied into served models
        leaks = {name: deps for name, deps in outside.items() if name.startswith(folder + ".") and deps}
        assert not leaks, f"{folder}/ must import nothing else of yqpack: {leaks}"
    assert not any(dep.startswith("cli.") for name, deps in outside.items() for dep in deps), \
        "only the entry point may import the CLI"
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"
    folders = {}
    for name, deps in outside.items():
        folders.setdefault(name.split(".")[0], set()).update(dep.split(".")[0] for dep in deps)
    folder_cycles = _cycles(folders)
    assert not folder_cycles, f"import cycles between stage folders: {folder_cycles}"


def test_every_error_class_lives_in_the_contract():
    """One error hierarchy: exception classes are defined in core/contracts.py only. The code copied into served
    models (inference/) may not import it and keeps plain ValueError subclasses the models turn into
    INVALID_ARGUMENT; the CLI's click exception is its own."""
    defined = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(base, "id", getattr(base, "attr", "")).endswith(("Error", "Exception")) for base in node.bases):
                defined.setdefault(_module_name(path).split(".")[0], []).append(node.name)
    assert set(defined) == {"core", "inference", "cli"}, defined
    assert defined["cli"] == ["_UserError"], defined["cli"]
    from packager.core import contracts

    assert all(issubclass(getattr(contracts, name), contracts.YqpackError) or name == "YqpackError"
               for name in defined["core"]), defined["core"]
