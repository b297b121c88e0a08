"""Deploy files are accepted by the tools that consume them (no Docker engine, no cluster):
hadolint, docker compose config, promtool, kubernetes-validate; Grafana provisioning is
checked by its JSON/YAML structure and its PromQL by promtool."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promql_names import ROOT, dashboard_queries, grafana_to_promql, metric_names

BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"
PROMTOOL = "/usr/bin/promtool"


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kw)


# -- Dockerfile ---------------------------------------------------------------------------------

def test_hadolint_passes_on_the_dockerfile():
    out = run(BIN / "hadolint", "--no-color", "Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_not_a_no_op():
    """The linter used above does reject a bad Dockerfile (unpinned apt, root, ADD of a URL)."""
    out = run(BIN / "hadolint", "--no-color", "-", input="FROM debian\nRUN apt-get install curl\n")
    assert out.returncode != 0 and "DL3008" in out.stdout


def test_dockerfile_is_multistage_non_root_with_readiness_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.M | re.I)
    assert len(stages) >= 3 and stages[-1] == "runtime"
    runtime = text.split("AS runtime", 1)[1]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = re.search(r"^HEALTHCHECK .*?CMD (.*)$", runtime, re.M | re.S).group(1)
    assert "/v2/health/ready" in health
    # CPU torch by default, CUDA by build argument, both from the same torch pin
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text and "-c constraints.txt" in text
    # the demo bundle is baked into the image and seeds the volume on first start
    assert "from offline.demo import demo_bundle" in text
    assert "COPY --from=demo /opt/repair-proxy/demo " in text
    assert re.search(r'^ENTRYPOINT \["repair-entrypoint"\]', text, re.M)


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_entrypoint_seeds_an_empty_volume_once(tmp_path, digits_vit_badnets):
    """Three replicas starting at once on one empty volume: one whole bundle, no leftovers."""
    from repair.bundle import Bundle

    volume = tmp_path / "volume"
    volume.mkdir()
    env = dict(os.environ, REPAIR_BUNDLE=str(volume), REPAIR_SEED_BUNDLE=str(digits_vit_badnets))
    script = DEPLOY / "docker/entrypoint.sh"
    procs = [subprocess.Popen(["sh", str(script), "sh", "-c", 'echo "ran $0"', f"cmd{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert [o[0].strip() for o in outs] == ["ran cmd0", "ran cmd1", "ran cmd2"]  # exec'd after seeding
    seeded, seed = Bundle(volume), Bundle(digits_vit_badnets)
    assert seeded.current_id() == seed.current_id()
    assert seeded.version_ids() == seed.version_ids()
    assert sorted(p.name for p in volume.iterdir()) == ["CURRENT", "versions"]  # no staging left
    assert (seeded.version().path / "model.safetensors").read_bytes() == \
        (seed.version().path / "model.safetensors").read_bytes()
    # a volume that already holds a bundle is left alone (the worker may have moved CURRENT)
    (volume / "CURRENT").write_text("v0099")
    assert run("sh", script, "true", env=env).returncode == 0
    assert (volume / "CURRENT").read_text() == "v0099"


# -- docker compose -----------------------------------------------------------------------------

def compose_config(*profiles: str) -> dict:
    args = [BIN / "docker-compose", "-f", "docker-compose.yml"]
    for p in profiles:
        args += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPAIR_", "PROXY_", "GRAFANA_"))}
    out = run(*args, "config", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_config_accepts_the_stack():
    cfg = compose_config()
    services = cfg["services"]
    assert set(services) == {"proxy", "worker", "prometheus", "grafana"}
    proxy, worker = services["proxy"], services["worker"]
    # proxy and worker share the bundle volume
    mounts = {s: {(v["source"], v["target"]) for v in services[s]["volumes"]} for s in ("proxy", "worker")}
    assert ("bundle", "/data/bundle") in mounts["proxy"] & mounts["worker"]
    assert proxy["command"][:2] == ["repair-proxy", "serve"]
    assert worker["command"][:2] == ["repair-proxy", "worker"]
    # health checks everywhere, and start order by health
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "/v2/health/ready" in " ".join(proxy["healthcheck"]["test"])
    assert services["prometheus"]["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert worker["depends_on"]["proxy"]["condition"] == "service_healthy"
    # Prometheus and Grafana read their config from deploy/
    prom_mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert Path(prom_mounts["/etc/prometheus"]) == DEPLOY / "prometheus"
    graf_mounts = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    assert Path(graf_mounts["/etc/grafana/provisioning"]) == DEPLOY / "grafana/provisioning"
    assert Path(graf_mounts["/etc/grafana/dashboards"]) == DEPLOY / "grafana/dashboards"


def test_compose_proxy_can_scale_to_three_replicas():
    """`--scale proxy=3` needs no fixed container name, a host port range wide enough for three
    replicas, and a Prometheus that discovers every replica behind the service's DNS name."""
    proxy = compose_config()["services"]["proxy"]
    assert "container_name" not in proxy
    (port,) = proxy["ports"]
    low, high = (int(p) for p in port["published"].split("-"))
    assert high - low + 1 >= 3 and port["target"] == 8080
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "repair-proxy")
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["proxy"] and sd["type"] == "A" and sd["port"] == 8080


def test_compose_gpu_profile_reserves_a_gpu():
    assert "proxy-gpu" not in compose_config()["services"]       # optional
    gpu = compose_config("gpu")["services"]["proxy-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert "--device" in gpu["command"] and gpu["command"][gpu["command"].index("--device") + 1] == "cuda"
    assert "proxy" in gpu["networks"]["default"]["aliases"]       # scraped with the others


def test_compose_config_rejects_a_broken_file(tmp_path):
    """`docker compose config` really validates: a depends_on on an unknown service fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on:\n      b:\n"
                      "        condition: service_healthy\n")
    out = run(BIN / "docker-compose", "-f", broken, "config", "-q")
    assert out.returncode != 0 and 'undefined service "b"' in out.stderr


# -- Prometheus ---------------------------------------------------------------------------------

def test_promtool_check_config():
    out = run(PROMTOOL, "check", "config", DEPLOY / "prometheus/prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


def test_promtool_test_rules():
    out = run(PROMTOOL, "test", "rules", DEPLOY / "prometheus/alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())["tests"]
    firing = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts == firing
    assert {"RepairPatchRateSpike", "RepairAddedLatencyHigh", "RepairHigh5xxRate",
            "RepairProxyNotReady", "RepairRectificationFailed"} <= alerts


def test_dashboard_promql_parses(tmp_path):
    """Every panel expression (Grafana variables substituted) is valid PromQL for promtool."""
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(queries.values())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run(PROMTOOL, "check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in out.stdout


# -- Grafana ------------------------------------------------------------------------------------

def test_grafana_datasource_uid_is_pinned_and_used_by_every_panel():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uid = source["uid"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/repair-proxy.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    for path in (DEPLOY / "grafana/dashboards").glob("*.json"):
        dash = json.loads(path.read_text())
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        cells = {}
        for p in dash["panels"]:  # no two panels overlap on Grafana's 24-column grid
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = p["title"]
        for p in dash["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == uid, p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == uid for t in p["targets"]), p["title"]


def test_dashboard_has_the_issue_panels():
    dash = json.loads((DEPLOY / "grafana/dashboards/repair-proxy.json").read_text())
    by_title = {p["title"]: p for p in dash["panels"]}
    expected = {
        "Patch rate": "repair_patched_samples_total",
        "Patched columns by layer": "repair_patched_columns_total",
        "AtPatch added latency": "repair_added_latency_seconds_bucket",
        "Request rate by endpoint and code": "repair_requests_total",
        "Request latency by endpoint": "repair_request_duration_seconds_bucket",
        "In-flight requests": "repair_inflight_requests",
        "Batch size": "repair_batch_size_bucket",
        "Served model version": "repair_model_version_info",
        "Rectification jobs": "repair_rectify_jobs_total",
        "Rectification job duration": "repair_rectify_job_duration_seconds_bucket",
    }
    for title, metric in expected.items():
        names = set().union(*(metric_names(t["expr"]) for t in by_title[title]["targets"]))
        assert metric in names, title
    quantiles = {re.search(r"histogram_quantile\(([\d.]+)", t["expr"]).group(1)
                 for t in by_title["AtPatch added latency"]["targets"]}
    assert quantiles == {"0.5", "0.95", "0.99"}
    assert "by (layer)" in by_title["Patched columns by layer"]["targets"][0]["expr"]
    assert "by (endpoint, code)" in by_title["Request rate by endpoint and code"]["targets"][0]["expr"]


# -- Kubernetes ---------------------------------------------------------------------------------

K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))


def k8s_objects() -> dict[str, dict]:
    objs = {}
    for path in K8S:
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            objs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objs


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    files = [p for p in K8S if p.name != "kustomization.yaml"]
    out = run(BIN / "kubernetes-validate", "--strict", "--quiet", *files)
    assert out.returncode == 0, out.stdout + out.stderr
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in files)


def test_k8s_replicas_share_the_bundle_pvc_and_probe_readiness():
    objs = k8s_objects()
    pvc = objs["PersistentVolumeClaim/repair-bundle"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    proxy = objs["Deployment/repair-proxy"]
    assert proxy["spec"]["replicas"] >= 2
    pod = proxy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    service = objs["Service/repair-proxy"]
    assert service["spec"]["selector"].items() <= proxy["spec"]["template"]["metadata"]["labels"].items()
    job = objs["Job/repair-detector-build"]
    worker = objs["Deployment/repair-worker"]
    for obj in (proxy, job, worker):
        spec = obj["spec"]["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
        assert claims == {"repair-bundle"}, obj["metadata"]["name"]
        for c in spec["containers"]:
            assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data/bundle"}
