"""yqpack command line: parses options and calls the stage modules; no pipeline logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from packager.cli.build import build, eval_onnx, render
from packager.core.contracts import ConfigError, YqpackError

# Stages still raising the builtin errors for bad input are converted too (being moved onto YqpackError).
_PLAIN_ERRORS = (YqpackError, ValueError, FileNotFoundError)


class _UserError(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class _Commands(click.Group):
    """The one place where a stage's error becomes `Error: <message>` and an exit code, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _PLAIN_ERRORS as error:
            raise _UserError(str(error), getattr(error, "exit_code", 1)) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="yqpack")
def main() -> None:
    """Take a YOLO detector to a served, verified Triton deployment."""


# --- build / render / eval-onnx (packager/cli/build.py) ---
main.add_command(build)
main.add_command(render)
main.add_command(eval_onnx)


# --- sensitivity (label-free INT8 sensitivity per unit) ---
@main.command()
@click.option("--build", "build_dir", default=Path("build"), show_default=True, type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path),
              help="Unlabelled tuning images (the build's calibration images are skipped if this is their folder).")
@click.option("--data", type=click.Path(path_type=Path),
              help="Ultralytics dataset YAML instead of --images: tuning images spread over its train split (the "
                   "build's calibration images skipped).")
@click.option("--max-images", default=64, show_default=True, type=int)
@click.option("--refine", default=2, show_default=True, type=int,
              help="Split this many of the most sensitive units into their child blocks.")
@click.option("--out", default=Path("sensitivity.json"), show_default=True, type=click.Path(path_type=Path),
              help="JSON result; the markdown table (.md) and bar chart (.png) are written beside it.")
def sensitivity(build_dir, images, data, max_images, refine, out) -> None:
    """Rank the model's units by how much INT8 hurts them, against FP32, with no labels."""
    from packager.quantize.sensitivity_command import run_sensitivity

    outputs = run_sensitivity(build_dir, images, out, max_images, refine, data=data)
    click.echo(outputs.markdown_path.read_text())
    click.echo(f"Wrote {outputs.json_path}, {outputs.markdown_path}, {outputs.plot_path}")


# --- serve / stop / server-env ---
@main.command()
@click.option("--repository", default="model_repository", show_default=True,
              help="Triton model repository rendered by yqpack build: a folder, or s3://BUCKET/PREFIX (yqpack push; "
                   "endpoint from AWS_ENDPOINT_URL) or s3://HOST:PORT/BUCKET/PREFIX.")
@click.option("--local/--docker", "local", default=True, show_default=True,
              help="Embedded tritonserver on 127.0.0.1, or docker compose on deploy/ (GPU host).")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--detach", is_flag=True,
              help="Return once ready and leave the server running (end it with yqpack stop).")
@click.option("--timeout", "ready_timeout", type=float, default=None,
              help="Seconds to wait for all models to be ready [local: 300; docker: 1800, engine builds included].")
@click.option("--allow-missing", is_flag=True,
              help="--docker: start without a detector whose TensorRT engine failed to build.")
def serve(repository, local, grpc_port, http_port, metrics_port, detach, ready_timeout, allow_missing) -> None:
    """Serve a model repository with a real tritonserver."""
    from packager.serve import embedded as serving

    if not local:
        if repository.startswith("s3://"):
            raise ConfigError("--docker serves a local folder; serve s3:// repositories with --local or yqpack k8s")
        from packager.core.contracts import Endpoints
        from packager.serve.compose import compose_up

        endpoints = Endpoints("localhost", http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
        compose_up(Path(repository), detach, allow_missing=allow_missing, endpoints=endpoints,
                   timeout_s=ready_timeout or 1800.0)
        return
    options = serving.ServeOptions(repository, grpc_port, http_port, metrics_port, detach, ready_timeout or 300.0)
    serving.serve_local(options)


@main.command()
@click.option("--docker", is_flag=True, help="Stop the docker compose deployment instead of the local server.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds before SIGTERM becomes SIGKILL.")
def stop(docker, timeout) -> None:
    """Stop the server started with `yqpack serve --detach` (or `serve --docker`)."""
    if docker:
        from packager.serve.compose import compose_down

        compose_down()
        return
    from packager.serve.embedded import stop_local

    if stop_local(timeout=timeout) is None:
        sys.exit(1)  # nothing was stopped: scripts must not take that for success


@main.command("server-env")
def server_env() -> None:
    """Create (or check) the embedded tritonserver's own Python env: nvidia-pytriton, numpy<2, onnxruntime."""
    from packager.serve.server_env import ensure_server_env

    env = ensure_server_env()
    click.echo(f"server env: {env.root} (tritonserver {env.tritonserver})")


# --- push / k8s (scale-out) ---
@main.command()
@click.option("--repository", type=click.Path(path_type=Path), default=Path("model_repository"), show_default=True,
              help="Model repository rendered by yqpack build.")
@click.option("--to", "destination", required=True, help="s3://BUCKET/PREFIX to upload it to.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint, e.g. http://minio:9000 [AWS_ENDPOINT_URL].")
@click.option("--delete-stale", is_flag=True, help="Delete objects under the prefix that the repository lacks.")
def push(repository, destination, endpoint_url, delete_stale) -> None:
    """Upload a model repository to S3, verify what landed, skip what is unchanged."""
    from packager.serve.s3_push import push_with_progress, report_push

    report_push(push_with_progress(repository, destination, endpoint_url, delete_stale=delete_stale), click.echo)


@main.command()
@click.option("--repository", required=True, help="Model repository: a folder (on a PVC) or s3://BUCKET/PREFIX.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the Kustomize manifests.")
@click.option("--image", required=True, help="Serving image: deploy/Dockerfile built and pushed to your registry.")
@click.option("--namespace", default="yqpack", show_default=True)
@click.option("--name", default=None, help="Deployment name [MODEL-triton].")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="Minimum replicas.")
@click.option("--max-replicas", type=click.IntRange(1), default=4, show_default=True)
@click.option("--gpus", type=click.IntRange(0), default=1, show_default=True, help="nvidia.com/gpu per pod.")
@click.option("--queue-ms", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="HPA target: Triton queue time per request, ms.")
@click.option("--s3-secret", default="yqpack-s3", show_default=True,
              help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_DEFAULT_REGION).")
@click.option("--endpoint-url", envvar=["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"], default=None,
              help="S3-compatible endpoint the cluster reaches [AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL].")
@click.option("--pvc", default=None, help="PersistentVolumeClaim holding a folder repository [NAME-models].")
def k8s(out, **options) -> None:
    """Render Kubernetes manifests (Deployment, Service, HPA, ServiceMonitor, PDB; KServe variant) for a repository."""
    from packager.serve.k8s import K8sOptions, render_k8s

    result = render_k8s(K8sOptions(**options), out)
    for path in result.files:
        click.echo(f"wrote {path}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"apply: kubectl apply -k {out}   (KServe instead: kubectl apply -k {out / 'kserve'})")


# --- verify ---


def _concurrency_levels(ctx, param, value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,2,4,8,16, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"concurrency levels must be integers >= 1, got {value!r}")
    return levels


@main.command()
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Triton gRPC endpoint host:port.")
@click.option("--images", "images_dir", default=None, type=click.Path(path_type=Path),
              help="Folder of encoded images (sent as they are), with --annotations.")
@click.option("--annotations", default=None, type=click.Path(path_type=Path),
              help="COCO instances JSON for the --images.")
@click.option("--data", default=None, type=click.Path(path_type=Path),
              help="Ultralytics dataset YAML instead of --images/--annotations: served mAP, load-test images and "
                   "the reference on its --split (YOLO txt labels, classes matched to the model's by name).")
@click.option("--split", type=click.Choice(["val", "test"]), default=None,
              help="With --data: the split to verify on [val].")
@click.option("--models", default=None, help="Comma-separated ensembles to verify (default: every ready ensemble).")
@click.option("--build", "build_dir", default=None, type=click.Path(path_type=Path),
              help="Build folder: manifest class names, used when the served configs carry none.")
@click.option("--report-dir", default="reports/verify", show_default=True,
              type=click.Path(path_type=Path))
@click.option("--wait", "wait_s", default=60.0, show_default=True, help="Seconds to wait for server readiness.")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True, help="Per-request timeout, seconds.")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True, callback=_concurrency_levels,
              help="Load levels: requests in flight.")
@click.option("--requests", "requests_per_level", default=200, show_default=True, help="Requests per load level.")
@click.option("--duration", "duration_s", default=None, type=float,
              help="Seconds per load level (replaces --requests).")
@click.option("--warmup", "warmup_requests", default=16, show_default=True, help="Unmeasured requests per model.")
@click.option("--max-images", default=None, type=int, help="Accuracy pass on the first N annotated images only.")
@click.option("--detector-load/--no-detector-load", default=True, show_default=True,
              help="Also load the bare detector (ensemble overhead ratio).")
@click.option("--min-map-ratio", default=0.99, show_default=True,
              help="Gate: mAP50-95 of each precision / reference (fp32, else fp16).")
@click.option("--max-errors", default=0, show_default=True, help="Gate: failed requests per model.")
@click.option("--min-throughput", default=None, type=float, help="Gate: peak images/s per model.")
@click.option("--max-p99-ms", default=None, type=float, help="Gate: p99 latency (ms) at every concurrency level.")
@click.option("--max-map-drift", default=0.005, show_default=True,
              help="Gate: |served mAP50-95 - the build's own eval-onnx of the same ONNX| (needs --build or a "
                   "detached yqpack serve); every precision, even a single one.")
@click.option("--min-map", default=None, type=float, help="Gate: served mAP50-95 floor per model.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs, CI).")
def verify(models, min_map_ratio, max_errors, min_throughput, max_p99_ms, max_map_drift, min_map, no_progress,
           **options) -> None:
    """Check a running server: served COCO mAP, load test, precision comparison, gates, report.

    Exit code 0 when every gate holds, 1 when a gate fails, 3 when the run is incomplete.
    """
    from packager.verify.gates import AbsoluteGates, GateThresholds
    from packager.verify.run import VerifyOptions, run_verify

    verify_options = VerifyOptions(
        models=[name.strip() for name in models.split(",") if name.strip()] if models else None,
        gates=GateThresholds(min_map_ratio, max_errors, min_throughput, max_p99_ms),
        progress=not no_progress,
        absolute=AbsoluteGates(max_map_drift, min_map),
        **options,
    )
    result = run_verify(verify_options)
    for gate in result.failed_gates:
        click.echo(f"gate failed: {gate.gate} on {gate.model}: {gate.detail}", err=True)
    if result.incomplete_reason:
        click.echo(f"incomplete: {result.incomplete_reason}", err=True)
    click.echo(f"verify {result.status.upper()}: report in {result.report_files.get('markdown')}")
    sys.exit(result.exit_code)


# --- engines (GPU) ---
@main.command("engines")
@click.option("--repository", type=click.Path(path_type=Path),
              default=Path("model_repository"), show_default=True,
              help="Model repository rendered with --target gpu.")
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=None,
              help="Build folder: stage each detector's source ONNX into the repository and record the engine "
                   "keys in its manifest.json.")
@click.option("--engines", "mode", type=click.Choice(["compose", "trtexec", "local", "print"]), default="compose",
              show_default=True,
              help="compose: the `engines` service of deploy/docker-compose.yml (the serving image's trtexec, on "
                   "this host's GPU); trtexec: a trtexec on this host; local: the TensorRT Python API; print: "
                   "only print the trtexec command lines.")
@click.option("--allow-missing", is_flag=True, help="Do not fail when an engine build fails; serve without it.")
@click.option("--tensorrt-version", default=None,
              help="For --engines print: the serving image's TensorRT version [default: TRITON_TENSORRT_VERSION "
                   "in deploy/.env].")
def engines(repository, build_dir, mode, allow_missing, tensorrt_version) -> None:
    """Build the TensorRT plans of a gpu repository where they will run (cached by ONNX, TensorRT, GPU)."""
    from packager.engines.modes import run_engines
    from packager.serve.compose import compose_engines

    run_engines(repository, build_dir, mode, allow_missing=allow_missing, tensorrt_version=tensorrt_version,
                compose_engines=compose_engines, echo=click.echo)


if __name__ == "__main__":
    sys.exit(main())
