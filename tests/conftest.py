"""Shared fixtures. Heavy artifacts (export + quantization, a running tritonserver) are built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from packager.assets import assets_dir


@pytest.fixture(scope="session")
def assets():
    root = assets_dir()
    if not (root / "weights" / "yolov8n.pt").is_file():
        pytest.fail(f"sample assets not found at {root}: set YQPACK_ASSETS")
    return root


# --- build ---

BUILD_CALIB_IMAGES = 64


@pytest.fixture(scope="session")
def yolov8n_build(assets, tmp_path_factory) -> Path:
    """A real yolov8n build (export + 64-image max calibration, preset mixed, FP16), made once per session.

    YQPACK_TEST_BUILD=<existing build dir> reuses a build instead (development only; the CI builds fresh).
    """
    from packager.pipeline import BuildOptions, run_build

    reuse = os.environ.get("YQPACK_TEST_BUILD")
    if reuse:
        build_dir = Path(reuse)
        if not (build_dir / "manifest.json").is_file():
            pytest.fail(f"YQPACK_TEST_BUILD={reuse} is not a build directory (no manifest.json)")
        return build_dir
    out = tmp_path_factory.mktemp("build") / "yolov8n"
    run_build(
        BuildOptions(
            model=assets / "weights" / "yolov8n.pt",
            out=out,
            calib_images=assets / "coco" / "calib2017",
            calib_size=BUILD_CALIB_IMAGES,
            show_progress=False,
        )
    )
    return out


# --- repository / server ---
@pytest.fixture(scope="session")
def server_env():
    """The real server env (nvidia-pytriton, numpy<2) under $YQPACK_HOME, created once and reused."""
    from packager.server_env import ensure_server_env

    return ensure_server_env()


@pytest.fixture(scope="session")
def model_repository(yolov8n_build, tmp_path_factory):
    """RepositoryResult of the `local` target rendered from the session build, precisions fp32, fp16, int8.

    `.path` is the repository folder, `.ensembles` maps precision -> ensemble model name.
    """
    from packager.repository import render_repository

    out = tmp_path_factory.mktemp("repository") / "model_repository"
    return render_repository(yolov8n_build, out, target="local", precisions=("fp32", "fp16", "int8"))


@pytest.fixture(scope="session")
def local_server(model_repository, server_env, tmp_path_factory):
    """A running LocalTritonServer serving `model_repository` on free 127.0.0.1 ports (grpc_url, http_url)."""
    from packager.serve import LocalTritonServer, find_free_ports

    grpc_port, http_port, metrics_port = find_free_ports(3)
    server = LocalTritonServer(
        model_repository.path,
        server_env,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_path=tmp_path_factory.mktemp("tritonserver") / "tritonserver.log",
    )
    with server:
        yield server


# --- verify ---


@pytest.fixture(scope="session")
def coco_ground_truth(assets):
    from packager.coco_eval import CocoGroundTruth

    return CocoGroundTruth(assets / "coco" / "annotations" / "instances_val2017_128.json")


@pytest.fixture(scope="session")
def coco_class_names(coco_ground_truth):
    """The 80 COCO names in YOLO class-id order (categories sorted by id), as Ultralytics' COCO models use."""
    categories = sorted(coco_ground_truth.coco.dataset["categories"], key=lambda cat: cat["id"])
    return [cat["name"] for cat in categories]


@pytest.fixture(scope="session")
def sample_val(assets):
    """(images folder, annotation file) of the 128 sample val images."""
    return assets / "coco" / "val2017", assets / "coco" / "annotations" / "instances_val2017_128.json"


@pytest.fixture(scope="session")
def served_verify(local_server, model_repository, yolov8n_build, sample_val, tmp_path_factory):
    """One real `run_verify` over the shared server: all 128 images, every precision, short load levels 1..16.

    Short levels (a few requests each) keep CI time down; the README benchmark uses the CLI defaults.
    """
    from packager.verify import VerifyOptions, run_verify

    images, annotations = sample_val
    options = VerifyOptions(
        images_dir=images,
        annotations=annotations,
        url=local_server.grpc_url,
        build_dir=yolov8n_build,
        report_dir=tmp_path_factory.mktemp("verify-report"),
        concurrency=(1, 2, 4, 8, 16),
        requests_per_level=16,
        warmup_requests=8,
        progress=False,
    )
    return run_verify(options)


@pytest.fixture(scope="session")
def onnx_eval_metrics(yolov8n_build, sample_val):
    """Local onnxruntime COCO eval (packager.onnx_eval) of the build's fp32, fp16 and int8-fp32 ONNX, once."""
    from packager.onnx_eval import evaluate_build

    images, annotations = sample_val
    return evaluate_build(yolov8n_build, images, annotations, variants=("fp32", "fp16", "int8-fp32"),
                          show_progress=False)


@pytest.fixture(scope="session")
def ultralytics_reference_metrics(assets, coco_ground_truth):
    """Ultralytics' own pipeline on the .pt model in torch (its LetterBox, square as served; its multi-label NMS
    with the validator's settings; its scale_boxes), scored with pycocotools on the same 128 images."""
    import cv2
    import numpy as np
    import torch

    from packager.assets import ultralytics_offline_env
    from packager.coco_eval import evaluate
    from packager.postprocess import EVAL_THRESHOLDS

    ultralytics_offline_env()
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    yolo = YOLO(str(assets / "weights" / "yolov8n.pt"))
    model = yolo.model.float().fuse().eval()
    letterbox = LetterBox(new_shape=(640, 640), auto=False)
    detections = {}
    with torch.no_grad():
        for path in coco_ground_truth.image_files(assets / "coco" / "val2017"):
            image = cv2.imread(str(path))
            x = torch.from_numpy(np.ascontiguousarray(letterbox(image=image)[:, :, ::-1].transpose(2, 0, 1)))
            prediction = model(x[None].float() / 255.0)
            prediction = prediction[0] if isinstance(prediction, (list, tuple)) else prediction
            det = non_max_suppression(
                prediction, EVAL_THRESHOLDS.conf, EVAL_THRESHOLDS.iou, multi_label=True, max_det=EVAL_THRESHOLDS.max_det
            )[0]
            det[:, :4] = scale_boxes((640, 640), det[:, :4], image.shape[:2])
            detections[path.name] = det.numpy()
    return evaluate(detections, coco_ground_truth, [yolo.names[i] for i in sorted(yolo.names)])
