"""`yqpack push` against a real S3-compatible server (moto, IAM auth on) and tritonserver loading the repository
from it: s3://127.0.0.1:PORT/bucket/prefix, credentials through the environment, one verify run over the ensemble."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner

from packager.cli.main import main
from packager.core.contracts import ConfigError, S3Error, ServerError
from packager.serve.s3_push import (
    PLACEHOLDER_NAME,
    S3Location,
    local_objects,
    push_repository,
    triton_s3_repository,
    verify_pushed,
)
from packager.core.repository_index import REPOSITORY_INDEX
from packager.repository.render import render_repository
from packager.serve.embedded import LocalTritonServer, find_free_ports
from packager.serve.records import read_state


@pytest.fixture(scope="module")
def fp32_repository(yolov8n_build, tmp_path_factory) -> Path:
    """The `local` target, fp32 only (one ensemble keeps the served round trip short)."""
    out = tmp_path_factory.mktemp("s3-repository") / "model_repository"
    return render_repository(yolov8n_build, out, target="local", precisions=("fp32",)).path


@pytest.fixture
def repository_copy(fp32_repository, tmp_path) -> Path:
    return Path(shutil.copytree(fp32_repository, tmp_path / "model_repository"))


def _s3(server: dict, secret: str | None = None):
    return boto3.client("s3", endpoint_url=server["endpoint"], region_name=server["region"],
                        aws_access_key_id=server["access_key"], aws_secret_access_key=secret or server["secret_key"])


def _keys(server: dict, prefix: str) -> dict[str, int]:
    listing = _s3(server).list_objects_v2(Bucket=server["bucket"], Prefix=prefix + "/")
    return {entry["Key"][len(prefix) + 1:]: entry["Size"] for entry in listing.get("Contents", [])}


# -- the objects a repository becomes ---------------------------------------------------------------------------
def test_every_file_and_a_placeholder_per_empty_folder(fp32_repository):
    objects = {o.relative: o for o in local_objects(fp32_repository)}
    files = {p.relative_to(fp32_repository).as_posix() for p in fp32_repository.rglob("*") if p.is_file()}
    placeholders = {k for k, o in objects.items() if o.source is None}
    assert set(objects) - placeholders == files
    # The ensemble's version folder is the only empty one; Triton refuses the ensemble without it.
    assert placeholders == {f"yolov8n_fp32/1/{PLACEHOLDER_NAME}"}
    assert not any("__pycache__" in k for k in objects)


# -- push -------------------------------------------------------------------------------------------------------
def test_push_lands_verified_then_skips_unchanged_objects(aws_env, repository_copy):
    server = aws_env
    first = push_repository(repository_copy, f"s3://{server['bucket']}/idempotent/v1", server["endpoint"])
    assert first.uploaded == len(first.objects) and first.unchanged == 0
    landed = _keys(server, "idempotent/v1")
    assert landed == {Path(o.key).relative_to("idempotent/v1").as_posix(): o.size for o in first.objects}
    info = _s3(server).get_object(Bucket=server["bucket"], Key=f"idempotent/v1/{REPOSITORY_INDEX}")["Body"].read()
    assert info == (repository_copy / REPOSITORY_INDEX).read_bytes()

    second = push_repository(repository_copy, f"s3://{server['bucket']}/idempotent/v1", server["endpoint"])
    assert second.uploaded == 0 and second.unchanged == len(first.objects)

    labels = repository_copy / "yolov8n_fp32" / "labels.txt"
    labels.write_text(labels.read_text().replace("person", "human"))
    third = push_repository(repository_copy, f"s3://{server['bucket']}/idempotent/v1", server["endpoint"])
    assert [o.key for o in third.objects if o.status == "uploaded"] == ["idempotent/v1/yolov8n_fp32/labels.txt"]


def test_stale_objects_are_reported_and_deleted_on_request(aws_env, repository_copy):
    server = aws_env
    destination = f"s3://{server['bucket']}/stale"
    push_repository(repository_copy, destination, server["endpoint"])
    _s3(server).put_object(Bucket=server["bucket"], Key="stale/old_model/config.pbtxt", Body=b"name: 'old'\n")
    kept = push_repository(repository_copy, destination, server["endpoint"])
    assert kept.stale == ["stale/old_model/config.pbtxt"] and kept.deleted == []
    removed = push_repository(repository_copy, destination, server["endpoint"], delete_stale=True)
    assert removed.deleted == ["stale/old_model/config.pbtxt"] and removed.stale == []
    assert "old_model/config.pbtxt" not in _keys(server, "stale")


def test_verification_catches_an_object_changed_in_the_store(aws_env, repository_copy):
    server = aws_env
    result = push_repository(repository_copy, f"s3://{server['bucket']}/tampered", server["endpoint"])
    target = next(o for o in result.objects if o.key.endswith("yolov8n_fp32/labels.txt"))
    body = (repository_copy / "yolov8n_fp32" / "labels.txt").read_bytes()
    _s3(server).put_object(Bucket=server["bucket"], Key=target.key, Body=body.replace(b"person", b"persoN"))
    with pytest.raises(S3Error, match="yolov8n_fp32/labels.txt: the MD5"):
        verify_pushed(_s3(server), S3Location.parse(f"s3://{server['bucket']}/tampered"), result.objects)
    # A push repairs it: the size matches but the recorded hash does not, so it is uploaded again.
    again = push_repository(repository_copy, f"s3://{server['bucket']}/tampered", server["endpoint"])
    assert [o.key for o in again.objects if o.status == "uploaded"] == [target.key]


def test_cli_push_reports_uploads_then_nothing_changed(aws_env, repository_copy):
    server = aws_env
    args = ["push", "--repository", str(repository_copy), "--to", f"s3://{server['bucket']}/cli",
            "--endpoint-url", server["endpoint"]]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "uploaded" in first.output and "sizes and hashes verified" in first.output
    assert f"s3://127.0.0.1:{server['port']}/{server['bucket']}/cli" in first.output  # what to serve
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and "0 uploaded" in second.output and "already up to date" in second.output


# -- bad input ----------------------------------------------------------------------------------------------------
def test_wrong_secret_key_is_a_clear_error(aws_env, repository_copy, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(S3Error, match="SignatureDoesNotMatch: the secret key is wrong"):
        push_repository(repository_copy, f"s3://{aws_env['bucket']}/denied", aws_env["endpoint"])


def test_unknown_access_key_is_a_clear_error_in_the_cli(aws_env, repository_copy, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    result = CliRunner().invoke(main, ["push", "--repository", str(repository_copy), "--to",
                                       f"s3://{aws_env['bucket']}/denied", "--endpoint-url", aws_env["endpoint"]])
    assert result.exit_code == 1 and "InvalidAccessKeyId" in result.output and "AWS_ACCESS_KEY_ID" in result.output


def test_missing_bucket_is_a_clear_error(aws_env, repository_copy):
    with pytest.raises(S3Error, match="bucket does not exist"):
        push_repository(repository_copy, "s3://no-such-bucket/x", aws_env["endpoint"])


def test_unreachable_endpoint_is_a_clear_error(aws_env, repository_copy):
    closed = find_free_ports(1)[0]  # nothing listens there
    with pytest.raises(S3Error, match=f"cannot reach s3://models/x .*127.0.0.1:{closed}"):
        push_repository(repository_copy, "s3://models/x", f"http://127.0.0.1:{closed}")


def test_a_repository_without_ensembles_is_refused(repository_copy):
    info_path = repository_copy / REPOSITORY_INDEX
    info = json.loads(info_path.read_text())
    info["models"] = [m for m in info["models"] if m["role"] != "ensemble"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="no ensembles"):
        push_repository(repository_copy, "s3://models/x", "http://127.0.0.1:9")
    info_path.unlink()
    result = CliRunner().invoke(main, ["push", "--repository", str(repository_copy), "--to", "s3://models/x"])
    assert result.exit_code == 1 and "is not a yqpack model repository" in result.output


@pytest.mark.parametrize("url", ["models/x", "http://models/x", "s3://", "s3://127.0.0.1:9000/models/x"])
def test_malformed_destinations_are_refused(repository_copy, url):
    with pytest.raises(S3Error, match="s3://BUCKET/PREFIX"):
        push_repository(repository_copy, url, "http://127.0.0.1:9")


def test_unknown_option_is_refused():
    result = CliRunner().invoke(main, ["push", "--to", "s3://models/x", "--bucket", "models"])
    assert result.exit_code == 2 and "No such option" in result.output and "--bucket" in result.output


# -- Triton's form of an S3 repository -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, environ, expected",
    [
        ("s3://models/yq/v1", {}, "s3://models/yq/v1"),
        ("s3://models/yq/v1", {"AWS_ENDPOINT_URL": "http://10.0.0.5:9000"}, "s3://10.0.0.5:9000/models/yq/v1"),
        ("s3://models/yq", {"AWS_ENDPOINT_URL_S3": "https://minio.example:9443",
                            "AWS_ENDPOINT_URL": "http://ignored:1"}, "s3://https://minio.example:9443/models/yq"),
        ("s3://models", {"AWS_ENDPOINT_URL": "http://minio"}, "s3://minio:80/models"),
        ("s3://127.0.0.1:9000/models/yq/", {"AWS_ENDPOINT_URL": "http://ignored:1"}, "s3://127.0.0.1:9000/models/yq"),
    ],
)
def test_triton_repository_url(url, environ, expected):
    assert triton_s3_repository(url, environ)[0] == expected


def test_triton_gets_the_region_it_reads():
    assert triton_s3_repository("s3://m/x", {"AWS_REGION": "eu-west-1"})[1] == {"AWS_DEFAULT_REGION": "eu-west-1"}
    assert triton_s3_repository("s3://m/x", {"AWS_REGION": "a", "AWS_DEFAULT_REGION": "b"})[1] == {}


def test_serve_docker_refuses_an_s3_repository():
    result = CliRunner().invoke(main, ["serve", "--docker", "--repository", "s3://models/x"])
    assert result.exit_code == 1 and "--docker serves a local folder" in result.output


# -- tritonserver reads the pushed repository --------------------------------------------------------------------------
def _server(repository: str, server_env, tmp_path: Path) -> LocalTritonServer:
    grpc_port, http_port, metrics_port = find_free_ports(3)
    return LocalTritonServer(repository, server_env, grpc_port=grpc_port, http_port=http_port,
                             metrics_port=metrics_port, log_path=tmp_path / "tritonserver.log")


@pytest.mark.slow
def test_push_serve_verify_stop_from_s3_with_the_cli(aws_env, fp32_repository, server_env, sample_val, yolov8n_build,
                                                     tmp_path, monkeypatch):
    """The user's path: yqpack push, yqpack serve --repository s3://BUCKET/PREFIX (endpoint in AWS_ENDPOINT_URL,
    credentials in the environment), one inference through the ensemble, a short yqpack verify, yqpack stop."""
    server = aws_env
    pushed = CliRunner().invoke(main, ["push", "--repository", str(fp32_repository), "--to",
                                       f"s3://{server['bucket']}/served/v1", "--endpoint-url", server["endpoint"]])
    assert pushed.exit_code == 0, pushed.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", server["endpoint"])
    home = tmp_path / "home"
    home.mkdir()
    (home / "server-env").symlink_to(server_env.root)  # a private state file, the session's server env
    env = {**os.environ, "YQPACK_HOME": str(home)}
    grpc_port, http_port, metrics_port = find_free_ports(3)
    cli = [sys.executable, "-m", "packager.cli.main"]
    started = subprocess.run([*cli, "serve", "--repository", f"s3://{server['bucket']}/served/v1", "--detach",
                              "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                              "--metrics-port", str(metrics_port)],
                             env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        state = read_state(home)
        assert state.repository == f"s3://127.0.0.1:{server['port']}/{server['bucket']}/served/v1"
        images, annotations = sample_val
        jpeg = sorted(images.glob("*.jpg"))[0].read_bytes()
        with grpcclient.InferenceServerClient(state.grpc_url) as client:
            request = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            request.set_data_from_numpy(np.array([[jpeg]], dtype=object))
            detections = client.infer("yolov8n_fp32", [request]).as_numpy("DETECTIONS")
        assert detections.shape[0] == 1 and detections.shape[2] == 6 and detections.shape[1] > 0
        report = tmp_path / "verify"
        verified = subprocess.run([*cli, "verify", "--url", state.grpc_url, "--images", str(images),
                                   "--annotations", str(annotations), "--build", str(yolov8n_build),
                                   "--report-dir", str(report), "--max-images", "32", "--concurrency", "1,4",
                                   "--requests", "8", "--warmup", "2", "--no-detector-load", "--no-progress"],
                                  env=env, capture_output=True, text=True, timeout=600)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        stopped = subprocess.run([*cli, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "stopped tritonserver" in stopped.stderr, stopped.stderr
    accuracy = {a["model"]: a for a in json.loads((report / "report.json").read_text())["accuracy"]}
    assert set(accuracy) == {"yolov8n_fp32"} and accuracy["yolov8n_fp32"]["errors"] == 0
    assert accuracy["yolov8n_fp32"]["metrics"]["map50_95"] > 0.3  # yolov8n on COCO images: a real detector answered


@pytest.mark.slow
def test_tritonserver_with_a_wrong_secret_fails_fast_and_says_why(aws_env, fp32_repository, server_env, tmp_path,
                                                                 monkeypatch):
    server = aws_env
    push_repository(fp32_repository, f"s3://{server['bucket']}/denied-served", server["endpoint"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    triton = _server(f"s3://127.0.0.1:{server['port']}/{server['bucket']}/denied-served", server_env, tmp_path)
    triton.start()
    try:
        with pytest.raises(ServerError, match="(?s)exited with code .*S3.*credentials"):
            triton.wait_ready(timeout=120)  # the process exits on its own; the timeout is only a backstop
    finally:
        triton.stop()
