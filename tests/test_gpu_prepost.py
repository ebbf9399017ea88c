"""Issue 21: the gpu target's DALI preprocess, in-graph NMS and host-side steps, on real DALI (CPU backend),
onnxruntime, OpenVINO and tritonserver (the gate and the postprocess as rendered, served by the embedded server)."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from packager.engines.host_sizing import instances_for, size_python_steps
from packager.export.nms_graph import NmsSpec, append_nms
from packager.inference import letterbox as lb
from packager.inference import postprocess as pp
from packager.inference.image_header import ImageHeaderError, check_complete, read_header
from packager.inference.request_params import ParameterError, compiled_nms_profile
from packager.repository.render import gate_name, render_repository

dali_letterbox = pytest.importorskip("packager.inference.dali_letterbox")
pytest.importorskip("nvidia.dali")

SIZE = (640, 640)
NMS_IMAGES = 24  # sample images the NMS comparisons run on (each costs two detector runs per runtime)


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def _noise(shape) -> np.ndarray:
    # Smooth content (a blurred gradient + noise) so JPEG artefacts stay typical of photos.
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    return cv2.GaussianBlur(image, (0, 0), 1.5) if min(shape[:2]) > 4 else image


@pytest.fixture(scope="module")
def dali():
    return dali_letterbox.DaliLetterbox(*SIZE, batch_size=4)


ODD_IMAGES = {
    "1x1 png": lambda: _png(_noise((1, 1, 3))),
    "1x60000 png": lambda: _png(_noise((1, 60000, 3))),
    "60000x1 png": lambda: _png(_noise((60000, 1, 3))),
    "4000x3000 jpeg": lambda: _jpeg(_noise((3000, 4000, 3))),
    "3000x4000 jpeg": lambda: _jpeg(_noise((4000, 3000, 3))),
    "grey jpeg": lambda: _jpeg(_noise((480, 640))),
    "1280x425 jpeg (rounds half to even)": lambda: _jpeg(_noise((425, 1280, 3))),
    "1280x427 jpeg": lambda: _jpeg(_noise((427, 1280, 3))),
    "5x7 png": lambda: _png(_noise((7, 5, 3))),
    "640x640 jpeg (no resize)": lambda: _jpeg(_noise((640, 640, 3))),
}


@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_dali_letterbox_geometry_equals_yqpacks_and_pixels_stay_close(dali, case):
    data = ODD_IMAGES[case]()
    images, infos = dali([data])
    reference, info = lb.preprocess_bytes(data, SIZE)
    assert np.array_equal(infos[0], info.as_array()), (case, infos[0], info)
    levels = np.abs(images[0] - reference) * 255
    # The border (grey 114) is the same bits; inside, OpenCV's fixed-point resize and DALI's float one differ.
    top, left = int(info.pad_y), int(info.pad_x)
    assert images[0][:, :top].size == 0 or np.array_equal(images[0][:, :top], reference[:, :top])
    assert images[0][:, :, :left].size == 0 or np.array_equal(images[0][:, :, :left], reference[:, :, :left])
    print(f"{case}: max {levels.max():.0f} levels, {np.mean(levels > 0.5):.2%} of values differ")
    assert levels.max() <= 2.01 and np.mean(levels > 0.5) < 0.15


def test_dali_letterbox_on_sample_photos(dali, sample_val):
    files = sorted(sample_val[0].glob("*.jpg"))[:16]
    encoded = [f.read_bytes() for f in files]
    images, infos = dali(encoded)
    levels = []
    for index, data in enumerate(encoded):
        reference, info = lb.preprocess_bytes(data, SIZE)
        assert np.array_equal(infos[index], info.as_array())
        levels.append(np.abs(images[index] - reference) * 255)
    levels = np.stack(levels)
    print(f"16 sample photos: max {levels.max():.0f} levels, mean {levels.mean():.4f}, "
          f"{np.mean(levels > 0.5):.2%} of values differ")
    assert levels.max() <= 2.01 and levels.mean() < 0.05


def test_dali_normalisation_is_yqpacks_float32_product(dali):
    images, _ = dali([_jpeg(_noise((300, 500, 3)))])
    pixels = np.round(images[0] * 255).astype(np.uint8)
    assert np.array_equal(lb.normalize_into(pixels, np.empty_like(images[0])), images[0])


def test_serialized_pipelines_load_in_dali(tmp_path, dali):
    import nvidia.dali as nvdali

    data = _jpeg(_noise((333, 517, 3)))
    cpu = dali_letterbox.serialize_pipeline(tmp_path / "cpu.dali", *SIZE, device="cpu", max_batch=2)
    pipeline = nvdali.Pipeline.deserialize(filename=str(cpu), device_id=None, exec_async=False,
                                           exec_pipelined=False)
    pipeline.build()
    pipeline.feed_input(dali_letterbox.INPUT_NAME, [np.frombuffer(data, np.uint8)])
    images, infos = pipeline.run()
    expected_images, expected_infos = dali([data])
    assert np.array_equal(np.asarray(images[0]), expected_images[0])
    assert np.array_equal(np.asarray(infos[0]), expected_infos[0])
    # The served (mixed-device) pipeline parses here and stops only at wanting a GPU; garbage does not parse.
    gpu = dali_letterbox.serialize_pipeline(tmp_path / "model.dali", *SIZE, device="gpu", max_batch=8)
    with pytest.raises(RuntimeError, match="CUDA"):
        nvdali.Pipeline.deserialize(filename=str(gpu))
    (tmp_path / "broken.dali").write_bytes(gpu.read_bytes()[:100])
    with pytest.raises(RuntimeError) as broken:
        nvdali.Pipeline.deserialize(filename=str(tmp_path / "broken.dali"))
    assert "CUDA" not in str(broken.value)


def _corrupt_cases(photo: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(21)
    scan = photo.find(b"\xff\xda")
    flipped = bytearray(photo)
    for position in rng.integers(scan + 64, len(photo) - 4, 16):
        flipped[position] = int(rng.integers(0, 256))
    return {
        "truncated half": photo[: len(photo) // 2],
        "no end marker": photo[:-2],
        "truncated png": _png(_noise((50, 50, 3)))[:60],
        "entropy bytes flipped": bytes(flipped),
        "zeros after the end": photo + bytes(1000),
    }


def test_gate_checks_refuse_exactly_what_dali_cannot_decode(sample_val):
    """Triton's dali backend fails a whole batch on one undecodable image: the gate must refuse those first."""
    photo = sorted(sample_val[0].glob("*.jpg"))[0].read_bytes()
    for name, data in _corrupt_cases(photo).items():
        try:
            check_complete(data, read_header(data))
            gate = "accepted"
        except ImageHeaderError:
            gate = "refused"
        try:
            dali_letterbox.DaliLetterbox(*SIZE, batch_size=1)([data])  # a fresh pipeline: a failed one is dead
            decoded = "decoded"
        except RuntimeError:
            decoded = "failed"
        print(f"{name}: gate {gate}, DALI {decoded}")
        assert (gate, decoded) in (("accepted", "decoded"), ("refused", "failed")), name


# -- in-graph NMS -----------------------------------------------------------------------------------------------
def _match(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows of a found in b (same class, IoU > 0.99, score within 1e-4): 1.0 = the same detections."""
    if len(a) == 0:
        return 1.0 if len(b) == 0 else 0.0
    found = 0
    for row in a:
        same = b[(b[:, 5] == row[5]) & (np.abs(b[:, 4] - row[4]) < 1e-4)]
        if len(same) and _best_iou(row[:4], same[:, :4]) > 0.99:
            found += 1
    return found / max(len(a), len(b))


def _best_iou(box: np.ndarray, boxes: np.ndarray) -> float:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return float((inter / (area + areas - inter + 1e-9)).max())


PROFILES = {0: pp.PRODUCTION_THRESHOLDS, 1: pp.EVAL_THRESHOLDS}


@pytest.fixture(scope="module")
def nms_models(yolov8n_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("nms")
    paths = {}
    for variant in ("fp32", "int8-fp32"):
        source = yolov8n_build / "onnx" / f"model.{variant}.onnx"
        paths[variant] = (source, out / f"model.{variant}.nms.onnx")
        onnx.save(append_nms(onnx.load(str(source))), str(paths[variant][1]))
    return paths


@pytest.fixture(scope="module")
def nms_inputs(sample_val):
    files = sorted(sample_val[0].glob("*.jpg"))[:NMS_IMAGES]
    return np.stack([lb.preprocess(lb.read_image(f), SIZE)[0] for f in files])


def _compare(raw: np.ndarray, rows: np.ndarray, label: str, exact: bool) -> None:
    shares = []
    for profile, thresholds in PROFILES.items():
        for index in range(len(raw)):
            python = pp.decode(raw[index], thresholds)
            graph = pp.select_in_graph(rows[index], profile, thresholds)
            share = _match(python, graph)
            shares.append(share)
            if exact:
                assert share == 1.0, (label, profile, index, len(python), len(graph))
    print(f"{label}: {np.mean(shares):.4%} of detections equal the Python NMS's ({len(shares)} image x profile), "
          f"worst image {min(shares):.2%}")
    assert np.mean(shares) > 0.995 and min(shares) > 0.95


@pytest.mark.parametrize("variant", ["fp32", "int8-fp32"])
def test_nms_graph_equals_the_python_nms_under_onnxruntime(nms_models, nms_inputs, variant):
    import onnxruntime as ort

    source, graph = nms_models[variant]
    raw = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"images": nms_inputs})[0]
    rows = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"images": nms_inputs})[0]
    assert rows.shape == (len(nms_inputs), 2, 1000, 6) and rows.dtype == np.float32
    # Same runtime, same head numbers: only NMS tie-breaking may differ (none on these images).
    _compare(raw, rows, f"onnxruntime {variant}", exact=True)


def test_nms_graph_equals_the_python_nms_under_openvino(nms_models, nms_inputs):
    import openvino as ov

    core = ov.Core()
    source, graph = nms_models["fp32"]
    hint = {"INFERENCE_PRECISION_HINT": "f32"}
    raw = core.compile_model(str(source), "CPU", hint)(nms_inputs)[0]
    rows = core.compile_model(str(graph), "CPU", hint)(nms_inputs)[0]
    # OpenVINO fuses the appended graph into the head differently: last-bit differences reorder near-ties.
    _compare(raw, rows, "openvino fp32", exact=False)


def test_requests_the_compiled_nms_cannot_serve_are_refused():
    nms = NmsSpec().served(80, 8400)
    assert compiled_nms_profile(pp.PRODUCTION_THRESHOLDS, nms) == 0
    assert compiled_nms_profile(pp.EVAL_THRESHOLDS, nms) == 1
    assert compiled_nms_profile(pp.PRODUCTION_THRESHOLDS._replace(conf=0.5, max_det=1000), nms) == 0
    for bad, message in [(pp.PRODUCTION_THRESHOLDS._replace(iou=0.5), "not compiled into"),
                         (pp.EVAL_THRESHOLDS._replace(multi_label=False), "not compiled into"),
                         (pp.PRODUCTION_THRESHOLDS._replace(conf=0.0), "below"),
                         (pp.PRODUCTION_THRESHOLDS._replace(max_det=1001), "above")]:
        with pytest.raises(ParameterError, match=message):
            compiled_nms_profile(bad, nms)


# -- host sizing ------------------------------------------------------------------------------------------------
def test_host_sizing_rewrites_only_the_models_render_left_to_the_host(yolov8n_build, tmp_path):
    repo = render_repository(yolov8n_build, tmp_path / "repo", target="gpu", precisions=("int8",)).path
    assert size_python_steps(repo, cores=16) == {gate_name("yolov8n"): 2, "yolov8n_postprocess": 2}
    assert "count: 2 kind: KIND_CPU" in (repo / "yolov8n_gate" / "config.pbtxt").read_text()
    python = render_repository(yolov8n_build, tmp_path / "python", target="gpu", precisions=("int8",),
                               preprocess="python", nms="python", postprocess_instances=3).path
    assert size_python_steps(python, cores=16) == {"yolov8n_preprocess": 14}
    assert "count: 3 kind: KIND_CPU" in (python / "yolov8n_postprocess" / "config.pbtxt").read_text()
    assert [instances_for(kind, 2) for kind in ("decode", "nms", "light")] == [1, 1, 1]
    assert [instances_for(kind, 64) for kind in ("decode", "nms", "light")] == [62, 16, 4]


def test_the_engines_step_sizes_the_python_steps_in_the_serving_images_bare_python(yolov8n_build, tmp_path):
    """deploy/build_engines.py (what compose and k8s run) with a bare interpreter: the standard library only."""
    import os
    import subprocess

    from packager.core.paths import DEPLOY_DIR

    repo = render_repository(yolov8n_build, tmp_path / "repo", target="gpu-ort", precisions=("fp16",)).path
    env = {**os.environ, "YQPACK_HOST_CORES": "32"}
    result = subprocess.run(["/usr/bin/python3", "-I", str(DEPLOY_DIR / "build_engines.py"), str(repo)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "python steps sized for 32 cores: yolov8n_postprocess x8, yolov8n_preprocess x30" in result.stdout
    assert "count: 30 kind: KIND_CPU" in (repo / "yolov8n_preprocess" / "config.pbtxt").read_text()


# -- the gate and the postprocess, served by tritonserver ---------------------------------------------------------
@pytest.fixture(scope="module")
def host_steps_server(yolov8n_build, server_env, tmp_path_factory):
    """The gpu repository's Python steps (gate, postprocess) as rendered, served alone on 127.0.0.1."""
    from packager.serve.embedded import LocalTritonServer, find_free_ports

    rendered = render_repository(yolov8n_build, tmp_path_factory.mktemp("gpu") / "repo", target="gpu",
                                 precisions=("int8",), max_pixels=4_000_000).path
    repo = tmp_path_factory.mktemp("host-steps") / "repo"
    for model in (gate_name("yolov8n"), "yolov8n_postprocess"):
        shutil.copytree(rendered / model, repo / model)
    ports = find_free_ports(3)
    server = LocalTritonServer(repo, server_env, grpc_port=ports[0], http_port=ports[1], metrics_port=ports[2],
                               log_path=tmp_path_factory.mktemp("log") / "tritonserver.log")
    with server:
        yield server, rendered


def _gate(client, images: list[bytes], parameters=None):
    tensor = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    return client.infer(gate_name("yolov8n"), [tensor], parameters=parameters).as_numpy("encoded")


@pytest.mark.slow
def test_bad_input_through_the_dali_path_is_a_per_request_invalid_argument(host_steps_server, sample_val):
    server, _ = host_steps_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    photo = sorted(sample_val[0].glob("*.jpg"))[0].read_bytes()
    refused = {
        "truncated JPEG": [photo[: len(photo) // 2]],
        "not an image": [b"hello"],
        "over the pixel budget": [_png(np.zeros((2100, 2000, 3), np.uint8))],
        "a format the DALI path does not serve": [cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))[1].tobytes()],
        "second image of two truncated": [photo, photo[:-2]],
    }
    for name, images in refused.items():
        with pytest.raises(InferenceServerException) as error:
            _gate(client, images)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT", (name, error.value)
        print(f"{name}: {error.value.message()}")
    for parameters in ({"iou_threshold": 0.5}, {"conf_threshold": 0.0}, {"max_det": 1001}, {"bogus": 1}):
        with pytest.raises(InferenceServerException) as error:
            _gate(client, [photo], parameters)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT", parameters
    # Good requests pass byte for byte; a shorter image of a batch is padded with zeros, which DALI ignores.
    small = _jpeg(_noise((40, 60, 3)))
    out = _gate(client, [photo, small], {"iou_threshold": 0.7, "multi_label": True, "conf_threshold": 0.001})
    assert out.shape == (2, len(photo)) and out.dtype == np.uint8
    assert out[0].tobytes() == photo and out[1, : len(small)].tobytes() == small and not out[1, len(small):].any()
    images, infos = dali_letterbox.DaliLetterbox(*SIZE, batch_size=2)([out[0].tobytes(), out[1].tobytes()])
    assert np.array_equal(infos[1], lb.preprocess_bytes(small, SIZE)[1].as_array())


@pytest.mark.slow
def test_served_postprocess_maps_in_graph_rows_like_the_python_path(host_steps_server, nms_inputs, sample_val):
    import onnxruntime as ort

    server, rendered = host_steps_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    graph = rendered / "yolov8n_int8_detector" / "1" / "model.onnx"  # the engine source: int8 + in-graph NMS
    files = sorted(sample_val[0].glob("*.jpg"))[:4]
    infos = np.stack([lb.preprocess_bytes(f.read_bytes(), SIZE)[1].as_array() for f in files])
    rows = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"images": nms_inputs[:4]})[0]
    for index in range(len(files)):
        detections = grpcclient.InferInput("detections", [1, *rows.shape[1:]], "FP32")
        detections.set_data_from_numpy(rows[index : index + 1])
        info = grpcclient.InferInput("letterbox_info", [1, 5], "FP32")
        info.set_data_from_numpy(infos[index : index + 1])
        for profile, thresholds in PROFILES.items():
            served = client.infer("yolov8n_postprocess", [detections, info], parameters={
                "conf_threshold": thresholds.conf, "iou_threshold": thresholds.iou, "max_det": thresholds.max_det,
                "multi_label": thresholds.multi_label}).as_numpy("DETECTIONS")[0]
            expected = pp.map_to_original(pp.select_in_graph(rows[index], profile, thresholds),
                                          lb.LetterboxInfo.from_array(infos[index]))
            np.testing.assert_array_equal(served, expected)
        with pytest.raises(InferenceServerException) as error:
            client.infer("yolov8n_postprocess", [detections, info], parameters={"iou_threshold": 0.6})
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "not compiled into" in error.value.message()
