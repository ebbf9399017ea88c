"""Served gate of the DALI preprocess: encoded image bytes (BYTES) -> the same bytes as UINT8, checked first.

Triton's dali backend fails every request of a batch with UNKNOWN when one image cannot be decoded, and it takes
no BYTES tensors, so this Python model stands in front of it and decodes nothing: it checks the request
parameters (request_params.py; with an in-graph NMS also that the detector compiled in what they ask for), then
per image its header against the pixel budget (config parameter max_pixels) and that a JPEG/PNG is complete
(image_header.check_complete: what DALI's decoders refuse), and answers INVALID_ARG naming the image otherwise.
A request of b images gets `encoded` (b, longest), shorter ones padded with zeros (decoders stop at their end
marker). Rendered into `<model>_gate/1/` next to flat copies of image_header.py and request_params.py.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_header import ImageHeaderError, check_complete, read_header  # noqa: E402  (copied here)
from request_params import compiled_nms_profile, parse_parameters  # noqa: E402

_DEFAULT_MAX_PIXELS = 50_000_000


class _Thresholds:
    """The fields request_params.compiled_nms_profile reads (postprocess.Thresholds without numpy's module)."""

    def __init__(self, conf=0.25, iou=0.45, max_det=100, multi_label=False):
        self.conf, self.iou, self.max_det, self.multi_label = conf, iou, max_det, multi_label


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.max_pixels = int(params.get("max_pixels", _DEFAULT_MAX_PIXELS))
        self.nms = json.loads(params["in_graph_nms"]) if params.get("in_graph_nms") else None
        defaults = {key: params[key] for key in ("conf_threshold", "iou_threshold", "max_det", "multi_label")
                    if key in params}
        self.defaults = parse_parameters(defaults)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            fields = parse_parameters(json.loads(request.parameters() or "{}"))
            if self.nms is not None:
                compiled_nms_profile(_Thresholds(**{**self.defaults, **fields}), self.nms)
            encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        except ValueError as error:
            return _error(f"preprocess: {error}", pb_utils.TritonError.INVALID_ARG)
        images = []
        for index, data in enumerate(encoded):
            try:
                data = _as_bytes(data)
                if not data:
                    raise ValueError("empty image bytes")
                header = read_header(data)
                if header.pixels > self.max_pixels:
                    raise ValueError(f"{header.format} of {header.width}x{header.height} = "
                                     f"{header.pixels / 1e6:.1f} MP is over the {self.max_pixels / 1e6:g} MP pixel "
                                     "budget (preprocess parameter max_pixels)")
                check_complete(data, header)
            except (ValueError, ImageHeaderError) as error:
                where = f"image {index + 1} of {len(encoded)}: " if len(encoded) > 1 else ""
                return _error(f"preprocess: {where}{error}", pb_utils.TritonError.INVALID_ARG)
            images.append(data)
        out = np.zeros((len(images), max(len(data) for data in images)), dtype=np.uint8)
        for index, data in enumerate(images):
            out[index, : len(data)] = np.frombuffer(data, dtype=np.uint8)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("encoded", out)])


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _as_bytes(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray):
        return data.tobytes()
    raise ValueError(f"IMAGE must hold encoded image bytes, got {type(data).__name__}")
