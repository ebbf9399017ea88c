"""The engine check: a built plan's outputs against the ONNX it came from, with NVIDIA Polygraphy, before Triton
serves it (standard library only: deploy/check_engines.py runs it in the compose `engine-check` service).

Two halves, on two machines:
- build side (packager/engines/reference.py, the build env): `polygraphy run <reference ONNX> --onnxrt` on a few
  calibration images saves the inputs (`yqpack_check_inputs.json`, repository top) and the reference outputs
  (`<detector>/1/model.check-reference.json`);
- GPU side (here): `polygraphy run model.plan --model-type engine --trt --load-inputs ... --load-outputs ...` with
  the tolerance of the plan's precision. The verdict goes beside the plan (`model.plan.check.json`, keyed by the
  plan's and the reference's sha256); packager/engines/serving.py serves a plan only with a passing verdict.

The comparison is Polygraphy's `simple` one on the mean absolute error of the head output, with rtol 0 so that
only atol decides. The tolerances are a tripwire for broken plans (wrong types, a bad fusion, garbage), sized from
onnxruntime measurements of the same twins (yolov8n, 2 calibration images, `TOLERANCES`); accuracy itself is
verify's served mAP gate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from packager.core.contracts import EngineBuildError
from packager.core.files import sha256_file
from packager.core.repository_index import RepositoryIndex
from packager.engines.plans import EngineSpec, check_path, read_key, repository_engine_specs, write_json_atomically

CHECK_INPUTS = "yqpack_check_inputs.json"  # repository top: a file, which Triton's repository scan ignores
REFERENCE_FILENAME = "model.check-reference.json"
CHECK_LOG_SUFFIX = ".check.log"
LOG_TAIL_LINES = 30
# The build artifact whose onnxruntime outputs a plan of each precision is compared with: the plan's own source,
# except INT8, whose FP16-mixed source onnxruntime's CPU QuantizeLinear mis-rounds (README: the INT8 twins).
REFERENCE_VARIANT = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32", "fp8": "fp8-fp32"}
# onnxruntime runs ModelOpt's float8 Q/DQ only with graph optimizations off.
ORT_GRAPH_OPTIMIZATION = {"fp8": "ORT_DISABLE_ALL"}


@dataclass(frozen=True)
class Tolerance:
    """Polygraphy `simple` comparison: fail when the `stat` of |plan - reference| exceeds atol (rtol 0: off)."""

    atol: float
    stat: str = "mean"
    rtol: float = 0.0


# Measured here on onnxruntime (yolov8n raw head [1, 84, 8400], 2 calibration images; mean |a - b| over the
# output): fp16 vs fp32 0.0036, int8-fp32 vs fp32 0.26, fp8-fp32 vs fp32 0.18, fp8 vs fp8-fp32 0.11, the
# truncating FP16-mixed INT8 vs its FP32 twin 0.74. An all-zero output is 9.5 from the reference. The plan is
# compared with its own precision's reference, so each tolerance is a few times the rounding seen between twins.
TOLERANCES = {"fp32": Tolerance(0.05), "fp16": Tolerance(0.05), "int8": Tolerance(1.0), "fp8": Tolerance(0.6)}
# An end-to-end head (YOLO26, [1, 300, 6] rows picked by an in-graph TopK) lists near-tied low-score rows in whichever
# order the kernels' rounding gives: two swapped rows move the mean a lot and the median not at all, while a broken
# plan moves both. So the median there.
HEAD_STAT = {"raw": "mean", "end2end": "median"}


def tolerance_for(precision: str, head_format: str = "raw") -> Tolerance:
    return replace(TOLERANCES[precision], stat=HEAD_STAT.get(head_format, "mean"))


def comparison_arguments(tolerance: Tolerance) -> list[str]:
    return ["--check-error-stat", tolerance.stat, "--atol", f"{tolerance.atol:g}", "--rtol", f"{tolerance.rtol:g}",
            "--validate"]  # NaN or Inf in the plan's outputs fails too


def reference_command(onnx_path: Path, inputs: Path, reference_out: Path, precision: str,
                      polygraphy: str = "polygraphy") -> list[str]:
    """Build side: the reference outputs of `onnx_path` on onnxruntime's CPU provider."""
    command = [polygraphy, "run", str(onnx_path), "--onnxrt", "--providers", "CPUExecutionProvider",
               "--load-inputs", str(inputs), "--save-outputs", str(reference_out)]
    if precision in ORT_GRAPH_OPTIMIZATION:
        command += ["--graph-optimization-level", ORT_GRAPH_OPTIMIZATION[precision]]
    return command


def engine_check_command(plan: Path, inputs: Path, reference: Path, precision: str,
                         plugins: Sequence[str | os.PathLike] = (), polygraphy: str = "polygraphy",
                         head_format: str = "raw") -> list[str]:
    """GPU side: the plan itself on TensorRT against the saved reference, with the precision's tolerance."""
    command = [polygraphy, "run", str(plan), "--model-type", "engine", "--trt",
               "--load-inputs", str(inputs), "--load-outputs", str(reference)]
    command += comparison_arguments(tolerance_for(precision, head_format))
    if plugins:
        command += ["--plugins", *map(str, plugins)]
    return command


def stand_in_command(onnx_path: Path, inputs: Path, reference: Path, precision: str,
                     polygraphy: str = "polygraphy", head_format: str = "raw") -> list[str]:
    """The same comparison with an ONNX on onnxruntime in the plan's place: how the comparison logic is tested on a
    machine without TensorRT. Never a check of a plan."""
    command = [polygraphy, "run", str(onnx_path), "--onnxrt", "--providers", "CPUExecutionProvider",
               "--load-inputs", str(inputs), "--load-outputs", str(reference)]
    if precision in ORT_GRAPH_OPTIMIZATION:
        command += ["--graph-optimization-level", ORT_GRAPH_OPTIMIZATION[precision]]
    return command + comparison_arguments(tolerance_for(precision, head_format))


@dataclass(frozen=True)
class CheckRecord:
    """The verdict on one plan, written beside it (`model.plan.check.json`)."""

    plan_sha256: str
    reference_sha256: str
    inputs_sha256: str
    precision: str
    tolerance: dict
    passed: bool
    summary: str
    abs_error: float | None  # of the tolerance's statistic (mean, or median for an end-to-end head)
    tensorrt_version: str  # what the check image runs; the plan key's version must be the same
    command: list


Runner = Callable[[Sequence[str], Path], int]


def run_logged(command: Sequence[str], log_path: Path) -> int:
    with open(log_path, "w") as log:
        return subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT).returncode


def abs_error(log_text: str, stat: str = "mean") -> float | None:
    """The statistic of Polygraphy's `Absolute Difference | Stats: mean=..., median=...` line of the comparison."""
    line = re.search(r"Absolute Difference \| Stats: (.*)", log_text)
    value = re.search(rf"\b{stat}=([0-9.eE+-]+)", line.group(1)) if line else None
    return float(value.group(1)) if value else None


def check_plan(spec: EngineSpec, repository: Path, tensorrt_version: str, *, runner: Runner = run_logged,
               command: Sequence[str] | None = None, plugins: Sequence[str | os.PathLike] = (),
               head_format: str = "raw") -> CheckRecord:
    """Compare one plan with its reference (unless a verdict on exactly these files exists) and record it.
    `command` replaces the TensorRT comparison (the tests' onnxruntime stand-in)."""
    plan, inputs = spec.plan_path, Path(repository) / CHECK_INPUTS
    reference = spec.plan_path.parent / REFERENCE_FILENAME
    for needed in (inputs, reference):
        if not needed.is_file():
            raise EngineBuildError(f"{spec.name}: {needed.name} is missing, so the plan cannot be checked: render "
                                   "the repository again with yqpack (it writes the onnxruntime reference)")
    tolerance = tolerance_for(spec.precision, head_format)
    key = read_key(plan)
    if key is not None and tensorrt_version and key.tensorrt_version.split(".")[:3] != tensorrt_version.split(".")[:3]:
        raise EngineBuildError(f"{spec.name}: the plan was built by TensorRT {key.tensorrt_version}, the check image "
                               f"runs {tensorrt_version}: use the TensorRT image of the same release as the Triton "
                               "image (CHECK_IMAGE_TAG in deploy/.env)")
    hashes = {"plan_sha256": sha256_file(plan), "reference_sha256": sha256_file(reference),
              "inputs_sha256": sha256_file(inputs)}
    previous = read_check(plan)
    if previous is not None and all(getattr(previous, k) == v for k, v in hashes.items()) \
            and previous.tolerance == asdict(tolerance):
        return previous
    command = list(command or engine_check_command(plan, inputs, reference, spec.precision, plugins,
                                                   head_format=head_format))
    log_path = plan.with_name(plan.name + CHECK_LOG_SUFFIX)
    try:
        code = runner(command, log_path)
    except OSError as error:  # polygraphy missing from the image
        log_path.write_text(f"{error}\n")
        code = 127
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    error = abs_error(log_text, tolerance.stat)
    measured = (f"{tolerance.stat} |plan - ONNX| {error:.4g}" if error is not None
                else "no error statistic in the log")
    summary = (f"{measured} <= {tolerance.atol:g} ({spec.precision} tolerance)" if code == 0 else
               f"{measured}, tolerance {tolerance.atol:g} ({spec.precision}); polygraphy exit {code}, see "
               f"{log_path.name}: " + " | ".join(log_text.strip().splitlines()[-3:]))
    record = CheckRecord(**hashes, precision=spec.precision, tolerance=asdict(tolerance), passed=code == 0,
                         summary=summary, abs_error=error, tensorrt_version=tensorrt_version, command=command)
    write_json_atomically(check_path(plan), asdict(record))
    return record


def read_check(plan: Path) -> CheckRecord | None:
    try:
        return CheckRecord(**json.loads(check_path(plan).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def check_repository_plans(repository: Path, *, allow_missing: bool = False, tensorrt_version: str = "",
                           plugins: Sequence[str | os.PathLike] = (), runner: Runner = run_logged,
                           report: Callable[[str], None] = print) -> dict[str, CheckRecord]:
    """Check every plan present; detectors without a plan (skipped or failed builds) are not served anyway."""
    records, problems = {}, []
    index = RepositoryIndex.load(repository)
    for spec in repository_engine_specs(repository):
        if not spec.plan_path.is_file():
            report(f"{spec.name}: no plan, nothing to check")
            continue
        # Rows of an in-graph NMS (docs/gpu-prepost.md) reorder near ties as an end-to-end head's do.
        head_format = "end2end" if index.get(spec.name).in_graph_nms is not None else index.model.head.value
        try:
            record = check_plan(spec, repository, tensorrt_version, runner=runner, plugins=plugins,
                                head_format=head_format)
        except EngineBuildError as error:
            problems.append(str(error))
            report(f"{spec.name}: not checked: {error}")
            continue
        records[spec.name] = record
        report(f"{spec.name}: {'agrees' if record.passed else 'DISAGREES'} with its ONNX: {record.summary}")
        if not record.passed:
            problems.append(f"{spec.name}: {record.summary}")
    if problems and not allow_missing:
        raise EngineBuildError(f"{len(problems)} plan(s) failed the engine check, so they are not served: "
                               + "; ".join(problems) + " (--allow-missing serves the others)")
    return records


def tensorrt_python_version() -> str:
    """The TensorRT of the check image (its Python bindings, which Polygraphy's --trt uses)."""
    try:
        import tensorrt  # noqa: PLC0415 - present in the check image only
    except ImportError:
        return ""
    return str(tensorrt.__version__)


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 deploy/check_engines.py /models`: the compose `engine-check` service."""
    parser = argparse.ArgumentParser(description="Check each TensorRT plan of a yqpack repository against its ONNX.")
    parser.add_argument("repository", type=Path)
    parser.add_argument("--allow-missing", action="store_true",
                        default=os.environ.get("YQPACK_ALLOW_MISSING", "0").lower() in ("1", "true", "yes"))
    parser.add_argument("--plugins", default="", help="TensorRT plugin libraries separated by ';'")
    args = parser.parse_args(argv)
    if os.environ.get("YQPACK_ENGINE_CHECK", "1").strip().lower() in ("0", "false", "no", "off"):
        print("engine check: off (YQPACK_ENGINE_CHECK=0); Triton serves the plans unchecked")
        return 0
    version = tensorrt_python_version()
    print(f"engine check: Polygraphy on TensorRT {version or '(no tensorrt module: polygraphy will say so)'}")
    try:
        records = check_repository_plans(args.repository, allow_missing=args.allow_missing, tensorrt_version=version,
                                         plugins=[p for p in args.plugins.split(";") if p.strip()])
    except (EngineBuildError, FileNotFoundError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(f"engine check: {sum(r.passed for r in records.values())} agree, "
          f"{sum(not r.passed for r in records.values())} refused")
    return 0
