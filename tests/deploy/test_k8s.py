"""
Checks of the Kubernetes install on what an operator gets: the manifests as `kubectl kustomize` renders
docker/k8s, export/ and monitoring/, and the commands docker/k8s/README.md tells them to run. Every image
those commands deploy is one its `kustomize edit set image` retargets; the manifests validate against a
pinned Kubernetes and agree with the BFF's settings, the HPA, the monitoring stack and the storage the README
asks for. Offline: kubectl renders, nothing is applied.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shutil
import string
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from backend import protocol
from tests.deploy.test_deploy import BFF_PORT, DOCKER, TRITON_PORTS

K8S = DOCKER / "k8s"
README = K8S / "README.md"
KUSTOMIZATIONS = ("k8s", "k8s/export", "k8s/monitoring")  # under docker/, each rendered whole
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"  # helm values, not a manifest
KUBERNETES_VERSION = "1.34.0"  # the oldest minor we claim to support; strict mode rejects unknown fields
OPERATOR_API = "monitoring.coreos.com/"  # the Prometheus Operator's CRDs: not in kubernetes-validate's schemas
STAND_IN_SECRET = "k" * 32  # the Secret nanochat-bff is created by hand; any valid key renders the same


# ---------------------------------------------------------------- helpers


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is not installed (it renders the kustomizations offline)"
    return found


def render(directory: Path) -> list[dict]:
    run = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def manifests() -> dict[str, list[dict]]:
    return {name: render(DOCKER / name) for name in KUSTOMIZATIONS}


def find(kind: str, name: str) -> dict:
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind}/{name} rendered from docker/k8s")


def pod_specs(docs: list[dict]) -> list[dict]:
    """The pod spec of every workload (Deployment, StatefulSet, Job...) among docs."""
    return [doc["spec"]["template"]["spec"] for doc in docs if "template" in doc.get("spec", {})]


def images(pod: dict) -> list[str]:
    return [c["image"] for c in pod.get("initContainers", []) + pod["containers"]]


def readme_commands() -> list[str]:
    """The README's shell commands in order: continuation lines joined, split at `&&`, comments dropped.
    A `cd` holds until the end of its line, as in `(cd dir && ...)` or `cd dir && ... && cd -`."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        cwd = ""
        for part in line.split(" #")[0].strip(" ()").split("&&"):
            part = " ".join(part.split())
            if part.startswith("cd "):
                cwd = "" if part == "cd -" else part.removeprefix("cd ")
            elif part:
                commands.append(f"cd {cwd} && {part}" if cwd else part)
    return commands


def set_image(directory: Path, args: list[str]) -> dict[str, str]:
    """What `kustomize edit set image NAME=NEWNAME:TAG...` does to directory/kustomization.yaml; the images set."""
    path = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    entries = {entry["name"]: entry for entry in kustomization.setdefault("images", [])}
    result = {}
    for arg in args:
        name, _, image = arg.partition("=")
        new_name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        entry = entries.get(name) or {"name": name}
        if name not in entries:
            kustomization["images"].append(entry)
        entry.update(newName=new_name, newTag=tag)
        result[name] = f"{new_name}:{tag}"
    path.write_text(yaml.safe_dump(kustomization))
    return result


def env_value(var: dict) -> str:
    """One env entry's value as the pod would see it (ConfigMaps from the rendering, Secrets stood in)."""
    if "value" in var:
        return var["value"]
    ref = var["valueFrom"]
    if "configMapKeyRef" in ref:
        return find("ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
    assert "secretKeyRef" in ref, var
    return STAND_IN_SECRET


def cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def triton_labels() -> dict:
    return find("StatefulSet", "triton")["spec"]["template"]["metadata"]["labels"]


def exported_metric_names() -> set[str]:
    """Every series name the backend and the BFF export (histograms as their _bucket/_sum/_count series)."""
    from bff.stats import BffStats

    names = set()
    for key, name in vars(protocol).items():
        if key.startswith("METRIC_") and key != "METRIC_PREFIX":
            names |= {name, name + "_bucket", name + "_sum", name + "_count"}
    for family in BffStats().registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name + s for s in ("", "_total", "_bucket",
                                                                                        "_count", "_sum")}
    return names


def vllm_records() -> list[dict]:
    rules = find("PrometheusRule", "nanochat-vllm-rules")["spec"]["groups"]
    return [rule for group in rules for rule in group["rules"]]


def relabel(vllm_name: str, ours: str) -> str:
    """The label_replace arguments that copy our label `ours` into vLLM's `vllm_name`."""
    return f'"{vllm_name}", "$1", "{ours}", "(.*)")'


# ---------------------------------------------------------------- schemas and layout


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kubernetes_manifest_validates(name):
    for doc in manifests()[name]:
        if doc["apiVersion"].startswith(OPERATOR_API):
            assert doc["spec"].get("podMetricsEndpoints") or doc["spec"].get("groups")  # structure only
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_broken_manifest():
    bad = copy.deepcopy(find("StatefulSet", "triton"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/v2/health/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):  # misspelt field, and httpGet without a port
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_every_manifest_is_in_a_kustomization():
    listed = set()
    for name in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((DOCKER / name / "kustomization.yaml").read_text())
        listed |= {DOCKER / name / r for r in kustomization["resources"]}
    assert all(path.is_file() for path in listed), listed
    files = {p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - listed == {ADAPTER_VALUES}, "a manifest no kustomization renders"


# ---------------------------------------------------------------- the README's commands


def test_readme_retargets_every_image_it_deploys(tmp_path):
    shutil.copytree(K8S, tmp_path / "docker" / "k8s")
    env, retargeted, deployed = {}, {}, []
    for command in readme_commands():
        command = string.Template(command).safe_substitute(env)
        if command.startswith("export "):
            env |= dict(re.findall(r"\s(\w+)=([^\s$()]+)(?=\s|$)", command))  # plain values; not $(...)
        if m := re.fullmatch(r"cd (\S+) && kustomize edit set image (.+)", command):
            retargeted |= set_image(tmp_path / m[1], m[2].split())
        if m := re.search(r"kubectl (?:-n \S+ )?apply -([kf]) (\S+)", command):
            deployed += render(tmp_path / m[2]) if m[1] == "k" else load_all(tmp_path / m[2])
    used = {image for pod in pod_specs(deployed) for image in images(pod)}
    assert used, "the README deploys no workload"
    assert used <= set(retargeted.values()), f"not retargeted by the README: {used - set(retargeted.values())}"


def test_readme_walks_the_install_in_order():
    commands = readme_commands()
    steps = [r"kustomize edit set image", r"install kube-prometheus-stack ", r"install prometheus-adapter ",
             r"create secret generic nanochat-bff", r"apply -k docker/k8s$", r"apply -k docker/k8s/monitoring$",
             r"apply -k docker/k8s/export$"]
    at = [next(i for i, c in enumerate(commands) if re.search(step, c)) for step in steps]
    assert at == sorted(at), dict(zip(steps, at, strict=True))
    text = README.read_text()
    assert text.index("must have") < text.index("```sh")  # prerequisites come before the first command


def test_a_read_only_gpu_container_comes_with_the_readmes_first_gpu_node_check():
    # CDI-mode NVIDIA toolkits can fail to create a GPU container with a read-only root (kserve/kserve#5711)
    sts = find("StatefulSet", "triton")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    text = README.read_text()
    check = text.index("kserve/kserve#5711")
    assert check < text.index("```sh") and "readOnlyRootFilesystem: false" in text[check:check + 600]


# ---------------------------------------------------------------- Triton and the BFF


def test_triton_pods():
    sts = find("StatefulSet", "triton")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == TRITON_PORTS
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["model-repository"]["persistentVolumeClaim"]["claimName"] == "model-repository"
    assert pod["nodeSelector"] and pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] > 60  # Triton's --exit-timeout-secs


def test_triton_services_ports():
    for name in ("triton", "triton-headless"):
        ports = {p["name"]: p["port"] for p in find("Service", name)["spec"]["ports"]}
        assert ports == TRITON_PORTS
    assert find("Service", "triton-headless")["spec"]["clusterIP"] == "None"
    assert find("Service", "bff")["spec"]["ports"][0]["port"] == BFF_PORT


def test_bff_endpoints_cover_every_replica_the_hpa_may_create():
    hpa = find("HorizontalPodAutoscaler", "triton")
    sts = find("StatefulSet", "triton")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "triton"}
    urls = find("ConfigMap", "nanochat-config")["data"]["BFF_TRITON_URLS"].split(",")
    expected = [f"triton-{i}.{sts['spec']['serviceName']}:{TRITON_PORTS['grpc']}"
                for i in range(hpa["spec"]["maxReplicas"])]
    assert urls == expected
    assert find("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_no_replicas_on_what_an_hpa_scales():
    # `kubectl apply` would reset the HPA's count to the manifest's, ending the streams of the replicas cut.
    hpas = [doc for docs in manifests().values() for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"]
    assert hpas
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert "replicas" not in find(target["kind"], target["name"])["spec"], target


def test_bff_deployment():
    pod = find("Deployment", "bff")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["INTERNAL_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "INTERNAL_API_KEY"
    assert container["ports"][0]["containerPort"] == BFF_PORT
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_every_bff_container_runs_one_worker_per_cpu_of_its_limit():
    bffs = [c for docs in manifests().values() for pod in pod_specs(docs) for c in pod["containers"]
            if c["image"].split(":")[0].endswith("nanochat-bff")]
    assert bffs
    for container in bffs:
        env = {e["name"]: env_value(e) for e in container["env"]}
        assert int(env["BFF_WORKERS"]) == math.ceil(cpus(container["resources"]["limits"]["cpu"]))


def test_triton_is_not_a_public_api_in_kubernetes():
    triton = find("StatefulSet", "triton")["spec"]["template"]["spec"]
    bff = find("Deployment", "bff")["spec"]["template"]["spec"]
    (t,), (b,) = triton["containers"], bff["containers"]
    assert [a for a in t["args"] if "restricted" in a] == [
        f"--{flag}=model-repository:triton-admin-key=$(TRITON_ADMIN_KEY)"
        for flag in ("grpc-restricted-protocol", "http-restricted-api")]
    secret = lambda c, name: next(e for e in c["env"] if e["name"] == name)["valueFrom"]["secretKeyRef"]
    assert secret(t, "TRITON_ADMIN_KEY") == secret(b, "BFF_TRITON_ADMIN_KEY") == {"name": "nanochat-bff",
                                                                                   "key": "TRITON_ADMIN_KEY"}
    assert triton["automountServiceAccountToken"] is False and bff["automountServiceAccountToken"] is False
    assert t["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert {m["mountPath"] for m in t["volumeMounts"]} >= {"/tmp", "/dev/shm"}  # what the stubs write
    assert b["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert next(e for e in b["env"] if e["name"] == "BFF_METRICS_OPEN")["value"] == "1"  # annotations scrape
    policy = find("NetworkPolicy", "triton-ingress")["spec"]
    assert policy["podSelector"]["matchLabels"] == triton_labels() and policy["policyTypes"] == ["Ingress"]
    api, metrics = policy["ingress"]
    assert api["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "bff"}}}]
    assert {p["port"] for p in api["ports"]} == set(TRITON_PORTS.values())  # the BFF's probe reads metrics too
    assert [p["port"] for p in metrics["ports"]] == [TRITON_PORTS["metrics"]]


def test_networkpolicy_admits_every_triton_port_the_bffs_settings_derive():
    from bff.settings import from_env

    pod = find("Deployment", "bff")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    settings = from_env({e["name"]: env_value(e) for e in container["env"]})
    ports = ({urlsplit("//" + url).port for url in settings.triton_urls}
             | {urlsplit(url).port for url in settings.triton_metrics_urls})
    bff_labels = pod["metadata"]["labels"].items()
    admitted = {port["port"] for rule in find("NetworkPolicy", "triton-ingress")["spec"]["ingress"]
                if any(set(peer.get("podSelector", {}).get("matchLabels", {}).items()) <= bff_labels
                       and "namespaceSelector" not in peer for peer in rule["from"])
                for port in rule["ports"]}
    assert ports and ports <= admitted, ports - admitted


# ---------------------------------------------------------------- export Job and storage


def test_export_job_builds_on_the_serving_gpu_type():
    job = find("Job", "export-d20")["spec"]["template"]["spec"]
    triton = find("StatefulSet", "triton")["spec"]["template"]["spec"]
    assert job["nodeSelector"] == triton["nodeSelector"]
    assert job["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert "RUNTIME=tensorrt" in job["containers"][0]["args"]


def test_export_job_owns_the_volumes_it_writes_without_fsgroup():
    # CSI drivers apply fsGroup by default only to ReadWriteOnce volumes with an fstype, not to NFS-like RWX.
    pod = find("Job", "export-d20")["spec"]["template"]["spec"]
    assert "fsGroup" not in pod["securityContext"]
    owner = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    (export,) = pod["containers"]
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    written = [m for m in export["volumeMounts"] if m["name"] in claims and not m.get("readOnly")]
    assert written
    for mount in written:
        (init,) = [c for c in pod["initContainers"] if mount in c["volumeMounts"]]
        assert f"chown {owner} {mount['mountPath']}" in " ".join(init["command"])
        assert init["securityContext"]["runAsUser"] == 0
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert init["image"] == export["image"]  # nothing more to pull or retarget
    text = " ".join(README.read_text().split())
    assert f"already owned by `{owner}`" in text and "no root squash" in text  # the storage assumption


def test_checkpoints_claim_is_provided_not_provisioned_and_outlives_the_job():
    claim = find("PersistentVolumeClaim", "nanochat-checkpoints")
    assert claim in manifests()["k8s"] and claim not in manifests()["k8s/export"]  # deleting the Job keeps it
    job = find("Job", "export-d20")["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in job["volumes"] if "persistentVolumeClaim" in v}
    assert claims["nanochat-checkpoints"]["persistentVolumeClaim"]["readOnly"] is True
    spec = claim["spec"]
    assert spec["storageClassName"] == "" and spec["accessModes"] == ["ReadOnlyMany"]  # bound, never provisioned
    text = " ".join(README.read_text().split())
    assert f"PersistentVolume named `{spec['volumeName']}`" in text
    assert f"(`checkpoints-pvc.yaml`: {spec['accessModes'][0]}, `storageClassName: \"\"`)" in text


# ---------------------------------------------------------------- monitoring


def helm_install(chart: str) -> re.Match:
    m = next(filter(None, (re.search(rf"helm upgrade --install (\S+) prometheus-community/{chart} -n (\S+)(.*)", c)
                           for c in readme_commands())), None)
    assert m, f"the README installs no {chart}"
    return m


def test_hpa_metric_is_the_backends_queue_depth():
    metric = find("HorizontalPodAutoscaler", "triton")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == protocol.METRIC_QUEUE_DEPTH  # the gauge the backend exports (backend/metrics.py)


def test_adapter_rule_is_chart_values_that_keep_the_charts_rules():
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert set(values) <= {"prometheus", "rules"} and values["rules"].get("default", True) is True
    assert not values["rules"].get("existing")  # an existing ConfigMap would replace every rule
    (rule,) = [r for r in values["rules"]["custom"] if r["name"]["as"] == protocol.METRIC_QUEUE_DEPTH]
    assert protocol.METRIC_QUEUE_DEPTH in rule["seriesQuery"] and "<<.Series>>" in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # the HPA's `type: Pods` lookup
    assert f"-f {ADAPTER_VALUES.relative_to(DOCKER.parent)}" in helm_install("prometheus-adapter")[3]


def test_monitoring_objects_carry_the_release_kube_prometheus_stack_selects():
    release, namespace = helm_install("kube-prometheus-stack").group(1, 2)
    operated = [doc for doc in manifests()["k8s/monitoring"] if doc["apiVersion"].startswith(OPERATOR_API)]
    assert {doc["kind"] for doc in operated} == {"PodMonitor", "PrometheusRule"}
    for doc in operated:
        assert doc["metadata"]["labels"]["release"] == release, doc["metadata"]["name"]
    for monitor in (doc for doc in operated if doc["kind"] == "PodMonitor"):  # it selects pods in its namespace
        assert monitor["metadata"]["namespace"] == find("Namespace", "nanochat")["metadata"]["name"]
    prometheus = urlsplit(yaml.safe_load(ADAPTER_VALUES.read_text())["prometheus"]["url"]).hostname
    assert prometheus == f"{release}-prometheus.{namespace}.svc"
    scraper = find("NetworkPolicy", "triton-ingress")["spec"]["ingress"][1]["from"][0]["namespaceSelector"]
    assert scraper["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    assert helm_install("prometheus-adapter")[2] == namespace


def test_dashboard_and_vllm_rules_name_only_metrics_we_export():
    dashboard = json.loads(find("ConfigMap", "nanochat-grafana-dashboard")["data"]["nanochat-triton.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    records = vllm_records()
    used = {m for e in exprs + [r["expr"] for r in records] for m in re.findall(r"\b(?:nanochat|bff)_\w+", e)}
    assert used and used <= exported_metric_names(), used - exported_metric_names()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for what in ("first token", "inter-token", "throughput", "queue", "slots", "finish reason"):
        assert what in titles, what
    assert {r["record"] for r in records} >= {"vllm:num_requests_running", "vllm:num_requests_waiting",
                                               "vllm:time_to_first_token_seconds_bucket", "vllm:gpu_cache_usage_perc"}


def test_vllm_rules_carry_vllms_label_names():
    records = [r for r in vllm_records() if r["record"].startswith("vllm:")]
    assert records
    for rule in records:
        assert relabel("model_name", "model") in rule["expr"], rule["record"]
        if protocol.METRIC_FINISHED in rule["expr"]:  # the one family labelled finish_reason
            assert relabel("finished_reason", "finish_reason") in rule["expr"], rule["record"]
