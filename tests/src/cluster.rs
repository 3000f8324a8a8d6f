//! A Kubernetes API server reached through an admin kubeconfig: the local environment's, or
//! a cluster a user points the main job at. Everything else (a person's kubeconfig, a
//! service account's, the Kubernetes gateway's Target) is derived from it.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;

use crate::Error;
use crate::kube_env::{mkdir, sa_token, write};
use crate::process;

/// An API server and an admin kubeconfig for it (its current context).
pub struct Cluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    dir: PathBuf,
    /// The current context, minified and flattened (certificates inline).
    config: serde_json::Value,
    url: String,
    ca_pem: String,
}

impl Cluster {
    /// Reads `kubeconfig`'s current context with `kubectl`; derived kubeconfigs and files go
    /// into `dir`.
    pub fn from_kubeconfig(kubeconfig: &Path, kubectl: &Path, dir: &Path) -> Result<Self, Error> {
        let out = process::run(
            Command::new(kubectl).env("KUBECONFIG", kubeconfig).args([
                "config",
                "view",
                "--raw",
                "--minify",
                "--flatten",
                "-o",
                "json",
            ]),
            "kubectl config view",
        )?;
        let config: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::Kube(format!("read {}: {e}", kubeconfig.display())))?;
        let cluster = &config["clusters"][0]["cluster"];
        let url = cluster["server"]
            .as_str()
            .ok_or_else(|| Error::Kube(format!("{} names no server", kubeconfig.display())))?
            .to_owned();
        let ca_pem = cluster["certificate-authority-data"]
            .as_str()
            .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or_else(|| {
                Error::Kube(format!(
                    "{}: the cluster's CA certificate is needed (certificate-authority or \
                     certificate-authority-data); insecure-skip-tls-verify is not enough",
                    kubeconfig.display()
                ))
            })?;
        mkdir(dir)?;
        Ok(Self {
            kubeconfig: kubeconfig.to_path_buf(),
            kubectl: kubectl.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            url,
            ca_pem,
        })
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API server's CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// `kubectl` as the admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// Runs `kubectl args` as the admin; its stdout, or an error with its stderr.
    pub fn kubectl_run(&self, args: &[&str]) -> Result<String, Error> {
        process::run(
            self.kubectl().args(args),
            &format!("kubectl {}", args.join(" ")),
        )
    }

    /// A client as the admin.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        client_from(&self.kubeconfig).await
    }

    fn derived(&self, name: &str, user: serde_json::Value) -> Result<PathBuf, Error> {
        let mut config = self.config.clone();
        config["users"] = serde_json::json!([{ "name": name, "user": user }]);
        config["contexts"][0]["context"]["user"] = serde_json::json!(name);
        let path = self.dir.join(format!("kubeconfig-{name}"));
        write(&path, &config.to_string())?;
        Ok(path)
    }

    /// A kubeconfig for a person: the admin's credential impersonating `user` in `groups`
    /// (what the API server, and agentgate's webhooks, then see as the caller).
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> Result<PathBuf, Error> {
        let mut creds = self.config["users"][0]["user"].clone();
        creds["as"] = serde_json::json!(user);
        creds["as-groups"] = serde_json::json!(groups);
        self.derived(&format!("as-{user}"), creds)
    }

    /// A kubeconfig that authenticates with `token` (e.g. a service account's).
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf, Error> {
        self.derived(name, serde_json::json!({ "token": token }))
    }

    /// Sets this API server up as a Target of agentgate's Kubernetes gateway for the agent
    /// user `user` (`agentgate:agent:<identity>` standalone, `agentgate:agent:<ns>:<identity>`
    /// in a cluster):
    /// - the service account `<sa_namespace>/agentgate-gw`, allowed only to impersonate that
    ///   user and the group `agentgate:agents`;
    /// - a ClusterRole `agent-<label>` with `agent_rules` (YAML flow list items, e.g.
    ///   `{ apiGroups: [""], resources: [pods], verbs: [get] }`) bound to that user;
    /// - `<targets>/<target>/token` (the service account's token) and `ca.crt`.
    ///
    /// Returns the Target's `kubernetes:` spec (flow YAML) that names these files.
    pub async fn gateway_target(
        &self,
        label: &str,
        user: &str,
        sa_namespace: &str,
        agent_rules: &[&str],
        targets: &Path,
        target: &str,
    ) -> Result<String, Error> {
        let rbac = format!(
            r#"apiVersion: v1
kind: ServiceAccount
metadata: {{ name: agentgate-gw, namespace: {sa_namespace} }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{ name: agentgate-impersonate-{label} }}
rules:
- {{ apiGroups: [""], resources: [users], verbs: [impersonate], resourceNames: ["{user}"] }}
- {{ apiGroups: [""], resources: [groups], verbs: [impersonate], resourceNames: ["agentgate:agents"] }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{ name: agentgate-impersonate-{label} }}
roleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agentgate-impersonate-{label} }}
subjects: [ {{ kind: ServiceAccount, name: agentgate-gw, namespace: {sa_namespace} }} ]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{ name: agent-{label} }}
rules:
{}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{ name: agent-{label} }}
roleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agent-{label} }}
subjects: [ {{ apiGroup: rbac.authorization.k8s.io, kind: User, name: "{user}" }} ]
"#,
            agent_rules
                .iter()
                .map(|r| format!("- {r}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let file = self.dir.join(format!("gateway-rbac-{label}.yaml"));
        write(&file, &rbac)?;
        self.kubectl_run(&["apply", "-f", &file.display().to_string()])?;
        let client = self.client().await?;
        let token = sa_token(&client, sa_namespace, "agentgate-gw", None).await?;
        let dir = targets.join(target);
        mkdir(&dir)?;
        write(&dir.join("token"), &token)?;
        write(&dir.join("ca.crt"), &self.ca_pem)?;
        Ok(format!(
            r#"{{ server: "{}", tls: {{ mode: VerifyFull, ca: {{ name: c, key: ca.crt }} }}, credentials: {{ name: c }} }}"#,
            self.url
        ))
    }
}

/// A `kube::Client` from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<kube::Client, Error> {
    crate::install_crypto_provider();
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| Error::Kube(format!("read {}: {e}", path.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| Error::Kube(format!("kubeconfig {}: {e}", path.display())))?;
    kube::Client::try_from(config).map_err(|e| Error::Kube(format!("client: {e}")))
}
