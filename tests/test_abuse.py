"""Issue 12: hostile or careless requests against the real tritonserver are refused cheaply, as client errors.

Every probe of the issue is replayed against the served `local` repository over gRPC (tritonclient) and HTTP
(plain urllib with Triton's binary-data extension); the header reader is checked against OpenCV's decoder.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from packager.inference.image_header import ImageHeaderError, read_header
from packager.inference.letterbox import ImageRejected, decode_image
from packager.inference.request_params import ACCEPTED, MAX_DET_LIMIT, ParameterError, parse_parameters

ACCEPTED_LIST = ", ".join(ACCEPTED)


# -- header reader against OpenCV -------------------------------------------------------------------------------
def _encodings(image: np.ndarray) -> dict[str, bytes]:
    def enc(ext, *params):
        ok, data = cv2.imencode(ext, image, list(params))
        assert ok, ext
        return data.tobytes()

    return {
        "jpeg": enc(".jpg"),
        "progressive jpeg": enc(".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "png": enc(".png"),
        "bmp": enc(".bmp"),
        "webp lossy": enc(".webp", cv2.IMWRITE_WEBP_QUALITY, 80),
        "webp lossless": enc(".webp", cv2.IMWRITE_WEBP_QUALITY, 101),
        "tiff": enc(".tiff"),
        "ppm": enc(".ppm"),
        "pgm": cv2.imencode(".pgm", image[:, :, 0])[1].tobytes(),
    }


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (1, 3000), (480, 640)])
def test_header_size_equals_the_decoded_size(shape):
    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    for name, data in _encodings(image).items():
        header = read_header(data)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert (header.height, header.width) == decoded.shape[:2], name


def test_header_of_garbage_and_broken_headers_is_a_client_error():
    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    for data in [b"hello world", b"GIF89a" + bytes(20), png[:20], b"\xff\xd8\xff" + bytes(10)]:
        with pytest.raises(ImageHeaderError):
            read_header(data)


def test_pixel_budget_is_checked_before_decoding():
    bomb = cv2.imencode(".png", np.zeros((20000, 20000), np.uint8))[1].tobytes()  # 400 MP in ~400 KB
    assert read_header(bomb).pixels == 400_000_000
    with pytest.raises(ImageRejected, match=r"20000x20000 = 400.0 MP is over the 50 MP pixel budget"):
        decode_image(bomb, max_pixels=50_000_000)
    small = cv2.imencode(".png", np.zeros((100, 100), np.uint8))[1].tobytes()
    assert decode_image(small, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageRejected, match="over the 0.009999 MP"):
        decode_image(small, max_pixels=9_999)


def _corrupt(jpeg: bytes, count: int = 2000) -> bytes:
    data = bytearray(jpeg)
    middle = len(data) // 2
    data[middle : middle + count] = np.random.default_rng(1).integers(0, 256, count, dtype=np.uint8).tobytes()
    return bytes(data)


def test_corrupt_jpeg_is_refused_only_when_asked(sample_jpeg):
    corrupt = _corrupt(sample_jpeg)
    assert decode_image(corrupt).shape[2] == 3  # the default of the library: decoded, partly grey
    with pytest.raises(ImageRejected, match="corrupt image data .*Corrupt JPEG data"):
        decode_image(corrupt, reject_corrupt=True)
    assert decode_image(sample_jpeg, reject_corrupt=True).shape == decode_image(sample_jpeg).shape


def test_request_parameters_are_strict():
    assert parse_parameters({"conf_threshold": "0.5", "max_det": 1000.0, "multi_label": "true"}) == {
        "conf": 0.5, "max_det": 1000, "multi_label": True}
    assert parse_parameters({"multi_label": 0}) == {"multi_label": False}
    bad = [{"conf": 0.5}, {"multi_label": 5}, {"conf_threshold": True}, {"max_det": MAX_DET_LIMIT + 1},
           {"max_det": 1e9}, {"iou_threshold": float("nan")}, {"max_det": 2.5}, {"iou_threshold": -0.1}]
    for values in bad:
        with pytest.raises(ParameterError):
            parse_parameters(values)
    with pytest.raises(ParameterError, match=f"unknown request parameter.*conf; accepted: {ACCEPTED_LIST}"):
        parse_parameters({"conf": 0.5})


# -- against the real server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_jpeg(assets):
    return sorted((assets / "coco" / "val2017").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def client(local_server):
    with grpcclient.InferenceServerClient(local_server.grpc_url) as triton:
        yield triton


@pytest.fixture(scope="module")
def ensemble(model_repository):
    return model_repository.ensembles["fp32"]


def _inputs(*images: bytes):
    tensor = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
    return [tensor]


def _refused(client, ensemble, images, parameters=None) -> str:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(ensemble, _inputs(*images), parameters=parameters)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    return caught.value.message()


def _http_infer(server, model: str, images: list[bytes], parameters: dict | None = None) -> tuple[int, dict]:
    blob = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header = {"inputs": [{"name": "IMAGE", "shape": [len(images), 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(blob)}}]}
    if parameters:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    request = urllib.request.Request(f"{server.http_url}/v2/models/{model}/infer", data=head + blob,
                                     headers={"Inference-Header-Content-Length": str(len(head))})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_pixel_bomb_is_refused_and_a_good_request_still_answers(client, ensemble, sample_jpeg):
    bomb = cv2.imencode(".png", np.zeros((20000, 20000), np.uint8))[1].tobytes()
    message = _refused(client, ensemble, [bomb])
    assert "PNG of 20000x20000 = 400.0 MP is over the 50 MP pixel budget" in message
    message = _refused(client, ensemble, [sample_jpeg] * 3 + [bomb] * 5)
    assert "image 4 of 8: PNG of 20000x20000" in message
    assert client.infer(ensemble, _inputs(sample_jpeg)).as_numpy("DETECTIONS").shape[2] == 6


@pytest.mark.slow
def test_unbounded_and_unknown_parameters_are_refused(client, ensemble, sample_jpeg):
    unbounded = {"conf_threshold": 0.0, "iou_threshold": 1.0, "max_det": int(1e9), "multi_label": True}
    assert "max_det must be an integer from 1 to 1000" in _refused(client, ensemble, [sample_jpeg], unbounded)
    for parameters, expected in [
        ({"conf": 0.5}, f"unknown request parameter(s) conf; accepted: {ACCEPTED_LIST}"),
        ({"multi_label": 5}, "multi_label must be true or false"),
        ({"conf_threshold": True}, "conf_threshold must be a number, got the boolean True"),
    ]:
        assert expected in _refused(client, ensemble, [sample_jpeg], parameters)
    # the largest accepted max_det with everything let through: answered, at most MAX_DET_LIMIT rows
    result = client.infer(ensemble, _inputs(sample_jpeg), parameters={**unbounded, "max_det": MAX_DET_LIMIT})
    assert result.as_numpy("DETECTIONS").shape == (1, MAX_DET_LIMIT, 6)


@pytest.mark.slow
def test_garbage_is_a_client_error_naming_the_image(client, ensemble, sample_jpeg):
    assert "not an image of an accepted format" in _refused(client, ensemble, [b"hello world"])
    message = _refused(client, ensemble, [sample_jpeg, b"\xff\xd8\xff\xe0garbage"])
    assert "preprocess: image 2 of 2: broken JPEG header" in message


@pytest.mark.slow
def test_corrupt_jpeg_is_refused_by_default(client, ensemble, sample_jpeg):
    assert "Corrupt JPEG data" in _refused(client, ensemble, [_corrupt(sample_jpeg)])
    truncated = _refused(client, ensemble, [sample_jpeg[: len(sample_jpeg) // 2]])
    assert "Premature end of JPEG file" in truncated or "could not decode" in truncated


@pytest.mark.slow
def test_http_answers_400_for_client_errors_and_200_for_good_requests(local_server, ensemble, sample_jpeg):
    status, body = _http_infer(local_server, ensemble, [b"garbage"])
    assert status == 400 and "not an image of an accepted format" in body["error"]
    status, body = _http_infer(local_server, ensemble, [sample_jpeg], {"max_det": 5000})
    assert status == 400 and "max_det must be an integer from 1 to 1000" in body["error"]
    # reserved names the HTTP frontend consumes itself never reach the models as unknown parameters
    status, body = _http_infer(local_server, ensemble, [sample_jpeg], {"priority": 1, "max_det": 3})
    assert status == 200 and body["outputs"][0]["shape"][0] == 1 and body["outputs"][0]["shape"][1] <= 3, body


# -- names ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_name", ["../../x", "yolo'v8", "my model", 'a"b', ".."])
def test_model_names_outside_the_safe_set_are_refused_at_render(yolov8n_build, tmp_path, bad_name):
    from packager.repository.render import render_repository

    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    for artifact in manifest["artifacts"].values():  # absolute paths: the copied manifest still finds the files
        artifact["path"] = str((yolov8n_build / artifact["path"]).resolve())
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({**manifest, "model_name": bad_name}))
    with pytest.raises(ValueError, match="must use only letters, digits"):
        render_repository(build, tmp_path / "repo", precisions=("fp32",))
    assert not (tmp_path / "repo").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_admin_apis_need_the_servers_admin_key(local_server, client):
    from packager.serve.embedded import ADMIN_HEADER

    for call in (client.get_log_settings, client.get_system_shared_memory_status):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
        # Triton prefixes the gRPC header name with triton-grpc-protocol-
        assert call(headers={f"triton-grpc-protocol-{ADMIN_HEADER}": local_server.admin_key}) is not None
    request = urllib.request.Request(f"{local_server.http_url}/v2/logging")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=10)
    request.add_header(ADMIN_HEADER, local_server.admin_key)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert client.is_server_ready() and client.get_model_repository_index() is not None  # verify's calls stay open


# -- NMS cost -----------------------------------------------------------------------------------------------------
def _greedy_reference(boxes, scores, iou_threshold, max_keep):
    """One greedy sweep over every candidate (the NMS before blocks), to compare with."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep = []
    while order.size and len(keep) < max_keep:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter = ((np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])).clip(0)
                 * (np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])).clip(0))
        order = rest[inter / (areas[best] + areas[rest] - inter + 1e-7) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


@pytest.mark.parametrize("count, iou, max_keep", [(5000, 0.45, 100), (5000, 0.0, 1000), (3000, 0.99, 1000),
                                                 (30000, 0.7, 300), (2500, 1.0, 1000), (10, 0.5, 1000)])
def test_block_nms_keeps_exactly_what_one_greedy_sweep_keeps(count, iou, max_keep):
    from packager.inference.postprocess import nms

    rng = np.random.default_rng(count)
    xy = rng.uniform(0, 600, (count, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 80, (count, 2)).astype(np.float32)], axis=1)
    scores = rng.choice(np.linspace(0, 1, 500, dtype=np.float32), count)  # ties too
    np.testing.assert_array_equal(nms(boxes, scores, iou, max_keep), _greedy_reference(boxes, scores, iou, max_keep))


@pytest.mark.parametrize("levels", [3, 50, 100000])
def test_top_candidates_equal_a_stable_sort(levels):
    from packager.inference.postprocess import top_candidates

    scores = np.random.default_rng(levels).integers(0, levels, 70000).astype(np.float32) / levels
    for count in (1, 30000, 69999):
        expected = np.argsort(-scores, kind="stable")[:count]
        np.testing.assert_array_equal(top_candidates(scores, count), expected)
