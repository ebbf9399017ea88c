"""Served preprocess: encoded image bytes -> letterboxed detector input + letterbox_info.

The output `images` is what the config declares: FP32 in [0, 1] for a Triton backend detector, or UINT8 pixels
(a quarter of the bytes through shared memory) for the local target's Python detector, which normalises them.

Rendered into `<model>_preprocess/1/` next to flat copies of yqpack's own `letterbox.py`, `image_header.py` and
`request_params.py`, so the server letterboxes exactly as calibration and local evaluation do. A bad image or
bad request parameter fails only its own request, with INVALID_ARG, before anything expensive: parameters are
checked first, then each image's header against the pixel budget (config parameter max_pixels), then decoding
(config parameter reject_corrupt: refuse JPEG data libjpeg reports as corrupt).
"""

import json
import os
import sys

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from letterbox import DEFAULT_MAX_PIXELS, decode_image, letterbox_chw_into  # noqa: E402  (copied here)
from request_params import parse_parameters  # noqa: E402

_TRUE = {"1", "true", "yes", "on"}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.size = (int(params["height"]), int(params["width"]))
        self.dtype = pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, "images")["data_type"])
        self.max_pixels = int(params.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.reject_corrupt = params.get("reject_corrupt", "true").strip().lower() in _TRUE
        # One thread: the detector owns the cores; cv2's own pool would only fight it for them.
        cv2.setNumThreads(1)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            parse_parameters(json.loads(request.parameters() or "{}"))
            encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        except ValueError as error:
            return _error(f"preprocess: {error}", pb_utils.TritonError.INVALID_ARG)
        images = np.empty((len(encoded), 3, *self.size), dtype=self.dtype)
        infos = np.empty((len(encoded), 5), dtype=np.float32)
        for index, data in enumerate(encoded):
            try:
                image = decode_image(_as_bytes(data), self.max_pixels, self.reject_corrupt)
                # Straight into this image's slot of the output batch: no padded copy, no second buffer.
                info = letterbox_chw_into(image, images[index])
            except ValueError as error:
                where = f"image {index + 1} of {len(encoded)}: " if len(encoded) > 1 else ""
                return _error(f"preprocess: {where}{error}", pb_utils.TritonError.INVALID_ARG)
            except Exception as error:  # noqa: BLE001  (any failure is this request's error, not the server's)
                return _error(f"preprocess: image {index + 1} of {len(encoded)}: {error}", pb_utils.TritonError.INTERNAL)
            infos[index] = info.as_array()
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("images", images), pb_utils.Tensor("letterbox_info", infos)]
        )


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _as_bytes(data):
    # BYTES tensors arrive as numpy object arrays of `bytes`; a str would mean the client sent text.
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray):
        return data.tobytes()
    raise ValueError(f"IMAGE must hold encoded image bytes, got {type(data).__name__}")
