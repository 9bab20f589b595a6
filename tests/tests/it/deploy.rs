//! What ops deploy with (`deploy/k8s`, `deploy/prometheus`, `deploy/grafana`), checked
//! against the real tools and the real binaries: schemas (kubernetes-validate), alert
//! unit tests (promtool), and that every name the files use — env vars, probe paths,
//! stream and consumer, metrics — is one the services actually have.

use std::collections::BTreeSet;

use callcap::subjects::Lane;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use callcap_tests::pipeline::Process;
use callcap_tests::stack::{Backend, Stack};
use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a tool the deploy checks need (installed by `deploy/test.sh`); panics naming it
/// when it is missing.
fn tool(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(name)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {name}: {e}; `bash deploy/test.sh` installs it (see deploy/lib.sh)")
        })
}

/// Every document of a YAML file.
fn yaml_docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(path)).expect(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

const MANIFESTS: [&str; 5] = [
    "deploy/k8s/namespace.yaml",
    "deploy/k8s/gateway.yaml",
    "deploy/k8s/worker.yaml",
    "deploy/k8s/worker-overflow.yaml",
    "deploy/k8s/secrets.example.yaml",
];

#[test]
fn manifests_pass_strict_kubernetes_schema_validation() {
    let out = tool(
        "kubernetes-validate",
        &[&["--strict"][..], &MANIFESTS[..]].concat(),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for m in MANIFESTS {
        assert!(
            text.contains(&format!("{} passed", m.rsplit('/').next().unwrap())),
            "{text}"
        );
    }
    // The validator does catch a mistake (a misspelt probe is not silently ignored).
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("gateway.yaml");
    let text = std::fs::read_to_string(repo().join("deploy/k8s/gateway.yaml")).unwrap();
    std::fs::write(&bad, text.replace("readinessProbe:", "readinesProbe:")).unwrap();
    let out = tool("kubernetes-validate", &["--strict", bad.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "a misspelt field must fail validation"
    );
}

/// The env var names a binary's `--help` documents.
fn env_vars_of(bin: &str) -> BTreeSet<String> {
    env_vars_of_command(bin, &[])
}

/// The settings of a subcommand's `--help` (`[env: …]`).
fn env_vars_of_command(bin: &str, sub: &[&str]) -> BTreeSet<String> {
    let out = Command::new(bin)
        .args(sub)
        .arg("--help")
        .output()
        .expect("running --help");
    let help = String::from_utf8_lossy(&out.stdout);
    help.split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_owned)
        .collect()
}

fn container_env(deployment: &Value) -> Vec<(String, Value)> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .expect("env list")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

#[test]
fn deployments_use_only_settings_probes_and_ports_the_binaries_have() {
    for (file, name, bin, port_env) in [
        (
            "deploy/k8s/gateway.yaml",
            "ingest-gateway",
            crate::GATEWAY_BIN,
            "LISTEN_ADDR",
        ),
        (
            "deploy/k8s/worker.yaml",
            "persist-worker",
            crate::WORKER_BIN,
            "METRICS_ADDR",
        ),
        (
            "deploy/k8s/worker-overflow.yaml",
            "persist-worker-overflow",
            crate::WORKER_BIN,
            "METRICS_ADDR",
        ),
        (
            "deploy/k8s/archiver.yaml",
            "persist-worker-archive",
            crate::WORKER_BIN,
            "METRICS_ADDR",
        ),
    ] {
        let docs = yaml_docs(file);
        let dep = find(&docs, "Deployment", name);
        let mut known = env_vars_of(bin);
        if name == "persist-worker-archive" {
            known.extend(env_vars_of_command(bin, &["archive"]));
            // Read by the S3 client, as ARCHIVE_URL's help says.
            let help = String::from_utf8_lossy(
                &Command::new(bin)
                    .args(["archive", "--help"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .to_string();
            for var in [
                "AWS_REGION",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL",
            ] {
                assert!(help.contains(var), "`archive --help` must name {var}");
                known.insert(var.to_owned());
            }
        }
        let env = container_env(dep);
        for (var, _) in &env {
            assert!(
                known.contains(var),
                "{file}: {var} is not a setting of {name} ({known:?})"
            );
        }
        // The probes hit the endpoints the binary serves, on the port it listens on.
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{file}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{file}");
        let listen = env
            .iter()
            .find(|(k, _)| k == port_env)
            .and_then(|(_, v)| v["value"].as_str())
            .unwrap_or_else(|| panic!("{file}: {port_env} set"));
        let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
        assert_eq!(
            c["ports"][0]["containerPort"].as_u64(),
            Some(port),
            "{file}"
        );
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{file}: requests"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{file}: limits"
        );
        // A PDB keeps voluntary evictions from taking them all.
        find(&docs, "PodDisruptionBudget", name);
    }
    // The gateway drains for SHUTDOWN_GRACE_SECS; Kubernetes must wait longer than that
    // before SIGKILL.
    let docs = yaml_docs("deploy/k8s/gateway.yaml");
    let dep = find(&docs, "Deployment", "ingest-gateway");
    let grace: u64 = container_env(dep)
        .iter()
        .find(|(k, _)| k == "SHUTDOWN_GRACE_SECS")
        .and_then(|(_, v)| v["value"].as_str()?.parse().ok())
        .expect("SHUTDOWN_GRACE_SECS set on the gateway");
    let termination = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds {termination} <= SHUTDOWN_GRACE_SECS {grace}"
    );
    // Secrets named by the Deployments exist (in the example) with those keys.
    let secrets = yaml_docs("deploy/k8s/secrets.example.yaml");
    for file in [
        "deploy/k8s/gateway.yaml",
        "deploy/k8s/worker.yaml",
        "deploy/k8s/worker-overflow.yaml",
    ] {
        let docs = yaml_docs(file);
        let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        for (var, e) in container_env(dep) {
            let Some(r) = e["valueFrom"]["secretKeyRef"].as_mapping() else {
                continue;
            };
            let secret = find(
                &secrets,
                "Secret",
                r[&Value::from("name")].as_str().unwrap(),
            );
            let key = r[&Value::from("key")].as_str().unwrap();
            assert!(
                !secret["stringData"][key].is_null(),
                "{file}: {var} from a missing secret key {key}"
            );
        }
        // The NATS identity: a secret volume holding the file NATS_NKEY_FILE names.
        let pod = &dep["spec"]["template"]["spec"];
        let nkey_file = container_env(dep)
            .into_iter()
            .find(|(k, _)| k == "NATS_NKEY_FILE")
            .and_then(|(_, v)| v["value"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("{file}: no NATS_NKEY_FILE"));
        let (dir, name) = nkey_file.rsplit_once('/').unwrap();
        let mount = pod["containers"][0]["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{file}: nothing mounted at {dir}"));
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let secret = find(
            &secrets,
            "Secret",
            volume["secret"]["secretName"].as_str().unwrap(),
        );
        assert!(
            !secret["stringData"][name].is_null(),
            "{file}: the identity secret has no {name}"
        );
    }
}

#[test]
fn keda_scales_each_lanes_workers_on_that_lanes_own_consumer() {
    let docs = yaml_docs("deploy/k8s/keda-scaledobject.yaml");
    let kustomized = yaml_docs("deploy/k8s/kustomization.yaml");
    let resources: Vec<&str> = kustomized[0]["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    for (lane, file) in [
        (Lane::Main, "deploy/k8s/worker.yaml"),
        (Lane::Overflow, "deploy/k8s/worker-overflow.yaml"),
    ] {
        assert!(
            resources.contains(&file.trim_start_matches("deploy/k8s/")),
            "{file} is applied by kustomization.yaml"
        );
        let so = find(&docs, "ScaledObject", lane.consumer_name());
        assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
        let target = &so["spec"]["scaleTargetRef"];
        assert_eq!(target["kind"], "Deployment");
        let workers = yaml_docs(file);
        let dep = find(&workers, "Deployment", target["name"].as_str().unwrap());
        assert_eq!(so["metadata"]["namespace"], dep["metadata"]["namespace"]);
        // The Deployment KEDA scales serves exactly the lane whose consumer it watches.
        let env = container_env(dep);
        let lanes = env
            .iter()
            .find(|(k, _)| k == "LANES")
            .and_then(|(_, v)| v["value"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("{file} sets LANES"));
        assert_eq!(lanes, lane.as_str(), "{file}");
        let trigger = &so["spec"]["triggers"][0];
        assert_eq!(trigger["type"], "nats-jetstream");
        let m = &trigger["metadata"];
        assert_eq!(m["stream"], callcap::subjects::STREAM_NAME);
        assert_eq!(m["consumer"], lane.consumer_name());
        assert_eq!(m["account"], "$G");
        // KEDA reads metadata values as strings.
        for k in ["lagThreshold", "activationLagThreshold"] {
            assert!(
                m[k].as_str().is_some_and(|v| v.parse::<u64>().is_ok()),
                "{k} must be a quoted number"
            );
        }
        let min = so["spec"]["minReplicaCount"].as_u64().unwrap();
        assert!(
            min >= 1,
            "never scale a lane's workers to zero: records would wait with nobody to store them"
        );
        assert!(so["spec"]["maxReplicaCount"].as_u64().unwrap() > min);
    }
}

#[test]
fn the_helm_values_run_the_server_as_the_tests_do() {
    let values = &yaml_docs("deploy/k8s/nats-values.yaml")[0];
    let config = &values["config"];
    assert_eq!(config["cluster"]["enabled"], true);
    assert_eq!(config["cluster"]["replicas"], 3);
    assert_eq!(config["jetstream"]["enabled"], true);
    assert_eq!(config["jetstream"]["fileStore"]["enabled"], true);
    assert_eq!(config["jetstream"]["merge"]["sync_interval"], "always");
    assert_eq!(config["monitor"]["enabled"], true);
    assert!(
        !values["podTemplate"]["topologySpreadConstraints"]["kubernetes.io/hostname"].is_null()
    );
    // The image is at least the project's minimum server.
    let tag = values["container"]["image"]["tag"].as_str().unwrap();
    callcap::subjects::check_server_version(tag.split('-').next().unwrap()).unwrap();
    // The batch limits match the configuration the tests run (deploy/nats/cluster.conf).
    let conf = std::fs::read_to_string(repo().join("deploy/nats/cluster.conf")).unwrap();
    let batch = &config["jetstream"]["merge"]["limits"]["batch"];
    for key in ["max_msgs", "max_inflight_per_stream", "max_inflight_total"] {
        let v = batch[key].as_u64().unwrap();
        assert!(
            conf.contains(&format!("{key}: {v}\n")),
            "{key}: {v} differs from cluster.conf"
        );
    }
    assert!(conf.contains("sync_interval: always"));

    // The same identities and permissions as deploy/nats/identities.conf, which every
    // test runs (and `security::each_nats_identity…` checks).
    let identities = std::fs::read_to_string(repo().join("deploy/nats/identities.conf")).unwrap();
    let block = |name: &str| -> Vec<String> {
        let start = identities.find(&format!("{name} = {{")).unwrap();
        let end = start + identities[start..].find("\n  }\n").unwrap();
        identities[start..end]
            .lines()
            .map(|l| l.split('#').next().unwrap().trim())
            .filter(|l| l.starts_with('"'))
            .map(|l| l.trim_matches('"').to_owned())
            .collect()
    };
    let users = config["merge"]["authorization"]["users"]
        .as_sequence()
        .unwrap();
    for (i, name) in ["GATEWAY", "WORKER"].iter().enumerate() {
        let perms = &users[i]["permissions"];
        let none = Vec::new();
        let mut helm: Vec<String> = perms["publish"]["allow"]
            .as_sequence()
            .unwrap()
            .iter()
            .chain(perms["publish"]["deny"].as_sequence().unwrap_or(&none))
            .chain(perms["subscribe"]["allow"].as_sequence().unwrap())
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let mut shipped = block(name);
        // identities.conf writes the subscribe allow inline: ["_INBOX.x.>"].
        let inline = identities[identities.find(&format!("{name} = {{")).unwrap()..]
            .lines()
            .find(|l| l.trim_start().starts_with("subscribe"))
            .unwrap()
            .split('"')
            .nth(1)
            .unwrap()
            .to_owned();
        shipped.push(inline);
        helm.sort();
        shipped.sort();
        assert_eq!(
            helm, shipped,
            "{name}: the Helm values differ from identities.conf"
        );
    }
    assert_eq!(users[2]["permissions"]["publish"], ">");
    for (user, var) in users.iter().zip([
        "CALLCAP_GATEWAY_NKEY",
        "CALLCAP_WORKER_NKEY",
        "CALLCAP_ADMIN_NKEY",
    ]) {
        assert_eq!(user["nkey"].as_str().unwrap(), format!("<< ${var} >>"));
        assert!(
            !values["container"]["env"][var].is_null(),
            "{var} is not given to the server"
        );
    }
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = tool(
        "promtool",
        &["check", "rules", "deploy/prometheus/alerts.yml"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tool(
        "promtool",
        &["test", "rules", "deploy/prometheus/alerts.test.yml"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PromQL expressions of the alert rules and the dashboard.
fn shipped_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules = &yaml_docs("deploy/prometheus/alerts.yml")[0];
    for r in rules["groups"][0]["rules"].as_sequence().unwrap() {
        out.push((
            r["alert"].as_str().unwrap().to_owned(),
            r["expr"].as_str().unwrap().to_owned(),
        ));
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/callcap.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {:?}", p["title"].as_str().unwrap_or_default()),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    // promtool parses recording rules: one per dashboard query.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in shipped_queries().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    let out = tool("promtool", &["check", "rules", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_use_is_exported() {
    let Backend {
        nats,
        db,
        company,
        key,
        workers,
        ..
    } = Stack::new().backend().await;
    let (gw_port, worker_port) = (callcap_tests::free_port(), callcap_tests::free_port());
    let _gw = Process::gateway(crate::GATEWAY_BIN, &nats.url(), gw_port, &[]);
    let _worker = workers.process(crate::WORKER_BIN, worker_port, &[]);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{gw_port}");
    callcap_tests::eventually(
        Duration::from_secs(30),
        "the gateway to be ready",
        || async {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .ok()?
                .status()
                .is_success()
                .then_some(())
        },
    )
    .await;
    // Some traffic, so every series exists: a 201 and a stored row.
    callcap_tests::eventually(Duration::from_secs(10), "a 201", || async {
        let r = http
            .post(format!("{base}/v1/calls"))
            .header("x-api-key", &key)
            .json(&callcap_tests::payloads::minimal(company))
            .send()
            .await
            .ok()?;
        (r.status() == reqwest::StatusCode::CREATED).then_some(())
    })
    .await;
    callcap_tests::eventually(Duration::from_secs(30), "the row", || async {
        (db.count_calls().await == 1).then_some(())
    })
    .await;
    // Gauges are reported every 5 s.
    let (exported, texts) =
        callcap_tests::eventually(Duration::from_secs(30), "both binaries' gauges", || {
            let http = http.clone();
            async move {
                let mut exported = BTreeSet::new();
                let mut texts = Vec::new();
                for port in [gw_port, worker_port] {
                    let url = format!("http://127.0.0.1:{port}/metrics");
                    let text = http.get(url).send().await.ok()?.text().await.ok()?;
                    texts.push(text.clone());
                    for line in text
                        .lines()
                        .filter(|l| !l.starts_with('#') && !l.is_empty())
                    {
                        let name = line.split(['{', ' ']).next().unwrap_or_default();
                        exported.insert(name.to_owned());
                        for suffix in ["_bucket", "_sum", "_count"] {
                            if let Some(base) = name.strip_suffix(suffix) {
                                exported.insert(base.to_owned());
                            }
                        }
                    }
                }
                (exported.contains("gateway_ready")
                    && exported.contains("worker_consumer_pending")
                    && exported.contains("worker_batch_size"))
                .then_some((exported, texts))
            }
        })
        .await;
    // Every metric says what it is (# HELP), and batch sizes have count buckets.
    for text in &texts {
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no # HELP line"
            );
        }
    }
    let worker_text = &texts[1];
    assert!(
        worker_text.contains("worker_batch_size_bucket{lane=\"main\",le=\"1000\"}"),
        "{worker_text}"
    );
    assert!(
        !worker_text.contains("worker_batch_size_bucket{lane=\"main\",le=\"0.001\"}"),
        "{worker_text}"
    );
    let mut used = 0;
    for (owner, expr) in shipped_queries() {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("gateway_") || w.starts_with("worker_"))
        {
            used += 1;
            assert!(
                exported.contains(name),
                "{owner} uses {name}, which neither binary exports ({exported:?})"
            );
        }
    }
    assert!(used > 20, "the queries name the services' metrics");
}

/// The `key: value` lines of a nats-server config's `batch { … }` block.
fn batch_limits(conf: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/nats").join(conf)).unwrap();
    let start = text
        .find("batch {")
        .unwrap_or_else(|| panic!("{conf} has no batch limits"));
    let end = start + text[start..].find('}').unwrap();
    text[start + "batch {".len()..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_shipped_nats_config_has_the_same_batch_limits_and_the_scripts_the_same_minimum_version() {
    let single = batch_limits("single.conf");
    assert_eq!(single.len(), 4, "{single:?}");
    for other in ["cluster.conf", "interval-fsync.conf"] {
        assert_eq!(
            batch_limits(other),
            single,
            "{other} differs from single.conf"
        );
    }
    // deploy/lib.sh installs and accepts the same minimum nats-server as the binaries.
    let lib = std::fs::read_to_string(repo().join("deploy/lib.sh")).unwrap();
    let line = lib
        .lines()
        .find(|l| l.starts_with("NATS_MIN_MAJOR="))
        .expect("lib.sh sets NATS_MIN_MAJOR");
    let (maj, min, _) = callcap::subjects::MIN_SERVER_VERSION;
    assert_eq!(
        line.trim(),
        format!("NATS_MIN_MAJOR={maj} NATS_MIN_MINOR={min}"),
        "deploy/lib.sh and MIN_SERVER_VERSION disagree"
    );
}
