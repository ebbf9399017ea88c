"""yqpack command line: parses options and calls the stage modules; no pipeline logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import click


class YqpackError(click.ClickException):
    """A user-facing failure: printed as 'Error: ...' and exit code 1, no traceback."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="yqpack")
def main() -> None:
    """Take a YOLO detector to a served, verified Triton deployment."""


# --- build / eval-onnx ---


def _user_errors(action):
    """Run `action`; plain-message exceptions from the stages become `Error: ...` with exit code 1."""
    try:
        return action()
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise YqpackError(str(message)) from None


@main.command()
@click.option("--model", required=True, type=click.Path(path_type=Path),
              help="Ultralytics .pt checkpoint, model .yaml (random init) or an existing .onnx export.")
@click.option("--out", default=Path("build"), show_default=True, type=click.Path(path_type=Path),
              help="Build directory (replaced atomically when the build succeeds).")
@click.option("--calib-images", type=click.Path(path_type=Path), help="Folder of calibration images.")
@click.option("--calib-data", type=click.Path(path_type=Path),
              help="Ready calibration tensor (.npy/.npz, N x 3 x H x W float32) instead of --calib-images.")
@click.option("--calib-size", default=64, show_default=True, type=int, help="Calibration images to use.")
@click.option("--imgsz", default="640", show_default=True, help="Input size: 640 or H,W (multiples of 32).")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest batch served.")
@click.option("--static-batch", is_flag=True, help="Export with a fixed batch of 1 instead of a dynamic batch.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset of the FP32 export.")
@click.option("--preset", type=click.Choice(["mixed", "extreme"]), default="mixed", show_default=True,
              help="mixed: head output convs, DFL/decode and residual Adds kept precise; "
                   "extreme: quantize everything (stress test only, never deploy).")
@click.option("--calibration-method", type=click.Choice(["max", "entropy"]), default="max", show_default=True)
@click.option("--calibration-eps", default="cpu", show_default=True,
              help="Comma-separated ModelOpt calibration execution providers (cpu, cuda:0, trt).")
@click.option("--dq-only/--no-dq-only", default=False, show_default=True,
              help="Store INT8 weights with DequantizeLinear only (ModelOpt dq_only).")
@click.option("--exclude-nodes", multiple=True, help="Regex of node names to keep out of INT8 (repeatable).")
@click.option("--exclude-ops", multiple=True, help="Op type to keep out of INT8, e.g. Concat (repeatable).")
@click.option("--calibrate-per-node", is_flag=True, help="ModelOpt per-node calibration (lower memory).")
@click.option("--trt-plugins", multiple=True, help="TensorRT plugin library (.so) passed to ModelOpt (repeatable).")
@click.option("--val-images", type=click.Path(path_type=Path), help="Evaluate the ONNX variants on these images.")
@click.option("--val-annotations", type=click.Path(path_type=Path), help="COCO instances JSON for --val-images.")
@click.option("--min-map-ratio", default=0.99, show_default=True, type=float,
              help="Gate: INT8 mAP50-95 must be at least this fraction of FP32.")
@click.option("--repository", type=click.Path(path_type=Path),
              help="Also render a Triton model repository from the build into this folder.")
@click.option("--target", type=click.Choice(["local", "cpu", "gpu", "gpu-ort"]), default="local", show_default=True,
              help="Serving target of the rendered repository (with --repository).")
def build(model, out, calib_images, calib_data, calib_size, imgsz, max_batch, static_batch, opset, preset,
          calibration_method, calibration_eps, dq_only, exclude_nodes, exclude_ops, calibrate_per_node, trt_plugins,
          val_images, val_annotations, min_map_ratio, repository, target) -> None:
    """Export, calibrate and quantize a YOLO detector into ONNX FP32 / FP16 / INT8 artifacts."""
    from rich.console import Console

    from packager.pipeline import BuildOptions, run_build, summary_table
    from packager.quantize import QuantizeOptions

    options = BuildOptions(
        model=model, out=out, calib_images=calib_images, calib_data=calib_data, calib_size=calib_size, imgsz=imgsz,
        max_batch=max_batch, dynamic_batch=not static_batch, opset=opset,
        quantize=QuantizeOptions(
            preset=preset, calibration_method=calibration_method,
            calibration_eps=[ep.strip() for ep in calibration_eps.split(",") if ep.strip()], dq_only=dq_only,
            exclude_nodes=list(exclude_nodes), exclude_ops=list(exclude_ops), calibrate_per_node=calibrate_per_node,
            trt_plugins=list(trt_plugins),
        ),
        val_images=val_images, val_annotations=val_annotations, min_map_ratio=min_map_ratio,
        repository=repository, repository_target=target,
    )
    result = _user_errors(lambda: run_build(options))
    Console().print(summary_table(result))


@main.command("eval-onnx")
@click.option("--build", "build_dir", default=Path("build"), show_default=True,
              type=click.Path(path_type=Path), help="Build directory made by yqpack build.")
@click.option("--val-images", required=True, type=click.Path(path_type=Path))
@click.option("--val-annotations", required=True, type=click.Path(path_type=Path))
@click.option("--variants", default="fp32,fp16,int8-fp32", show_default=True,
              help="Comma-separated ONNX variants (fp32, fp16, int8, int8-fp32).")
@click.option("--min-map-ratio", default=0.99, show_default=True, type=float,
              help="Gate: int8-fp32 mAP50-95 must be at least this fraction of FP32 (0 disables).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the metrics to this JSON file.")
def eval_onnx(build_dir, val_images, val_annotations, variants, min_map_ratio, json_path) -> None:
    """COCO mAP of a build's ONNX variants with onnxruntime (CPU), plus the INT8 accuracy gate."""
    import json

    from rich.console import Console

    from packager.onnx_eval import check_gate, evaluate_build
    from packager.pipeline import metrics_table

    names = [v.strip() for v in variants.split(",") if v.strip()]
    metrics = _user_errors(lambda: evaluate_build(build_dir, val_images, val_annotations, names))
    Console().print(metrics_table(metrics))
    if json_path is not None:
        json_path.write_text(json.dumps({v: m.as_dict() for v, m in metrics.items()}, indent=2) + "\n")
    if min_map_ratio > 0 and "fp32" in metrics and "int8-fp32" in metrics:
        gate = _user_errors(lambda: check_gate(metrics, min_map_ratio))
        click.echo(f"Gate passed: {gate.message()}")


# --- serve / stop / server-env ---
@main.command()
@click.option("--repository", type=click.Path(path_type=Path), default=Path("model_repository"),
              show_default=True, help="Triton model repository rendered by yqpack build.")
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
    from packager import serve as serving

    try:
        if not local:
            try:
                serving.docker_compose_up(repository, detach, grpc_port=grpc_port, http_port=http_port,
                                          metrics_port=metrics_port, allow_missing=allow_missing,
                                          ready_timeout=ready_timeout or 1800.0)
            except RuntimeError as error:  # e.g. deploy.DockerUnavailableError: no Docker engine here
                raise YqpackError(str(error)) from None
            return
        options = serving.ServeOptions(repository, grpc_port, http_port, metrics_port, detach, ready_timeout or 300.0)
        serving.serve_local(options)
    except (ValueError, FileNotFoundError) as error:
        raise YqpackError(str(error)) from None


@main.command()
@click.option("--docker", is_flag=True, help="Stop the docker compose deployment instead of the local server.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds before SIGTERM becomes SIGKILL.")
def stop(docker, timeout) -> None:
    """Stop the server started with `yqpack serve --detach` (or `serve --docker`)."""
    if docker:
        from packager.deploy import compose_down

        try:
            compose_down()
        except RuntimeError as error:
            raise YqpackError(str(error)) from None
        return
    from packager.serve import stop_local

    if stop_local(timeout=timeout) is None:
        sys.exit(1)  # nothing was stopped: scripts must not take that for success


@main.command("server-env")
def server_env() -> None:
    """Create (or check) the embedded tritonserver's own Python env: nvidia-pytriton, numpy<2, onnxruntime."""
    from packager.server_env import ensure_server_env

    env = ensure_server_env()
    click.echo(f"server env: {env.root} (tritonserver {env.tritonserver})")


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
@click.option("--images", "images_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of encoded images (sent as they are).")
@click.option("--annotations", required=True, type=click.Path(path_type=Path),
              help="COCO instances JSON for the images.")
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
    from packager.gates import AbsoluteGates, GateThresholds
    from packager.verify import VerifyError, VerifyOptions, run_verify

    verify_options = VerifyOptions(
        models=[name.strip() for name in models.split(",") if name.strip()] if models else None,
        gates=GateThresholds(min_map_ratio, max_errors, min_throughput, max_p99_ms),
        progress=not no_progress,
        absolute=AbsoluteGates(max_map_drift, min_map),
        **options,
    )
    try:
        result = run_verify(verify_options)
    except (VerifyError, ValueError, FileNotFoundError) as error:
        raise YqpackError(str(error)) from error
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
@click.option("--tensorrt-version", default="10.8.0", show_default=True,
              help="For --engines print: the serving image's TensorRT version (deploy/.env documents it).")
def engines(repository, build_dir, mode, allow_missing, tensorrt_version) -> None:
    """Build the TensorRT plans of a gpu repository where they will run (cached by ONNX, TensorRT, GPU)."""
    from packager import engines as engine_stage

    try:
        if build_dir is not None:
            engine_stage.stage_engine_sources(build_dir, repository)
        if mode == "print":
            version = engine_stage.TensorRTVersion.parse(tensorrt_version)
            for spec in engine_stage.repository_engine_specs(repository):
                command = engine_stage.trtexec_command("trtexec", spec, version, spec.plan_path)
                click.echo(" ".join(command))
            return
        if mode == "compose":
            from packager.deploy import compose_engines

            compose_engines(repository, allow_missing=allow_missing)
        elif mode == "local":
            engine_stage.build_repository_engines_local(repository, allow_missing=allow_missing, report=click.echo)
        else:
            engine_stage.build_repository_engines(repository, allow_missing=allow_missing, report=click.echo)
        if build_dir is not None:
            recorded = engine_stage.record_engines(build_dir, repository)
            click.echo(f"recorded {len(recorded)} engine key(s) in {build_dir / 'manifest.json'}")
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # EngineBuildError, DockerUnavailableError too
        raise YqpackError(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
