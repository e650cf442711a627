"""The deployment files, checked offline: the Kubernetes manifests against the API's schemas, the
Dockerfile with hadolint and for what the project needs, and `mlflow models generate-dockerfile`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import mlflow_cli
import pytest
import yaml
from conftest import BIN, REPO, model_uri_of, step_env

K8S_VERSION = "1.33"  # a supported Kubernetes release; the schemas ship with kubernetes-validate
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))
SERVE_PORT = 8000


def resources() -> dict[str, dict]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc
    return found


def pod_spec(resource: dict) -> dict:
    if resource["kind"] == "CronJob":
        return resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return resource["spec"]["template"]["spec"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_the_kubernetes_api(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs
    for doc in docs:
        # strict: unknown fields (a typo such as `readinesProbe`) fail too
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_cronjob_runs_main_one_at_a_time_with_secrets_and_a_model_cache():
    cron = resources()["CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = pod_spec(cron)["containers"][0]
    assert container["command"][:5] == ["mlflow", "run", "/app", "-e", "main"]
    assert {"configMapRef": {"name": "phi3flow-config"}} in container["envFrom"]
    secret_name = next(e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e)
    secret = resources()["Secret"]
    assert secret["metadata"]["name"] == secret_name
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"} <= set(secret["stringData"])
    assert "MLFLOW_TRACKING_URI" in resources()["ConfigMap"]["data"]
    # The Hugging Face cache (HF_HOME in the image) is on the claimed volume
    hf_home = re.search(r"HF_HOME=(\S+)", (REPO / "Dockerfile").read_text()).group(1)
    cache_mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")["mountPath"]
    assert hf_home.startswith(cache_mount + "/")
    volume = next(v for v in pod_spec(cron)["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"]["claimName"] == resources()["PersistentVolumeClaim"]["metadata"]["name"]


def test_serve_deployment_is_ready_on_health_and_sized():
    deployment, service = resources()["Deployment"], resources()["Service"]
    assert deployment["spec"]["replicas"] >= 2
    container = pod_spec(deployment)["containers"][0]
    assert container["command"] == ["python", "-m", "steps.serve"]
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0" and int(args[args.index("--port") + 1]) == SERVE_PORT
    assert container["ports"] == [{"name": "http", "containerPort": SERVE_PORT}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    sizes = container["resources"]
    assert set(sizes["requests"]) == set(sizes["limits"]) == {"cpu", "memory"}
    # the Service reaches exactly these pods
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"] == pod_labels
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_pins_as_a_non_root_user_with_a_healthcheck():
    dockerfile = (REPO / "Dockerfile").read_text()
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    python = yaml.safe_load((REPO / "python_env.yaml").read_text())["python"]
    assert re.search(rf"^FROM python:{re.escape(python)}\.\d+-slim", dockerfile, re.M)
    # CPU torch at the project's pin, then the project itself (which brings the other pins)
    torch_pin = next(pin for pin in pins if pin.startswith("torch=="))
    assert re.search(rf"--index-url https://download.pytorch.org/whl/cpu {re.escape(torch_pin)}\b", dockerfile)
    assert "pip install --no-cache-dir ." in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    healthcheck = re.search(r"^HEALTHCHECK .*\n.*CMD (\[.*\])$", dockerfile, re.M)
    assert healthcheck and f"http://127.0.0.1:{SERVE_PORT}/health" in healthcheck.group(1)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    assert cmd[:3] == ["python", "-m", "steps.serve"] and cmd[cmd.index("--port") + 1] == str(SERVE_PORT)
    # everything the image copies exists and is not excluded by .dockerignore
    ignored = set((REPO / ".dockerignore").read_text().split())
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for name in source.split():
            assert (REPO / name.rstrip("/")).exists(), name
            assert name.rstrip("/") not in ignored, name


def test_generated_dockerfile_folder_loads_and_predicts_without_the_project(onnx_fp32_run, tracking_uri: str,
                                                                            tmp_path: Path):
    model_uri = model_uri_of(onnx_fp32_run)
    generated = tmp_path / "generated"
    proc = mlflow_cli.run(["models", "generate-dockerfile", "-m", model_uri, "-d", str(generated)],
                          step_env(tracking_uri), tmp_path, 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COPY model_dir /opt/ml/model" in (generated / "Dockerfile").read_text()
    # Move the folder (as a Docker build context would be) and load it with nothing of the project
    # around: cwd elsewhere, no project on sys.path, and the project's package must stay unimported.
    moved = shutil.move(str(generated), str(tmp_path / "elsewhere"))
    env = step_env(tracking_uri, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    # The project's package cannot be imported at all in that process (this environment has it
    # installed, and MLflow imports its default-experiment plugin when it starts): the model must
    # load and answer without it.
    code = (
        "import json, sys\n"
        "class NoProject:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'phi3flow' or name.startswith('phi3flow.'):\n"
        "            raise ImportError('the project is not here')\n"
        "sys.meta_path.insert(0, NoProject())\n"
        "import mlflow\n"
        f"model = mlflow.pyfunc.load_model({str(Path(moved) / 'model_dir')!r})\n"
        "answer = model.predict({'messages': [{'role': 'user', 'content': 'What is the capital of Spain?'}], "
        "'max_tokens': 4})[0]\n"
        "print(json.dumps({'usage': answer['usage'], 'project_imported': 'phi3flow' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd="/",
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["usage"]["completion_tokens"] > 0
    assert result["project_imported"] is False
