//! etcd and a real kube-apiserver on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::certs::{self, Ca, Pem};
use crate::http::{self, TlsClient};
use crate::process::{self, Proc, Spec};
use crate::{Binaries, Error};

/// Users the API server authenticates by bearer token, besides the certificate admin.
/// `(name, groups)`; their token is `<name>-token`.
pub const TOKEN_USERS: &[(&str, &[&str])] = &[
    ("alice", &["agentgate-approvers", "developers"]),
    ("bob", &["developers"]),
    ("mallory", &[]),
];

/// etcd plus kube-apiserver with RBAC, TokenRequest, OIDC discovery and an admin credential.
pub struct KubeEnv {
    // Field order is drop order: the API server stops before etcd.
    apiserver: Proc,
    etcd: Proc,
    dir: PathBuf,
    port: u16,
    ca: Ca,
    admin: Pem,
    kubectl: PathBuf,
    version: String,
}

impl KubeEnv {
    /// Starts etcd and the API server under `dir`.
    pub fn start(dir: &Path, bins: &Binaries) -> Result<Self, Error> {
        let logs = dir.join("logs");
        mkdir(&logs)?;
        let etcd = start_etcd(dir, bins)?;
        let (etcd, etcd_port) = etcd;

        let ca = Ca::new("agentgate test cluster CA")?;
        let serving = ca.server("kube-apiserver", &["kubernetes", "kubernetes.default.svc"])?;
        let admin = ca.client("agentgate-admin", &["system:masters"])?;
        let pki = dir.join("pki");
        mkdir(&pki)?;
        write(&pki.join("ca.crt"), &ca.cert_pem())?;
        write(&pki.join("apiserver.crt"), &serving.cert)?;
        write(&pki.join("apiserver.key"), &serving.key)?;
        write(&pki.join("admin.crt"), &admin.cert)?;
        write(&pki.join("admin.key"), &admin.key)?;
        let (sa_key, sa_pub) = certs::signing_key_pem()?;
        write(&pki.join("sa.key"), &sa_key)?;
        write(&pki.join("sa.pub"), &sa_pub)?;
        let tokens: String = TOKEN_USERS
            .iter()
            .map(|(u, g)| format!("{u}-token,{u},uid-{u},\"{}\"\n", g.join(",")))
            .collect();
        write(&pki.join("tokens.csv"), &tokens)?;

        let mut last = None;
        for _ in 0..3 {
            let port = process::free_port()?;
            let p = |f: &str| pki.join(f).display().to_string();
            let spec = Spec::new("kube-apiserver", &bins.kube_apiserver).args([
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                format!("--secure-port={port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // A loopback advertise address cannot be put in the kubernetes Endpoints.
                "--endpoint-reconciler-type=none".into(),
                format!("--cert-dir={}", pki.join("generated").display()),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-issuer=https://127.0.0.1:{port}"),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--enable-priority-and-fairness=false".into(),
                // kwok's fake nodes (tests/src/kwok_env.rs) serve exec on their InternalIP.
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ]);
            let mut apiserver = Proc::start(spec, &logs)?;
            let client = TlsClient::new(&ca.cert_pem(), Some((&admin.cert, &admin.key)))?;
            let ready = process::wait_until(
                &mut apiserver,
                Duration::from_secs(120),
                "kube-apiserver /readyz answering ok",
                || matches!(client.get(port, "/readyz"), Ok(r) if r.status == 200),
            );
            match ready {
                Ok(()) => {
                    let version = client
                        .get(port, "/version")
                        .map(|r| r.body)
                        .unwrap_or_default();
                    let env = Self {
                        apiserver,
                        etcd,
                        dir: dir.to_owned(),
                        port,
                        ca,
                        admin,
                        kubectl: bins.kubectl.clone(),
                        version,
                    };
                    env.write_kubeconfigs()?;
                    env.bootstrap()?;
                    return Ok(env);
                }
                Err(e) if apiserver.log_contains("address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Http("kube-apiserver did not start".into())))
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The service-account token issuer (the API server's own OIDC issuer).
    pub fn issuer(&self) -> String {
        self.url()
    }

    /// The cluster CA certificate (PEM): it signs the API server's serving certificate.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// Path of the cluster CA certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("pki").join("ca.crt")
    }

    /// The CA that signs this cluster's certificates, for webhook serving certificates in tests.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The admin's client certificate and key (`system:masters`).
    pub fn admin_cert(&self) -> &Pem {
        &self.admin
    }

    /// The admin kubeconfig (a client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The kubeconfig of a token user from [`TOKEN_USERS`].
    pub fn kubeconfig_for(&self, user: &str) -> PathBuf {
        self.dir.join(format!("kubeconfig-{user}"))
    }

    /// The bearer token of a user from [`TOKEN_USERS`].
    pub fn token(&self, user: &str) -> String {
        format!("{user}-token")
    }

    /// The JSON the API server answers on `/version`.
    pub fn version_json(&self) -> &str {
        &self.version
    }

    /// A `kube::Client` with admin rights, for the caller's runtime.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        self.client_from(&self.kubeconfig()).await
    }

    /// A `kube::Client` authenticated as a user from [`TOKEN_USERS`].
    pub async fn client_as(&self, user: &str) -> Result<kube::Client, Error> {
        self.client_from(&self.kubeconfig_for(user)).await
    }

    /// Writes a kubeconfig that authenticates with `token` (e.g. a service account's) and
    /// returns its path.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf, Error> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: agentgate-test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: agentgate-test\n    user: {name}\n    namespace: default\ncurrent-context: {name}\n",
            self.url(),
            self.dir.join("pki").join("ca.crt").display()
        );
        write(&path, &kc)?;
        Ok(path)
    }

    /// A `kube::Client` from a kubeconfig file.
    pub async fn client_from(&self, path: &Path) -> Result<kube::Client, Error> {
        crate::cluster::client_from(path).await
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", self.kubeconfig());
        cmd
    }

    /// `kubectl` as a user from [`TOKEN_USERS`].
    pub fn kubectl_as(&self, user: &str) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", self.kubeconfig_for(user));
        cmd
    }

    /// Runs kubectl (admin) and returns its standard output, or an error with its output.
    pub fn kubectl_run(&self, args: &[&str]) -> Result<String, Error> {
        process::run(
            self.kubectl().args(args),
            &format!("kubectl {}", args.join(" ")),
        )
    }

    fn write_kubeconfigs(&self) -> Result<(), Error> {
        let pki = self.dir.join("pki");
        let cluster = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: agentgate-test\n  cluster:\n    server: {}\n    certificate-authority: {}\n",
            self.url(),
            pki.join("ca.crt").display()
        );
        let admin = format!(
            "{cluster}users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: admin\n  context:\n    cluster: agentgate-test\n    user: admin\n    namespace: default\ncurrent-context: admin\n",
            pki.join("admin.crt").display(),
            pki.join("admin.key").display()
        );
        write(&self.kubeconfig(), &admin)?;
        for (user, _) in TOKEN_USERS {
            let kc = format!(
                "{cluster}users:\n- name: {user}\n  user:\n    token: {}\ncontexts:\n- name: {user}\n  context:\n    cluster: agentgate-test\n    user: {user}\n    namespace: default\ncurrent-context: {user}\n",
                self.token(user)
            );
            write(&self.kubeconfig_for(user), &kc)?;
        }
        Ok(())
    }

    /// Lets anyone read the issuer's discovery document and keys (as managed clusters do), so
    /// token verifiers need no credential.
    fn bootstrap(&self) -> Result<(), Error> {
        self.kubectl_run(&[
            "create",
            "clusterrolebinding",
            "agentgate-test-oidc-discovery",
            "--clusterrole=system:service-account-issuer-discovery",
            "--group=system:unauthenticated",
            "--group=system:authenticated",
        ])?;
        Ok(())
    }

    /// Checks both processes are still running.
    pub fn check_running(&mut self) -> Result<(), Error> {
        self.etcd.check_running()?;
        self.apiserver.check_running()
    }

    /// Process ids of etcd and the API server.
    pub fn pids(&self) -> Vec<u32> {
        [self.etcd.pid(), self.apiserver.pid()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Stops the API server (etcd keeps running), e.g. to test what happens when it is down.
    pub fn stop_apiserver(&mut self) {
        self.apiserver.stop(Duration::from_secs(10));
    }
}

fn start_etcd(dir: &Path, bins: &Binaries) -> Result<(Proc, u16), Error> {
    let logs = dir.join("logs");
    let mut last = None;
    for _ in 0..3 {
        let client = process::free_port()?;
        let peer = process::free_port()?;
        let data = dir.join("etcd");
        let spec = Spec::new("etcd", &bins.etcd).args([
            "--name=default".to_owned(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]);
        let mut proc = Proc::start(spec, &logs)?;
        let ready = process::wait_until(
            &mut proc,
            Duration::from_secs(30),
            "etcd /health",
            || matches!(http::get(client, "/health"), Ok(r) if r.status == 200 && r.body.contains("true")),
        );
        match ready {
            Ok(()) => return Ok((proc, client)),
            Err(e) if proc.log_contains("address already in use") => {
                last = Some(e);
                let _ = std::fs::remove_dir_all(&data);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::Http("etcd did not start".into())))
}

pub(crate) fn mkdir(p: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(format!("create {}", p.display()), e))
}

pub(crate) fn write(p: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(p, text).map_err(|e| Error::io(format!("write {}", p.display()), e))
}

/// A token for service account `namespace/sa` (TokenRequest), for `audience` or the API
/// server's own.
pub async fn sa_token(
    client: &kube::Client,
    namespace: &str,
    sa: &str,
    audience: Option<&str>,
) -> Result<String, Error> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(client.clone(), namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = api
        .create_token_request(sa, &Default::default(), &req)
        .await
        .map_err(|e| Error::Kube(format!("token for {namespace}/{sa}: {e}")))?;
    Ok(t.status.and_then(|s| s.token).unwrap_or_default())
}

/// Server-side applies `obj` (any kind the API server serves) in `namespace`.
pub async fn apply(
    client: &kube::Client,
    namespace: &str,
    obj: serde_json::Value,
) -> Result<(), Error> {
    let obj: kube::core::DynamicObject =
        serde_json::from_value(obj).map_err(|e| Error::Kube(format!("not an object: {e}")))?;
    let types = obj
        .types
        .as_ref()
        .ok_or_else(|| Error::Kube("apiVersion and kind are required".into()))?;
    let gvk =
        kube::core::GroupVersionKind::try_from(types).map_err(|e| Error::Kube(format!("{e}")))?;
    let (ar, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| Error::Kube(format!("discover {}: {e}", gvk.kind)))?;
    let api: kube::Api<kube::core::DynamicObject> =
        kube::Api::namespaced_with(client.clone(), namespace, &ar);
    let name = obj.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &kube::api::PatchParams::apply("agentgate-tests").force(),
        &kube::api::Patch::Apply(&obj),
    )
    .await
    .map_err(|e| Error::Kube(format!("apply {} {name}: {e}", gvk.kind)))?;
    Ok(())
}

impl KubeEnv {
    /// This API server as a [`Cluster`](crate::cluster::Cluster), through the admin
    /// kubeconfig.
    pub fn cluster(&self) -> Result<crate::cluster::Cluster, Error> {
        crate::cluster::Cluster::from_kubeconfig(
            &self.kubeconfig(),
            &self.kubectl,
            &self.dir.join("cluster"),
        )
    }

    /// Sets this API server up as a Target of agentgate's Kubernetes gateway for the
    /// standalone agent user `agentgate:agent:<identity>`, with a service account in
    /// `default`: see [`Cluster::gateway_target`](crate::cluster::Cluster::gateway_target).
    pub async fn gateway_target(
        &self,
        identity: &str,
        agent_rules: &[&str],
        targets: &Path,
        target: &str,
    ) -> Result<String, Error> {
        self.cluster()?
            .gateway_target(
                identity,
                &format!("agentgate:agent:{identity}"),
                "default",
                agent_rules,
                targets,
                target,
            )
            .await
    }
}
