#!/usr/bin/env python3
"""Asserts the deployment policies on rendered manifests (`kubectl kustomize` output).

Usage: check_policies.py OVERLAY=FILE [OVERLAY=FILE ...]
       check_policies.py --self-test OVERLAY=FILE   (mutates a good render, expects failures)

Every rule names the object it found wanting. Exit status 1 when any rule fails.
"""
import copy
import re
import sys

import yaml

SECRETISH = re.compile(r"(KEY|KEYS|TOKEN|TOKENS|PASSWORD|SECRET|DATABASE_URL)$")


def docs_by_kind(docs):
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


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


def check(overlay, docs):
    errors = []

    def need(ok, what):
        if not ok:
            errors.append(f"{overlay}: {what}")

    workloads = [d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")]
    need(workloads, "no workloads rendered")
    for w in workloads:
        name = f'{w["kind"]}/{w["metadata"]["name"]}'
        spec = pod_spec(w)
        psc = spec.get("securityContext", {})
        need(psc.get("runAsNonRoot") is True, f"{name}: pod securityContext.runAsNonRoot must be true")
        for c in spec["containers"]:
            cname = f'{name} container {c["name"]}'
            sc = c.get("securityContext", {})
            need(sc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation must be false")
            need(sc.get("readOnlyRootFilesystem") is True, f"{cname}: readOnlyRootFilesystem must be true")
            need("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cname}: capabilities must drop ALL")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    need(r in res.get(kind, {}), f"{cname}: resources.{kind}.{r} missing")
            for var, e in env_of(c).items():
                if SECRETISH.search(var):
                    inline = "value" in e
                    sqlite = inline and str(e["value"]).startswith("sqlite:")
                    need(not inline or sqlite, f"{cname}: {var} is inline; take it from a Secret")
                    if not inline:
                        need("secretKeyRef" in e.get("valueFrom", {}), f"{cname}: {var} must come from a Secret")
            if w["kind"] == "Deployment":
                need("livenessProbe" in c and "readinessProbe" in c, f"{cname}: liveness and readiness probes required")
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
            jobs = [j for j in docs if j["kind"] == "Job" and "migrate" in pod_spec(j)["containers"][0].get("command", [])]
            need(jobs, "production needs a migration Job")
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


def self_test(overlay, docs):
    """Each mutation of a good render must be caught."""
    def mutate(fn):
        d = copy.deepcopy(docs)
        fn(d)
        return check(overlay, d)

    def edge(d):
        return pod_spec(find(d, "Deployment", "coinflow-edge"))["containers"][0]

    mutations = {
        "limits removed": lambda d: edge(d)["resources"].pop("limits"),
        "root allowed": lambda d: pod_spec(find(d, "Deployment", "coinflow-edge"))["securityContext"].pop("runAsNonRoot"),
        "inline key": lambda d: edge(d)["env"].append({"name": "COINFLOW_WEBHOOK_KEYS", "value": "k"}),
        "no PDB": lambda d: d.remove(find(d, "PodDisruptionBudget", "coinflow-edge")),
        "no HPA": lambda d: d.remove(find(d, "HorizontalPodAutoscaler", "coinflow-edge")),
        "no readiness": lambda d: edge(d).pop("readinessProbe"),
        "body size drift": lambda d: find(d, "Ingress", "coinflow-edge")["metadata"]["annotations"].update(
            {"nginx.ingress.kubernetes.io/proxy-body-size": "10m"}),
        "overlapping recovery": lambda d: find(d, "CronJob", "coinflow-recover")["spec"].update({"concurrencyPolicy": "Allow"}),
        "short recovery window": lambda d: pod_spec(find(d, "CronJob", "coinflow-recover"))["containers"][0].update(
            {"args": ["--window", "12h"]}),
        "inline API key": lambda d: pod_spec(find(d, "CronJob", "coinflow-recover"))["containers"][0]["env"].append(
            {"name": "COINFLOW_API_KEY", "value": "k"}),
    }
    failed = [name for name, fn in mutations.items() if not mutate(fn)]
    if check(overlay, docs):
        failed.append("the unmodified render must pass")
    return failed


def main(argv):
    if argv[:1] == ["--self-test"]:
        overlay, docs = load(argv[1])
        missed = self_test(overlay, docs)
        for m in missed:
            print(f"self-test: mutation not caught: {m}", file=sys.stderr)
        print(f"policy self-test: {'FAILED' if missed else 'ok'}")
        return 1 if missed else 0
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
