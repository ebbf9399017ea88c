"""`yqpack k8s`: every rendered manifest is schema-valid for Kubernetes 1.30 and 1.35 (kubernetes-validate's bundled
strict schemas, offline); the CRD kinds are checked against the fields their CRDs define, with their Kubernetes
parts (PodSpec, Container, LabelSelector) validated against the same strict schemas; and the objects agree with
each other (selectors, ports, the HPA metric and the adapter rule, the engine scripts the init container runs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from packager.core.paths import PROJECT_ROOT
from packager.cli.main import main
from packager.serve.k8s import ENGINE_MODULES, METRIC_NAME, K8sOptions, render_k8s
from packager.serve.s3_push import push_repository
from packager.core.repository_index import REPOSITORY_INDEX
from packager.repository.render import render_repository

VERSIONS = ("1.30.0", "1.35.0")
CRD_KINDS = {"ServiceMonitor", "InferenceService"}
IMAGE = "registry.example.com/yqpack-triton:25.01"

# Fields the CRDs define (prometheus-operator monitoring.coreos.com/v1 ServiceMonitor; KServe
# serving.kserve.io/v1beta1 InferenceService), at the levels yqpack writes.
SERVICEMONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "endpoints", "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets",
    "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector", "podTargetLabels",
    "sampleLimit", "scrapeClass", "scrapeProtocols", "selector", "targetLabels", "targetLimit",
}
SERVICEMONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2", "filterRunning",
    "followRedirects", "honorLabels", "honorTimestamps", "interval", "metricRelabelings", "oauth2", "params", "path",
    "port", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort", "tlsConfig",
}
PROMETHEUS_DURATION = re.compile(  # the CRD's Duration pattern
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
KSERVE_COMPONENT_EXTENSION = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy",
}
KSERVE_PREDICTOR_FRAMEWORKS = {"model", "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface",
                               "pmml", "lightgbm", "paddle", "workerSpec"}
KSERVE_MODEL_EXTENSION = {"modelFormat", "runtime", "storageUri", "runtimeVersion", "protocolVersion", "storage"}


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repositories(yolov8n_build, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("k8s-repositories")
    return {
        "local": render_repository(yolov8n_build, root / "local", target="local", precisions=("fp32",)).path,
        "gpu": render_repository(yolov8n_build, root / "gpu", target="gpu", precisions=("fp16", "int8")).path,
        "gpu-ort": render_repository(yolov8n_build, root / "gpu-ort", target="gpu-ort", precisions=("int8",)).path,
    }


def _render(repository: str, out: Path, **options) -> Path:
    render_k8s(K8sOptions(repository=repository, image=IMAGE, **options), out)
    return out


@pytest.fixture(scope="module")
def rendered(repositories, tmp_path_factory, s3_server) -> dict[str, Path]:
    """Four variants: folder (PVC) local and gpu targets; S3 local (Triton reads S3) and gpu (fetch + engines)."""
    root = tmp_path_factory.mktemp("k8s")
    creds = {"AWS_ACCESS_KEY_ID": s3_server["access_key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret_key"],
             "AWS_DEFAULT_REGION": s3_server["region"]}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in creds.items():
            patch.setenv(name, value)
        for target in ("local", "gpu"):
            push_repository(repositories[target], f"s3://models/k8s/{target}", s3_server["endpoint"])
        variants = {
            f"s3-{target}": _render(f"s3://models/k8s/{target}", root / f"s3-{target}", gpus=1,
                                    endpoint_url=s3_server["endpoint"], namespace="vision", replicas=2, max_replicas=6)
            for target in ("local", "gpu")
        }
    variants["pvc-local"] = _render(str(repositories["local"]), root / "pvc-local", gpus=0)
    variants["pvc-gpu"] = _render(str(repositories["gpu"]), root / "pvc-gpu", gpus=2, pvc="shared-models")
    variants["pvc-gpu-ort"] = _render(str(repositories["gpu-ort"]), root / "pvc-gpu-ort")
    return variants


def _documents(folder: Path) -> dict[str, dict]:
    """kind -> object for every manifest in a folder (kustomization.yaml aside)."""
    objects = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for document in yaml.safe_load_all(path.read_text()):
                objects[document["kind"]] = document
    return objects


def _validate_fragment(instance: dict, schema_file: str, version: str) -> None:
    """Validate part of an object (a PodSpec, a Container ...) against kubernetes-validate's strict schema."""
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.schema_contents(f"{folder}/{schema_file}", version)
    registry = Resource.from_contents(kv.schema_contents(f"{folder}/_definitions.json", version)) @ Registry()
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(instance)


# -- schema validity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ["pvc-local", "pvc-gpu", "pvc-gpu-ort", "s3-local", "s3-gpu"])
def test_every_manifest_is_schema_valid(rendered, variant, version):
    folder = rendered[variant]
    checked, not_schema_checked = [], []
    for path in [*sorted(folder.glob("*.yaml")), *sorted((folder / "kserve").glob("*.yaml"))]:
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            try:
                assert kv.validate(document, version, strict=True) == version.rsplit(".", 1)[0]
                checked.append(document["kind"])
            except kv.SchemaNotFoundError:
                not_schema_checked.append(document["kind"])
    assert set(not_schema_checked) == CRD_KINDS, "only the CRD kinds lack a bundled schema"
    expected = {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                "ServiceAccount"}
    assert expected <= set(checked)
    assert ("PersistentVolumeClaim" in checked) == variant.startswith("pvc")


def test_a_broken_manifest_is_rejected_by_the_validator(rendered):
    """The validator is strict for real: an unknown field and a wrong type both fail."""
    deployment = _documents(rendered["pvc-gpu"])["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.35.0", strict=True)
    deployment = _documents(rendered["pvc-gpu"])["Deployment"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.30.0", strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ["pvc-gpu", "s3-local"])
def test_servicemonitor_has_only_crd_fields_and_selects_the_service(rendered, variant, version):
    objects = _documents(rendered[variant])
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= SERVICEMONITOR_SPEC and {"selector", "endpoints"} <= set(monitor["spec"])
    _validate_fragment(monitor["spec"]["selector"], "labelselector-meta-v1.json", version)
    _validate_fragment(monitor["metadata"], "objectmeta-meta-v1.json", version)
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= SERVICEMONITOR_ENDPOINT
        assert endpoint["port"] in port_names and PROMETHEUS_DURATION.match(endpoint["interval"])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ["pvc-local", "s3-gpu"])
def test_inferenceservice_has_only_crd_fields_and_valid_pod_parts(rendered, variant, version):
    service = _documents(rendered[variant] / "kserve")["InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(service["spec"]) == {"predictor"}
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Serverless")
    predictor = dict(service["spec"]["predictor"])
    model = predictor.pop("model")
    kserve_only = {k: predictor.pop(k) for k in list(predictor) if k in KSERVE_COMPONENT_EXTENSION}
    assert not set(predictor) & KSERVE_PREDICTOR_FRAMEWORKS
    assert all(isinstance(kserve_only[k], int) for k in ("minReplicas", "maxReplicas"))
    _validate_fragment({**predictor, "containers": []}, "podspec-v1.json", version)  # volumes, securityContext, SA
    extension = {k: model.pop(k) for k in list(model) if k in KSERVE_MODEL_EXTENSION}
    _validate_fragment({**model, "name": "kserve-container"}, "container-v1.json", version)
    assert extension["modelFormat"] == {"name": "triton"} and extension["runtime"] == "kserve-tritonserver"
    assert extension["protocolVersion"] == "v2"
    assert re.match(r"^(s3://models/k8s/gpu|pvc://yolov8n-triton-models)$", extension["storageUri"])
    # The Python backend's shared memory: a memory emptyDir on /dev/shm.
    shm = next(v for v in predictor["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in model["volumeMounts"]


# -- what the objects say -----------------------------------------------------------------------------------------
def _pod(objects: dict) -> dict:
    return objects["Deployment"]["spec"]["template"]["spec"]


def test_deployment_gpu_shm_probes_and_non_root(rendered):
    objects = _documents(rendered["pvc-gpu"])
    pod = _pod(objects)
    triton = pod["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in _pod(_documents(rendered["pvc-local"]))["containers"][0]["resources"]["limits"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"].endswith("Mi")
    shm_mib = int(shm["emptyDir"]["sizeLimit"][:-2])
    assert shm_mib >= 1024 and int(triton["resources"]["limits"]["memory"][:-2]) > shm_mib
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = triton["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert objects["Deployment"]["spec"]["progressDeadlineSeconds"] >= 1800  # init containers build engines first
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for container in [*pod["containers"], *pod.get("initContainers", [])]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"]
    assert "--model-repository=/models" in triton["args"]
    # gpu: the claim is the source; each pod serves its own copy with its own GPU's plans (issue 20)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models-source"]["persistentVolumeClaim"]["claimName"] == "shared-models"
    assert volumes["models"] == {"name": "models", "emptyDir": {}}
    assert triton["args"][:3] == ["python3", "/yqpack/deploy/start_triton.py", "tritonserver"]
    local = _pod(_documents(rendered["pvc-local"]))
    assert next(v for v in local["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert local["containers"][0]["args"][0] == "tritonserver"


def test_s3_repository_is_read_by_triton_or_fetched_for_the_engine_build(rendered, s3_server):
    direct = _pod(_documents(rendered["s3-local"]))
    triton = direct["containers"][0]
    assert f"--model-repository=s3://127.0.0.1:{s3_server['port']}/models/k8s/local" in triton["args"]
    assert triton["envFrom"] == [{"secretRef": {"name": "yqpack-s3"}}]
    assert "initContainers" not in direct  # a local-target repository has no plans to build
    fetched = _pod(_documents(rendered["s3-gpu"]))
    fetch, engines = fetched["initContainers"]
    assert fetch["name"] == "fetch" and fetch["command"][:5] == ["aws", "s3", "sync", "s3://models/k8s/gpu", "/models"]
    assert fetch["command"][-2:] == ["--endpoint-url", s3_server["endpoint"]]
    assert engines["name"] == "engines" and engines["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--model-repository=/models" in fetched["containers"][0]["args"]


def test_engine_init_container_runs_the_compose_engines_code(rendered, repositories, tmp_path):
    """The ConfigMap carries deploy/build_engines.py + packager/engines/builder.py; laid out as its items mount them, a
    bare Python runs the builder (here without trtexec, which it reports as such)."""
    folder = rendered["pvc-gpu"]
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    pod = _pod(_documents(folder))
    engines = next(c for c in pod["initContainers"] if c["name"] == "engines")
    volume = next(v for v in pod["volumes"] if v["name"] == "engine-scripts")
    generator = next(g for g in kustomization["configMapGenerator"] if g["name"] == volume["configMap"]["name"])
    mount = next(m for m in engines["volumeMounts"] if m["name"] == "engine-scripts")["mountPath"]
    assert engines["image"] == pod["containers"][0]["image"] == IMAGE  # the serving image's own TensorRT
    layout = tmp_path / mount.strip("/")
    for item in volume["configMap"]["items"]:
        source = folder / next(f for f in generator["files"] if Path(f).name == item["key"])
        (layout / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, layout / item["path"])
    for module in ENGINE_MODULES:  # mounted back at their paths under packager/
        assert (layout / "packager" / module).read_bytes() == (PROJECT_ROOT / "packager" / module).read_bytes()
    script = tmp_path / engines["command"][1].strip("/")
    assert (layout / "deploy" / "start_triton.py").is_file()  # Triton's entry point travels in the same ConfigMap
    source = tmp_path / "models-source"
    shutil.copytree(repositories["gpu"], source)
    options = engines["command"][3:]
    assert options[options.index("--copy-from") + 1] == "/models-source"
    assert options[options.index("--plan-cache") + 1] == "/models-source/.yqpack-plans"

    trtexec = tmp_path / "trtexec"
    calls = tmp_path / "calls"
    trtexec.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nfor a in "$@"; do case "$a" in --saveEngine=*) '
                       'printf PLAN > "${a#--saveEngine=}";; esac; done\n')
    trtexec.chmod(0o755)

    def pod_start(pod: str, gpu: str, capability: str) -> Path:
        """One replica's init container, as the manifest runs it (bare python3), on a GPU given by the override."""
        models = tmp_path / pod / "models"
        command = ["/usr/bin/python3", "-I", str(script), str(models), "--trtexec", str(trtexec),
                   "--timing-cache-dir", str(tmp_path / pod / "trt_cache"),
                   "--copy-from", str(source), "--plan-cache", str(source / ".yqpack-plans")]
        env = {"PATH": "/usr/bin:/bin", "YQPACK_TENSORRT_VERSION": "11.1.0.106", "YQPACK_GPU_NAME": gpu,
               "YQPACK_GPU_COMPUTE_CAPABILITY": capability, "YQPACK_SERVING_IMAGE": IMAGE}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return models

    builds = lambda: len(calls.read_text().splitlines()) if calls.exists() else 0  # noqa: E731
    first = pod_start("pod-a", "NVIDIA L4", "8.9")
    assert builds() == 2  # fp16 and int8
    second = pod_start("pod-b", "NVIDIA L4", "8.9")
    assert builds() == 2  # the same GPU model: both plans from the plan cache, nothing rebuilt
    third = pod_start("pod-c", "Tesla T4", "7.5")
    assert builds() == 4  # another GPU model builds its own, into its own copy
    for models, gpu in ((first, "NVIDIA L4"), (second, "NVIDIA L4"), (third, "Tesla T4")):
        keys = [json.loads(p.read_text()) for p in models.glob("*/1/model.plan.key.json")]
        assert len(keys) == 2 and {k["gpu_name"] for k in keys} == {gpu} and {k["image"] for k in keys} == {IMAGE}
    assert not list(source.glob("*/1/model.plan*"))  # the shared repository itself never holds a plan
    assert len(list((source / ".yqpack-plans").glob("*/model.plan"))) == 4  # one entry per (detector, GPU model)

    result = subprocess.run(["/usr/bin/python3", "-I", str(script), str(tmp_path / "x"), "--trtexec",
                             "/nonexistent/trtexec", "--copy-from", str(source)], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "trtexec" in result.stderr, result.stderr


def test_service_pdb_and_hpa_agree_with_the_deployment_and_the_adapter_rule(rendered):
    folder = rendered["s3-gpu"]
    objects = _documents(folder)
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[kind]["spec"]["selector"]
        assert (selector.get("matchLabels", selector)).items() <= labels.items()
    assert sorted(p["port"] for p in objects["Service"]["spec"]["ports"]) == [8000, 8001, 8002]
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert objects["Deployment"]["metadata"]["namespace"] == "vision"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == METRIC_NAME
    (rule,) = yaml.safe_load((folder / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == METRIC_NAME
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert 'nv_inference_request_success{<<.LabelMatchers>>,model=~"yolov8n_fp16|yolov8n_int8"}' in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


@pytest.mark.parametrize("variant", ["pvc-local", "pvc-gpu", "s3-gpu"])
def test_kustomizations_list_exactly_the_rendered_files(rendered, variant):
    for folder in (rendered[variant], rendered[variant] / "kserve"):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Kustomization"
        listed = set(kustomization["resources"])
        on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == on_disk and not any(".." in r for r in listed)  # kustomize refuses files outside its root
        for generator in kustomization.get("configMapGenerator", []):
            assert all((folder / f).is_file() for f in generator["files"])


# -- bad input ------------------------------------------------------------------------------------------------------
def _cli(*args: str):
    return CliRunner().invoke(main, ["k8s", *args])


def test_bad_options_are_clear_errors(repositories, tmp_path):
    repo = str(repositories["gpu"])
    cases = {
        ("--namespace", "Vision_Team"): "not a Kubernetes name",
        ("--max-replicas", "1", "--replicas", "3"): "--max-replicas 1 is below --replicas 3",
        ("--gpus", "0"): "gpu-target repository needs --gpus 1",
        ("--image", "my image"): "--image must be an image reference",
    }
    for extra, message in cases.items():
        image = () if "--image" in extra else ("--image", IMAGE)
        args = ["--repository", repo, "--out", str(tmp_path / "out"), *image]
        result = _cli(*args, *extra)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
    unknown = _cli("--repository", repo, "--out", str(tmp_path), "--image", IMAGE, "--gpu-count", "1")
    assert unknown.exit_code == 2 and "--gpu-count" in unknown.output
    missing = _cli("--repository", repo, "--out", str(tmp_path))
    assert missing.exit_code == 2 and "--image" in missing.output


def test_a_repository_without_ensembles_is_refused(repositories, tmp_path):
    copy = Path(shutil.copytree(repositories["local"], tmp_path / "repo"))
    info = json.loads((copy / REPOSITORY_INDEX).read_text())
    info["models"] = [m for m in info["models"] if m["role"] != "ensemble"]
    (copy / REPOSITORY_INDEX).write_text(json.dumps(info))
    result = _cli("--repository", str(copy), "--out", str(tmp_path / "out"), "--image", IMAGE)
    assert result.exit_code == 1 and "no ensembles" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unreachable_s3_endpoint_is_a_clear_error(tmp_path, monkeypatch):
    from packager.serve.embedded import find_free_ports

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    closed = f"http://127.0.0.1:{find_free_ports(1)[0]}"
    result = _cli("--repository", "s3://models/none", "--endpoint-url", closed, "--out", str(tmp_path),
                  "--image", IMAGE)
    assert result.exit_code == 1 and "cannot reach s3://models/none" in result.output


def test_an_s3_prefix_without_a_repository_is_a_clear_error(aws_env, tmp_path):
    result = _cli("--repository", "s3://models/nothing-here", "--endpoint-url", aws_env["endpoint"],
                  "--out", str(tmp_path), "--image", IMAGE)
    assert result.exit_code == 1 and "is not a yqpack repository" in result.output


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("variant", ["pvc-gpu", "s3-gpu", "s3-local"])
def test_kustomize_builds_both_bases_and_the_result_is_schema_valid(rendered, variant):
    """`kubectl kustomize` (offline) builds what `kubectl apply -k` would send; the generated ConfigMap's hashed
    name reaches the Deployment, and every built object still validates."""
    for folder in (rendered[variant], rendered[variant] / "kserve"):
        built = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stderr
        objects = list(yaml.safe_load_all(built.stdout))
        namespace = objects[0]["metadata"]["name"]
        assert all(o["metadata"].get("namespace", namespace) == namespace for o in objects)
        for document in objects:
            if document["kind"] not in CRD_KINDS:
                kv.validate(document, "1.35.0", strict=True)
        if variant.endswith("gpu") and folder == rendered[variant]:
            (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
            assert set(config_map["data"]) == {"build_engines.py", "start_triton.py", "builder.py", "plans.py",
                                               "gpu_probe.py", "serving.py", "host_sizing.py", "contracts.py",
                                               "repository_index.py",
                                               "files.py"}
            deployment = next(o for o in objects if o["kind"] == "Deployment")
            volumes = deployment["spec"]["template"]["spec"]["volumes"]
            assert next(v for v in volumes if v["name"] == "engine-scripts")["configMap"]["name"] == \
                config_map["metadata"]["name"]


def test_rerendering_replaces_the_folder_and_a_foreign_folder_is_refused(repositories, tmp_path):
    out = tmp_path / "k8s"
    _render(str(repositories["gpu"]), out)
    assert (out / "pvc.yaml").is_file() and (out / "engines" / "builder.py").is_file()
    _render(str(repositories["local"]), out, gpus=0, pvc="other-models")
    assert not (out / "engines").exists()  # nothing left over from the gpu rendering
    assert "other-models" in (out / "pvc.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["k8s"]  # no staging folder left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = _cli("--repository", str(repositories["gpu"]), "--out", str(foreign), "--image", IMAGE)
    assert result.exit_code == 1 and "was not written by yqpack k8s" in result.output
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_names_what_it_wrote_and_warns_about_the_local_target(repositories, tmp_path):
    result = CliRunner().invoke(
        main, ["k8s", "--repository", str(repositories["local"]), "--out", str(tmp_path / "k8s"), "--image", IMAGE,
               "--gpus", "0"])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'k8s' / 'deployment.yaml'}" in result.output
    assert "kubectl apply -k" in result.output
    assert "note: the local target's detector runs onnxruntime" in result.stderr


def test_trt_cache_is_writable_where_tensorrt_builds(rendered):
    """gpu: the engines init container's timing caches; gpu-ort: onnxruntime builds its engines at load in Triton."""
    for variant, init in (("pvc-gpu", True), ("pvc-gpu-ort", False), ("pvc-local", False)):
        pod = _pod(_documents(rendered[variant]))
        triton_mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        wants_cache = variant != "pvc-local"
        assert ("trt-cache" in triton_mounts) == wants_cache, variant
        assert (not wants_cache) or not triton_mounts["trt-cache"].get("readOnly", False)
        assert ("initContainers" in pod) == init, variant
