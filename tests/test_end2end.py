"""Every current Ultralytics detector through the whole path: YOLO26 (end-to-end, NMS-free), YOLO11, YOLOv8.

Real export (yolo26n.yaml / yolo11n.yaml random init, BatchNorm re-estimated; yolov8n from the shared build),
real ModelOpt, onnxruntime, tritonserver and Ultralytics' own predictor and Triton client. Lean on purpose:
imgsz 320 and 8 calibration images for the random-init models, one server for all three families.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient

from packager.core.paths import ultralytics_offline_env
from packager.export.onnx_export import export_onnx
from packager.inference.letterbox import preprocess, read_image
from packager.core.contracts import HeadFormat, ModelSpec, TensorSpec
from packager.core.manifest import BuildManifest
from packager.pipeline.manifest import artifact_path
from packager.evaluate.onnx_eval import onnx_session
from packager.inference.postprocess import Thresholds, postprocess
from packager.inference.runtime import RuntimeOptions
from packager.repository.render import render_repository
from packager.repository.targets import detector_name, ensemble_name

pytestmark = pytest.mark.slow
IMGSZ = (320, 320)
CALIB_IMAGES = 8
# Random-init families built here; yolov8n comes from the shared session build (pretrained COCO weights).
RANDOM_INIT = {"yolo26n": "yolo26n.yaml", "yolo11n": "yolo11n.yaml"}
SERVED = {"yolo26n": ("fp32", "int8"), "yolo11n": ("fp32",), "yolov8n": ("fp32",)}


@pytest.fixture(scope="module")
def builds(assets, yolov8n_build, tmp_path_factory) -> dict[str, Path]:
    from packager.pipeline.run import BuildOptions, run_build

    out = tmp_path_factory.mktemp("e2e-builds")
    result = {"yolov8n": Path(yolov8n_build)}
    for name, model in RANDOM_INIT.items():
        options = BuildOptions(model=Path(model), out=out / name, calib_images=assets / "coco" / "calib2017",
                               calib_size=CALIB_IMAGES, imgsz=IMGSZ, show_progress=False)
        result[name] = run_build(options).build_dir
    return result


@pytest.fixture(scope="module")
def val_files(assets) -> list[Path]:
    return sorted((assets / "coco" / "val2017").glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def server(builds, server_env, tmp_path_factory):
    """One tritonserver for the three families: each build rendered (local target), model folders side by side."""
    from packager.serve.embedded import LocalTritonServer, find_free_ports

    root = tmp_path_factory.mktemp("e2e-serve")
    combined = root / "model_repository"
    combined.mkdir()
    for name, precisions in SERVED.items():
        # onnxruntime, the runtime of Ultralytics' own ONNX backend the served results are compared with: the
        # random-init heads' near-tied scores would reorder between runtimes (OpenVINO is tested in test_serve).
        rendered = render_repository(builds[name], root / name, target="local", precisions=precisions,
                                     runtime="onnxruntime")
        for model in rendered.models:
            shutil.copytree(rendered.path / model, combined / model)
    grpc_port, http_port, metrics_port = find_free_ports(3)
    with LocalTritonServer(combined, server_env, grpc_port=grpc_port, http_port=http_port,
                           metrics_port=metrics_port, log_path=root / "tritonserver.log") as running:
        yield running


# -- build ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, head_format, output", [
    ("yolo26n", "end2end", [-1, 300, 6]), ("yolo11n", "raw", [-1, 84, 2100]), ("yolov8n", "raw", [-1, 84, 8400]),
])
def test_head_format_detected_from_the_graph_and_recorded(builds, name, head_format, output):
    spec = BuildManifest.load(builds[name]).model
    assert spec.head is HeadFormat(head_format) and spec.stride == 32
    assert list(spec.output.shape) == output


def test_end2end_tail_kept_precise_and_the_rest_quantized(builds):
    """ModelOpt quantizes the YOLO26 graph; the one-to-one output convs and the TopK/Gather tail stay precise."""
    quant = BuildManifest.load(builds["yolo26n"]).quantization
    graph = onnx.load(str(artifact_path(builds["yolo26n"], "fp32"))).graph
    op_type = {node.name: node.op_type for node in graph.node}
    kept = set(quant.excluded_nodes)
    for op in ("TopK", "GatherElements", "ReduceMax"):
        nodes = [n for n, t in op_type.items() if t == op]
        assert nodes and set(nodes) <= kept, op
    one_to_one_outputs = [n for n in op_type if "one2one_cv" in n and n.endswith(".2/Conv")]
    assert len(one_to_one_outputs) == 6 and set(one_to_one_outputs) <= kept
    # of the backbone, only the stride-4 stage is held back (found by shape, as on YOLOv8)
    from packager.quantize.early_stage import stride4_stage_convs

    stride4 = stride4_stage_convs(onnx.load(str(artifact_path(builds["yolo26n"], "fp32"))))
    assert stride4 and {n for n in kept if op_type[n] == "Conv" and "one2one" not in n} == set(stride4)
    assert quant.quantized_nodes > 50
    int8 = onnx.load(str(artifact_path(builds["yolo26n"], "int8-fp32")))
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) > 50


def test_classic_head_on_request_and_end2end_refused_without_one(assets, tmp_path):
    result = export_onnx("yolo26n.yaml", tmp_path / "classic.onnx", IMGSZ, end2end=False)
    assert result.head_format is HeadFormat.RAW and result.output_shape == [-1, 84, 2100]
    with pytest.raises(ValueError, match="no NMS-free"):
        export_onnx("yolo11n.yaml", tmp_path / "v11.onnx", IMGSZ, end2end=True)
    assert not (tmp_path / "v11.onnx").exists()


def test_end2end_postprocess_equals_ultralytics_predictor(builds, val_files):
    """Our end-to-end selection + un-letterbox == Ultralytics' YOLO(onnx).predict on the same ONNX, real images."""
    ultralytics_offline_env()
    import cv2
    from ultralytics import YOLO

    onnx_path = artifact_path(builds["yolo26n"], "fp32")
    session = onnx_session(onnx_path)
    yolo = YOLO(str(onnx_path), task="detect")
    compared = 0
    for path in val_files:
        ours_input, info = preprocess(read_image(path), IMGSZ)
        # conf 0 keeps every row, then a cut in the middle of the scores, then max_det truncating.
        for conf, max_det in ((0.0, 300), (None, 300), (0.0, 40)):
            if conf is None:
                conf = float(np.median(session.run(None, {"images": ours_input[None]})[0][0][:, 4]))
            # rect=False: the square letterbox the fixed-size graph takes (Ultralytics' predict default is rect).
            result = yolo.predict(str(path), imgsz=IMGSZ, conf=conf, max_det=max_det, rect=False, verbose=False)[0]
            # Same letterbox: Ultralytics divides by 255 where we multiply by 1/255 (1 ulp apart), and this
            # random-init head's near-equal scores would reorder on that. So the head runs on Ultralytics' own
            # input tensor and the comparison isolates the postprocess.
            their_input = yolo.predictor.preprocess([cv2.imread(str(path))]).numpy()
            np.testing.assert_allclose(their_input[0], ours_input, rtol=0, atol=1e-7)
            rows = session.run(None, {"images": their_input})[0][0]
            ours = postprocess(rows, info, Thresholds(conf=conf, max_det=max_det), HeadFormat.END2END.value)
            theirs = result.boxes.data.numpy()
            assert len(ours) == len(theirs) > 0
            order_ours, order_theirs = np.lexsort(ours.T[::-1]), np.lexsort(theirs.T[::-1])
            np.testing.assert_array_equal(ours[:, 4:], theirs[:, 4:])  # same rows, same (score) order
            np.testing.assert_allclose(ours[order_ours], theirs[order_theirs], rtol=0, atol=1e-3)
            compared += len(ours)
    assert compared > 300


# -- served -----------------------------------------------------------------------------------------------------
def _infer(url: str, model: str, data: bytes, parameters: dict | None = None) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[data]], dtype=object))
    return client.infer(model, [image], parameters=parameters or {}).as_numpy("DETECTIONS")


@pytest.mark.parametrize("name, precision", [(n, p) for n, ps in SERVED.items() for p in ps])
def test_served_ensemble_answers_n_by_6(server, builds, val_files, name, precision):
    """One ensemble request per family: [1, n, 6] float32, boxes inside the image, == the local pipeline."""
    path = val_files[-1]
    height, width = read_image(path).shape[:2]
    thresholds = Thresholds(conf=0.0 if name != "yolov8n" else 0.25, max_det=100)
    detections = _infer(server.grpc_url, ensemble_name(name, precision), path.read_bytes(),
                        {"conf_threshold": thresholds.conf, "max_det": thresholds.max_det})
    assert detections.dtype == np.float32 and detections.ndim == 3 and detections.shape[0] == 1
    assert detections.shape[2] == 6 and 0 < detections.shape[1] <= 100
    boxes = detections[0, :, :4]
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
    if precision == "fp32":
        spec = BuildManifest.load(builds[name]).model
        chw, info = preprocess(read_image(path), spec.imgsz)
        raw = onnx_session(artifact_path(builds[name], "fp32")).run(None, {"images": chw[None]})[0][0]
        local = postprocess(raw, info, thresholds, spec.head.value)
        np.testing.assert_allclose(detections[0], local, rtol=0, atol=1e-3)


def test_served_end2end_thresholds_per_request(server, val_files):
    """conf_threshold and max_det apply to the NMS-free head; iou_threshold changes nothing (no NMS)."""
    url, model, data = server.grpc_url, ensemble_name("yolo26n", "fp32"), val_files[0].read_bytes()
    assert _infer(url, model, data, {"conf_threshold": 0.0, "max_det": 7}).shape == (1, 7, 6)
    everything = _infer(url, model, data, {"conf_threshold": 0.0, "max_det": 300})
    assert everything.shape == (1, 300, 6)
    cut = float(np.median(everything[0, :, 4]))
    above = _infer(url, model, data, {"conf_threshold": cut, "max_det": 300})
    assert 0 < above.shape[1] < 300 and (above[0, :, 4] > cut).all()
    loose = _infer(url, model, data, {"conf_threshold": 0.0, "max_det": 300, "iou_threshold": 0.05})
    np.testing.assert_array_equal(loose, everything)


@pytest.mark.parametrize("name", ["yolov8n", "yolo26n"])
def test_ultralytics_triton_client_on_served_detector(server, builds, val_files, name):
    """YOLO("grpc://host:port/<detector>") reads names/imgsz/end2end from the `metadata` parameter and predicts
    the same detections as Ultralytics on the local ONNX of the same build."""
    ultralytics_offline_env()
    from ultralytics import YOLO

    spec = BuildManifest.load(builds[name]).model
    remote = YOLO(f"grpc://{server.grpc_url}/{detector_name(name, 'fp32')}", task="detect")
    local = YOLO(str(artifact_path(builds[name], "fp32")), task="detect")
    conf = 0.25 if name == "yolov8n" else 0.0
    compared = 0
    for path in val_files[:3]:
        served = remote.predict(str(path), conf=conf, verbose=False)[0]
        expected = local.predict(str(path), imgsz=spec.imgsz, conf=conf, rect=False, verbose=False)[0]
        assert served.names == dict(enumerate(spec.class_names))
        assert len(served.boxes) == len(expected.boxes) > 0
        np.testing.assert_allclose(served.boxes.data.numpy(), expected.boxes.data.numpy(), rtol=0, atol=1e-3)
        compared += len(served.boxes)
    assert remote.predictor.model.end2end is (spec.head is HeadFormat.END2END)
    if name == "yolov8n":
        assert served.names[0] == "person" and compared > 5


def test_eval_and_verify_unchanged_for_an_end2end_build(server, builds, sample_val, tmp_path):
    """`eval-onnx` and `verify` take a YOLO26 build as they take a YOLOv8 one; served == local detections."""
    from packager.evaluate.onnx_eval import evaluate_build
    from packager.verify.run import VerifyOptions, run_verify

    images, coco_annotations = sample_val
    # The random-init model names its classes '0'..'79' (COCO's 80 in YOLO order): the first 32 images'
    # annotations with the categories named that way.
    dataset = json.loads(Path(coco_annotations).read_text())
    for index, category in enumerate(sorted(dataset["categories"], key=lambda c: c["id"])):
        category["name"] = str(index)
    dataset["images"] = sorted(dataset["images"], key=lambda image: image["id"])[:32]
    kept = {image["id"] for image in dataset["images"]}
    dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in kept]
    annotations = tmp_path / "instances_numbered.json"
    annotations.write_text(json.dumps(dataset))
    local = evaluate_build(builds["yolo26n"], images, annotations, variants=("fp32",), show_progress=False,
                           runtime=RuntimeOptions("onnxruntime"))["fp32"]  # the runtime the fixture serves with
    options = VerifyOptions(images_dir=images, annotations=annotations, url=server.grpc_url,
                            models=[ensemble_name("yolo26n", "fp32")], concurrency=(1,),
                            requests_per_level=4, warmup_requests=1, detector_load=False, progress=False,
                            report_dir=tmp_path / "report", build_dir=builds["yolo26n"])  # the absolute gate's reference
    result = run_verify(options)
    assert result.status == "pass", (result.incomplete_reason, [g.detail for g in result.failed_gates])
    # Random weights detect noise: the annotation check names that instead of failing right annotations.
    assert [check.verdict for check in result.annotation_checks] == ["unfit judge"]
    served = result.accuracy[0]
    assert served.errors == 0 and served.images == local.images == 32
    assert served.metrics.detections == local.detections > 0
    assert served.metrics.map50_95 == pytest.approx(local.map50_95, abs=1e-4)


def test_existing_end2end_onnx_is_adopted(builds, tmp_path):
    """An Ultralytics end-to-end .onnx given as --model: head format, names and stride from graph + metadata."""
    source = artifact_path(builds["yolo26n"], "fp32")
    result = export_onnx(source, tmp_path / "model.fp32.onnx", IMGSZ)
    assert result.head_format is HeadFormat.END2END and result.output_shape == [-1, 300, 6] and result.stride == 32
    assert tuple(result.class_names) == BuildManifest.load(builds["yolo26n"]).model.class_names


def test_ultralytics_metadata_survives_pbtxt_quoting():
    """Names with quotes and backslashes come back from Triton's config parser as the same Python literal."""
    import ast

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from packager.repository.render import ultralytics_metadata_pbtxt

    names = ["person", "it's", 'say "hi"', "back\\slash"]
    spec = ModelSpec("x", HeadFormat.END2END, TensorSpec("images", (-1, 3, 320, 480)),
                     TensorSpec("output0", (-1, 300, 6)), tuple(names), (320, 480))
    line = f'parameters {{ key: "metadata" value: {{ string_value: "{ultralytics_metadata_pbtxt(spec)}" }} }}'
    config = text_format.Parse(line, model_config_pb2.ModelConfig())
    metadata = ast.literal_eval(config.parameters["metadata"].string_value)
    assert metadata["names"] == dict(enumerate(names)) and metadata["imgsz"] == [320, 480]
    assert metadata["end2end"] is True and metadata["stride"] == 32 and metadata["batch"] == 1
    assert metadata["args"]["dynamic"] is False


@pytest.mark.parametrize("target", ["cpu", "gpu", "gpu-ort"])
def test_end2end_repository_for_every_target(builds, tmp_path, target):
    """The (k, 6) head output is what every target's detector and the postprocess declare; configs parse."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    rendered = render_repository(builds["yolo26n"], tmp_path / "repo", target=target, precisions=("fp16", "int8"))
    configs = {m: text_format.Parse((rendered.path / m / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
               for m in rendered.models}
    post = configs["yolo26n_postprocess"]
    assert post.parameters["yqpack_head_format"].string_value == "end2end" and list(post.input[0].dims) == [300, 6]
    for precision in ("fp16", "int8"):
        detector = configs[detector_name("yolo26n", precision)]
        assert list(detector.output[0].dims) == [300, 6]
        assert "'end2end': True" in detector.parameters["metadata"].string_value
