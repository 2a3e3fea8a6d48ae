//! The deployment files, checked mechanically against the code (no cluster, no Docker engine
//! here): every Kubernetes manifest parses into the typed API objects with no field lost on
//! the way (a misspelled field fails), and the settings, ports, probes, paths, certificates,
//! images, compose services and dashboards agree with what the binaries really read and
//! serve.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, PodTemplateSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use logging_agent::config::Config as AgentConfig;
use logging_aggregator::config::Config as AggregatorConfig;
use logging_tests::{ADMIN_TOKEN, AgentProcess, AggregatorProcess, binary, http_client};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of a YAML file, as JSON values.
fn yaml_docs(relative: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(relative))
        .unwrap_or_else(|e| panic!("{relative}: {e}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Where `typed` (the document after a trip through its typed form) differs from
/// `original`: fields the type dropped (unknown or misspelled), or changed.
fn differences(original: &Value, typed: &Value, at: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{at}.{key}");
                match b.get(key) {
                    Some(other) => differences(value, other, &path, out),
                    None => out.push(format!("{path}: unknown field (misspelled?)")),
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{at}.{key}: missing (a required field?)"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(x, y, &format!("{at}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{at}: {a} became {b}")),
    }
}

/// Deserializes into `T`, serializes back, and insists nothing was lost or changed
/// (k8s-openapi drops unknown fields silently, docs/design.md §10).
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    differences(doc, &back, "", &mut out);
    if out.is_empty() {
        Ok(typed)
    } else {
        Err(out.join("; "))
    }
}

// --- cert-manager's and kustomize's objects, which k8s-openapi does not carry ---

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertManagerObject<S> {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: S,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssuerSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    self_signed: Option<BTreeMap<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<CaIssuer>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CaIssuer {
    secret_name: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSpec {
    secret_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    common_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns_names: Option<Vec<String>>,
    #[serde(rename = "isCA", skip_serializing_if = "Option::is_none")]
    is_ca: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    renew_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usages: Option<Vec<KeyUsage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key: Option<PrivateKey>,
    issuer_ref: IssuerRef,
}

impl CertificateSpec {
    fn has_usage(&self, usage: KeyUsage) -> bool {
        self.usages.iter().flatten().any(|u| *u == usage)
    }
}

/// The usages cert-manager accepts that this deployment has a use for.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
enum KeyUsage {
    #[serde(rename = "digital signature")]
    DigitalSignature,
    #[serde(rename = "key encipherment")]
    KeyEncipherment,
    #[serde(rename = "server auth")]
    ServerAuth,
    #[serde(rename = "client auth")]
    ClientAuth,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrivateKey {
    algorithm: KeyAlgorithm,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<KeyEncoding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rotation_policy: Option<RotationPolicy>,
}

#[derive(Serialize, Deserialize)]
enum KeyAlgorithm {
    #[serde(rename = "RSA")]
    Rsa,
    #[serde(rename = "ECDSA")]
    Ecdsa,
    Ed25519,
}

#[derive(Serialize, Deserialize)]
enum KeyEncoding {
    #[serde(rename = "PKCS1")]
    Pkcs1,
    #[serde(rename = "PKCS8")]
    Pkcs8,
}

#[derive(Serialize, Deserialize)]
enum RotationPolicy {
    Never,
    Always,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssuerRef {
    name: String,
    kind: String,
    group: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    resources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    images: Option<Vec<KustomizeImage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patches: Option<Vec<KustomizePatch>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizePatch {
    path: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizeImage {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_tag: Option<String>,
}

fn object_key(doc: &Value) -> (String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&doc["kind"]), text(&doc["metadata"]["name"]))
}

/// Every object `kubectl apply -k deploy/` installs, checked and typed.
#[derive(Default)]
struct Install {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    services: Vec<Service>,
    daemon_sets: Vec<DaemonSet>,
    stateful_sets: Vec<StatefulSet>,
    deployments: Vec<Deployment>,
    autoscalers: Vec<HorizontalPodAutoscaler>,
    budgets: Vec<PodDisruptionBudget>,
    network_policies: Vec<NetworkPolicy>,
    issuers: Vec<CertManagerObject<IssuerSpec>>,
    certificates: Vec<CertManagerObject<CertificateSpec>>,
    /// (kind, name) of every object, as kustomize would list them.
    objects: BTreeSet<(String, String)>,
}

impl Install {
    /// Adds one document, or says what is wrong with it.
    fn add(&mut self, doc: &Value) -> Result<(), String> {
        self.objects.insert(object_key(doc));
        let api_version = doc["apiVersion"].as_str().unwrap_or("");
        match (api_version, doc["kind"].as_str().unwrap_or("")) {
            ("v1", "Namespace") => self.namespaces.push(round_trip(doc)?),
            ("v1", "ServiceAccount") => self.service_accounts.push(round_trip(doc)?),
            ("v1", "ConfigMap") => self.config_maps.push(round_trip(doc)?),
            ("v1", "Service") => self.services.push(round_trip(doc)?),
            ("apps/v1", "DaemonSet") => self.daemon_sets.push(round_trip(doc)?),
            ("apps/v1", "StatefulSet") => self.stateful_sets.push(round_trip(doc)?),
            ("apps/v1", "Deployment") => self.deployments.push(round_trip(doc)?),
            ("autoscaling/v2", "HorizontalPodAutoscaler") => {
                self.autoscalers.push(round_trip(doc)?)
            }
            ("policy/v1", "PodDisruptionBudget") => self.budgets.push(round_trip(doc)?),
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                self.network_policies.push(round_trip(doc)?)
            }
            ("cert-manager.io/v1", "Issuer") => self.issuers.push(round_trip(doc)?),
            ("cert-manager.io/v1", "Certificate") => self.certificates.push(round_trip(doc)?),
            (api_version, kind) => return Err(format!("unexpected object {api_version} {kind}")),
        }
        Ok(())
    }

    /// Reads deploy/kustomization.yaml and every resource it lists.
    fn load() -> (Kustomization, Install) {
        Install::load_dir("deploy")
    }

    /// Reads `<dir>/kustomization.yaml`, every resource it lists (a directory is a
    /// kustomization of its own), then applies its patches (a ConfigMap replaces the data of
    /// the one of that name).
    fn load_dir(dir: &str) -> (Kustomization, Install) {
        let docs = yaml_docs(&format!("{dir}/kustomization.yaml"));
        let kustomization: Kustomization =
            round_trip(&docs[0]).unwrap_or_else(|e| panic!("{dir}/kustomization.yaml: {e}"));
        let mut install = Install::default();
        for resource in &kustomization.resources {
            if !resource.ends_with(".yaml") {
                let base = Path::new(dir).join(resource);
                let (_, from_base) = Install::load_dir(&base.to_string_lossy());
                install.absorb(from_base);
                continue;
            }
            for (i, doc) in yaml_docs(&format!("{dir}/{resource}")).iter().enumerate() {
                install
                    .add(doc)
                    .unwrap_or_else(|e| panic!("{dir}/{resource}, document {i}: {e}"));
            }
        }
        for patch in kustomization.patches.iter().flatten() {
            let doc = &yaml_docs(&format!("{dir}/{}", patch.path))[0];
            install
                .patch(doc)
                .unwrap_or_else(|e| panic!("{dir}/{}: {e}", patch.path));
        }
        (kustomization, install)
    }

    fn absorb(&mut self, other: Install) {
        self.namespaces.extend(other.namespaces);
        self.service_accounts.extend(other.service_accounts);
        self.config_maps.extend(other.config_maps);
        self.services.extend(other.services);
        self.daemon_sets.extend(other.daemon_sets);
        self.stateful_sets.extend(other.stateful_sets);
        self.deployments.extend(other.deployments);
        self.autoscalers.extend(other.autoscalers);
        self.budgets.extend(other.budgets);
        self.network_policies.extend(other.network_policies);
        self.issuers.extend(other.issuers);
        self.certificates.extend(other.certificates);
        self.objects.extend(other.objects);
    }

    /// Applies one strategic-merge patch of the kinds the overlays use.
    fn patch(&mut self, doc: &Value) -> Result<(), String> {
        let name = doc["metadata"]["name"].as_str().ok_or("no metadata.name")?;
        let named = |meta: &ObjectMeta| meta.name.as_deref() == Some(name);
        match (doc["kind"].as_str(), doc["$patch"].as_str()) {
            (Some("ConfigMap"), None) => {
                let replacement: ConfigMap = round_trip(doc)?;
                let base = self
                    .config_maps
                    .iter_mut()
                    .find(|c| named(&c.metadata))
                    .ok_or(format!(
                        "patches the ConfigMap {name}, which the base lacks"
                    ))?;
                base.data
                    .get_or_insert_with(Default::default)
                    .extend(replacement.data.into_iter().flatten());
            }
            (kind, how) => {
                return Err(format!(
                    "a patch of {kind:?} ({how:?}) the test does not apply"
                ));
            }
        }
        Ok(())
    }

    fn certificate(&self, secret: &str) -> &CertificateSpec {
        &self
            .certificates
            .iter()
            .find(|c| c.spec.secret_name == secret)
            .unwrap_or_else(|| panic!("no Certificate writes the secret {secret}"))
            .spec
    }
}

fn template_labels(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("pod template labels")
}

fn pod_spec(template: &PodTemplateSpec) -> &PodSpec {
    template.spec.as_ref().expect("a pod spec")
}

fn env_of(container: &Container) -> BTreeMap<String, Option<String>> {
    container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect()
}

fn port_named(container: &Container, name: &str) -> i32 {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container {} has no port named {name}", container.name))
        .container_port
}

/// The secret behind the pod's volume named `volume`.
fn secret_volume(pod: &PodSpec, volume: &str) -> String {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| panic!("no secret volume {volume}"))
}

/// The (path, port name) of an HTTP probe.
fn http_probe(probe: Option<&k8s_openapi::api::core::v1::Probe>) -> (String, String) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .expect("an HTTP probe");
    let port = match &get.port {
        IntOrString::String(name) => name.clone(),
        IntOrString::Int(n) => n.to_string(),
    };
    (get.path.clone().unwrap_or_default(), port)
}

/// The directory a volume named `volume` is mounted at in `container`.
fn mount_of<'a>(container: &'a Container, volume: &str) -> &'a str {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container.name))
        .mount_path
        .as_str()
}

fn mebibytes(quantity: &Quantity) -> u64 {
    let text = quantity.0.as_str();
    let (number, factor) = if let Some(n) = text.strip_suffix("Gi") {
        (n, 1024)
    } else if let Some(n) = text.strip_suffix("Mi") {
        (n, 1)
    } else {
        panic!("memory quantity {text} is not in Mi or Gi")
    };
    number.parse::<u64>().expect("a whole number") * factor
}

fn variables<T: Serialize + DeserializeOwned + Default>() -> BTreeSet<String> {
    logging_common::config::variable_names::<T>()
        .into_iter()
        .collect()
}

/// The aggregator's settings as the ConfigMap gives them (no environment).
fn configmap_settings(install: &Install) -> AggregatorConfig {
    let map = install
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("logging-aggregator"))
        .expect("the aggregator's ConfigMap");
    let text = &map.data.as_ref().expect("data")["config.yaml"];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, text).unwrap();
    let config: AggregatorConfig = logging_common::config::load(Some(&file), std::iter::empty())
        .unwrap_or_else(|e| panic!("the ConfigMap's config.yaml: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("the ConfigMap's config.yaml: {e}"));
    config
}

#[test]
fn every_manifest_is_a_typed_object_with_no_unknown_field() {
    let (kustomization, install) = Install::load();
    assert_eq!(kustomization.namespace.as_deref(), Some("logging"));
    assert_eq!(install.daemon_sets.len(), 1);
    assert_eq!(install.stateful_sets.len(), 1);
    assert_eq!(install.certificates.len(), 3);

    // Nothing in deploy/, deploy/base/ or deploy/scale-out/ is forgotten by its
    // kustomization (templates aside).
    for dir in ["deploy", "deploy/base", "deploy/scale-out"] {
        let kustomization: Kustomization =
            round_trip(&yaml_docs(&format!("{dir}/kustomization.yaml"))[0]).unwrap();
        let mut listed: BTreeSet<String> = kustomization.resources.iter().cloned().collect();
        listed.extend(
            kustomization
                .patches
                .iter()
                .flatten()
                .map(|p| p.path.clone()),
        );
        listed.insert("kustomization.yaml".into());
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            if name.ends_with(".yaml") && !name.ends_with(".example.yaml") {
                assert!(
                    listed.contains(&name),
                    "{dir}/{name} is not in its kustomization"
                );
            }
        }
    }
    // The repository root's daemonset.yaml is the one deploy/ installs.
    assert_eq!(read("daemonset.yaml"), read("deploy/base/daemonset.yaml"));

    // Every object lives in the namespace the kustomization sets (the Namespace aside).
    let metas: Vec<&ObjectMeta> = install
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(install.config_maps.iter().map(|o| &o.metadata))
        .chain(install.services.iter().map(|o| &o.metadata))
        .chain(install.daemon_sets.iter().map(|o| &o.metadata))
        .chain(install.stateful_sets.iter().map(|o| &o.metadata))
        .chain(install.budgets.iter().map(|o| &o.metadata))
        .chain(install.network_policies.iter().map(|o| &o.metadata))
        .chain(install.issuers.iter().map(|o| &o.metadata))
        .chain(install.certificates.iter().map(|o| &o.metadata))
        .collect();
    for meta in metas {
        assert_eq!(
            meta.namespace.as_deref(),
            Some("logging"),
            "{:?}",
            meta.name
        );
    }

    // The images kustomize pins are the images the workloads use.
    let pinned: BTreeSet<String> = kustomization
        .images
        .iter()
        .flatten()
        .map(|i| i.name.clone())
        .collect();
    let used: BTreeSet<String> = install
        .daemon_sets
        .iter()
        .map(|d| &d.spec.as_ref().unwrap().template)
        .chain(
            install
                .stateful_sets
                .iter()
                .map(|s| &s.spec.as_ref().unwrap().template),
        )
        .flat_map(|t| pod_spec(t).containers.iter())
        .map(|c| {
            let image = c.image.clone().unwrap_or_default();
            image.split(':').next().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(pinned, used);

    // The secret template holds only variables the aggregator reads.
    let template = &yaml_docs("deploy/api-tokens.example.yaml")[0];
    let secret: Secret = round_trip(template).unwrap();
    let known = variables::<AggregatorConfig>();
    for key in secret.string_data.iter().flatten().map(|(k, _)| k) {
        assert!(
            known.contains(key),
            "the secret template sets {key}, which nothing reads"
        );
    }
}

#[test]
fn the_scale_out_variant_is_the_same_aggregator_reading_from_a_shared_engine() {
    let (kustomization, install) = Install::load_dir("deploy/scale-out");
    let (_, base) = Install::load();
    assert!(
        kustomization.resources.contains(&"../base".to_string()),
        "the variant shares deploy/base/"
    );
    assert!(
        install.stateful_sets.is_empty(),
        "the Deployment instead of the StatefulSet"
    );
    assert_eq!(install.deployments.len(), 1);
    assert_eq!(install.daemon_sets.len(), 1, "the agents come along");
    let deployment = &install.deployments[0];
    let spec = deployment.spec.as_ref().unwrap();
    assert!(
        spec.replicas.is_none(),
        "the HorizontalPodAutoscaler owns the replica count"
    );
    for meta in [&deployment.metadata, &install.autoscalers[0].metadata] {
        assert_eq!(meta.namespace.as_deref(), Some("logging"));
    }

    // The pod is the StatefulSet's, but for the data volume, the grace period and the
    // Secret, which is required here.
    let pod = pod_spec(&spec.template);
    let comparable = |template: &PodTemplateSpec| {
        let mut value = serde_json::to_value(template).unwrap();
        let spec = value["spec"].as_object_mut().unwrap();
        spec.remove("terminationGracePeriodSeconds");
        if let Some(volumes) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
            volumes.retain(|v| v["name"] != "data");
        }
        value["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("envFrom");
        value
    };
    let base_template = &base.stateful_sets[0].spec.as_ref().unwrap().template;
    assert_eq!(comparable(&spec.template), comparable(base_template));
    let data = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "data")
        .unwrap();
    assert!(
        data.empty_dir.is_some(),
        "a replica's WAL lives and dies with it"
    );
    let secret = pod.containers[0].env_from.as_ref().unwrap()[0]
        .secret_ref
        .as_ref()
        .unwrap();
    assert_eq!(secret.name, "logging-aggregator-env");
    assert_eq!(secret.optional, Some(false));

    // It reads from the engine it writes to, drains within its grace, and leaves the
    // per-replica alert windows off.
    let config = configmap_settings(&install);
    let base_config = configmap_settings(&base);
    match config.log_query_backend.as_str() {
        "elasticsearch" => assert!(config.elasticsearch_url.is_some()),
        "loki" => assert!(config.loki_url.is_some()),
        other => panic!("the scale-out variant reads from {other}"),
    }
    assert!(config.shutdown_drain_seconds > 0);
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert!(
        grace >= config.shutdown_drain_seconds as i64 + 10,
        "the grace period ({grace} s) outlasts the drain ({} s)",
        config.shutdown_drain_seconds
    );
    assert!(config.alert_rules.is_empty());
    assert_eq!(
        (
            config.service_port,
            config.ingest_port,
            config.prometheus_port
        ),
        (
            base_config.service_port,
            base_config.ingest_port,
            base_config.prometheus_port
        )
    );
    assert_eq!(
        (&config.data_dir, &config.tls_cert, &config.tls_client_ca),
        (
            &base_config.data_dir,
            &base_config.tls_cert,
            &base_config.tls_client_ca
        )
    );

    // The autoscaler scales this Deployment on the CPU it requests.
    let hpa = install.autoscalers[0].spec.as_ref().unwrap();
    assert_eq!(hpa.scale_target_ref.kind, "Deployment");
    assert_eq!(hpa.scale_target_ref.api_version.as_deref(), Some("apps/v1"));
    assert_eq!(
        Some(hpa.scale_target_ref.name.as_str()),
        deployment.metadata.name.as_deref()
    );
    assert!(
        hpa.min_replicas.unwrap_or(1) >= 2,
        "a drain never stops ingest"
    );
    let requests = pod.containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .unwrap();
    assert!(
        requests.contains_key("cpu"),
        "utilization needs a CPU request"
    );

    // The Services, the budget and the network policy select its pods.
    let labels = template_labels(&spec.template);
    let selects = |selector: &BTreeMap<String, String>| {
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    for service in &install.services {
        assert!(selects(
            service.spec.as_ref().unwrap().selector.as_ref().unwrap()
        ));
    }
    let budget = install.budgets[0].spec.as_ref().unwrap();
    assert!(selects(
        budget
            .selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()
    ));
    let policy = install.network_policies[0].spec.as_ref().unwrap();
    assert!(selects(
        policy
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()
    ));

    // The Secret template gives the replicas what they need, and only what the binary reads.
    let template = &yaml_docs("deploy/scale-out/aggregator-env.example.yaml")[0];
    let secret: Secret = round_trip(template).unwrap();
    let keys: BTreeSet<String> = secret
        .string_data
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .collect();
    let known = variables::<AggregatorConfig>();
    assert!(keys.is_subset(&known), "{keys:?}");
    for needed in ["API_TOKENS", "DATABASE_URL"] {
        assert!(keys.contains(needed), "the replicas need {needed}");
    }
}

/// The real kustomize (in `kubectl`) renders both installs, and what it renders is what the
/// checks above read: the same objects, the same aggregator configuration.
#[test]
fn kubectl_kustomize_renders_what_the_checks_read() {
    let version = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    if version.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubectl is not installed, and CI is set: install it (it carries kustomize)"
        );
        eprintln!("skipping: kubectl (kustomize) is not installed");
        return;
    }
    for dir in ["deploy", "deploy/scale-out"] {
        let output = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join(dir))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rendered: Vec<Value> =
            serde_saphyr::from_multiple(&String::from_utf8(output.stdout).unwrap()).unwrap();
        let (_, install) = Install::load_dir(dir);
        let keys: BTreeSet<(String, String)> = rendered.iter().map(object_key).collect();
        assert_eq!(keys, install.objects, "{dir}");
        for doc in &rendered {
            if doc["kind"] != "Namespace" {
                assert_eq!(doc["metadata"]["namespace"], "logging", "{dir}: {doc}");
            }
        }
        let config = rendered
            .iter()
            .find(|d| d["kind"] == "ConfigMap")
            .expect("the aggregator's ConfigMap");
        let checked = install.config_maps[0].data.as_ref().unwrap()["config.yaml"].clone();
        assert_eq!(config["data"]["config.yaml"], checked, "{dir}");
    }
}

#[test]
fn the_checker_catches_a_misspelled_or_unknown_field() {
    let mut daemonset = yaml_docs("deploy/base/daemonset.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    assert!(round_trip::<DaemonSet>(&daemonset).is_ok());
    daemonset["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always".into();
    let error = round_trip::<DaemonSet>(&daemonset).expect_err("a misspelling is caught");
    assert!(error.contains("imagePulPolicy"), "{error}");

    let mut certificate = yaml_docs("deploy/base/certificates.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Certificate")
        .unwrap();
    certificate["spec"]["dnsName"] = serde_json::json!(["x"]);
    assert!(round_trip::<CertManagerObject<CertificateSpec>>(&certificate).is_err());

    let mut service = yaml_docs("deploy/base/aggregator-service.yaml")[0].clone();
    service["spec"]["ports"][0]["targetport"] = "api".into();
    assert!(round_trip::<Service>(&service).is_err());
}

#[test]
fn the_daemonset_sets_only_what_the_agent_reads_and_mounts_where_it_looks() {
    let (_, install) = Install::load();
    let daemonset = &install.daemon_sets[0];
    let template = &daemonset.spec.as_ref().unwrap().template;
    let pod = pod_spec(template);
    let agent = &pod.containers[0];
    let env = env_of(agent);
    let known = variables::<AgentConfig>();
    for name in env.keys() {
        assert!(
            known.contains(name),
            "the DaemonSet sets {name}, which the agent does not read"
        );
    }
    let value = |name: &str| -> String {
        env.get(name)
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("the DaemonSet does not set {name}"))
    };
    let defaults = AgentConfig::default();

    // NODE_NAME comes from the node the pod runs on.
    let node = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node.as_deref(), Some("spec.nodeName"));

    // The checkpoint directory is the agent's default and survives the pod on the node.
    assert_eq!(
        Path::new(&value("AGENT_DATA_DIR")),
        defaults.agent_data_dir.as_path()
    );
    assert_eq!(mount_of(agent, "state"), value("AGENT_DATA_DIR"));
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .unwrap_or_else(|| panic!("no hostPath volume {name}"))
    };
    assert_eq!(host_path("state").path, value("AGENT_DATA_DIR"));
    assert_eq!(
        host_path("state").type_.as_deref(),
        Some("DirectoryOrCreate")
    );

    // The globs are the default, under a read-only mount of the same host directory.
    assert_eq!(value("AGENT_PATHS"), defaults.agent_paths.join(","));
    for (volume, path) in [
        ("pod-logs", "/var/log/pods"),
        ("container-logs", "/var/log/containers"),
        ("docker-containers", "/var/lib/docker/containers"),
    ] {
        assert_eq!(mount_of(agent, volume), path);
        assert_eq!(host_path(volume).path, path);
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume)
            .unwrap();
        assert_eq!(mount.read_only, Some(true), "{volume} must be read-only");
    }
    for glob in value("AGENT_PATHS").split(',') {
        assert!(
            glob.starts_with("/var/log/pods/"),
            "{glob} is not under a mount"
        );
    }

    // mTLS: the files cert-manager writes, from the agent's certificate, for the Service
    // name the server certificate carries.
    let tls_dir = mount_of(agent, "tls");
    for (variable, file) in [
        ("TLS_CA", "ca.crt"),
        ("TLS_CERT", "tls.crt"),
        ("TLS_KEY", "tls.key"),
    ] {
        assert_eq!(value(variable), format!("{tls_dir}/{file}"));
    }
    let agent_certificate = install.certificate(&secret_volume(pod, "tls"));
    assert!(agent_certificate.has_usage(KeyUsage::ClientAuth));
    let url = value("AGGREGATOR_URL");
    let authority = url.strip_prefix("https://").expect("https");
    let (host, port) = authority.split_once(':').expect("host:port");
    let server_certificate = install.certificate("logging-aggregator-tls");
    assert!(
        server_certificate
            .dns_names
            .as_ref()
            .unwrap()
            .iter()
            .any(|n| n == host),
        "the server certificate is not valid for {host}"
    );
    let service = install
        .services
        .iter()
        .find(|s| host.starts_with(&format!("{}.", s.metadata.name.as_deref().unwrap())))
        .expect("AGGREGATOR_URL names a Service of the install");
    let ingest = service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("ingest"))
        .unwrap();
    assert_eq!(port, ingest.port.to_string());

    // Metrics and health on the agent's port, announced to Prometheus.
    let metrics_port = port_named(agent, "metrics");
    assert_eq!(value("AGENT_METRICS_PORT"), metrics_port.to_string());
    assert_eq!(metrics_port, i32::from(defaults.agent_metrics_port));
    let annotations = template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(annotations["prometheus.io/port"], metrics_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    for probe in [
        agent.liveness_probe.as_ref(),
        agent.readiness_probe.as_ref(),
    ] {
        assert_eq!(http_probe(probe), ("/health".into(), "metrics".into()));
    }

    // Operations: every node, killed only after the agent's own flush could finish, memory
    // above what the benchmark measured with 1,000 files (BENCHMARKS.md).
    let spec = daemonset.spec.as_ref().unwrap();
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert!(
        grace as u64 > logging_agent::app::SHUTDOWN_GRACE.as_secs(),
        "the pod is killed ({grace} s) before the agent's flush ends"
    );
    let resources = agent.resources.as_ref().unwrap();
    let limit = mebibytes(&resources.limits.as_ref().unwrap()["memory"]);
    assert!(
        limit >= 64,
        "memory limit {limit} MiB is below the 64 MiB bar"
    );
    let security = agent.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
}

#[test]
fn the_aggregator_manifests_agree_with_its_configuration() {
    let (_, install) = Install::load();
    let config = configmap_settings(&install);
    let statefulset = &install.stateful_sets[0];
    let spec = statefulset.spec.as_ref().unwrap();
    let pod = pod_spec(&spec.template);
    let aggregator = &pod.containers[0];

    // It reads the ConfigMap it mounts.
    let args = aggregator.args.clone().unwrap_or_default();
    assert_eq!(args[0], "--config");
    let config_mount = aggregator
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "config")
        .unwrap();
    assert_eq!(args[1], config_mount.mount_path);
    assert_eq!(config_mount.sub_path.as_deref(), Some("config.yaml"));

    // Ports, probes and the Services in front of them.
    assert_eq!(
        port_named(aggregator, "api"),
        i32::from(config.service_port)
    );
    assert_eq!(
        port_named(aggregator, "ingest"),
        i32::from(config.ingest_port)
    );
    assert_eq!(
        port_named(aggregator, "metrics"),
        i32::from(config.prometheus_port)
    );
    assert_eq!(
        port_named(aggregator, "otlp-grpc"),
        i32::from(config.otlp_grpc_port)
    );
    assert_eq!(
        port_named(aggregator, "forward"),
        i32::from(config.forward_port)
    );
    assert_eq!(
        http_probe(aggregator.liveness_probe.as_ref()),
        ("/health".into(), "api".into())
    );
    assert_eq!(
        http_probe(aggregator.startup_probe.as_ref()),
        ("/health".into(), "api".into())
    );
    assert_eq!(
        http_probe(aggregator.readiness_probe.as_ref()),
        ("/health/ready".into(), "api".into())
    );
    let pod_labels = template_labels(&spec.template);
    for service in &install.services {
        let service_spec = service.spec.as_ref().unwrap();
        for (key, value) in service_spec.selector.iter().flatten() {
            assert_eq!(pod_labels.get(key), Some(value), "Service selector {key}");
        }
        for port in service_spec.ports.iter().flatten() {
            let Some(IntOrString::String(target)) = &port.target_port else {
                panic!("Service ports target the container's named ports");
            };
            port_named(aggregator, target);
        }
    }
    assert!(
        install
            .services
            .iter()
            .any(|s| s.metadata.name == Some(spec.service_name.clone().unwrap()))
    );

    // Storage and certificates where the configuration expects them; user 1000 (seed).
    assert_eq!(Path::new(mount_of(aggregator, "data")), config.data_dir);
    assert_eq!(
        spec.volume_claim_templates.as_ref().unwrap()[0]
            .metadata
            .name
            .as_deref(),
        Some("data")
    );
    let tls_dir = Path::new(mount_of(aggregator, "tls"));
    assert_eq!(
        config.tls_cert.as_deref(),
        Some(tls_dir.join("tls.crt").as_path())
    );
    assert_eq!(
        config.tls_key.as_deref(),
        Some(tls_dir.join("tls.key").as_path())
    );
    assert_eq!(
        config.tls_client_ca.as_deref(),
        Some(tls_dir.join("ca.crt").as_path())
    );
    let server = install.certificate(&secret_volume(pod, "tls"));
    assert!(server.has_usage(KeyUsage::ServerAuth));
    let security = pod.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_user, Some(1000));
    assert_eq!(security.fs_group, Some(1000));
    assert_eq!(security.run_as_non_root, Some(true));

    // The agents' certificate is signed by the CA the aggregator trusts for clients.
    let agent = install.certificate("logging-agent-tls");
    assert_eq!(agent.issuer_ref.name, server.issuer_ref.name);

    // The network policy opens the ingest port to the agent's pods only.
    let agent_labels = template_labels(&install.daemon_sets[0].spec.as_ref().unwrap().template);
    let policy = install.network_policies[0].spec.as_ref().unwrap();
    for (key, value) in policy
        .pod_selector
        .as_ref()
        .unwrap()
        .match_labels
        .iter()
        .flatten()
    {
        assert_eq!(pod_labels.get(key), Some(value));
    }
    let port_of = |p: &k8s_openapi::api::networking::v1::NetworkPolicyPort| match &p.port {
        Some(IntOrString::Int(n)) => *n,
        other => panic!("numeric ports expected, found {other:?}"),
    };
    let mut ingest_rule = false;
    let mut open_ports = BTreeSet::new();
    for rule in policy.ingress.iter().flatten() {
        let ports: Vec<i32> = rule.ports.iter().flatten().map(port_of).collect();
        match &rule.from {
            Some(peers) => {
                assert_eq!(ports, vec![i32::from(config.ingest_port)]);
                for peer in peers {
                    let selector = peer.pod_selector.as_ref().unwrap();
                    for (key, value) in selector.match_labels.iter().flatten() {
                        assert_eq!(agent_labels.get(key), Some(value));
                    }
                }
                ingest_rule = true;
            }
            None => open_ports.extend(ports),
        }
    }
    assert!(ingest_rule, "no rule admits the agents to the ingest port");
    assert!(!open_ports.contains(&i32::from(config.ingest_port)));
    assert!(open_ports.contains(&i32::from(config.service_port)));
    assert!(open_ports.contains(&i32::from(config.prometheus_port)));
    assert!(open_ports.contains(&i32::from(config.otlp_grpc_port)));
    assert!(open_ports.contains(&i32::from(config.forward_port)));
}

/// The probe paths answer 200 on the real binaries, and the admin token the StatefulSet's
/// operator is told to fetch is printed by the real subcommand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_and_the_admin_token_command_work_on_the_real_binaries() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("aggregator");
    std::fs::create_dir_all(&data).unwrap();
    // No API_TOKENS: the aggregator generates an admin token, as in the StatefulSet.
    let aggregator = AggregatorProcess::start(&data, &[("API_TOKENS", "")]);
    let client = http_client();
    for path in ["/health", "/health/ready"] {
        let response = client
            .get(format!("{}{path}", aggregator.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "aggregator {path}");
    }
    let output = std::process::Command::new(binary("logging-aggregator"))
        .arg("admin-token")
        .env_clear()
        .env("DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert!(token.len() >= 32, "{token:?}");
    assert_ne!(token, ADMIN_TOKEN);
    let logs = |token: String| {
        let client = client.clone();
        let url = format!("{}/api/logs", aggregator.base);
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(logs(token).await, 200);
    assert_eq!(logs("not-the-token".into()).await, 401);

    let agent = AgentProcess::start(&aggregator, &root.path().join("agent"), &[]);
    let response = client
        .get(format!("http://127.0.0.1:{}/health", agent.metrics_port))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "agent /health");
}

/// Workspace packages and the binaries they build.
fn workspace_binaries() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for member in ["agent", "aggregator", "common", "tests"] {
        let manifest = read(&format!("{member}/Cargo.toml"));
        let package = manifest
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .map(|l| l.trim_end_matches('"').to_string())
            .unwrap();
        if repo().join(member).join("src/main.rs").exists() {
            out.insert(package.clone(), package);
        }
    }
    out
}

#[test]
fn the_dockerfile_builds_binaries_that_exist_and_exposes_their_ports() {
    let dockerfile = read("deploy/Dockerfile");
    let binaries = workspace_binaries();
    assert_eq!(
        binaries.keys().cloned().collect::<Vec<_>>(),
        vec!["logging-agent", "logging-aggregator"]
    );
    for package in binaries.keys() {
        assert!(
            dockerfile.contains(&format!("-p {package}")),
            "the image build does not build {package}"
        );
        assert!(dockerfile.contains(&format!("target/release/{package}")));
        // The binary really is what that package builds.
        assert!(binary(package).exists());
    }
    // One final stage per binary, its ENTRYPOINT the file it copied in.
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    let stage = |target: &str| -> &str {
        stages
            .iter()
            .find(|s| {
                s.lines()
                    .next()
                    .unwrap()
                    .ends_with(&format!(" AS {target}"))
            })
            .unwrap_or_else(|| panic!("no stage {target}"))
    };
    let aggregator = AggregatorConfig::default();
    let agent = AgentConfig::default();
    for (target, binary_name, ports) in [
        (
            "aggregator",
            "logging-aggregator",
            vec![
                aggregator.service_port,
                aggregator.ingest_port,
                aggregator.prometheus_port,
                aggregator.otlp_grpc_port,
                aggregator.forward_port,
            ],
        ),
        ("agent", "logging-agent", vec![agent.agent_metrics_port]),
    ] {
        let text = stage(target);
        let copied = format!("/out/{binary_name} /usr/local/bin/{binary_name}");
        assert!(
            text.contains(&copied),
            "stage {target} does not copy {binary_name}"
        );
        assert!(text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary_name}\"]")));
        let exposed: Vec<u16> = text
            .lines()
            .find_map(|l| l.strip_prefix("EXPOSE "))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(
            exposed, ports,
            "stage {target} exposes other ports than the defaults"
        );
    }
    assert!(stage("aggregator").contains("\nUSER 1000:1000\n"));
    // The image's DATA_DIR is the directory the StatefulSet mounts its volume at.
    assert!(stage("aggregator").contains("ENV DATA_DIR=/var/lib/logging-aggregator"));

    // The build context keeps the sources and leaves out the bulk.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .collect();
    assert!(ignored.contains(&"target".to_string()));
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "agent",
        "aggregator",
        "common",
        "tests",
    ] {
        assert!(
            !ignored.contains(&needed.to_string()),
            "{needed} is left out of the build"
        );
    }
}

/// Metric names the binaries register, from their sources.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack = vec![repo().join("agent/src"), repo().join("aggregator/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for piece in text.split('"').skip(1).step_by(2) {
                let is_name = piece.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                if is_name
                    && (piece.starts_with("logging_agent_")
                        || piece.starts_with("logging_aggregator_"))
                {
                    names.insert(piece.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn the_compose_stack_and_the_dashboards_agree_with_the_code() {
    let compose = &yaml_docs("deploy/compose/compose.yaml")[0];
    let services = compose["services"].as_object().expect("services");
    let dockerfile = read("deploy/Dockerfile");
    let mut targets = BTreeMap::new();
    for (name, service) in services {
        if let Some(build) = service.get("build") {
            let target = build["target"].as_str().unwrap();
            assert!(
                dockerfile.contains(&format!(" AS {target}\n")),
                "{name}: no stage {target}"
            );
            assert_eq!(build["dockerfile"], "deploy/Dockerfile");
            assert_eq!(build["context"], "../..");
            targets.insert(name.clone(), target.to_string());
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if let Some(relative) = source.strip_prefix("./") {
                assert!(
                    repo().join("deploy/compose").join(relative).exists(),
                    "{name} mounts {source}, which is not in deploy/compose"
                );
            }
        }
    }
    // Each binary's environment holds only variables it reads.
    let agent_vars = variables::<AgentConfig>();
    let aggregator_vars = variables::<AggregatorConfig>();
    for (name, target) in &targets {
        let known = if target == "agent" {
            &agent_vars
        } else {
            &aggregator_vars
        };
        for key in services[name]["environment"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            assert!(
                known.contains(key),
                "compose service {name} sets {key}, which it does not read"
            );
        }
    }
    assert_eq!(
        targets.get("logging-agent").map(String::as_str),
        Some("agent")
    );
    assert_eq!(
        targets.get("logging-aggregator").map(String::as_str),
        Some("aggregator")
    );
    // The agent reaches the aggregator by a name its development certificate carries.
    let url = services["logging-agent"]["environment"]["AGGREGATOR_URL"]
        .as_str()
        .unwrap();
    let default_ingest = AggregatorConfig::default().ingest_port;
    assert_eq!(url, format!("https://logging-aggregator:{default_ingest}"));
    assert!(logging_aggregator::certs::SERVER_NAMES.contains(&"logging-aggregator"));

    // Prometheus scrapes each binary where it serves /metrics.
    let prometheus = &yaml_docs("deploy/compose/prometheus.yml")[0];
    let scraped: BTreeSet<String> = prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|job| {
            job["static_configs"][0]["targets"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = [
        format!(
            "logging-aggregator:{}",
            AggregatorConfig::default().prometheus_port
        ),
        format!(
            "logging-agent:{}",
            AgentConfig::default().agent_metrics_port
        ),
    ]
    .into();
    assert_eq!(scraped, expected);

    // Grafana: the datasources the dashboards use are provisioned; every metric a panel
    // queries is one the binaries export.
    let provisioned: BTreeSet<String> = yaml_docs(
        "deploy/compose/grafana/provisioning/datasources/datasources.yaml",
    )[0]["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["uid"].as_str().unwrap().to_string())
        .collect();
    let exported = exported_metrics();
    assert!(exported.contains("logging_agent_checkpoint_lag_bytes"));
    let dashboards = repo().join("deploy/compose/grafana/dashboards");
    let mut panels_seen = 0;
    for entry in std::fs::read_dir(&dashboards).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let dashboard: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for panel in dashboard["panels"].as_array().unwrap() {
            panels_seen += 1;
            let title = panel["title"].as_str().unwrap();
            let uid = panel["datasource"]["uid"].as_str().unwrap();
            assert!(
                provisioned.contains(uid),
                "{title}: datasource {uid} is not provisioned"
            );
            for target in panel["targets"].as_array().unwrap() {
                let target_uid = target["datasource"]["uid"].as_str().unwrap();
                assert!(provisioned.contains(target_uid));
                if target_uid == "elasticsearch" {
                    // Lucene over the sink's documents: the fields the index template maps.
                    let query = target["query"].as_str().unwrap();
                    assert!(query.starts_with("level:"), "{title}: {query}");
                    assert_eq!(target["timeField"], "@timestamp", "{title}");
                    continue;
                }
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if !word.starts_with("logging_") {
                        continue;
                    }
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| word.strip_suffix(suffix))
                        .filter(|base| exported.contains(*base))
                        .unwrap_or(word);
                    assert!(exported.contains(base), "{title}: {word} is not exported");
                }
            }
        }
    }
    assert!(panels_seen >= 6);

    // Prometheus loads the pipeline's alert rules, and each queries metrics that exist.
    assert!(
        prometheus["rule_files"]
            .as_array()
            .unwrap()
            .contains(&Value::from("/etc/prometheus/rules.yml"))
    );
    let rules = &yaml_docs("deploy/compose/prometheus-rules.yml")[0];
    let mut alerts = BTreeSet::new();
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        alerts.insert(name.to_string());
        let expr = rule["expr"].as_str().unwrap();
        let metrics: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("logging_"))
            .collect();
        assert!(!metrics.is_empty(), "{name}: {expr}");
        for metric in metrics {
            assert!(
                exported.contains(metric),
                "{name}: {metric} is not exported"
            );
        }
    }
    assert!(alerts.contains("LoggingWalOverrun") && alerts.contains("LoggingSinkFailing"));
}
