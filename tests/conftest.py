"""Shared fixtures. Heavy artifacts (export + quantization, a running tritonserver) are built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from packager.core.paths import assets_dir


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
    from packager.pipeline.run import BuildOptions, run_build

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
    from packager.serve.server_env import ensure_server_env

    return ensure_server_env()


@pytest.fixture(scope="session")
def model_repository(yolov8n_build, tmp_path_factory):
    """RepositoryResult of the `local` target rendered from the session build, precisions fp32, fp16, int8.

    `.path` is the repository folder, `.ensembles` maps precision -> ensemble model name.
    """
    from packager.repository.render import render_repository

    out = tmp_path_factory.mktemp("repository") / "model_repository"
    return render_repository(yolov8n_build, out, target="local", precisions=("fp32", "fp16", "int8"))


@pytest.fixture(scope="session")
def local_server(model_repository, server_env, tmp_path_factory):
    """A running LocalTritonServer serving `model_repository` on free 127.0.0.1 ports (grpc_url, http_url)."""
    from packager.serve.embedded import LocalTritonServer, find_free_ports

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
    from packager.metrics.coco_eval import CocoGroundTruth

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
    from packager.verify.run import VerifyOptions, run_verify

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
        server_log=local_server.log_path,  # no yqpack serve record names this server's log
    )
    return run_verify(options)


@pytest.fixture(scope="session")
def onnx_eval_metrics(yolov8n_build, sample_val):
    """Local onnxruntime COCO eval (packager.evaluate.onnx_eval) of the build's fp32, fp16 and int8-fp32 ONNX, once."""
    from packager.evaluate.onnx_eval import evaluate_build

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

    from packager.core.paths import ultralytics_offline_env
    from packager.metrics.coco_eval import evaluate
    from packager.inference.postprocess import EVAL_THRESHOLDS

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


# --- S3 (a real S3-compatible server on 127.0.0.1: moto's, with IAM authentication on) ---


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on a free 127.0.0.1 port that checks credentials; bucket `models`.

    Yields packager-independent facts: endpoint, access key, secret key, bucket. Stopped (its own pid) at the end.
    """
    import json
    import socket
    import subprocess
    import sys
    import time

    try:
        import boto3
        import moto  # noqa: F401
    except ImportError as error:
        pytest.fail(f"{error}: install the test extras (pip install -e .[test]) for the S3 tests")
    from packager.serve.embedded import find_free_ports

    port = find_free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # INITIAL_NO_AUTH_ACTION_COUNT: the first 3 requests (creating the user, its policy and key) need no
    # credentials; every later one is authenticated against moto's IAM, so a wrong key is refused as on AWS.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:  # a bare TCP connect: an HTTP request could use up one of the unauthenticated actions
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1",
                     "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anonymous)
        iam.create_user(UserName="yqpack")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="yqpack", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="yqpack")["AccessKey"]
        server = {"endpoint": endpoint, "port": port, "access_key": key["AccessKeyId"],
                  "secret_key": key["SecretAccessKey"], "bucket": "models", "region": "us-east-1"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=server["access_key"],
                     aws_secret_access_key=server["secret_key"]).create_bucket(Bucket="models")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """The valid credentials of `s3_server` in the environment, as a user sets them (no endpoint variable)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server["region"])
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # a developer's ~/.aws must not leak in
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return s3_server
