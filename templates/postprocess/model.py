"""Served postprocess: raw head output + letterbox_info -> DETECTIONS (n, 6) in original image pixels.

Rendered into `<model>_postprocess/1/` next to flat copies of yqpack's own `postprocess.py` and `letterbox.py`:
the same decode + class-aware NMS (raw head) or end-to-end selection (NMS-free head, config parameter
yqpack_head_format) as local evaluation. Thresholds default to this model's config parameters and can be overridden
per request with the request parameters conf_threshold, iou_threshold, max_det and multi_label (for an end2end head
only conf_threshold and max_det apply), checked by the copied `request_params.py` (unknown names, wrong types and
max_det over 1000 are refused with INVALID_ARG, as the preprocess already did before decoding). A request with a
batch of b images gets DETECTIONS (b, max_n, 6), short rows padded with
score 0 and class_id -1 (one image per request, the documented use, never pads).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from letterbox import LetterboxInfo  # noqa: E402  (copied next to this file)
from postprocess import Thresholds, map_to_original, postprocess, select_in_graph  # noqa: E402
from request_params import compiled_nms_profile, parse_parameters  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.raw_name = config["input"][0]["name"]
        defaults = {key: value for key, value in params.items() if key in ("conf_threshold", "iou_threshold",
                                                                           "max_det", "multi_label")}
        self.defaults = Thresholds()._replace(**parse_parameters(defaults))
        self.head_format = params.get("yqpack_head_format", "raw")  # rendered from the build's ModelSpec.head
        # In-graph NMS (gpu target, export/nms_graph.py): the input is (profiles, k, 6) rows, not the raw head.
        self.nms = json.loads(params["in_graph_nms"]) if params.get("in_graph_nms") else None

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            thresholds = self.defaults._replace(**parse_parameters(json.loads(request.parameters() or "{}")))
            profile = compiled_nms_profile(thresholds, self.nms) if self.nms is not None else None
        except ValueError as error:
            return _error(f"postprocess: {error}", pb_utils.TritonError.INVALID_ARG)
        try:
            raw = pb_utils.get_input_tensor_by_name(request, self.raw_name).as_numpy()
            infos = pb_utils.get_input_tensor_by_name(request, "letterbox_info").as_numpy()
            if profile is not None:
                per_image = [map_to_original(select_in_graph(raw[index], profile, thresholds),
                                             LetterboxInfo.from_array(infos[index])) for index in range(len(raw))]
            else:
                per_image = [
                    postprocess(raw[index], LetterboxInfo.from_array(infos[index]), thresholds, self.head_format)
                    for index in range(len(raw))
                ]
        except Exception as error:  # noqa: BLE001  (any failure is this request's error, not the server's)
            return _error(f"postprocess: {error}", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("DETECTIONS", _stack(per_image))])


def _stack(per_image):
    if len(per_image) == 1:
        return per_image[0][None]
    rows = max(len(dets) for dets in per_image)
    out = np.zeros((len(per_image), rows, 6), dtype=np.float32)
    out[:, :, 5] = -1
    for index, dets in enumerate(per_image):
        out[index, : len(dets)] = dets
    return out


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
