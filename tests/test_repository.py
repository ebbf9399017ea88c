"""Rendering the Triton model repository: Triton's own config schema, wiring, names, atomic swap."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from packager.inference import letterbox

from packager.inference import postprocess, runtime
from packager.core.paths import TEMPLATES_DIR
from packager.repository.render import render_repository
from packager.repository.targets import LABELS_FILE, TARGETS, TRITON_DTYPE, detector_name, ensemble_name
from packager.core.contracts import Role
from packager.core.repository_index import RepositoryIndex


def load_repository_info(repository: Path) -> dict:
    """The index exactly as written to disk (what a user or another tool reads)."""
    RepositoryIndex.load(repository)  # and it reads back
    return json.loads((repository / "yqpack_repository.json").read_text())

PRECISIONS = ("fp32", "fp16", "int8")


def _configs(repository: Path) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name, f"{path}: name {config.name!r} differs from its folder"
        configs[config.name] = config
    return configs


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request, yolov8n_build, tmp_path_factory):
    target = request.param
    if not (TEMPLATES_DIR / "detector" / target / "config.pbtxt.j2").is_file():
        pytest.skip(f"templates/detector/{target} not written yet (GPU issue)")
    out = tmp_path_factory.mktemp(f"repo-{target}") / "model_repository"
    return render_repository(yolov8n_build, out, target=target, precisions=PRECISIONS)


def test_every_config_parses_with_tritons_schema(rendered):
    configs = _configs(rendered.path)
    assert sorted(configs) == sorted(rendered.models)
    name = rendered.model_name
    expected = {f"{name}_preprocess", f"{name}_postprocess"}
    if rendered.target == "gpu":  # the DALI preprocess's gate (docs/gpu-prepost.md)
        expected.add(f"{name}_gate")
    for precision in PRECISIONS:
        expected |= {detector_name(name, precision), ensemble_name(name, precision)}
    assert set(configs) == expected


def test_batching_is_consistent(rendered):
    configs = _configs(rendered.path)
    for config in configs.values():
        assert config.max_batch_size > 0, f"{config.name}: max_batch_size must be > 0"
        if config.HasField("dynamic_batching"):
            for size in config.dynamic_batching.preferred_batch_size:
                assert 1 <= size <= config.max_batch_size, f"{config.name}: preferred batch {size}"
    for precision in PRECISIONS:
        ensemble = configs[ensemble_name(rendered.model_name, precision)]
        detector = configs[detector_name(rendered.model_name, precision)]
        assert detector.HasField("dynamic_batching"), "the detector must batch dynamically"
        assert list(detector.dynamic_batching.preferred_batch_size), "the detector needs preferred batch sizes"
        assert detector.instance_group and detector.instance_group[0].count >= 1
        # A CPU detector's ~100 ms batches gather waiting requests anyway; a GPU one needs a short window.
        delay = detector.dynamic_batching.max_queue_delay_microseconds
        cpu = rendered.target in ("local", "cpu", "cpu-openvino")
        assert delay == 0 if cpu else 0 < delay <= 10_000, (rendered.target, delay)
        for step in ensemble.ensemble_scheduling.step:
            assert ensemble.max_batch_size <= configs[step.model_name].max_batch_size, step.model_name


def test_ensembles_are_wired(rendered):
    configs = _configs(rendered.path)
    for precision in PRECISIONS:
        ensemble = configs[ensemble_name(rendered.model_name, precision)]
        assert ensemble.platform == "ensemble"
        assert [(t.name, t.data_type) for t in ensemble.input] == [("IMAGE", model_config_pb2.TYPE_STRING)]
        assert [(t.name, list(t.dims)) for t in ensemble.output] == [("DETECTIONS", [-1, 6])]
        available = {t.name: t.data_type for t in ensemble.input}  # ensemble tensor -> its type
        steps = list(ensemble.ensemble_scheduling.step)
        gate = [f"{rendered.model_name}_gate"] if rendered.target == "gpu" else []
        assert [s.model_name for s in steps] == [
            *gate,
            f"{rendered.model_name}_preprocess",
            detector_name(rendered.model_name, precision),
            f"{rendered.model_name}_postprocess",
        ]
        for step in steps:
            model = configs[step.model_name]
            inputs, outputs = {t.name: t for t in model.input}, {t.name: t for t in model.output}
            required = {name for name, t in inputs.items() if not t.optional}
            assert required <= set(step.input_map) <= set(inputs), f"{step.model_name}: unmapped inputs"
            assert set(step.output_map) <= set(outputs), f"{step.model_name}: unknown outputs"
            missing = set(step.input_map.values()) - set(available)
            assert not missing, f"{step.model_name} consumes {missing} before any step produces it"
            for name, tensor in step.input_map.items():
                assert inputs[name].data_type == available[tensor], f"{step.model_name}: {name} of another type"
            available |= {tensor: outputs[name].data_type for name, tensor in step.output_map.items()}
        assert {t.name for t in ensemble.output} <= set(available)


def test_detector_names_and_dims_match_the_onnx(rendered, yolov8n_build):
    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    configs = _configs(rendered.path)
    for precision in PRECISIONS:
        config = configs[detector_name(rendered.model_name, precision)]
        onnx_path = rendered.path / config.name / "1" / "model.onnx"
        if rendered.target == "gpu":  # model.onnx is the engine source; the plan is built on the serving host
            assert config.platform == "tensorrt_plan" or config.backend == "tensorrt"
            assert not (rendered.path / config.name / "1" / "model.plan").exists()
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        (onnx_input,) = [i for i in graph.input if i.name not in initializers]
        (onnx_output,) = graph.output
        # The model's own input first; the local target's Python detector also takes the letterboxed pixels.
        pixels = ["images_pixels"] if rendered.target == "local" else []
        assert [t.name for t in config.input] == [onnx_input.name, *pixels] == [manifest["input"]["name"], *pixels]
        # gpu: the graph ends in the in-graph NMS's rows (docs/gpu-prepost.md) instead of the raw head.
        head = "detections" if rendered.target == "gpu" else manifest["output"]["name"]
        assert [t.name for t in config.output] == [onnx_output.name] == [head]
        onnx_in_dims = [d.dim_value for d in onnx_input.type.tensor_type.shape.dim][1:]
        onnx_out_dims = [d.dim_value for d in onnx_output.type.tensor_type.shape.dim][1:]
        assert all(list(t.dims) == onnx_in_dims for t in config.input)
        assert list(config.output[0].dims) == onnx_out_dims
        assert config.input[0].data_type == config.output[0].data_type == model_config_pb2.TYPE_FP32
        assert [t.data_type for t in config.input[1:]] == [model_config_pb2.TYPE_UINT8] * len(pixels)
        # pre/post must agree with the detector's tensors
        pre, post = configs[f"{rendered.model_name}_preprocess"], configs[f"{rendered.model_name}_postprocess"]
        assert list(pre.output[0].dims) == onnx_in_dims and pre.output[0].data_type == config.input[-1].data_type
        assert [t.name for t in post.input][0] == onnx_output.name and list(post.input[0].dims) == onnx_out_dims


def test_ensembles_carry_the_class_names(rendered, yolov8n_build):
    """Clients (yqpack verify) map class ids to names from the served config alone."""
    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    configs = _configs(rendered.path)
    for ensemble in rendered.ensembles.values():
        names = json.loads(configs[ensemble].parameters["class_names"].string_value)
        assert names == manifest["class_names"] and len(names) == 80


def test_local_target_serves_the_documented_artifacts(yolov8n_build, tmp_path):
    build = yolov8n_build
    manifest = json.loads((build / "manifest.json").read_text())
    result = render_repository(build, tmp_path / "repo", target="local", precisions=PRECISIONS)
    for precision, variant in {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32"}.items():
        served = result.path / detector_name(result.model_name, precision) / "1" / "model.onnx"
        assert filecmp.cmp(served, build / manifest["artifacts"][variant]["path"], shallow=False), precision
        assert (served.parent / "model.py").is_file()
    # pre/post run yqpack's own modules, byte for byte
    pre_dir = result.path / f"{result.model_name}_preprocess" / "1"
    post_dir = result.path / f"{result.model_name}_postprocess" / "1"
    assert filecmp.cmp(pre_dir / "letterbox.py", letterbox.__file__, shallow=False)
    assert filecmp.cmp(post_dir / "postprocess.py", postprocess.__file__, shallow=False)
    assert filecmp.cmp(post_dir / "letterbox.py", letterbox.__file__, shallow=False)
    labels = (result.path / ensemble_name(result.model_name, "int8") / LABELS_FILE).read_text().splitlines()
    assert labels == manifest["class_names"]
    info = load_repository_info(result.path)
    assert info["ensembles"] == {p: ensemble_name(result.model_name, p) for p in PRECISIONS}
    assert info["target"] == "local"


def test_production_thresholds_are_the_postprocess_defaults(yolov8n_build, tmp_path):
    result = render_repository(yolov8n_build, tmp_path / "repo", precisions=("fp32",))
    post = _configs(result.path)[f"{result.model_name}_postprocess"]
    params = {key: value.string_value for key, value in post.parameters.items()}
    assert (float(params["conf_threshold"]), float(params["iou_threshold"]), int(params["max_det"])) == (0.25, 0.45, 100)


def test_render_is_atomic(yolov8n_build, tmp_path, monkeypatch):
    build = yolov8n_build
    repository = tmp_path / "model_repository"
    render_repository(build, repository, precisions=("fp32",))
    before = sorted(str(p.relative_to(repository)) for p in repository.rglob("*"))

    # A failure halfway through (disk full while copying the second precision's ONNX) ...
    copies = []
    real_copy = shutil.copy2

    def failing_copy(src, dst, *args, **kwargs):
        copies.append(dst)
        if str(src).endswith(".onnx") and len([c for c in copies if str(c).endswith(".onnx")]) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        render_repository(build, repository, precisions=("fp32", "fp16"))
    monkeypatch.undo()
    # ... leaves the previous repository as it was, and no staging folder behind.
    assert sorted(str(p.relative_to(repository)) for p in repository.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]

    # A successful render replaces it entirely.
    render_repository(build, repository, precisions=("int8",))
    info = load_repository_info(repository)
    assert info["ensembles"] == {"int8": ensemble_name(info["model_name"], "int8")}
    assert not any(p.name.endswith("_fp32") for p in repository.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]


def test_a_rerender_keeps_the_tracked_readme(yolov8n_build, tmp_path):
    """The checkout tracks model_repository/README.md: rendering into a fresh clone's folder, and again, keeps it."""
    repository = tmp_path / "model_repository"
    repository.mkdir()
    readme = Path(__file__).resolve().parent.parent / "model_repository" / "README.md"
    shutil.copy2(readme, repository / "README.md")
    render_repository(yolov8n_build, repository, precisions=("fp32",))
    render_repository(yolov8n_build, repository, precisions=("int8",))
    assert (repository / "README.md").read_bytes() == readme.read_bytes()
    assert set(load_repository_info(repository)["ensembles"]) == {"int8"}  # the models were replaced
    # a repository rendered where there was none gets no README
    render_repository(yolov8n_build, tmp_path / "fresh", precisions=("fp32",))
    assert not (tmp_path / "fresh" / "README.md").exists()


def test_clear_errors(yolov8n_build, tmp_path):
    build = yolov8n_build
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        render_repository(build, tmp_path / "r", target="tpu")
    with pytest.raises(ValueError, match="unknown precision"):
        render_repository(build, tmp_path / "r", precisions=("int4",))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        render_repository(tmp_path, tmp_path / "r")
    with pytest.raises(ValueError, match="preferred batch sizes"):
        render_repository(build, tmp_path / "r", max_batch=4, preferred_batch_sizes=[8])
    assert not (tmp_path / "r").exists()


def test_the_index_and_the_configs_state_the_same_facts(rendered):
    """engines, serve and verify read roles, precisions and I/O from the index or the config parameters."""
    index = RepositoryIndex.load(rendered.path)
    configs = _configs(rendered.path)
    assert sorted(m.name for m in index.models) == sorted(configs)
    assert {p.value for p in index.ensembles()} == set(PRECISIONS)
    for model in index.models:
        params = {k: v.string_value for k, v in configs[model.name].parameters.items()}
        assert params["yqpack_role"] == model.role.value
        assert params.get("yqpack_precision") == (model.precision.value if model.precision else None)
        assert params["yqpack_target"] == rendered.target == index.target
        assert params["yqpack_model"] == index.model.name
        assert params.get("yqpack_runtime") == (model.runtime or None)
        assert (model.runtime != "") == (model.role in (Role.DETECTOR, Role.ENSEMBLE))
        assert configs[model.name].max_batch_size == model.max_batch_size
        if model.role is Role.DETECTOR:
            config = configs[model.name]
            assert [t.name for t in config.input] == [t.name for t in model.inputs]
            assert [list(t.dims) for t in config.input] == [list(t.dims) for t in model.inputs]
            assert [model_config_pb2.DataType.Name(t.data_type) for t in config.input] == [
                TRITON_DTYPE[t.dtype] for t in model.inputs
            ]
            assert list(config.output[0].dims) == list(model.outputs[0].dims)
            assert list(config.dynamic_batching.preferred_batch_size) == list(model.preferred_batch_sizes)


def test_an_index_from_an_older_yqpack_is_refused_clearly(yolov8n_build, tmp_path):
    from packager.core.contracts import ManifestError

    result = render_repository(yolov8n_build, tmp_path / "repo", precisions=("fp32",))
    path = result.path / "yqpack_repository.json"
    path.write_text(json.dumps({"model_name": "yolov8n", "target": "local", "ensembles": {"fp32": "yolov8n_fp32"}}))
    with pytest.raises(ManifestError, match="older yqpack.*yqpack render"):
        RepositoryIndex.load(result.path)
    path.write_text("{ truncated")
    with pytest.raises(ManifestError, match="not valid JSON"):
        RepositoryIndex.load(result.path)


# Parameters Triton's openvino backend reads (triton-inference-server/openvino_backend r25.01, src/openvino.cc),
# with the values it accepts; any other key is silently ignored by the backend, so a typo would go unnoticed.
OPENVINO_BACKEND_PARAMETERS = {
    "PERFORMANCE_HINT": {"LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"},
    "NUM_STREAMS": None,  # AUTO, NUMA or an integer
    "INFERENCE_NUM_THREADS": None,  # non-negative integer
    "COMPILATION_NUM_THREADS": None,
    "HINT_BF16": {"YES"},
}


def test_cpu_openvino_runs_int8_on_openvino_and_keeps_float_exact(yolov8n_build, tmp_path):
    result = render_repository(yolov8n_build, tmp_path / "repo", target="cpu-openvino", precisions=PRECISIONS)
    configs = _configs(result.path)
    int8 = configs[detector_name(result.model_name, "int8")]
    assert int8.backend == "openvino" and int8.default_model_filename == "model.onnx"
    assert [group.kind for group in int8.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    params = {key: value.string_value for key, value in int8.parameters.items()}
    assert params["PERFORMANCE_HINT"] == "LATENCY" and "HINT_BF16" not in params  # no silent bf16
    for key, value in params.items():
        # yqpack's own facts and Ultralytics' metadata are for clients: the backend (r25.01 src/openvino.cc
        # ParseParameters) reads only the keys it names, so it ignores them.
        if key.startswith("yqpack_") or key == "metadata":
            continue
        assert key in OPENVINO_BACKEND_PARAMETERS, f"the openvino backend ignores parameter {key}"
        allowed = OPENVINO_BACKEND_PARAMETERS[key]
        assert value.upper() in allowed if allowed else (value.isdigit() or value.upper() in ("AUTO", "NUMA")), value
    # The backend has no f32 hint (bf16 by default on AMX hosts): FP32/FP16 stay on the onnxruntime backend.
    for precision in ("fp32", "fp16"):
        assert configs[detector_name(result.model_name, precision)].backend == "onnxruntime"
    platforms = {p.value: m.platform for p, m in RepositoryIndex.load(result.path).detectors().items()}
    assert platforms == {"fp32": "onnxruntime", "fp16": "onnxruntime", "int8": "openvino"}


@pytest.mark.parametrize("runtime,hint", [("openvino", "f32"), ("openvino", "bf16"), ("onnxruntime", "f32")])
def test_local_detector_runtime_is_a_config_parameter(yolov8n_build, tmp_path, runtime, hint):
    from packager.inference import runtime as runtime_module

    result = render_repository(yolov8n_build, tmp_path / "repo", precisions=("int8",), runtime=runtime,
                               precision_hint=hint)
    detector = detector_name(result.model_name, "int8")
    params = {key: value.string_value for key, value in _configs(result.path)[detector].parameters.items()}
    assert (params["runtime"], params["precision_hint"]) == (runtime, hint)
    assert filecmp.cmp(result.path / detector / "1" / "runtime.py", runtime_module.__file__, shallow=False)
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        render_repository(yolov8n_build, tmp_path / "other", runtime="tvm")


# The local detector serves on this machine: its INT8 label is this CPU's choice (onnxruntime without VNNI/AMX).
LOCAL_INT8 = runtime.runtime_on_this_machine(runtime.RuntimeOptions("openvino"), quantized=True).label


@pytest.mark.parametrize("target, runtime, expected", [
    ("local", "openvino", {"fp32": "openvino (f32 hint)", "int8": LOCAL_INT8}),
    ("local", "onnxruntime", {"fp32": "onnxruntime", "int8": "onnxruntime"}),
    ("cpu-openvino", "openvino", {"fp32": "onnxruntime (Triton backend)", "int8": "openvino (Triton backend)"}),
])
def test_each_detector_names_the_runtime_that_executes_it(yolov8n_build, tmp_path, target, runtime, expected):
    """Reports print the runtime beside served numbers: cpu-openvino keeps FP32 on onnxruntime (exact)."""
    result = render_repository(yolov8n_build, tmp_path / "repo", target=target, precisions=("fp32", "int8"),
                               runtime=runtime)
    index = RepositoryIndex.load(result.path)
    assert {p.value: m.runtime for p, m in index.detectors().items()} == expected
    for precision, ensemble in index.ensembles().items():
        assert index.get(ensemble).runtime == expected[precision.value]
