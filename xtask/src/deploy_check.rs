//! `cargo xtask deploy-check` (also run by `cargo xtask test`): validates `deploy/` and the docs
//! that must follow the code, and that every relative link of the Markdown resolves inside the
//! repository (`doc_links`).
//!
//! One line per check. Every check runs even when an earlier one failed; the task fails at the
//! end if any did. YAML-level work (classifying documents, the structural checks of the custom
//! resources, comparing the two rule files) is done by `deploy/tools/manifests.py` with the
//! project venv's python (PyYAML comes with yamllint); the rest is here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};

use crate::util::{cargo, have, root};

/// The Kubernetes version whose schemas `kubernetes-validate` checks the manifests against (one
/// it ships, so the check works offline).
const KUBERNETES_VERSION: &str = "1.32.0";

/// Metric names the dashboard and the rules rely on by name, accepted even if the scan of the
/// registrations missed them (the KV-eviction alert was written against this agreed name).
const EXTRA_METRICS: &[&str] = &["inferwatch_kv_evictions_total"];

/// Suffixes the Prometheus exposition adds to a registered family name.
const SUFFIXES: &[&str] = &["", "_total", "_bucket", "_count", "_sum", "_created"];

/// One check: a one-line detail on success.
type Check = fn(&Ctx) -> anyhow::Result<String>;

pub fn run() -> anyhow::Result<()> {
    let ctx = Ctx::new()?;
    let checks: &[(&str, Check)] = &[
        ("promtool check rules", promtool_check),
        ("promtool test rules", promtool_test),
        ("rule files in sync", rules_in_sync),
        ("yamllint", yamllint),
        ("kubernetes-validate", kubernetes_validate),
        ("custom resources", custom_resources),
        ("kustomizations", kustomizations),
        ("rendered kustomizations", rendered_kustomizations),
        ("configmap toml", configmap_toml),
        ("metric names", metric_names),
        ("docs: configuration keys", config_keys_documented),
        ("docs: metrics and spans", reference_documented),
        ("docs: relative links", |ctx| {
            crate::doc_links::check(&ctx.root)
        }),
    ];
    let mut failed = Vec::new();
    for (name, check) in checks {
        match check(&ctx) {
            Ok(detail) => println!("deploy-check: ok   {name}: {detail}"),
            Err(err) => {
                println!("deploy-check: FAIL {name}: {err:#}");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("deploy checks failed: {}", failed.join(", "));
    }
    Ok(())
}

struct Ctx {
    root: PathBuf,
    venv_bin: PathBuf,
    tmp: PathBuf,
}

impl Ctx {
    fn new() -> anyhow::Result<Self> {
        let root = root();
        let tmp =
            std::env::temp_dir().join(format!("inferwatch-deploy-check-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            venv_bin: root.join(".venv/bin"),
            root,
            tmp,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn venv(&self, program: &str) -> anyhow::Result<Command> {
        let path = self.venv_bin.join(program);
        if !path.exists() {
            bail!("{} missing: run `cargo xtask setup`", path.display());
        }
        let mut cmd = Command::new(path);
        cmd.current_dir(&self.root);
        Ok(cmd)
    }

    /// `deploy/tools/manifests.py <args>`: its stdout, or an error with its stderr.
    fn manifests(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.venv("python")?;
        cmd.arg("deploy/tools/manifests.py").args(args);
        output(&mut cmd)
    }

    /// Every file under `dir` (relative to the root) whose name ends with one of `exts`,
    /// sorted, as paths relative to the root.
    fn files(&self, dir: &str, exts: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        walk(&self.path(dir), &mut |p| {
            let name = p.to_string_lossy();
            if exts.iter().any(|e| name.ends_with(e))
                && let Ok(rel) = p.strip_prefix(&self.root)
            {
                out.push(rel.to_string_lossy().into_owned());
            }
        })?;
        out.sort();
        Ok(out)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, f)?;
        } else {
            f(&path);
        }
    }
    Ok(())
}

/// Runs `cmd`; its stdout when it succeeds, else an error carrying both streams.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out: Output = cmd.output().with_context(|| format!("starting {shown}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            stdout.trim_end(),
            stderr.trim_end()
        );
    }
    Ok(stdout)
}

fn promtool(ctx: &Ctx) -> anyhow::Result<Command> {
    if !have("promtool") {
        bail!("promtool missing: run `cargo xtask setup` (Debian package `prometheus`)");
    }
    let mut cmd = Command::new("promtool");
    cmd.current_dir(&ctx.root);
    Ok(cmd)
}

fn promtool_check(ctx: &Ctx) -> anyhow::Result<String> {
    let out = output(
        promtool(ctx)?
            .args(["check", "rules"])
            .arg("deploy/alerts/inferwatch.rules.yml"),
    )?;
    Ok(out
        .lines()
        .find(|l| l.contains("rules found"))
        .unwrap_or("ok")
        .trim()
        .to_owned())
}

fn promtool_test(ctx: &Ctx) -> anyhow::Result<String> {
    let tests = ctx.files("deploy/alerts/tests", &[".yml", ".yaml"])?;
    if tests.is_empty() {
        bail!("no test files in deploy/alerts/tests");
    }
    output(promtool(ctx)?.args(["test", "rules"]).args(&tests))?;
    // Every alerting rule must have a test that expects it to fire and one that expects it
    // quiet.
    let mut evals = 0;
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in &tests {
        let text = std::fs::read_to_string(ctx.path(t))?;
        let mut current: Option<String> = None;
        for line in text.lines() {
            let l = line.trim();
            if l.starts_with("- eval_time:") {
                evals += 1;
            } else if let Some(name) = l.strip_prefix("alertname:") {
                current = Some(name.trim().to_owned());
            } else if l.starts_with("exp_alerts: []") {
                quiet.extend(current.clone());
            } else if l == "exp_alerts:" {
                firing.extend(current.clone());
            }
        }
    }
    let rules = std::fs::read_to_string(ctx.path("deploy/alerts/inferwatch.rules.yml"))?;
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    let untested: Vec<&str> = alerts
        .iter()
        .copied()
        .filter(|a| !firing.contains(*a) || !quiet.contains(*a))
        .collect();
    if !untested.is_empty() {
        bail!("rules without both a firing and a quiet test: {untested:?}");
    }
    Ok(format!(
        "{evals} evaluations in {} files; each of the {} alerts tested firing and quiet",
        tests.len(),
        alerts.len()
    ))
}

fn rules_in_sync(ctx: &Ctx) -> anyhow::Result<String> {
    Ok(ctx
        .manifests(&[
            "rules-equal",
            "deploy/alerts/inferwatch.rules.yml",
            "deploy/alerts/prometheusrule.yaml",
        ])?
        .trim()
        .to_owned())
}

fn yamllint(ctx: &Ctx) -> anyhow::Result<String> {
    let files = ctx.files("deploy", &[".yaml", ".yml"])?;
    output(
        ctx.venv("yamllint")?
            .args(["--strict", "-c", ".yamllint", "deploy", ".yamllint"]),
    )?;
    Ok(format!("{} files under deploy/ clean", files.len()))
}

/// The manifests under deploy/kubernetes and deploy/examples, classified by the helper.
fn classify(ctx: &Ctx) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = ctx.files("deploy/kubernetes", &[".yaml", ".yml"])?;
    files.extend(ctx.files("deploy/examples", &[".yaml", ".yml"])?);
    let mut args = vec!["classify"];
    args.extend(files.iter().map(String::as_str));
    let json: serde_json::Value =
        serde_json::from_str(&ctx.manifests(&args)?).context("parsing the classification")?;
    let mut by_class: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for doc in json.as_array().into_iter().flatten() {
        let class = doc["class"].as_str().unwrap_or("other").to_owned();
        let file = doc["file"].as_str().unwrap_or_default().to_owned();
        by_class.entry(class).or_default().insert(file);
    }
    if let Some(other) = by_class.get("other") {
        bail!("documents that are not Kubernetes objects: {other:?}");
    }
    let core = by_class.get("core").cloned().unwrap_or_default();
    if let Some(both) = by_class.get("crd").map(|c| c.intersection(&core).count())
        && both > 0
    {
        bail!("keep custom resources in files of their own (kubernetes-validate has no schema)");
    }
    Ok(by_class)
}

fn kubernetes_validate(ctx: &Ctx) -> anyhow::Result<String> {
    let classes = classify(ctx)?;
    let core: Vec<&String> = classes.get("core").into_iter().flatten().collect();
    if core.is_empty() {
        bail!("no manifests found");
    }
    output(
        ctx.venv("kubernetes-validate")?
            .args(["-k", KUBERNETES_VERSION, "--strict", "--quiet"])
            .args(&core),
    )?;
    Ok(format!(
        "{} files valid against the Kubernetes {KUBERNETES_VERSION} schemas (strict)",
        core.len()
    ))
}

fn custom_resources(ctx: &Ctx) -> anyhow::Result<String> {
    let classes = classify(ctx)?;
    let mut args = vec!["crd", "deploy/alerts/prometheusrule.yaml"];
    args.extend(classes.get("crd").into_iter().flatten().map(String::as_str));
    let mut detail = ctx.manifests(&args)?.trim().to_owned();
    detail.push_str("; ");
    detail.push_str(
        ctx.manifests(&[
            "podmonitor-targets",
            "deploy/kubernetes/base/podmonitor.yaml",
            "deploy/kubernetes/base/daemonset.yaml",
        ])?
        .trim(),
    );
    Ok(detail)
}

fn kustomization_dirs(classes: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    classes
        .get("kustomization")
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Path::new(f)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
        })
        .collect()
}

fn kustomizations(ctx: &Ctx) -> anyhow::Result<String> {
    let classes = classify(ctx)?;
    let dirs = kustomization_dirs(&classes);
    let mut args = vec!["kustomize"];
    args.extend(dirs.iter().map(String::as_str));
    let mut detail = ctx.manifests(&args)?.trim().to_owned();
    let patches: Vec<&str> = classes
        .get("patch")
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if !patches.is_empty() {
        let mut args = vec!["patch"];
        args.extend(&patches);
        detail.push_str("; ");
        detail.push_str(ctx.manifests(&args)?.trim());
    }
    Ok(detail)
}

/// Renders each kustomization with `kubectl kustomize` (offline) and validates the result, so
/// that the patches are checked as they apply. Skipped without kubectl.
fn rendered_kustomizations(ctx: &Ctx) -> anyhow::Result<String> {
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return Ok("skipped: no kubectl to render them (the sources were checked above)".into());
    }
    let classes = classify(ctx)?;
    let dirs = kustomization_dirs(&classes);
    let mut objects = 0;
    for (i, dir) in dirs.iter().enumerate() {
        let rendered = output(
            Command::new("kubectl")
                .current_dir(&ctx.root)
                .args(["kustomize", dir]),
        )
        .with_context(|| format!("rendering {dir}"))?;
        let all = ctx.tmp.join(format!("rendered-{i}.yaml"));
        let core = ctx.tmp.join(format!("rendered-{i}-core.yaml"));
        std::fs::write(&all, rendered)?;
        ctx.manifests(&[
            "split-core",
            &all.to_string_lossy(),
            &core.to_string_lossy(),
        ])?;
        ctx.manifests(&["crd", &all.to_string_lossy()])
            .with_context(|| format!("custom resources rendered from {dir}"))?;
        let out = output(
            ctx.venv("kubernetes-validate")?
                .args(["-k", KUBERNETES_VERSION, "--strict"])
                .arg(&core),
        )
        .with_context(|| format!("validating {dir} rendered"))?;
        objects += out.lines().filter(|l| l.contains(" passed ")).count();
    }
    Ok(format!(
        "{} kustomizations rendered by kubectl; {objects} objects valid",
        dirs.len()
    ))
}

/// The agent binary of this workspace, built (debug) when missing or stale.
fn agent_binary(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    output(
        cargo()
            .current_dir(&ctx.root)
            .args(["build", "-q", "-p", "inferwatch"]),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { ctx.root.join(t) })
        .unwrap_or_else(|| ctx.root.join("target"));
    let bin = target.join("debug/inferwatch");
    if !bin.exists() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// `inferwatch check --config <file>` with exactly the `INFERWATCH_*` variables of `env`
/// (none inherited: a stray variable would change what is checked).
fn agent_check(bin: &Path, config: &Path, env: &BTreeMap<String, String>) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("INFERWATCH_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env).arg("check").arg("--config").arg(config);
    cmd
}

fn configmap_toml(ctx: &Ctx) -> anyhow::Result<String> {
    let toml = ctx.manifests(&[
        "configmap-data",
        "deploy/kubernetes/base/configmap.yaml",
        "inferwatch-config",
        "inferwatch.toml",
    ])?;
    let file = ctx.tmp.join("inferwatch.toml");
    std::fs::write(&file, &toml)?;
    // The INFERWATCH_* variables the DaemonSet and its patches set, applied as in the pod.
    let mut files = ctx.files("deploy/kubernetes", &[".yaml"])?;
    files.extend(ctx.files("deploy/examples", &[".yaml"])?);
    let mut args = vec!["agent-env"];
    args.extend(files.iter().map(String::as_str));
    let env: BTreeMap<String, String> = serde_json::from_str(&ctx.manifests(&args)?)?;
    let bin = agent_binary(ctx)?;
    output(&mut agent_check(&bin, &file, &env))
        .context("the agent refused the ConfigMap's config")?;
    // Control: the same check must refuse a config with an unknown key, or exit 0 above
    // proves nothing.
    let bad = ctx.tmp.join("inferwatch-bad.toml");
    std::fs::write(
        &bad,
        toml.replacen("[kernel]", "[kernel]\nno_such_key_deploy_check = 1", 1),
    )?;
    if agent_check(&bin, &bad, &env).output()?.status.success() {
        bail!("`inferwatch check` accepted an unknown key: its exit status proves nothing");
    }
    Ok(format!(
        "`inferwatch check --config` accepts it (with {}), refuses an unknown key",
        env.keys().cloned().collect::<Vec<_>>().join(", ")
    ))
}

/// Where metric families are registered: the Prometheus sink (findings) and the agent's own
/// telemetry (`internal_events`).
const METRIC_DIRS: [&str; 2] = ["agent/src/sinks/prometheus", "agent/src/internal_events"];

/// Family names registered in the [`METRIC_DIRS`]' `*.rs`: every string literal that is a
/// whole `inferwatch_*` name.
fn registered_metrics(ctx: &Ctx) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let mut files = Vec::new();
    for dir in METRIC_DIRS {
        files.extend(ctx.files(dir, &[".rs"])?);
    }
    for f in files {
        let text = std::fs::read_to_string(ctx.path(&f))?;
        for (at, _) in text.match_indices("\"inferwatch_") {
            let rest = &text[at + 1..];
            let len = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            if rest[len..].starts_with('"') {
                names.insert(rest[..len].to_owned());
            }
        }
    }
    if names.is_empty() {
        bail!(
            "no metric registrations found in {}",
            METRIC_DIRS.join(", ")
        );
    }
    Ok(names)
}

/// Every `inferwatch_*` identifier in `text`.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("inferwatch_") {
        if at > 0 {
            let prev = text.as_bytes()[at - 1];
            if prev.is_ascii_alphanumeric() || prev == b'_' {
                continue;
            }
        }
        let rest = &text[at..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        out.insert(rest[..len].to_owned());
    }
    out
}

fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if let (true, Some(s)) = (k == "expr" || k == "query", v.as_str()) {
                    out.push(s.to_owned());
                }
                collect_queries(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_queries(i, out)),
        _ => {}
    }
}

fn metric_names(ctx: &Ctx) -> anyhow::Result<String> {
    let registered = registered_metrics(ctx)?;
    let mut known: BTreeSet<String> = registered
        .iter()
        .flat_map(|n| SUFFIXES.iter().map(move |s| format!("{n}{s}")))
        .collect();
    known.extend(EXTRA_METRICS.iter().map(|s| s.to_string()));

    let path = ctx.path("deploy/grafana/inferwatch.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).context("deploy/grafana/inferwatch.json is not JSON")?;
    let panels = dashboard["panels"].as_array().map_or(0, Vec::len);
    if panels == 0 {
        bail!("the dashboard has no panels");
    }
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        if let Some(id) = p["id"].as_u64()
            && !ids.insert(id)
        {
            bail!("duplicate panel id {id}");
        }
    }
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_tokens(q)).collect();
    let rules = std::fs::read_to_string(ctx.path("deploy/alerts/inferwatch.rules.yml"))?;
    let in_rules = metric_tokens(&rules);
    let unknown: Vec<&String> = used
        .iter()
        .chain(&in_rules)
        .filter(|m| !known.contains(*m))
        .collect();
    if !unknown.is_empty() {
        bail!("metrics the agent does not register: {unknown:?}");
    }
    Ok(format!(
        "dashboard parses ({panels} panels, {} queries); its {} metrics and the rules' {} are among the {} registered (+{})",
        queries.len(),
        used.len(),
        in_rules.len(),
        registered.len(),
        EXTRA_METRICS.join(", ")
    ))
}

/// The `pub` fields of every serde `*Config` struct under agent/src, by struct.
fn config_fields(ctx: &Ctx) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for f in ctx.files("agent/src", &[".rs"])? {
        let text = std::fs::read_to_string(ctx.path(&f))?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.strip_prefix("pub struct ") else {
                continue;
            };
            let name = rest.trim_end_matches(" {").trim();
            let derives_deserialize = lines[i.saturating_sub(6)..i]
                .iter()
                .any(|l| l.contains("Deserialize"));
            if !name.ends_with("Config") || !derives_deserialize || !line.ends_with('{') {
                continue;
            }
            let fields: Vec<String> = lines[i + 1..]
                .iter()
                .take_while(|l| !l.starts_with('}'))
                .filter_map(|l| l.strip_prefix("    pub "))
                .filter_map(|l| l.split(':').next())
                .map(|s| s.trim().to_owned())
                .collect();
            out.insert(name.to_owned(), fields);
        }
    }
    if !out.contains_key("AgentConfig") {
        bail!("AgentConfig not found under agent/src");
    }
    Ok(out)
}

fn config_keys_documented(ctx: &Ctx) -> anyhow::Result<String> {
    let doc = std::fs::read_to_string(ctx.path("docs/configuration.md"))
        .context("reading docs/configuration.md")?;
    let structs = config_fields(ctx)?;
    let mut missing = Vec::new();
    let mut n = 0;
    for (name, fields) in &structs {
        for field in fields {
            n += 1;
            // Sections appear as `[kernel]`, keys as `key`.
            let found = if name == "AgentConfig" {
                doc.contains(&format!("[{field}]"))
            } else {
                doc.contains(&format!("`{field}`"))
            };
            if !found {
                missing.push(format!("{name}.{field}"));
            }
        }
    }
    if !missing.is_empty() {
        bail!("docs/configuration.md lacks: {}", missing.join(", "));
    }
    Ok(format!(
        "all {n} keys of {} config structs documented",
        structs.len()
    ))
}

fn reference_documented(ctx: &Ctx) -> anyhow::Result<String> {
    let doc = std::fs::read_to_string(ctx.path("docs/reference.md"))
        .context("reading docs/reference.md")?;
    let mut missing = Vec::new();
    let metrics = registered_metrics(ctx)?;
    for m in &metrics {
        if !doc.contains(m.as_str()) {
            missing.push(m.clone());
        }
    }
    // Span names and attribute keys the OTLP rendering of the correlator's outputs writes.
    let text = std::fs::read_to_string(ctx.path("agent/src/sinks/otlp/render.rs"))?;
    let mut keys = BTreeSet::new();
    for (at, _) in text.match_indices("\"inferwatch.") {
        let rest = &text[at + 1..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(rest.len());
        let key = rest[..len].trim_end_matches('.');
        if rest[len..].starts_with('"') || rest[len..].starts_with('{') {
            keys.insert(key.to_owned());
        }
    }
    for k in &keys {
        if !doc.contains(&format!("`{k}")) {
            missing.push(k.clone());
        }
    }
    if !missing.is_empty() {
        bail!("docs/reference.md lacks: {}", missing.join(", "));
    }
    Ok(format!(
        "{} metric families and {} span names / attributes documented",
        metrics.len(),
        keys.len()
    ))
}
