"""Render Kubernetes manifests for a model repository (folder on a PVC, or S3) from `templates/k8s/*.yaml.j2`.

The output folder is a Kustomize base (`kubectl apply -k OUT`): Namespace, Deployment (GPU, /dev/shm, probes,
non-root, an init container building the TensorRT plans on the node's GPU like compose's `engines` service),
Service, HorizontalPodAutoscaler on Triton queue time per request, ServiceMonitor, PodDisruptionBudget, the
prometheus-adapter rule that feeds the HPA, and a KServe `InferenceService` variant in `OUT/kserve/`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from packager.core.paths import DEPLOY_DIR, PACKAGE_DIR, TEMPLATES_DIR
from packager.core.contracts import ConfigError, Role
from packager.serve.s3_push import S3Location, read_remote_index, triton_endpoint_url
from packager.repository.targets import PRE_POST_INSTANCES
from packager.core.repository_index import RepositoryIndex
from packager.core.files import replace_directory
from packager.serve.embedded import SHM_DEFAULT_BYTES

MIB = 1024 * 1024
AWS_CLI_IMAGE = "amazon/aws-cli:2.17.0"  # fetches an S3 repository for the engine build (the image has no S3 client)
STARTUP_BUDGET_S = 600  # model download + load after the init containers; the startup probe allows this much
ENGINE_BUDGET_S = 1800  # init containers (fetch + TensorRT builds) have no probe: the rollout deadline covers them
MODELS_MOUNT = "/models"
METRIC_NAME = "triton_queue_time_per_request_ms"  # what the adapter rule exposes and the HPA reads
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
MANIFESTS = ("namespace", "deployment", "service", "hpa", "servicemonitor", "pdb")
KSERVE_MANIFESTS = ("serviceaccount", "inferenceservice")
# The engine kit (standard library only), as paths under packager/; each file name is also its ConfigMap key.
ENGINE_MODULES = ("engines/builder.py", "engines/plans.py", "engines/gpu_probe.py", "engines/serving.py",
                  "engines/host_sizing.py", "core/contracts.py", "core/repository_index.py", "core/files.py")
ENGINE_SCRIPTS = ("build_engines.py", "start_triton.py")  # deploy/ entry points, mounted at /yqpack/deploy/
SOURCE_MOUNT = "/models-source"  # a gpu Deployment's claim: the repository to copy, and the plan cache
MARKER = ".yqpack-k8s"  # marks a folder yqpack k8s may replace


@dataclass(frozen=True)
class K8sOptions:
    repository: str  # a rendered repository folder (its copy lives on a PVC), or s3://BUCKET/PREFIX
    image: str
    namespace: str = "yqpack"
    name: str | None = None  # default MODEL-triton
    replicas: int = 1
    max_replicas: int = 4
    gpus: int = 1
    queue_ms: float = 50.0
    s3_secret: str = "yqpack-s3"
    endpoint_url: str | None = None
    pvc: str | None = None  # default NAME-models (folder repositories)


@dataclass(frozen=True)
class ServedRepository:
    """What the manifests need to know about the repository, read from its yqpack_repository.json."""

    model_name: str
    target: str
    ensembles: dict[str, str]  # precision -> ensemble name
    python_detectors: int  # detectors running in the Python backend (the `local` target): one shm user each
    s3: S3Location | None  # None: a folder, served from a PVC

    @property
    def builds_engines(self) -> bool:
        return self.target == "gpu"


@dataclass(frozen=True)
class K8sResult:
    out: Path
    files: list[Path]
    notes: list[str] = field(default_factory=list)


def load_served_repository(options: K8sOptions) -> ServedRepository:
    if options.repository.startswith("s3://"):
        location = S3Location.parse(options.repository)
        index: RepositoryIndex = read_remote_index(options.repository, options.endpoint_url)
    else:
        location, index = None, RepositoryIndex.load_servable(Path(options.repository))
    ensembles = {precision.value: name for precision, name in index.ensembles().items()}
    python_detectors = sum(m.platform == "python" for m in index.by_role(Role.DETECTOR))
    return ServedRepository(index.model.name, index.target, ensembles, python_detectors, location)


def check_options(options: K8sOptions, repository: ServedRepository) -> None:
    names = {"--namespace": options.namespace, "--name": options.name, "--s3-secret": options.s3_secret,
             "--pvc": options.pvc}
    bad = [f"{flag} {value!r}" for flag, value in names.items() if value is not None and not DNS_LABEL.match(value)]
    if bad:
        raise ConfigError(f"not a Kubernetes name (lowercase letters, digits, '-', at most 63): {', '.join(bad)}")
    if not options.image or any(c.isspace() for c in options.image):
        raise ConfigError(f"--image must be an image reference like registry/yqpack-triton:25.01: {options.image!r}")
    if options.max_replicas < options.replicas:
        raise ConfigError(f"--max-replicas {options.max_replicas} is below --replicas {options.replicas}")
    if repository.builds_engines and options.gpus < 1:
        raise ConfigError("a gpu-target repository needs --gpus 1 or more (its TensorRT plans are built on the GPU)")


def shm_bytes(target: str, python_detectors: int) -> int:
    """/dev/shm for the Python backend: one region per stub (pre/post instances, Python-backend detectors), each
    starting at SHM_DEFAULT_BYTES and growing with the batch; 4x headroom, at least 1 GiB."""
    stubs = sum(PRE_POST_INSTANCES[target]) + python_detectors
    return max(1024 * MIB, 4 * stubs * SHM_DEFAULT_BYTES)


def manifest_context(options: K8sOptions, repository: ServedRepository) -> dict:
    name = options.name or f"{repository.model_name.lower().replace('_', '-')}-triton"
    if not DNS_LABEL.match(name):
        raise ConfigError(f"derived name {name!r} is not a Kubernetes name: pass --name")
    s3 = repository.s3
    # Triton reads S3 itself unless the plans must be built first: then an init container copies the repository.
    fetch = s3 is not None and repository.builds_engines
    if s3 is None or fetch:
        model_repository = MODELS_MOUNT
    else:
        model_repository = triton_endpoint_url(s3, options.endpoint_url) if options.endpoint_url else s3.url
    shm = shm_bytes(repository.target, repository.python_detectors)
    return {
        "name": name,
        "namespace": options.namespace,
        "image": options.image,
        "replicas": options.replicas,
        "max_replicas": options.max_replicas,
        "gpus": options.gpus,
        "queue_target": f"{options.queue_ms:g}",
        "metric_name": METRIC_NAME,
        "model_name": repository.model_name,
        "target": repository.target,
        "ensembles": sorted(repository.ensembles.values()),
        "ensemble_regex": "|".join(sorted(repository.ensembles.values())),
        "s3": s3,
        "s3_secret": options.s3_secret,
        "endpoint_url": options.endpoint_url,
        "pvc": None if s3 is not None else (options.pvc or f"{name}-models"),
        "fetch": fetch,
        "aws_cli_image": AWS_CLI_IMAGE,
        "engines": repository.builds_engines,
        "trt_cache": repository.target in ("gpu", "gpu-ort"),
        "engine_modules": ENGINE_MODULES,
        "model_repository": model_repository,
        "models_mount": MODELS_MOUNT,
        "source_mount": SOURCE_MOUNT,
        "plan_cache": f"{SOURCE_MOUNT}/.yqpack-plans",
        "engine_scripts": ENGINE_SCRIPTS,
        "shm_mib": shm // MIB,
        "shm_default_bytes": SHM_DEFAULT_BYTES,
        "memory_limit_mib": 8192 + shm // MIB,  # a memory emptyDir counts against the container's limit
        "startup_failure_threshold": STARTUP_BUDGET_S // 10,
        "progress_deadline_s": ENGINE_BUDGET_S + STARTUP_BUDGET_S,
        "storage_uri": s3.url if s3 is not None else f"pvc://{options.pvc or f'{name}-models'}",
    }


def render_k8s(options: K8sOptions, out: Path) -> K8sResult:
    """Render the Kustomize base (and `kserve/`) for `options.repository` into `out`; returns the files written.

    Rendered into a sibling folder and swapped in, so a failure leaves a previous rendering intact and a new one
    carries no file left over from an earlier rendering. A non-empty `out` not written by yqpack is refused.
    """
    repository = load_served_repository(options)
    check_options(options, repository)
    context = manifest_context(options, repository)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out} exists and was not written by yqpack k8s: choose an empty or new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.rendering-", dir=out.parent))
    try:
        written = _render_all(context, staging)
        (staging / MARKER).write_text(f"written by yqpack k8s from {options.repository}\n")
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    notes = []
    if repository.target == "local":
        notes.append("the local target's detector runs onnxruntime in the Python backend, which the serving image "
                     "lacks: render the repository with --target gpu, gpu-ort or cpu for a cluster")
    if repository.builds_engines:
        notes.append("KServe variant: it has no engine-build step; push a repository whose plans were built on the "
                     "same GPU model and TensorRT version (yqpack engines), or use the Deployment")
    return K8sResult(out, [out / path.relative_to(staging) for path in written], notes)


def _render_all(context: dict, out: Path) -> list[Path]:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR / "k8s")), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["q"] = _quote
    (out / "kserve").mkdir()
    (out / "prometheus-adapter").mkdir()
    files = [_render(env, f"{m}.yaml.j2", context, out / f"{m}.yaml") for m in MANIFESTS]
    if context["pvc"]:
        files.append(_render(env, "pvc.yaml.j2", context, out / "pvc.yaml"))
    if context["engines"]:
        files += _copy_engine_scripts(out / "engines")
    files.append(_render(env, "kustomization.yaml.j2", context, out / "kustomization.yaml"))
    files.append(_render(env, "prometheus-adapter-values.yaml.j2", context, out / "prometheus-adapter" / "values.yaml"))
    files.append(_render(env, "namespace.yaml.j2", context, out / "kserve" / "namespace.yaml"))  # no ../ in kustomize
    files += [_render(env, f"kserve/{m}.yaml.j2", context, out / "kserve" / f"{m}.yaml") for m in KSERVE_MANIFESTS]
    files.append(_render(env, "kserve/kustomization.yaml.j2", context, out / "kserve" / "kustomization.yaml"))
    return files


def _render(env: jinja2.Environment, template: str, context: dict, destination: Path) -> Path:
    text = env.get_template(template).render(**context)
    list(yaml.safe_load_all(text))  # a template bug surfaces here, not in kubectl
    destination.write_text(text)
    return destination


def _copy_engine_scripts(folder: Path) -> list[Path]:
    """The compose `engines` service's code for a ConfigMap: deploy/build_engines.py and the standard-library-only
    engine kit it imports (ENGINE_MODULES, mounted back at their paths under packager/)."""
    folder.mkdir(exist_ok=True)
    sources = (*(DEPLOY_DIR / f for f in ENGINE_SCRIPTS), *(PACKAGE_DIR / f for f in ENGINE_MODULES))  # checkout or wheel
    return [Path(shutil.copy2(source, folder / source.name)) for source in sources]  # flat: names are the keys


def _quote(value) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    import json

    return json.dumps(str(value))
