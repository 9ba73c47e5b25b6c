#!/usr/bin/env python3
"""YAML-side checks of deploy/ for `cargo xtask deploy-check` (run with the project venv's
python, which has PyYAML through yamllint / kubernetes-validate).

Subcommands (each prints one summary line, exits 1 with the reasons on failure):
  classify FILE...            JSON: per file, its documents' apiVersion/kind and a class:
                              core | crd | kustomization | patch | other
  split-core IN OUT           writes IN's core (non-CRD) documents to OUT; prints the CRDs left out
  crd FILE...                 structural check of PodMonitor / PrometheusRule documents
  kustomize DIR...            every resource and patch path of DIR/kustomization.yaml exists
  patch FILE...               a patch names apiVersion, kind and metadata.name
  rules-equal RULES PROMRULE  the PrometheusRule's spec.groups equal the rule file's groups
  configmap-data FILE NAME KEY  prints data[KEY] of ConfigMap NAME
  agent-env FILE...           JSON: INFERWATCH_* variables set on the inferwatch container
  podmonitor-targets PM DS    the PodMonitor selects the DaemonSet's pods and a named port
"""
import json
import os
import re
import sys

import yaml

CRD_GROUPS = ("monitoring.coreos.com/",)
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def classify_doc(path, doc):
    api = str(doc.get("apiVersion", ""))
    if api.startswith("kustomize.config.k8s.io/"):
        return "kustomization"
    if path.endswith(".patch.yaml"):
        return "patch"
    if api.startswith(CRD_GROUPS):
        return "crd"
    if api and doc.get("kind"):
        return "core"
    return "other"


def fail(errors):
    for e in errors:
        print(f"  {e}", file=sys.stderr)
    sys.exit(1)


def cmd_classify(files):
    out = []
    for path in files:
        for i, d in enumerate(docs(path)):
            out.append({"file": path, "index": i, "apiVersion": d.get("apiVersion"),
                        "kind": d.get("kind"), "class": classify_doc(path, d)})
    print(json.dumps(out))


def cmd_split_core(src, dst):
    core, crds = [], []
    for d in docs(src):
        (crds if classify_doc(src, d) == "crd" else core).append(d)
    with open(dst, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(core, f)
    print(f"{len(core)} core documents; left out: "
          + (", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in crds) or "none"))


def check_strings(errors, where, mapping):
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        errors.append(f"{where}: not a mapping")
        return
    for k, v in mapping.items():
        if not isinstance(k, str) or not isinstance(v, str):
            errors.append(f"{where}.{k}: keys and values must be strings")


def check_groups(errors, where, groups):
    allowed_rule = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
    if not isinstance(groups, list) or not groups:
        errors.append(f"{where}: groups must be a non-empty list")
        return
    names = set()
    for gi, g in enumerate(groups):
        gw = f"{where}[{gi}]"
        if not isinstance(g, dict) or not isinstance(g.get("name"), str):
            errors.append(f"{gw}: a group needs a name")
            continue
        if g["name"] in names:
            errors.append(f"{gw}: duplicate group {g['name']}")
        names.add(g["name"])
        extra = set(g) - {"name", "interval", "rules", "limit", "partial_response_strategy"}
        if extra:
            errors.append(f"{gw}: unknown keys {sorted(extra)}")
        for ri, r in enumerate(g.get("rules") or []):
            rw = f"{gw}.rules[{ri}]"
            if not isinstance(r, dict):
                errors.append(f"{rw}: not a mapping")
                continue
            if set(r) - allowed_rule:
                errors.append(f"{rw}: unknown keys {sorted(set(r) - allowed_rule)}")
            if ("alert" in r) == ("record" in r):
                errors.append(f"{rw}: exactly one of alert / record")
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                errors.append(f"{rw}: expr must be a non-empty string")
            for key in ("for", "keep_firing_for"):
                if key in r and not DURATION.match(str(r[key])):
                    errors.append(f"{rw}: {key} {r[key]!r} is not a duration")
            check_strings(errors, f"{rw}.labels", r.get("labels"))
            check_strings(errors, f"{rw}.annotations", r.get("annotations"))


def check_metadata(errors, where, doc):
    md = doc.get("metadata")
    if not isinstance(md, dict) or not isinstance(md.get("name"), str):
        errors.append(f"{where}: metadata.name missing")
        return
    if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", md["name"]):
        errors.append(f"{where}: metadata.name {md['name']!r} is not a DNS name")
    check_strings(errors, f"{where}.metadata.labels", md.get("labels"))


def cmd_crd(files):
    errors, n = [], 0
    for path in files:
        for i, d in enumerate(docs(path)):
            where = f"{path}#{i} {d.get('kind')}"
            if classify_doc(path, d) != "crd":
                continue
            n += 1
            check_metadata(errors, where, d)
            if d.get("apiVersion") != "monitoring.coreos.com/v1":
                errors.append(f"{where}: apiVersion must be monitoring.coreos.com/v1")
            spec = d.get("spec")
            if not isinstance(spec, dict):
                errors.append(f"{where}: spec missing")
                continue
            if d.get("kind") == "PrometheusRule":
                if set(spec) - {"groups"}:
                    errors.append(f"{where}: unknown spec keys {sorted(set(spec) - {'groups'})}")
                check_groups(errors, f"{where}.spec.groups", spec.get("groups"))
            elif d.get("kind") == "PodMonitor":
                allowed = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                           "podTargetLabels", "sampleLimit"}
                if set(spec) - allowed:
                    errors.append(f"{where}: unknown spec keys {sorted(set(spec) - allowed)}")
                sel = (spec.get("selector") or {}).get("matchLabels")
                if not isinstance(sel, dict) or not sel:
                    errors.append(f"{where}: spec.selector.matchLabels must be non-empty")
                eps = spec.get("podMetricsEndpoints")
                if not isinstance(eps, list) or not eps:
                    errors.append(f"{where}: spec.podMetricsEndpoints must be a non-empty list")
                for ei, ep in enumerate(eps or []):
                    ew = f"{where}.podMetricsEndpoints[{ei}]"
                    allowed_ep = {"port", "path", "interval", "scrapeTimeout", "scheme",
                                  "relabelings", "metricRelabelings", "honorLabels"}
                    if set(ep) - allowed_ep:
                        errors.append(f"{ew}: unknown keys {sorted(set(ep) - allowed_ep)}")
                    if not isinstance(ep.get("port"), str):
                        errors.append(f"{ew}: port must name a container port")
                    if "path" in ep and not str(ep["path"]).startswith("/"):
                        errors.append(f"{ew}: path must start with /")
                    if "interval" in ep and not DURATION.match(str(ep["interval"])):
                        errors.append(f"{ew}: interval is not a duration")
                    for rl in ep.get("relabelings") or []:
                        if "targetLabel" in rl and not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$",
                                                                rl["targetLabel"]):
                            errors.append(f"{ew}: bad targetLabel {rl['targetLabel']!r}")
            else:
                errors.append(f"{where}: no structural check for this kind")
    if errors:
        fail(errors)
    print(f"{n} custom resources structurally valid")


def cmd_kustomize(dirs):
    errors = []
    for d in dirs:
        k = docs(os.path.join(d, "kustomization.yaml"))[0]
        if set(k) - {"apiVersion", "kind", "resources", "patches", "namespace", "images",
                     "commonLabels", "labels"}:
            errors.append(f"{d}: unknown keys")
        for r in k.get("resources") or []:
            p = os.path.normpath(os.path.join(d, r))
            if not (os.path.isfile(p) or os.path.isfile(os.path.join(p, "kustomization.yaml"))):
                errors.append(f"{d}: resource {r} not found")
        for patch in k.get("patches") or []:
            if not os.path.isfile(os.path.join(d, patch.get("path", ""))):
                errors.append(f"{d}: patch {patch.get('path')} not found")
    if errors:
        fail(errors)
    print(f"{len(dirs)} kustomizations: every resource and patch exists")


def cmd_patch(files):
    errors = []
    for path in files:
        for i, d in enumerate(docs(path)):
            for key in ("apiVersion", "kind"):
                if not d.get(key):
                    errors.append(f"{path}#{i}: {key} missing")
            check_metadata(errors, f"{path}#{i}", d)
    if errors:
        fail(errors)
    print(f"{len(files)} patches name apiVersion, kind and metadata.name")


def cmd_rules_equal(rules, promrule):
    a = docs(rules)[0]
    b = [d for d in docs(promrule) if d.get("kind") == "PrometheusRule"][0]
    if a.get("groups") != b["spec"].get("groups"):
        fail([f"{promrule} spec.groups differs from {rules} groups"])
    n = sum(len(g.get("rules", [])) for g in a["groups"])
    print(f"{n} rules in {len(a['groups'])} groups, identical in both files")


def find(path, kind, name=None):
    for d in docs(path):
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
            return d
    fail([f"{path}: no {kind} {name or ''}"])


def cmd_configmap_data(path, name, key):
    data = find(path, "ConfigMap", name).get("data", {})
    if key not in data:
        fail([f"{path}: ConfigMap {name} has no key {key}"])
    sys.stdout.write(data[key])


def cmd_agent_env(files):
    env = {}
    for path in files:
        for d in docs(path):
            if d.get("kind") != "DaemonSet":
                continue
            for c in d["spec"]["template"]["spec"].get("containers", []):
                if c.get("name") != "inferwatch":
                    continue
                for e in c.get("env", []):
                    if e["name"].startswith("INFERWATCH_"):
                        env[e["name"]] = e.get("value", "from-secret-placeholder")
    print(json.dumps(env))


def cmd_podmonitor_targets(pm_path, ds_path):
    pm = find(pm_path, "PodMonitor")
    ds = find(ds_path, "DaemonSet")
    tmpl = ds["spec"]["template"]
    labels = tmpl["metadata"].get("labels", {})
    errors = []
    for k, v in pm["spec"]["selector"]["matchLabels"].items():
        if labels.get(k) != v:
            errors.append(f"PodMonitor selects {k}={v}, the DaemonSet's pods have {labels.get(k)!r}")
    ports = {p.get("name") for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        if ep["port"] not in ports:
            errors.append(f"PodMonitor port {ep['port']} is not a named container port")
    if errors:
        fail(errors)
    print("PodMonitor selects the DaemonSet's pods and its metrics port")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "classify": lambda: cmd_classify(args),
        "split-core": lambda: cmd_split_core(*args),
        "crd": lambda: cmd_crd(args),
        "kustomize": lambda: cmd_kustomize(args),
        "patch": lambda: cmd_patch(args),
        "rules-equal": lambda: cmd_rules_equal(*args),
        "configmap-data": lambda: cmd_configmap_data(*args),
        "agent-env": lambda: cmd_agent_env(args),
        "podmonitor-targets": lambda: cmd_podmonitor_targets(*args),
    }[cmd]()


if __name__ == "__main__":
    main()
