"""deploy/: the Dockerfile, compose file, Kubernetes and KServe manifests, checked by real validators (hadolint,
yamllint, kubernetes-validate's bundled API schemas) and for the facts that tie them together. Images are not
built here: nothing in deploy/ is run."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install 'zsad[dev]')")

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (still supported by the big clouds' K8s)


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install 'zsad[dev]')")
    return found


def _kv():
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed (pip install 'zsad[dev]')")
    import kubernetes_validate

    return kubernetes_validate


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)


# -- Dockerfile ----------------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = _tool("hadolint")
    res = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
    bad = tmp_path / "Dockerfile"  # the linter is live: a floating tag and an unpinned apt install are flagged
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    res = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "DL3007" in res.stdout and "DL3008" in res.stdout


def test_dockerfile_pins_the_triton_image_and_copies_every_package_folder():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$", text, re.M)
    assert re.fullmatch(r"\d\d\.\d\d", _dockerfile_arg("TRITON_VERSION"))
    assert _dockerfile_arg("TORCH") == "cpu"
    # the image installs zsad non-editably from these folders: each mapped package folder must be copied in
    # and let through the build context's ignore file
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY (\S+) \./\1$", text, re.M))
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for folder in package_dirs | {"triton_models"}:
        assert folder in copied, f"deploy/Dockerfile does not COPY {folder}"
        assert f"!{folder}/**" in ignore, f"deploy/Dockerfile.dockerignore drops {folder}"
    for folder in copied:
        assert (ROOT / folder).is_dir(), folder


# -- YAML ----------------------------------------------------------------------------------------------------------
def test_yaml_passes_yamllint(tmp_path):
    yamllint = _tool("yamllint")
    cfg = str(DEPLOY / ".yamllint")
    res = subprocess.run([yamllint, "-f", "parsable", "-c", cfg, str(DEPLOY)], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\n")  # a duplicated key: live linter
    assert subprocess.run([yamllint, "-c", cfg, str(bad)], capture_output=True).returncode != 0


def test_kubernetes_manifests_validate_against_the_api_schemas():
    kv = _kv()
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    kinds = set()
    for f in files:
        for doc in _docs(f):
            kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field
            kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    broken = _one(DEPLOY / "kubernetes" / "deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv.ValidationError):  # the schema check is live
        kv.validate(broken, K8S_VERSION, strict=True)


def _triton_container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_deployment_has_gpu_probes_metrics_and_matches_service_hpa_and_volume():
    dep = _one(DEPLOY / "kubernetes" / "deployment.yaml")
    c = _triton_container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's defaults
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (c["livenessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["port"]) == ("/v2/health/live", "http")
    assert (c["readinessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["port"]) == ("/v2/health/ready",
                                                                                              "http")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
    assert ann["prometheus.io/path"] == "/metrics"
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
        re.search(r"^USER (\d+):", (DEPLOY / "Dockerfile").read_text(), re.M).group(1))

    svc = _one(DEPLOY / "kubernetes" / "service.yaml")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    hpa = _one(DEPLOY / "kubernetes" / "hpa.yaml")
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == ("Deployment",
                                                                                              dep["metadata"]["name"])
    pvc = _one(DEPLOY / "kubernetes" / "model-repository-pvc.yaml")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert f"--model-repository={mounts['models']}" in c["args"] and mounts["dshm"] == "/dev/shm"


def _exit_timeout(args: list[str]) -> int:
    (value,) = [int(a.split("=", 1)[1]) for a in args if a.startswith("--exit-timeout-secs=")]
    return value


def test_deployment_drains_before_it_is_killed():
    """A rollout or scale-down loses no request (issue 23 item 3): the preStop pause outlasts the readiness probe's
    reaction, and the grace period covers the pause plus tritonserver's own wait for requests in flight."""
    dep = _one(DEPLOY / "kubernetes" / "deployment.yaml")
    c = _triton_container(dep)
    sleep_cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_cmd[0] == "sleep"
    pause = int(sleep_cmd[1])
    ready = c["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= pause
    assert ready["timeoutSeconds"] < ready["periodSeconds"]
    exit_timeout = _exit_timeout(c["args"])
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pause + exit_timeout
    compose = _one(DEPLOY / "compose.yaml")["services"]["tritonserver"]
    assert int(compose["stop_grace_period"].rstrip("s")) > _exit_timeout(compose["command"])


def test_kserve_runtime_and_inference_service():
    kv = _kv()
    rt = _one(DEPLOY / "kserve" / "servingruntime.yaml")
    isvc = _one(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert (rt["apiVersion"], rt["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"] and model["protocolVersion"] in rt["spec"]["protocolVersions"]
    assert model["modelFormat"] in [{k: f[k] for k in ("name", "version")} for f in rt["spec"]["supportedModelFormats"]]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (c,) = rt["spec"]["containers"]
    assert c["name"] == "kserve-container"  # the name KServe's storage initializer and router look for
    assert c["image"] == _triton_container(_one(DEPLOY / "kubernetes" / "deployment.yaml"))["image"]
    assert "--model-repository=/mnt/models" in c["args"]  # where KServe puts storageUri
    # no CRD schemas offline: the container parts are Kubernetes Container specs, so check them as a Pod's
    kserve_keys = {"modelFormat", "runtime", "protocolVersion", "storageUri", "runtimeVersion"}
    container = {"name": "model", **{k: v for k, v in model.items() if k not in kserve_keys}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [c, container]}}
    kv.validate(pod, K8S_VERSION, strict=True)


def test_compose_builds_this_dockerfile_with_a_gpu():
    compose = _one(DEPLOY / "compose.yaml")
    (svc,) = compose["services"].values()
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / svc["build"]["context"]).resolve() == ROOT
    assert svc["build"]["args"]["TRITON_VERSION"] == _dockerfile_arg("TRITON_VERSION")
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert {p.rsplit(":", 1)[1] for p in svc["ports"]} == {"8000", "8001", "8002"}
    assert any(v.endswith(":/models:ro") for v in svc["volumes"])
    assert "--model-repository=/models" in svc["command"]


def _server_commands() -> dict[str, list[str]]:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    rt = _one(DEPLOY / "kserve" / "servingruntime.yaml")
    return {"Dockerfile": cmd, "compose": _one(DEPLOY / "compose.yaml")["services"]["tritonserver"]["command"],
            "deployment": _triton_container(_one(DEPLOY / "kubernetes" / "deployment.yaml"))["args"],
            "servingruntime": rt["spec"]["containers"][0]["args"]}


def test_every_tritonserver_flag_exists_in_triton_2_51():
    """The flags in deploy/ are those of tritonserver 2.51 (the 24.10 image), read from the bundled binary's --help."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("nvidia-pytriton (the bundled tritonserver) is not installed")
    from zsad.serve.server import _bundled_binary

    with tempfile.TemporaryDirectory() as work:
        binary = _bundled_binary(Path(work))
        res = subprocess.run([str(binary.path), "--help"], env={**os.environ, **binary.env}, capture_output=True,
                             text=True, timeout=60)
    known = set(re.findall(r"--([a-z][a-z0-9-]+)", res.stdout + res.stderr))
    assert {"model-repository", "http-port", "strict-readiness"} <= known, res.stderr[-500:]
    for where, cmd in _server_commands().items():
        assert cmd[0] == "tritonserver", where
        for arg in cmd[1:]:
            flag = re.fullmatch(r"--([a-z0-9-]+)=.+", arg)
            assert flag and flag.group(1) in known, f"{where}: {arg}"
