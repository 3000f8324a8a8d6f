//! A real API server with agentgate's CRDs, webhook configurations and RBAC, and the real
//! operator binary running against it.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentgate_crds::{AccessGrant, GrantPhase};
use agentgate_operator::Config;
use agentgate_operator::webhook::{Endpoint, configurations};
use clap::Parser;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use serde_json::json;
use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

pub const NS: &str = "default";
pub const OPERATOR_NS: &str = "agentgate-system";

pub struct Cluster {
    pub env: TestEnv,
    pub client: kube::Client,
    pub webhook_port: u16,
    pub operators: Vec<Proc>,
    pub metrics_ports: Vec<u16>,
    pub extra_args: Vec<String>,
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    }
}

pub fn operator_config(webhook_port: u16, metrics_port: u16, extra: &[String]) -> Config {
    let mut args = vec![
        "agentgate-operator".to_owned(),
        format!("--namespace={OPERATOR_NS}"),
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        "--webhook-hosts=127.0.0.1".into(),
        format!("--metrics-addr=127.0.0.1:{metrics_port}"),
        "--lease-duration=3s".into(),
        "--sidecar-image=registry.example/agentgate-sidecar:test".into(),
    ];
    args.extend(extra.iter().cloned());
    Config::parse_from(args)
}

impl Cluster {
    /// Starts the API server, installs everything the chart would, and one operator replica.
    pub async fn start(extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_ca_bundle(extra_args, None).await
    }

    /// [`Cluster::start`] with a caBundle already in the webhook configurations (as
    /// cert-manager's CA injector would put it).
    pub async fn start_with_ca_bundle(
        extra_args: &[&str],
        ca_bundle: Option<String>,
    ) -> anyhow::Result<Self> {
        let env = TestEnv::start_async(Parts {
            kube: true,
            ..Default::default()
        })
        .await?;
        let client = env.kube()?.client().await?;
        testenv::install_crds(&client).await?;
        let ns: Api<Namespace> = Api::all(client.clone());
        ns.create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(OPERATOR_NS),
                ..Default::default()
            },
        )
        .await?;
        let webhook_port = free_port()?;
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        // OIDC issuer checks trust the test cluster's CA (the API server is an issuer).
        extra_args.push(format!(
            "--oidc-ca-file={}",
            env.kube()?.ca_path().display()
        ));
        let config = operator_config(webhook_port, 0, &extra_args);
        let (mut m, mut v) = configurations(
            &config,
            &Endpoint::Url(format!("https://127.0.0.1:{webhook_port}")),
        );
        if let Some(ca) = &ca_bundle {
            let bundle = k8s_openapi::ByteString(ca.as_bytes().to_vec());
            for w in m.webhooks.iter_mut().flatten() {
                w.client_config.ca_bundle = Some(bundle.clone());
            }
            for w in v.webhooks.iter_mut().flatten() {
                w.client_config.ca_bundle = Some(bundle.clone());
            }
        }
        Api::all(client.clone())
            .create(&PostParams::default(), &m)
            .await?;
        Api::all(client.clone())
            .create(&PostParams::default(), &v)
            .await?;
        rbac(&client).await?;
        fixtures(&client).await?;
        let mut cluster = Self {
            env,
            client,
            webhook_port,
            operators: Vec::new(),
            metrics_ports: Vec::new(),
            extra_args,
        };
        cluster.start_operator().await?;
        Ok(cluster)
    }

    /// Starts one more operator replica on the webhook port the API server calls.
    pub async fn start_operator(&mut self) -> anyhow::Result<usize> {
        self.start_operator_on(self.webhook_port).await
    }

    async fn try_start_operator(&self, i: usize, webhook_port: u16) -> anyhow::Result<(Proc, u16)> {
        let metrics = free_port()?;
        let kube = self.env.kube()?;
        let mut spec = Spec::new(
            &format!("operator-{i}"),
            env!("CARGO_BIN_EXE_agentgate-operator"),
        )
        .args([
            format!("--namespace={OPERATOR_NS}"),
            format!("--webhook-addr=127.0.0.1:{webhook_port}"),
            "--webhook-hosts=127.0.0.1".into(),
            format!("--metrics-addr=127.0.0.1:{metrics}"),
            "--lease-duration=3s".into(),
            format!("--pod-name=operator-{i}"),
            "--sidecar-image=registry.example/agentgate-sidecar:test".into(),
        ])
        .args(self.extra_args.clone())
        .env("KUBECONFIG", kube.kubeconfig().display().to_string())
        .env(
            "RUST_LOG",
            "info,kube_runtime=warn,agentgate_operator=debug",
        );
        spec.stop_signal = "INT";
        let mut proc = Proc::start(spec, &self.env.dir().join("logs"))?;
        // Ready once it has loaded its certificate (and, for the first, set caBundle).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            proc.check_running()?;
            if let Ok(r) = testenv::http::get(metrics, "/readyz")
                && r.status == 200
            {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "operator-{i} not ready:\n{}",
                proc.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((proc, metrics))
    }

    /// Starts one more operator replica serving webhooks on `webhook_port` (replicas on one
    /// host cannot share a port; in a cluster each pod has its own address).
    pub async fn start_operator_on(&mut self, webhook_port: u16) -> anyhow::Result<usize> {
        let i = self.operators.len();
        // A port picked free can be taken by another test's process before the operator
        // binds it: start again on a new one.
        let mut attempt = 0;
        let (proc, metrics) = loop {
            attempt += 1;
            match self.try_start_operator(i, webhook_port).await {
                Ok(started) => break started,
                Err(_)
                    if attempt < 3
                        && std::fs::read_to_string(
                            self.env
                                .dir()
                                .join("logs")
                                .join(format!("operator-{i}.log")),
                        )
                        .is_ok_and(|log| log.contains("in use")) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        self.operators.push(proc);
        self.metrics_ports.push(metrics);
        // The webhooks answer through the API server once caBundle is in place.
        wait_webhooks_ready(&self.client).await?;
        Ok(i)
    }

    pub fn operator_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.operators[i].log_path()).unwrap_or_default()
    }

    pub fn kube(&self) -> &testenv::KubeEnv {
        self.env.kube.as_ref().expect("kube started")
    }

    pub async fn client_as(&self, user: &str) -> anyhow::Result<kube::Client> {
        Ok(self.kube().client_as(user).await?)
    }

    /// A client authenticated as the agent's service account (`default/claude`).
    pub async fn agent_client(&self) -> anyhow::Result<kube::Client> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), NS);
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: None,
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let tr = sas
            .create_token_request("claude", &PostParams::default(), &req)
            .await?;
        let token = tr.status.and_then(|s| s.token).unwrap_or_default();
        let path = self.kube().kubeconfig_with_token("claude-sa", &token)?;
        Ok(self.kube().client_from(&path).await?)
    }

    pub fn metrics(&self, i: usize) -> String {
        testenv::http::get(self.metrics_ports[i], "/metrics")
            .map(|r| r.body)
            .unwrap_or_default()
    }
}

async fn wait_webhooks_ready(client: &kube::Client) -> anyhow::Result<()> {
    // A dry-run create goes through the webhooks; it fails until caBundle is set.
    let api: Api<AccessGrant> = Api::namespaced(client.clone(), NS);
    let probe: AccessGrant = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": { "name": "readiness-probe" },
        "spec": { "identity": "claude", "target": "orders-db", "scope": { "operations": ["Read"] }, "reason": "probe", "duration": "1m" }
    }))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match api.create(&pp, &probe).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("webhooks never became ready: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn rbac(client: &kube::Client) -> anyhow::Result<()> {
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let rule = |verbs: &[&str], resources: &[&str]| PolicyRule {
        api_groups: Some(vec!["agentgate.dev".into()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..Default::default()
    };
    roles
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: meta("agentgate-requester"),
                rules: Some(vec![rule(
                    &[
                        "get", "list", "watch", "create", "update", "patch", "delete",
                    ],
                    &["accessgrants"],
                )]),
                ..Default::default()
            },
        )
        .await?;
    roles
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: meta("agentgate-approver"),
                rules: Some(vec![rule(&["approve"], &["accessgrants"])]),
                ..Default::default()
            },
        )
        .await?;
    bindings
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: meta("agentgate-requesters"),
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: "agentgate-requester".into(),
                },
                subjects: Some(vec![
                    Subject {
                        kind: "Group".into(),
                        name: "developers".into(),
                        api_group: Some("rbac.authorization.k8s.io".into()),
                        ..Default::default()
                    },
                    Subject {
                        kind: "ServiceAccount".into(),
                        name: "claude".into(),
                        namespace: Some(NS.into()),
                        ..Default::default()
                    },
                ]),
            },
        )
        .await?;
    Ok(())
}

/// Lets `user` approve any grant through RBAC (the `approve` verb).
pub async fn grant_approve_verb(client: &kube::Client, user: &str) -> anyhow::Result<()> {
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    bindings
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: meta(&format!("agentgate-approver-{user}")),
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: "agentgate-approver".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "User".into(),
                    name: user.into(),
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    ..Default::default()
                }]),
            },
        )
        .await?;
    Ok(())
}

async fn fixtures(client: &kube::Client) -> anyhow::Result<()> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    for name in ["claude", "default", "other"] {
        sas.create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta(name),
                ..Default::default()
            },
        )
        .await?;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let creds: Secret = serde_json::from_value(json!({
        "metadata": { "name": "orders-db-credentials" },
        "stringData": { "username": "agentgate", "password": "s3cret" }
    }))?;
    secrets.create(&PostParams::default(), &creds).await?;
    apply(client, json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "Target", "metadata": { "name": "orders-db" },
        "spec": { "protocol": "Postgres", "postgres": { "host": "db", "database": "orders",
            "credentials": { "name": "orders-db-credentials" } } }
    }))
    .await?;
    for (name, sa) in [("claude", "claude"), ("gpt", "other")] {
        apply(client, json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": { "name": name },
            "spec": { "owner": "team-orders", "authentication": { "serviceAccount": { "name": sa } },
                "approvers": { "groups": ["agentgate-approvers"] }, "maxGrantDuration": "1h" }
        }))
        .await?;
    }
    Ok(())
}

/// Server-side applies a manifest (any agentgate kind) as the admin.
pub async fn apply(client: &kube::Client, obj: serde_json::Value) -> anyhow::Result<()> {
    Ok(testenv::kube_env::apply(client, NS, obj).await?)
}

/// Creates a grant request as `client`'s user.
pub async fn request(
    client: &kube::Client,
    name: &str,
    identity: &str,
    duration: &str,
    extra: serde_json::Value,
) -> Result<AccessGrant, kube::Error> {
    let mut spec = json!({ "identity": identity, "target": "orders-db",
        "scope": { "operations": ["Write"] }, "reason": format!("test {name}"), "duration": duration });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    let g: AccessGrant = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": { "name": name }, "spec": spec
    }))
    .expect("a grant");
    Api::<AccessGrant>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &g)
        .await
}

/// Patches `spec.decision` (or anything under spec) as `client`'s user.
pub async fn patch_spec(
    client: &kube::Client,
    name: &str,
    spec: serde_json::Value,
) -> Result<AccessGrant, kube::Error> {
    Api::<AccessGrant>::namespaced(client.clone(), NS)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": spec })),
        )
        .await
}

pub async fn get(client: &kube::Client, name: &str) -> anyhow::Result<AccessGrant> {
    Ok(Api::<AccessGrant>::namespaced(client.clone(), NS)
        .get(name)
        .await?)
}

pub fn phase(g: &AccessGrant) -> Option<GrantPhase> {
    g.status.as_ref().and_then(|s| s.phase)
}

/// Polls every 20 ms until the grant reaches `want`; returns it and when that was seen.
pub async fn wait_phase(
    client: &kube::Client,
    name: &str,
    want: GrantPhase,
    timeout: Duration,
) -> anyhow::Result<(AccessGrant, jiff::Timestamp)> {
    let deadline = Instant::now() + timeout;
    loop {
        let g = get(client, name).await?;
        if phase(&g) == Some(want) {
            return Ok((g, jiff::Timestamp::now()));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "grant {name} is {:?}, not {want:?}, after {timeout:?}: {:?}",
            phase(&g),
            g.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn err_text(e: kube::Error) -> String {
    e.to_string()
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}
