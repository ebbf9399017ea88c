"""What Triton serves from a gpu repository, and the tritonserver command line (standard library only: it runs as
the serving container's entry point, deploy/start_triton.py, and in the Kubernetes pod).

A TensorRT detector is served only when its plan is there and the engine check (packager/engines/check.py) passed
on exactly that plan. A detector the engines step skipped (FP8 below compute capability 8.9), failed to build
under --allow-missing, or whose plan disagrees with its ONNX is left out together with its ensemble, so Triton is
never asked to load it: Triton then gets a *view* of the repository, a folder of symbolic links to the models it
serves, and keeps model control mode `none` (explicit mode would open the load/unload API, whose restriction
group also holds the repository index that clients read).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from packager.core.contracts import ConfigError, Role
from packager.core.files import sha256_file
from packager.core.repository_index import REPOSITORY_INDEX, RepositoryIndex
from packager.engines.plans import ENGINES_OUTCOME, PLAN_FILENAME, TENSORRT_PLATFORM, check_path

# The admin API groups that need the triton-admin-key header (as the embedded server: packager/serve/embedded.py).
RESTRICTED_APIS = "shared-memory,logging,trace"
ADMIN_HEADER = "triton-admin-key"
CHECK_OFF_VALUES = ("0", "false", "no", "off")


@dataclass(frozen=True)
class ServedSet:
    """The models of a repository that Triton will load, and why each other one is left out."""

    repository: Path
    models: tuple[str, ...]
    excluded: dict[str, str] = field(default_factory=dict)  # model -> reason
    unchecked: tuple[str, ...] = ()  # plans served without an engine check (the check was switched off)

    @property
    def complete(self) -> bool:
        return not self.excluded


def check_required(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("YQPACK_ENGINE_CHECK", "1").strip().lower() not in CHECK_OFF_VALUES


def plan_check_verdict(plan: Path) -> tuple[bool, str]:
    """(passed, why) of the engine check recorded beside `plan`; a record of another plan counts as none."""
    try:
        record = json.loads(check_path(plan).read_text())
    except (OSError, ValueError):
        return False, "no engine check recorded for this plan (the engine-check step did not run)"
    if record.get("plan_sha256") != sha256_file(plan):
        return False, "the engine check on record was made on another plan"
    if not record.get("passed"):
        return False, f"engine check failed: {record.get('summary', 'outputs disagree with the ONNX')}"
    return True, "engine check passed"


def served_models(repository: Path, environ: dict[str, str] | None = None) -> ServedSet:
    """Every model of the index, less TensorRT detectors without a (checked) plan and the ensembles using them."""
    repository = Path(repository)
    index = RepositoryIndex.load(repository)
    outcome = _read_outcome(repository)
    require_check = check_required(environ)
    excluded, unchecked = {}, []
    for detector in index.by_role(Role.DETECTOR):
        if detector.platform != TENSORRT_PLATFORM:
            continue
        plan = repository / detector.name / "1" / PLAN_FILENAME
        if not plan.is_file():
            excluded[detector.name] = outcome.get(detector.name, {}).get("message") or "no model.plan"
        elif require_check:
            passed, why = plan_check_verdict(plan)
            if not passed:
                excluded[detector.name] = why
        else:
            unchecked.append(detector.name)
    dropped_precisions = {index.get(name).precision for name in excluded}
    for ensemble in index.by_role(Role.ENSEMBLE):
        if ensemble.precision in dropped_precisions:
            excluded[ensemble.name] = f"its detector is not served ({ensemble.precision.value})"
    kept = tuple(m.name for m in index.models if m.name not in excluded)
    if not any(index.get(name).role is Role.ENSEMBLE for name in kept):
        raise ConfigError("no ensemble of this repository can be served: "
                          + "; ".join(f"{name}: {why}" for name, why in excluded.items()))
    return ServedSet(repository, kept, excluded, tuple(unchecked))


def _read_outcome(repository: Path) -> dict[str, dict]:
    try:
        return json.loads((repository / ENGINES_OUTCOME).read_text()).get("detectors", {})
    except (OSError, ValueError, AttributeError):
        return {}


def make_view(served: ServedSet, view_dir: Path) -> Path:
    """A folder holding one symbolic link per served model (and the index), for --model-repository."""
    view_dir = Path(view_dir)
    view_dir.mkdir(parents=True, exist_ok=True)
    for entry in view_dir.iterdir():  # a restarted container finds its previous view
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
    for name in (*served.models, REPOSITORY_INDEX):
        (view_dir / name).symlink_to((served.repository / name).resolve())
    return view_dir


def tritonserver_arguments(argv: Sequence[str], served: ServedSet, view_dir: Path,
                           admin_key: str) -> list[str]:
    """`argv` (tritonserver and its options) with the repository replaced by a view when models are left out,
    and the admin API groups closed behind `admin_key`."""
    arguments = list(argv)
    if not served.complete:
        view = make_view(served, view_dir)
        arguments = [f"--model-repository={view}" if a.startswith("--model-repository=") else a for a in arguments]
    arguments += [f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}",
                  f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}"]
    return arguments


def repository_argument(argv: Sequence[str]) -> Path:
    for argument in argv:
        if argument.startswith("--model-repository="):
            return Path(argument.split("=", 1)[1])
    raise ConfigError("no --model-repository=... among the tritonserver arguments")


def main(argv: Sequence[str] | None = None, *, execute: bool = True) -> list[str]:
    """`python3 deploy/start_triton.py tritonserver --model-repository=/models ...`: say what is served and why
    anything is not, then become tritonserver. The admin key is $TRITON_ADMIN_KEY, or a random one (printed
    nowhere) that keeps the admin APIs closed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    repository = repository_argument(argv)
    view_dir = Path(os.environ.get("YQPACK_SERVED_VIEW", "/tmp/yqpack-served-models"))
    if (repository / REPOSITORY_INDEX).is_file():
        served = served_models(repository)
        for name, why in served.excluded.items():
            print(f"not serving {name}: {why}", flush=True)
        for name in served.unchecked:
            print(f"serving {name} without an engine check (YQPACK_ENGINE_CHECK is off)", flush=True)
        print(f"serving {len(served.models)} models of {repository}", flush=True)
    else:  # a repository yqpack did not render: serve it as it is
        served = ServedSet(repository, ())
    admin_key = os.environ.get("TRITON_ADMIN_KEY", "").strip()
    if not admin_key:
        admin_key = secrets.token_hex(16)
        print("TRITON_ADMIN_KEY is empty: the admin APIs (shared memory, logging, trace) are closed for this run; "
              "set it in deploy/.env to use them", flush=True)
    arguments = tritonserver_arguments(argv, served, view_dir, admin_key)
    if execute:
        os.execvp(arguments[0], arguments)
    return arguments
