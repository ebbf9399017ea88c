"""Served detector for the embedded server (`--target local`): onnxruntime or OpenVINO (CPU) in the Python backend.

The pytriton tritonserver has only the Python backend, so this model stands in for Triton's onnxruntime and
openvino backends: all requests of one dynamic batch run in one call. The runtime is the config parameter
`runtime` (openvino: real INT8 kernels, `precision_hint` f32 unless bf16 is asked for). yqpack's own `runtime.py`
and `letterbox.py` are copied beside this file, so served and local evaluation open models and normalise pixels
identically. Each request brings the model's float input or (from the ensemble) its letterboxed uint8 pixels.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from letterbox import normalize_into  # noqa: E402  (copied next to this file)
from runtime import RuntimeOptions, open_served_model  # noqa: E402

RUNTIME_LOG_TAG = "yqpack-runtime "  # packager/verify reads the JSON after it


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        options = RuntimeOptions(
            runtime=params.get("runtime", "onnxruntime"),
            precision_hint=params.get("precision_hint", "f32"),
            performance_hint=params.get("performance_hint", "LATENCY"),
            threads=int(params.get("intra_op_threads", "0")),
            # Beside the model, so it goes with the repository; OpenVINO keys entries by model and settings.
            cache_dir=params.get("cache_dir") or os.path.join(args["model_repository"], "openvino_cache"),
            # Spinning threads cost pre/post some CPU but save the detector its wake-up latency: measured on 2
            # cores, the ensemble keeps 81-93 % of in-process throughput with spinning vs 71-80 % without (README).
            allow_spinning=params.get("allow_spinning", "1") == "1",
            cpu_pinning=params.get("cpu_pinning", "true").strip().lower() == "true",
        )
        # An INT8 detector comes with its u8-activation twin and self-check images: the runtime picks the file this
        # CPU computes right and checks it against onnxruntime before serving (int8_cpu.py).
        self.model = open_served_model(version_dir, params.get("model_filename", "model.onnx"), options)
        for note in self.model.choice.notes:  # a fallback must be visible in the server log
            pb_utils.Logger.log_warn(f"{args['model_name']}: {note}")
        check = self.model.self_check
        if check is not None and check.passed:
            pb_utils.Logger.log_info(f"{args['model_name']}: {check.sentence()}")
        # One machine-readable line: `yqpack verify` reads what really runs (fallbacks included) from the server log.
        pb_utils.Logger.log_info(RUNTIME_LOG_TAG + json.dumps({
            "model": args["model_name"], "runtime": self.model.runtime, "label": self.model.label,
            "notes": list(self.model.choice.notes),
            "self_check": None if check is None else {"passed": check.passed, "distance": round(check.distance, 4),
                                                      "tolerance": check.tolerance, "images": check.images}}))
        # Pixels first: the ensemble's input; the float one is for clients of the bare detector.
        self.input_names = [tensor["name"] for tensor in config["input"]][::-1]
        self.output_name = config["output"][0]["name"]
        self.batch_buffer = np.empty((0,), dtype=np.float32)
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.model.label}, compiled in {self.model.compile_seconds:.2f} s"
        )

    def execute(self, requests):
        try:
            arrays = [self._input(request) for request in requests]
            # Borrowed: pb_utils.Tensor keeps a reference and the stub copies it into shared memory as soon as
            # execute() returns, before the next call can overwrite the runtime's output buffer.
            outputs = np.split(self.model.run_borrowed(self._float_batch(arrays)),
                               np.cumsum([len(x) for x in arrays])[:-1])
        except Exception as error:  # noqa: BLE001  (report to every request of the batch, keep serving)
            message = f"detector: {error}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)])
            for out in outputs
        ]

    def _input(self, request):
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                return tensor.as_numpy()
        # Triton itself refuses a request without inputs; this names the two if that ever changes.
        raise ValueError(f"a request needs one of the inputs {' or '.join(self.input_names)}")

    def _float_batch(self, arrays):
        """The requests' inputs as one float32 batch. One float request (a bare-detector client) goes to the
        runtime as it lies in shared memory; otherwise each is written into one reused buffer, pixels normalised
        on the way (the runtime reads the buffer before the next execute() writes it)."""
        if len(arrays) == 1 and arrays[0].dtype == np.float32:
            return arrays[0]
        shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
        size = int(np.prod(shape))
        if self.batch_buffer.size < size:
            self.batch_buffer = np.empty(size, dtype=np.float32)
        batch, start = self.batch_buffer[:size].reshape(shape), 0
        for array in arrays:
            part = batch[start : start + len(array)]
            if array.dtype == np.uint8:
                normalize_into(array, part)
            else:
                part[...] = array
            start += len(array)
        return batch
