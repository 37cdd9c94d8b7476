#!/usr/bin/env python3
"""Asserts this project's deployment policies on rendered manifests (`kubectl kustomize`
output): the ones checkov's generic checks cannot express, such as the ingress body limit
equal to the edge's, fulfillment's gRPC port open only to the edge and its clients, the
recovery window longer than Coinflow's retries, or which overlay runs which database.
checkov (scripts/check-deploy, deploy/checkov.yaml) asserts the rest: security contexts,
resources, probes, image tags, a NetworkPolicy for every pod.

Usage: check_policies.py OVERLAY=FILE [OVERLAY=FILE ...]
       check_policies.py --self-test OVERLAY=FILE ...
           each rule must catch its mutation of a good render (production and local)
       check_policies.py --checkov-self-test CHECKOV OVERLAY=FILE
           each checkov check that replaced a rule of this file must catch its mutation

Every rule names the object it found wanting. Exit status 1 when any rule fails.
"""
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

SECRETISH = re.compile(r"(KEY|KEYS|TOKEN|TOKENS|PASSWORD|SECRET|DATABASE_URL)$")
WORKLOADS = ("Deployment", "Job", "CronJob")


def find(docs, kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    return None


def pod_spec(obj):
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def migration_jobs(docs):
    return [j for j in docs if j["kind"] == "Job" and "migrate" in pod_spec(j)["containers"][0].get("command", [])]


def check(overlay, docs):
    errors = []

    def need(ok, what):
        if not ok:
            errors.append(f"{overlay}: {what}")

    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    need(workloads, "no workloads rendered")
    images = sorted({c["image"] for w in workloads for c in pod_spec(w)["containers"]})
    need(len(images) <= 1, f"workloads run different images {images}: a release runs one image everywhere")
    for w in workloads:
        name = f'{w["kind"]}/{w["metadata"]["name"]}'
        for c in pod_spec(w)["containers"]:
            cname = f'{name} container {c["name"]}'
            for var, e in env_of(c).items():
                if SECRETISH.search(var):
                    inline = "value" in e
                    sqlite = inline and str(e["value"]).startswith("sqlite:")
                    need(not inline or sqlite, f"{cname}: {var} is inline; take it from a Secret")
                    if not inline:
                        need("secretKeyRef" in e.get("valueFrom", {}), f"{cname}: {var} must come from a Secret")
            if w["kind"] == "Deployment":
                need("OTEL_EXPORTER_OTLP_ENDPOINT" in env_of(c), f"{cname}: OTLP endpoint not configured")

    edge = find(docs, "Deployment", "coinflow-edge")
    need(edge is not None, "Deployment/coinflow-edge missing")
    if edge:
        c = pod_spec(edge)["containers"][0]
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            http = c.get(probe, {}).get("httpGet", {})
            need(http.get("path") == path and http.get("port") == "admin", f"edge {probe} must GET {path} on the admin port")
        need("preStop" in c.get("lifecycle", {}), "edge needs a preStop delay")
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["", "0"])
        pre_secs = int(pre[-1]) if pre[-1].isdigit() else 0
        grace = int(env_of(c).get("EDGE_SHUTDOWN_GRACE_SECS", {}).get("value", "20"))
        need(pod_spec(edge).get("terminationGracePeriodSeconds", 30) > pre_secs + grace,
             "edge terminationGracePeriodSeconds must exceed preStop + EDGE_SHUTDOWN_GRACE_SECS")
        limit = int(env_of(c).get("EDGE_BODY_LIMIT_BYTES", {}).get("value", "262144"))
        ingress = find(docs, "Ingress", "coinflow-edge")
        need(ingress is not None, "Ingress/coinflow-edge missing")
        if ingress:
            size = ingress["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/proxy-body-size", "")
            m = re.fullmatch(r"(\d+)([kKmM]?)", size)
            want = int(m.group(1)) * {"": 1, "k": 1024, "K": 1024, "m": 1 << 20, "M": 1 << 20}[m.group(2)] if m else None
            need(want == limit, f"ingress proxy-body-size {size!r} must equal EDGE_BODY_LIMIT_BYTES ({limit})")
        need(find(docs, "HorizontalPodAutoscaler", "coinflow-edge") is not None, "edge HPA missing")
        need(find(docs, "PodDisruptionBudget", "coinflow-edge") is not None, "edge PDB missing")

    ful = find(docs, "Deployment", "coinflow-fulfillment")
    need(ful is not None, "Deployment/coinflow-fulfillment missing")
    if ful:
        c = pod_spec(ful)["containers"][0]
        need("grpc" in c.get("livenessProbe", {}) and "grpc" in c.get("readinessProbe", {}),
             "fulfillment probes must be native gRPC probes")
        need(find(docs, "PodDisruptionBudget", "coinflow-fulfillment") is not None, "fulfillment PDB missing")
        headless = find(docs, "Service", "coinflow-fulfillment-headless")
        need(headless is not None and headless["spec"].get("clusterIP") == "None", "headless fulfillment Service missing")
        mounts = [v.get("configMap", {}).get("name", "") for v in pod_spec(ful).get("volumes", [])]
        need(any(m.startswith("coinflow-catalog") for m in mounts), "the catalog must come from a ConfigMap")
        db = env_of(c).get("FULFILLMENT_DATABASE_URL", {})
        if overlay == "production":
            need(ful["spec"].get("replicas", 1) >= 2, "production needs at least 2 fulfillment replicas")
            need("secretKeyRef" in db.get("valueFrom", {}), "production DATABASE_URL must come from a Secret")
            need(migration_jobs(docs), "production needs a migration Job")
            need(not [d for d in docs if d["kind"] == "Secret"], "production must not carry Secret objects")
        if overlay == "local":
            need(ful["spec"].get("replicas") == 1, "local runs exactly one fulfillment replica (SQLite)")
            need(ful["spec"].get("strategy", {}).get("type") == "Recreate", "local fulfillment must use Recreate")
            need(str(db.get("value", "")).startswith("sqlite:"), "local uses the SQLite ledger")
            claims = [v for v in pod_spec(ful).get("volumes", []) if "persistentVolumeClaim" in v]
            need(claims, "local keeps the SQLite ledger on a PVC")

    rec = find(docs, "CronJob", "coinflow-recover")
    need(rec is not None, "CronJob/coinflow-recover missing (recovery after Coinflow gives up)")
    if rec:
        need(rec["spec"].get("concurrencyPolicy") == "Forbid", "coinflow-recover runs must not overlap (concurrencyPolicy: Forbid)")
        args = pod_spec(rec)["containers"][0].get("args", [])
        window = args[args.index("--window") + 1] if "--window" in args else "48h"
        hours = int(window[:-1]) if window.endswith("h") and window[:-1].isdigit() else 0
        need(hours > 36, f"coinflow-recover --window {window} must cover more than Coinflow's retries (36 h at most)")
        egress = [p for p in docs if p["kind"] == "NetworkPolicy"
                  and p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "coinflow-recover"
                  and "Egress" in p["spec"].get("policyTypes", [])]
        need(egress, "coinflow-recover needs an egress NetworkPolicy")
        if overlay == "local":
            need(rec["spec"].get("suspend") is True, "local has no Coinflow API key: the recovery CronJob is suspended")

    pols = [p for p in docs if p["kind"] == "NetworkPolicy"
            and p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "coinflow-fulfillment"]
    need(pols, "a NetworkPolicy must guard fulfillment")
    for p in pols:
        for rule in p["spec"].get("ingress", []):
            ports = {port["port"] for port in rule.get("ports", [])}
            if 50051 in ports:
                for peer in rule.get("from", []):
                    labels = peer.get("podSelector", {}).get("matchLabels", {})
                    ok = labels.get("app.kubernetes.io/name") == "coinflow-edge" or labels.get("coinflow.io/fulfillment-client") == "true"
                    need(ok, f"NetworkPolicy/{p['metadata']['name']}: gRPC open to {peer}")
    return errors


def load(arg):
    overlay, path = arg.split("=", 1)
    with open(path) as f:
        return overlay, [d for d in yaml.safe_load_all(f) if d]


def container(d, kind, name):
    return pod_spec(find(d, kind, name))["containers"][0]


def edge(d):
    return container(d, "Deployment", "coinflow-edge")


def ful(d):
    return container(d, "Deployment", "coinflow-fulfillment")


def recover(d):
    return container(d, "CronJob", "coinflow-recover")


def remove(kind, name):
    return lambda d: d.remove(find(d, kind, name))


def without_workloads(d):
    d[:] = [x for x in d if x["kind"] not in WORKLOADS]


def set_env(c, name, **how):
    c["env"] = [e for e in c["env"] if e["name"] != name] + [{"name": name, **how}]


# (overlay, what the failure says, the mutation of a good render): one per rule above.
MUTATIONS = [
    ("production", "no workloads rendered", without_workloads),
    ("production", "workloads run different images",
     lambda d: pod_spec(migration_jobs(d)[0])["containers"][0].update({"image": "coinflow-fulfillment"})),
    ("production", "COINFLOW_WEBHOOK_KEYS is inline", lambda d: set_env(edge(d), "COINFLOW_WEBHOOK_KEYS", value="k")),
    ("production", "COINFLOW_API_KEY is inline", lambda d: set_env(recover(d), "COINFLOW_API_KEY", value="k")),
    ("production", "EDGE_INGEST_TOKEN must come from a Secret",
     lambda d: set_env(edge(d), "EDGE_INGEST_TOKEN", valueFrom={"configMapKeyRef": {"name": "c", "key": "k"}})),
    ("production", "OTLP endpoint not configured",
     lambda d: ful(d).update({"env": [e for e in ful(d)["env"] if e["name"] != "OTEL_EXPORTER_OTLP_ENDPOINT"]})),
    ("production", "Deployment/coinflow-edge missing", remove("Deployment", "coinflow-edge")),
    ("production", "edge readinessProbe must GET /readyz",
     lambda d: edge(d)["readinessProbe"]["httpGet"].update({"path": "/healthz"})),
    ("production", "edge livenessProbe must GET /healthz on the admin port",
     lambda d: edge(d)["livenessProbe"]["httpGet"].update({"port": "http"})),
    ("production", "edge needs a preStop delay", lambda d: edge(d).pop("lifecycle")),
    ("production", "terminationGracePeriodSeconds must exceed",
     lambda d: pod_spec(find(d, "Deployment", "coinflow-edge")).update({"terminationGracePeriodSeconds": 25})),
    ("production", "must equal EDGE_BODY_LIMIT_BYTES",
     lambda d: find(d, "Ingress", "coinflow-edge")["metadata"]["annotations"].update(
         {"nginx.ingress.kubernetes.io/proxy-body-size": "10m"})),
    ("production", "Ingress/coinflow-edge missing", remove("Ingress", "coinflow-edge")),
    ("production", "edge HPA missing", remove("HorizontalPodAutoscaler", "coinflow-edge")),
    ("production", "edge PDB missing", remove("PodDisruptionBudget", "coinflow-edge")),
    ("production", "Deployment/coinflow-fulfillment missing", remove("Deployment", "coinflow-fulfillment")),
    ("production", "native gRPC probes",
     lambda d: ful(d).update({"livenessProbe": {"httpGet": {"path": "/healthz", "port": "admin"}}})),
    ("production", "fulfillment PDB missing", remove("PodDisruptionBudget", "coinflow-fulfillment")),
    ("production", "headless fulfillment Service missing",
     lambda d: find(d, "Service", "coinflow-fulfillment-headless")["spec"].pop("clusterIP")),
    ("production", "the catalog must come from a ConfigMap",
     lambda d: pod_spec(find(d, "Deployment", "coinflow-fulfillment")).update({"volumes": [{"name": "catalog", "emptyDir": {}}]})),
    ("production", "at least 2 fulfillment replicas",
     lambda d: find(d, "Deployment", "coinflow-fulfillment")["spec"].update({"replicas": 1})),
    ("production", "production DATABASE_URL must come from a Secret",
     lambda d: set_env(ful(d), "FULFILLMENT_DATABASE_URL", value="sqlite:///var/lib/coinflow/ledger.db")),
    ("production", "production needs a migration Job", lambda d: d.remove(migration_jobs(d)[0])),
    ("production", "production must not carry Secret objects",
     lambda d: d.append({"kind": "Secret", "metadata": {"name": "coinflow-postgres"}})),
    ("production", "CronJob/coinflow-recover missing", remove("CronJob", "coinflow-recover")),
    ("production", "must not overlap",
     lambda d: find(d, "CronJob", "coinflow-recover")["spec"].update({"concurrencyPolicy": "Allow"})),
    ("production", "--window 12h must cover more", lambda d: recover(d).update({"args": ["--window", "12h"]})),
    ("production", "coinflow-recover needs an egress NetworkPolicy",
     lambda d: find(d, "NetworkPolicy", "coinflow-recover")["spec"].update({"policyTypes": ["Ingress"]})),
    ("production", "a NetworkPolicy must guard fulfillment", remove("NetworkPolicy", "coinflow-fulfillment")),
    ("production", "NetworkPolicy/coinflow-fulfillment: gRPC open to",
     lambda d: find(d, "NetworkPolicy", "coinflow-fulfillment")["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})),
    ("local", "local runs exactly one fulfillment replica",
     lambda d: find(d, "Deployment", "coinflow-fulfillment")["spec"].update({"replicas": 2})),
    ("local", "local fulfillment must use Recreate",
     lambda d: find(d, "Deployment", "coinflow-fulfillment")["spec"].update({"strategy": {"type": "RollingUpdate"}})),
    ("local", "local uses the SQLite ledger",
     lambda d: set_env(ful(d), "FULFILLMENT_DATABASE_URL", valueFrom={"secretKeyRef": {"name": "coinflow-postgres", "key": "url"}})),
    ("local", "local keeps the SQLite ledger on a PVC",
     lambda d: pod_spec(find(d, "Deployment", "coinflow-fulfillment")).update(
         {"volumes": [v for v in pod_spec(find(d, "Deployment", "coinflow-fulfillment"))["volumes"] if "persistentVolumeClaim" not in v]})),
    ("local", "the recovery CronJob is suspended", lambda d: find(d, "CronJob", "coinflow-recover")["spec"].pop("suspend")),
]


def self_test(renders):
    """Each mutation of a good render must fail with its own rule's message."""
    missed = [f"{overlay} must pass unmodified: {e}" for overlay, docs in renders.items() for e in check(overlay, docs)]
    for overlay, says, fn in MUTATIONS:
        if overlay not in renders:
            missed.append(f"{overlay}: no render given")
            continue
        d = copy.deepcopy(renders[overlay])
        fn(d)
        if not any(says in e for e in check(overlay, d)):
            missed.append(f"{overlay}: not caught: {says}")
    return missed


# What this file asserted before checkov did: each check that took a rule over, with a
# mutation of one workload it must fail on. A skip in deploy/checkov.yaml that drops one
# of them fails here.
CHECKOV_TAKES_OVER = [
    (["CKV_K8S_23"], "runs as root", lambda d: find(d, "CronJob", "coinflow-recover"),
     lambda w: [pod_spec(w)["securityContext"].pop(k) for k in ("runAsNonRoot", "runAsUser")]),
    (["CKV_K8S_20"], "allows privilege escalation", lambda d: migration_jobs(d)[0],
     lambda w: pod_spec(w)["containers"][0]["securityContext"].update({"allowPrivilegeEscalation": True})),
    (["CKV_K8S_22"], "writes its root filesystem", lambda d: find(d, "Deployment", "coinflow-fulfillment"),
     lambda w: pod_spec(w)["containers"][0]["securityContext"].update({"readOnlyRootFilesystem": False})),
    (["CKV_K8S_37"], "keeps capabilities", lambda d: find(d, "Deployment", "coinflow-edge"),
     lambda w: pod_spec(w)["containers"][0]["securityContext"].update({"capabilities": {"drop": ["NET_RAW"]}})),
    (["CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13"], "has no requests or limits",
     lambda d: find(d, "CronJob", "coinflow-recover"), lambda w: pod_spec(w)["containers"][0].pop("resources")),
    (["CKV_K8S_8", "CKV_K8S_9"], "has no probes", lambda d: find(d, "Deployment", "coinflow-edge"),
     lambda w: [pod_spec(w)["containers"][0].pop(p) for p in ("livenessProbe", "readinessProbe")]),
]


def checkov_self_test(checkov, docs):
    """Scans one mutated workload per file with checkov's configuration; each must fail its checks."""
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkov.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, _, pick, fn) in enumerate(CHECKOV_TAKES_OVER):
            w = copy.deepcopy(pick(docs))
            fn(w)
            with open(os.path.join(tmp, f"mutant{i}.yaml"), "w") as f:
                yaml.safe_dump(w, f)
        run = subprocess.run([checkov, "--config-file", config, "--directory", tmp, "--output", "json"],
                             capture_output=True, text=True)
    try:
        scan = json.loads(run.stdout)
    except json.JSONDecodeError:
        return [f"checkov gave no report (exit {run.returncode}): {run.stderr[-500:]}"]
    failed = {}
    for r in scan if isinstance(scan, list) else [scan]:
        for c in r.get("results", {}).get("failed_checks", []):
            failed.setdefault(os.path.basename(c["file_path"]), set()).add(c["check_id"])
    missed = []
    for i, (checks, what, pick, _) in enumerate(CHECKOV_TAKES_OVER):
        w = pick(docs)
        for check_id in checks:
            if check_id not in failed.get(f"mutant{i}.yaml", set()):
                missed.append(f"{check_id} let {w['kind']}/{w['metadata']['name']} through when it {what}")
    return missed


def report(title, missed):
    for m in missed:
        print(f"{title}: {m}", file=sys.stderr)
    print(f"{title}: {'FAILED' if missed else 'ok'}")
    return 1 if missed else 0


def main(argv):
    if argv[:1] == ["--self-test"]:
        return report("policy self-test", self_test(dict(load(a) for a in argv[1:])))
    if argv[:1] == ["--checkov-self-test"]:
        return report("checkov self-test", checkov_self_test(argv[1], load(argv[2])[1]))
    errors = []
    for arg in argv:
        overlay, docs = load(arg)
        errors += check(overlay, docs)
    for e in errors:
        print(f"policy: {e}", file=sys.stderr)
    print(f"policies: {'FAILED' if errors else 'ok'} ({len(argv)} overlays)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
