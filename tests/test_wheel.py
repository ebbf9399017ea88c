"""The wheel as a user installs it: built from the sources, installed outside the checkout, run from a temp folder.

The wheel is built offline (`pip wheel --no-deps --no-build-isolation`, this env's setuptools) from a copy of the
sources, so the checkout gets no build/ or egg-info. It is installed with `pip install --no-deps --target` and run
with this env's dependencies; every command runs in a fresh folder with the checkout off sys.path, and each test
checks that the installed copy (not the checkout) answered.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.metadata import Metadata

from packager.core.paths import PROJECT_ROOT
from packager.serve.k8s import ENGINE_MODULES

SOURCES = ("pyproject.toml", "README.md", "packager", "templates", "deploy")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (PROJECT_ROOT / name).is_dir():
            shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(PROJECT_ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(source)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (built,) = out.glob("yqpack-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                          str(wheel)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return target


def run_installed(installed: Path, cwd: Path, code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -c code` in `cwd` with only the installed wheel ahead of this env's site-packages."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "YQPACK_HOME")}
    environment.update({"PYTHONPATH": str(installed), "XDG_STATE_HOME": str(cwd / "state"), **(env or {})})
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True)


def test_wheel_carries_templates_and_deploy(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "templates").rglob("*")
               if p.is_file() and p.suffix in (".j2", ".py")}
    assert {f"packager/{p}" for p in shipped} <= names
    for name in ("docker-compose.yml", ".env", "Dockerfile", "Dockerfile.check", "build_engines.py",
                 "check_engines.py", "start_triton.py", "plugins/README.md"):
        assert f"packager/deploy_files/{name}" in names
    assert {f"packager/{module}" for module in ENGINE_MODULES} <= names  # what build_engines.py imports


def test_installed_package_finds_its_files_and_keeps_state_per_user(installed, tmp_path):
    code = ("import json, packager, packager.core.paths as a; print(json.dumps({'package': packager.__file__, "
            "'templates': str(a.TEMPLATES_DIR), 'deploy': str(a.DEPLOY_DIR), 'home': str(a.yqpack_home()), "
            "'checkout': a.is_source_checkout()}))")
    run = run_installed(installed, tmp_path, code)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["package"] == str(installed / "packager" / "__init__.py")
    assert found["templates"] == str(installed / "packager" / "templates")
    assert found["deploy"] == str(installed / "packager" / "deploy_files")
    assert found["checkout"] is False
    assert found["home"] == str(tmp_path / "state" / "yqpack")  # never next to the package
    named = run_installed(installed, tmp_path, code, env={"YQPACK_HOME": str(tmp_path / "mine")})
    assert json.loads(named.stdout)["home"] == str(tmp_path / "mine")


@pytest.mark.slow
def test_installed_wheel_renders_gpu_repository_and_prints_engines(installed, yolov8n_build, tmp_path):
    repository = tmp_path / "model_repository"
    render = ("import sys; from packager.cli.main import main; sys.exit(main(['render', '--build', "
              f"{str(yolov8n_build)!r}, '--repository', 'model_repository', '--target', 'gpu']))")
    rendered = run_installed(installed, tmp_path, render)  # relative --repository: lands in the temp folder
    assert rendered.returncode == 0, rendered.stderr
    configs = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
    assert configs == ["yolov8n_fp16", "yolov8n_fp16_detector", "yolov8n_gate", "yolov8n_int8",
                       "yolov8n_int8_detector", "yolov8n_postprocess", "yolov8n_preprocess"]
    assert (repository / "yolov8n_preprocess" / "1" / "model.dali").is_file()  # DALI came with the wheel's deps
    assert 'platform: "tensorrt_plan"' in (repository / "yolov8n_int8_detector" / "config.pbtxt").read_text()

    cli = ("import sys; from packager.cli.main import main; sys.exit(main(['engines', '--build', "
           f"{str(yolov8n_build)!r}, '--repository', {str(repository)!r}, '--engines', 'print']))")
    printed = run_installed(installed, tmp_path, cli)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    # TensorRT 11 (the default image, deploy/.env): strongly typed without a flag, no precision options at all
    assert len(lines) == 2 and all("--skipInference" in line for line in lines)
    assert not any(flag in line for line in lines for flag in ("--stronglyTyped", "--fp16", "--int8"))
    assert (repository / "yqpack_check_inputs.json").is_file()  # the engine check's onnxruntime side came along
    assert all((repository / f"yolov8n_{p}_detector" / "1" / "model.onnx").is_file() for p in ("fp16", "int8"))


def test_installed_compose_file_mounts_the_installed_package(installed, tmp_path):
    """The engines service mounts yqpack's engine code from wherever the package is installed."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no compose implementation installed (apt-get install docker-compose)")
    code = ("import json, packager.serve.compose as d; from packager.core.contracts import Endpoints; "
            f"print(json.dumps(d.compose_environment({str(tmp_path / 'repo')!r}, Endpoints(), False, base={{}})))")
    run = run_installed(installed, tmp_path, code)
    assert run.returncode == 0, run.stderr
    env = {**json.loads(run.stdout), "PATH": os.environ["PATH"]}
    deploy = installed / "packager" / "deploy_files"
    config = subprocess.run([compose, "-f", str(deploy / "docker-compose.yml"), "config"], cwd=deploy, env=env,
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stderr
    engines = yaml.safe_load(config.stdout)["services"]["engines"]
    assert f"{installed / 'packager'}:/yqpack/packager:ro" in engines["volumes"]
    assert f"{deploy / 'build_engines.py'}:/yqpack/deploy/build_engines.py:ro" in engines["volumes"]
    triton = yaml.safe_load(config.stdout)["services"]["triton"]
    assert f"{deploy / 'start_triton.py'}:/yqpack/deploy/start_triton.py:ro" in triton["volumes"]


def test_wheel_metadata_is_complete_and_renders(wheel):
    """What `twine check` looks at: valid core metadata, a long description that renders, and the basics."""
    from markdown_it import MarkdownIt

    archive = zipfile.ZipFile(wheel)
    (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    raw = archive.read(metadata_name)
    metadata = Metadata.from_email(raw, validate=True)  # raises on any invalid field
    assert (metadata.name, str(metadata.version)) == ("yqpack", "0.1.0")
    assert str(metadata.requires_python) == "<3.13,>=3.10"
    assert metadata.license_expression and metadata.classifiers
    assert all(" :: " in c for c in metadata.classifiers)
    assert metadata.description_content_type.startswith("text/markdown")
    message = email.parser.BytesParser().parsebytes(raw)
    html = MarkdownIt("commonmark").render(message.get_payload())
    assert html.startswith("<h1>yqpack</h1>") and html.count("<pre>") >= 3
