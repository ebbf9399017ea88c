"""Served preprocess: encoded image bytes -> letterboxed detector input + letterbox_info.

Rendered into `<model>_preprocess/1/` next to a flat copy of yqpack's own `letterbox.py`, so the server
letterboxes exactly as calibration and local evaluation do. A bad image fails only its own request.
"""

import json
import os
import sys

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from letterbox import decode_image, letterbox, to_chw_float  # noqa: E402  (copied next to this file)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.size = (int(params["height"]), int(params["width"]))
        # One thread: the detector owns the cores; cv2's own pool would only fight it for them.
        cv2.setNumThreads(1)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            images = np.empty((len(encoded), 3, *self.size), dtype=np.float32)
            infos = np.empty((len(encoded), 5), dtype=np.float32)
            for index, data in enumerate(encoded):
                boxed, info = letterbox(decode_image(_as_bytes(data)), self.size)
                to_chw_float(boxed, out=images[index])
                infos[index] = info.as_array()
        except Exception as error:  # noqa: BLE001  (any failure is this request's error, not the server's)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess: {error}"))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("images", images), pb_utils.Tensor("letterbox_info", infos)]
        )


def _as_bytes(data):
    # BYTES tensors arrive as numpy object arrays of `bytes`; a str would mean the client sent text.
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray):
        return data.tobytes()
    raise ValueError(f"IMAGE must hold encoded image bytes, got {type(data).__name__}")
