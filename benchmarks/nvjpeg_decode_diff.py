"""On a GPU host: how far nvJPEG's decode (what the served DALI preprocess uses) is from OpenCV's libjpeg-turbo
(what calibration and the Python path use), in pixels and in detections.

Decodes each JPEG with torchvision.io.decode_jpeg on the GPU (nvJPEG) and with cv2.imdecode, letterboxes both with
yqpack's letterbox.py, runs the FP32 ONNX (onnxruntime) and yqpack's NMS at the eval thresholds, and writes
{"pixels": ..., "detections": {"opencv": {file: rows}, "nvjpeg": {...}}} for scoring elsewhere
(pycocotools needs the annotations). Also times the GPU decode and its host CPU per image (batches of 32).

    python3 benchmarks/nvjpeg_decode_diff.py IMAGES_DIR MODEL.onnx OUT.json [MODULES_DIR]
MODULES_DIR: a folder with copies of packager/inference/{letterbox,postprocess,image_header}.py (default: this
checkout's packager/inference).
"""

import argparse
import json
import sys
import time
from pathlib import Path

INFERENCE = Path(__file__).resolve().parent.parent / "packager" / "inference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("model", help="the build's FP32 ONNX")
    parser.add_argument("out", type=Path, help="JSON written here")
    parser.add_argument("modules_dir", nargs="?", default=str(INFERENCE),
                        help="copies of packager/inference/{letterbox,postprocess,image_header}.py")
    args = parser.parse_args()
    # GPU-side imports after the options: --help works on a machine without CUDA.
    import cv2
    import numpy as np
    import onnxruntime as ort
    import torch
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    sys.path.insert(0, args.modules_dir)
    import letterbox as lb
    import postprocess as pp

    images_dir, model, out = args.images_dir, args.model, args.out

    files = sorted(images_dir.glob("*.jpg"))
    encoded = [f.read_bytes() for f in files]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    decode_jpeg(tensors[:4], mode=ImageReadMode.RGB, device="cuda")  # warm-up: nvJPEG handles, CUDA context
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    gpu_images = []
    for start in range(0, len(tensors), 32):
        gpu_images += decode_jpeg(tensors[start : start + 32], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    levels, detections = [], {"opencv": {}, "nvjpeg": {}}
    for index, path in enumerate(files):
        reference = lb.decode_image(encoded[index])  # BGR
        nvjpeg = gpu_images[index].permute(1, 2, 0).cpu().numpy()[:, :, ::-1].copy()  # RGB CHW -> BGR HWC
        assert nvjpeg.shape == reference.shape, (path.name, nvjpeg.shape, reference.shape)
        levels.append(np.abs(nvjpeg.astype(np.int16) - reference.astype(np.int16)))
        for name, image in (("opencv", reference), ("nvjpeg", nvjpeg)):
            tensor, info = lb.preprocess(image)
            head = session.run(None, {"images": tensor[None]})[0][0]
            detections[name][path.name] = pp.postprocess(head, info, pp.EVAL_THRESHOLDS).tolist()
    flat = np.concatenate([level.reshape(-1) for level in levels])
    report = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "opencv": cv2.__version__, "images": len(files),
        "pixels": {"max_level_diff": int(flat.max()), "mean_level_diff": float(flat.mean()),
                   "share_differing": float((flat > 0).mean()), "share_over_2_levels": float((flat > 2).mean()),
                   "per_image_max": [int(level.max()) for level in levels]},
        "gpu_decode": {"images_per_s": len(files) / wall, "host_cpu_ms_per_image": 1e3 * cpu / len(files)},
        "detections": detections,
    }
    out.write_text(json.dumps(report))
    print(json.dumps({k: v for k, v in report.items() if k != "detections"}, indent=1))


if __name__ == "__main__":
    main()
