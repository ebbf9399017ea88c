"""`yqpack build`, `render` and `eval-onnx`: their options, parsed into the stages' option objects.

`build` and `render` also read their options from a file (`--config`, packager/pipeline/config.py): the file's
values become the command's defaults, so an option given on the command line wins. Registered on the command
group in packager/cli/main.py, which converts the stages' errors.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource


def _runtime_options(command):
    """--runtime / --precision-hint: which CPU runtime evaluates (and, for --target local, serves) the ONNX."""
    command = click.option("--precision-hint", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
                           help="OpenVINO only: f32 keeps FP32 exact; bf16 is faster on AMX and less exact.")(command)
    return click.option("--runtime", type=click.Choice(["openvino", "onnxruntime"]), default="openvino",
                        show_default=True, help="openvino: INT8 on integer kernels (VNNI/AMX); onnxruntime: INT8 "
                        "emulated (Q -> DQ -> float). Falls back to onnxruntime, with a message, where "
                        "OpenVINO cannot run.")(command)


def _config_option(command: str, help_text: str):
    """--config FILE of `command` (build, render): read eagerly, before the other options, into their defaults."""

    def load(ctx: click.Context, _param, value):
        if value is None:
            return None
        from packager.pipeline import config

        loaded = config.read_config_file(value, {"build": config.BUILD_KEYS, "render": config.RENDER_KEYS}[command])
        ctx.default_map = {**(ctx.default_map or {}), **_click_defaults(loaded.values)}
        return loaded

    return click.option("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE", is_eager=True,
                        callback=load, help=help_text)


def _click_defaults(values: dict) -> dict:
    """Config values in the forms the options parse: 'H,W', comma-joined lists, `--build`'s parameter name."""
    defaults = {}
    for key, value in values.items():
        if key == "imgsz" and value is not None:
            value = ",".join(str(size) for size in value)
        elif key in ("calibration_eps", "precisions") and value is not None:
            value = ",".join(value)
        defaults["build_dir" if key == "build" else key] = value
    return defaults


def _from_command_line(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


@click.command()
@click.option("--model", required=True, type=click.Path(path_type=Path),
              help="Ultralytics .pt checkpoint, model .yaml (random init) or an existing .onnx export.")
@click.option("--out", default=Path("build"), show_default=True, type=click.Path(path_type=Path),
              help="Build directory (replaced atomically when the build succeeds).")
@click.option("--calib-images", type=click.Path(path_type=Path),
              help="Folder of calibration images (with --data: instead of its train split).")
@click.option("--calib-data", type=click.Path(path_type=Path),
              help="Ready calibration tensor (.npy/.npz, N x 3 x H x W float32) instead of --calib-images.")
@click.option("--calib-size", default=64, show_default=True, type=int, help="Calibration images to use.")
@click.option("--imgsz", default=None, help="Input size: 640 or H,W (multiples of 32). Default: the size a .pt was "
              "trained at (its train_args), else 640.")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest batch served.")
@click.option("--static-batch", is_flag=True, help="Export with a fixed batch of 1 instead of a dynamic batch.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset of the FP32 export.")
@click.option("--end2end/--no-end2end", default=None,
              help="NMS-free one-to-one head (YOLO26) or the classic head + NMS. Default: NMS-free when the model has it.")
@click.option("--preset", type=click.Choice(["mixed", "extreme", "auto"]), default=None,
              help="[default: mixed, then auto when mixed misses the accuracy gate] "
                   "mixed: head output convs, DFL/decode and residual Adds kept precise; "
                   "extreme: quantize everything (stress test only, never deploy); auto: keep the most sensitive "
                   "units precise until --auto-target agreement with FP32 on the tuning images.")
@click.option("--stride4-precise/--stride4-int8", default=True, show_default=True,
              help="mixed: keep the backbone's stride-4 stage (yolov8n: model.1 and model.2, 6.9 % of conv MACs) "
                   "in high precision, or quantize it too.")
@click.option("--auto-target", default=0.97, show_default=True, type=float,
              help="auto: pseudo-mAP50-95 of INT8 vs FP32 detections on the tuning images to reach.")
@click.option("--tune-images", type=click.Path(path_type=Path),
              help="auto: tuning images [default: --calib-images after the first --calib-size; with --data, "
                   "other train images].")
@click.option("--max-tune-images", default=64, show_default=True, type=int, help="auto: tuning images to use.")
@click.option("--calibration-method", type=click.Choice(["mse", "max", "entropy"]), default="mse", show_default=True,
              help="INT8 activation ranges. mse: ModelOpt max calibration, then each activation scale set to its "
                   "least-rounding-error range from histograms of the same images; max / entropy: ModelOpt's own.")
@click.option("--adaround/--no-adaround", default=False, show_default=True,
              help="Learn each INT8 convolution's weight rounding on the calibration images (AdaRound; minutes, "
                   "on a CUDA GPU when torch sees one).")
@click.option("--adaround-iterations", default=1500, show_default=True, type=int,
              help="AdaRound optimisation steps per convolution.")
@click.option("--adaround-device", default="auto", show_default=True,
              help="AdaRound device: auto (CUDA GPU if present, else CPU), cpu, cuda, cuda:N.")
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
@click.option("--data", type=click.Path(path_type=Path),
              help="Ultralytics dataset YAML: calibration (and auto's tuning) images spread over its train split, "
                   "evaluation and gate on --split (instead of --val-images/--val-annotations).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="With --data: the split that evaluates and gates the build.")
@click.option("--min-map-ratio", default=0.99, show_default=True, type=float,
              help="Gate: INT8 mAP50-95 must be at least this fraction of FP32.")
@click.option("--repository", type=click.Path(path_type=Path),
              help="Also render a Triton model repository from the build into this folder.")
@click.option("--target", type=click.Choice(["local", "cpu", "cpu-openvino", "gpu", "gpu-ort"]), default="local",
              show_default=True, help="Serving target of the rendered repository (with --repository).")
@click.option("--fp8/--no-fp8", default=None,
              help="Also build FP8 (E4M3) twins for TensorRT on compute capability >= 8.9 (--target gpu serves them "
                   "where the GPU has FP8; the engines step skips them below 8.9) [default: no].")
@click.option("--allow-overlap", is_flag=True,
              help="Warn instead of refusing when a --val-images image is also a calibration/tuning image.")
@_runtime_options
@_config_option("build", "YAML (or JSON) file of these options, keys as the long names with _ (calib_images: "
                "DIR), or an earlier build's manifest.json to repeat that build; options given here win.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved options as a --config YAML file and exit without building.")
def build(config_file, print_config, **values) -> None:
    """Export, calibrate and quantize a YOLO detector into ONNX FP32 / FP16 / INT8 artifacts."""
    from rich.console import Console

    from packager.pipeline.config import config_from_options, config_yaml, options_from_config
    from packager.pipeline.run import run_build
    from packager.pipeline.summary import summary_table
    from packager.core.contracts import ConfigError

    ctx = click.get_current_context()
    values["calibration_eps"] = [ep.strip() for ep in values["calibration_eps"].split(",") if ep.strip()]
    for key in ("exclude_nodes", "exclude_ops", "trt_plugins"):
        values[key] = list(values[key])
    options = options_from_config({key: str(v) if isinstance(v, Path) else v for key, v in values.items()})
    if print_config:
        click.echo(config_yaml(config_from_options(options)), nl=False)
        return
    reproduced = config_file.manifest_of if config_file is not None else None
    if reproduced is not None and not _from_command_line(ctx, "out") and \
            Path(options.out).resolve() == reproduced.resolve():
        raise ConfigError(f"--config {config_file.path} would rebuild {reproduced} in place, replacing the build it "
                          "repeats: pass --out DIR for the new build")
    result = run_build(options)
    Console().print(summary_table(result, options.runtime))


@click.command()
@click.option("--build", "build_dir", default=Path("build"), show_default=True, type=click.Path(path_type=Path),
              help="Build directory made by yqpack build (read only: nothing is re-quantized).")
@click.option("--repository", default=Path("model_repository"), show_default=True, type=click.Path(path_type=Path),
              help="Model repository to write (replaced atomically).")
@click.option("--target", type=click.Choice(["local", "cpu", "cpu-openvino", "gpu", "gpu-ort"]), default="local",
              show_default=True)
@click.option("--precisions", default=None, help="Comma-separated fp32,fp16,int8 [gpu targets: fp16,int8; else all].")
@click.option("--max-batch", default=None, type=int, help="max_batch_size of every model [the build's].")
@click.option("--preprocess", type=click.Choice(["dali", "python"]), default=None,
              help="gpu target: dali = nvJPEG decode + letterbox on the GPU behind a checking Python gate (default); "
                   "python = decode + letterbox on host cores. Other targets: python only. See docs/gpu-prepost.md.")
@click.option("--nms", type=click.Choice(["graph", "python"]), default=None,
              help="gpu target: graph = box decode + NMS inside the TensorRT engine, iou/multi_label compiled in "
                   "(default); python = NMS on host cores, any iou per request. Other targets: python only.")
@_runtime_options
@_config_option("render", "YAML (or JSON) file of these options (build: DIR, target: gpu, ...), or a build's "
                "manifest.json: that build, rendered as it was; options given here win.")
def render(config_file, build_dir, repository, target, precisions, max_batch, preprocess, nms, runtime,
           precision_hint) -> None:
    """Render a Triton model repository for a serving target from a finished build."""
    from packager.repository.render import RenderOptions, render as render_stage

    names = tuple(p.strip() for p in precisions.split(",") if p.strip()) if precisions else None
    result = render_stage(build_dir, repository, RenderOptions(target=target, precisions=names, max_batch=max_batch,
                                                               runtime=runtime, precision_hint=precision_hint,
                                                               preprocess=preprocess, nms=nms))
    click.echo(f"rendered {len(result.models)} models for target {target} into {result.path}: "
               + ", ".join(result.ensembles.values()))


@click.command("eval-onnx")
@click.option("--build", "build_dir", default=Path("build"), show_default=True,
              type=click.Path(path_type=Path), help="Build directory made by yqpack build.")
@click.option("--val-images", type=click.Path(path_type=Path), help="Images folder (with --val-annotations).")
@click.option("--val-annotations", type=click.Path(path_type=Path), help="COCO instances JSON of --val-images.")
@click.option("--data", "data_yaml", type=click.Path(path_type=Path),
              help="Ultralytics dataset YAML (YOLO txt labels) instead of --val-images/--val-annotations.")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="With --data: the split to score.")
@click.option("--variants", default="fp32,fp16,int8-fp32", show_default=True,
              help="Comma-separated ONNX variants (fp32, fp16, int8, int8-fp32, fp8, fp8-fp32).")
@click.option("--min-map-ratio", default=0.99, show_default=True, type=float,
              help="Gate: int8-fp32 (and fp8-fp32) mAP50-95 must be at least this fraction of FP32 (0 disables).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the metrics to this JSON file.")
@click.option("--allow-overlap", is_flag=True,
              help="Warn instead of refusing when a validation image is one of the build's calibration images.")
@_runtime_options
def eval_onnx(build_dir, val_images, val_annotations, data_yaml, split, variants, min_map_ratio, json_path,
              allow_overlap, runtime, precision_hint) -> None:
    """COCO mAP of a build's ONNX variants on CPU (OpenVINO or onnxruntime), ratios vs FP32 with 95 % intervals,
    quantized MAC coverage, gates."""
    import json

    from rich.console import Console

    from packager.evaluate.onnx_eval import check_gate, evaluate_build_detailed
    from packager.pipeline.summary import metrics_table
    from packager.inference.runtime import RuntimeOptions, evaluation_label, variant_label

    names = [v.strip() for v in variants.split(",") if v.strip()]
    options = RuntimeOptions(runtime, precision_hint)
    evaluation = evaluate_build_detailed(build_dir, val_images, val_annotations, names, allow_overlap=allow_overlap,
                                         runtime=options, data=data_yaml, split=split)
    click.echo(f"ground truth: {evaluation.dataset}")
    if evaluation.unscored_classes:
        click.echo(f"not scored: {len(evaluation.unscored_classes)} model class(es) the ground truth lacks, e.g. "
                   f"{evaluation.unscored_classes[:10]} (their detections are left out)")
    label = evaluation.runtime_label() or evaluation_label(options)  # what ran, fallbacks included
    Console().print(metrics_table(evaluation.metrics, label, evaluation.intervals, evaluation.coverage))
    if json_path is not None:
        rows = {v: {**row, "runtime": evaluation.runtimes.get(v) or variant_label(v, options),
                    "runtime_notes": list(evaluation.runtime_notes.get(v, ()))}
                for v, row in evaluation.as_dict().items()}
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
    for variant in ("int8-fp32", "fp8-fp32"):
        if min_map_ratio > 0 and "fp32" in evaluation.metrics and variant in evaluation.metrics:
            gate = check_gate(evaluation.metrics, min_map_ratio, variant, evaluation.intervals.get(variant))
            click.echo(f"Gate passed: {gate.message()}")
