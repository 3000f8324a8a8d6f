//! The real test environment of agentgate.
//!
//! [`TestEnv`] starts, on loopback and in its own temporary directory with free ports:
//! etcd and a kube-apiserver built from the Go module proxy ([`KubeEnv`]), a PostgreSQL
//! server ([`PostgresEnv`]) and an OpenSSH server ([`SshEnv`]) from Debian's packages. Nothing
//! is faked. Dropping the environment stops every process and removes the directory; processes
//! also die with the test process (see [`process`]).
//!
//! For the audit tests, [`OtelCollector`] runs a real OpenTelemetry Collector that receives
//! OTLP/HTTP logs, and [`oscal_validate`] checks a document against NIST's OSCAL JSON schema.
//!
//! The binaries come from `tests/env/install.sh`, which builds them into a cache keyed by
//! version. A missing binary is an error that says how to get it: tests never skip.

pub mod approvals;
pub mod bench;
pub mod certs;
pub mod cluster;
pub mod demo;
pub mod http;
pub mod keycloak_env;
pub mod kube_env;
pub mod kwok_env;
pub mod oscal;
pub mod otel_env;
pub mod postgres_env;
pub mod process;
pub mod ssh_env;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

pub use kube_env::KubeEnv;
pub use oscal::oscal_validate;
pub use otel_env::OtelCollector;
pub use postgres_env::PostgresEnv;
pub use ssh_env::SshEnv;

/// Everything that can go wrong while starting or using the environment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A binary the environment needs is missing.
    #[error(
        "{what} not found at {path}: run `tests/env/install.sh` (it builds and caches it), or set {var}"
    )]
    MissingBinary {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The variable that overrides the path.
        var: &'static str,
    },
    /// A process did not start.
    #[error("{what} did not start: {why}\n--- log {log}")]
    Start {
        /// The process.
        what: String,
        /// What happened.
        why: String,
        /// The end of its log.
        log: String,
    },
    /// A helper command failed.
    #[error("{what} failed ({status}):\n{output}")]
    Command {
        /// The command.
        what: String,
        /// Its exit status.
        status: String,
        /// Its output.
        output: String,
    },
    /// An I/O error.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation or TLS set-up failed.
    #[error("certificates: {0}")]
    Cert(String),
    /// An HTTP probe failed.
    #[error("http: {0}")]
    Http(String),
    /// A Kubernetes client operation failed.
    #[error("kubernetes: {0}")]
    Kube(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

const K8S_GOMOD: &str = include_str!("../env/k8s/go.mod");
const ETCD_GOMOD: &str = include_str!("../env/etcd/go.mod");
const HELM_GOMOD: &str = include_str!("../env/helm/go.mod");

fn required_version(gomod: &str, module: &str) -> String {
    let prefix = format!("require {module} v");
    gomod
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The Kubernetes version the environment builds (from `tests/env/k8s/go.mod`).
pub fn kubernetes_version() -> String {
    required_version(K8S_GOMOD, "k8s.io/kubernetes")
}

/// Where the environment's binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// etcd.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kubectl built from the same Kubernetes release.
    pub kubectl: PathBuf,
    /// helm (checked when used: see [`Binaries::helm`]).
    helm: PathBuf,
    /// PostgreSQL's bin directory (initdb, postgres, psql, pg_isready).
    pub pg_bin: PathBuf,
}

impl Binaries {
    /// Finds the binaries: `$AGENTGATE_<NAME>` if set, else the version-keyed cache that
    /// `tests/env/install.sh` fills (`$AGENTGATE_CACHE`, default `~/.cache/agentgate`).
    pub fn locate() -> Result<Self, Error> {
        let cache = cache_dir();
        let k8s = cache.join(format!("kubernetes-{}", kubernetes_version()));
        let etcd = cache.join(format!(
            "etcd-{}",
            required_version(ETCD_GOMOD, "go.etcd.io/etcd/server/v3")
        ));
        let helm = cache.join(format!(
            "helm-{}",
            required_version(HELM_GOMOD, "helm.sh/helm/v3")
        ));
        let pick = |var: &'static str, what: &'static str, default: PathBuf| {
            let path = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
            if path.exists() {
                Ok(path)
            } else {
                Err(Error::MissingBinary { what, path, var })
            }
        };
        let pg_default = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dir| {
                dir.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()))
                    .max()
            })
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/bin"));
        Ok(Self {
            etcd: pick("AGENTGATE_ETCD", "etcd", etcd.join("etcd"))?,
            kube_apiserver: pick(
                "AGENTGATE_KUBE_APISERVER",
                "kube-apiserver",
                k8s.join("kube-apiserver"),
            )?,
            kubectl: pick("AGENTGATE_KUBECTL", "kubectl", k8s.join("kubectl"))?,
            helm: std::env::var_os("AGENTGATE_HELM")
                .map(PathBuf::from)
                .unwrap_or_else(|| helm.join("helm")),
            pg_bin: pick("AGENTGATE_PG_BIN", "PostgreSQL server binaries", pg_default)?,
        })
    }
}

impl Binaries {
    /// The helm binary, or an error saying how to build it.
    pub fn helm(&self) -> Result<&Path, Error> {
        if self.helm.exists() {
            Ok(&self.helm)
        } else {
            Err(Error::MissingBinary {
                what: "helm",
                path: self.helm.clone(),
                var: "AGENTGATE_HELM",
            })
        }
    }
}

/// The cache `tests/env/install.sh` fills: `$AGENTGATE_CACHE`, default `~/.cache/agentgate`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("AGENTGATE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/agentgate")
        })
}

/// A `NAME=value` setting of `tests/env/install.sh` (the versions it installs).
pub fn install_setting(name: &str) -> String {
    const INSTALL_SH: &str = include_str!("../env/install.sh");
    INSTALL_SH
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Which parts to start.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parts {
    /// etcd + kube-apiserver.
    pub kube: bool,
    /// PostgreSQL.
    pub postgres: bool,
    /// sshd.
    pub ssh: bool,
}

impl Parts {
    /// Every part.
    pub fn all() -> Self {
        Self {
            kube: true,
            postgres: true,
            ssh: true,
        }
    }
}

/// A running environment. Dropping it stops everything and removes its directory (set
/// `AGENTGATE_KEEP_ENV=1` to keep the directory and its logs for debugging).
pub struct TestEnv {
    // Field order is drop order: processes stop before the directory is removed.
    /// The Kubernetes control plane, when started.
    pub kube: Option<KubeEnv>,
    /// PostgreSQL, when started.
    pub postgres: Option<PostgresEnv>,
    /// sshd, when started.
    pub ssh: Option<SshEnv>,
    /// The binaries in use.
    pub bins: Binaries,
    ca: certs::Ca,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestEnv {
    /// Starts the requested parts. Blocking: call it from `spawn_blocking` in async code if
    /// the runtime must keep running meanwhile.
    pub fn start(parts: Parts) -> Result<Self, Error> {
        install_crypto_provider();
        sweep_stale_dirs();
        let bins = Binaries::locate()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("agentgate-env-{}-", std::process::id()))
            .tempdir()
            .map_err(|e| Error::io("create the environment directory", e))?;
        let path = dir.path().to_owned();
        // Daemons running as other users (postgres) must reach their sub-directories.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| Error::io("chmod the environment directory", e))?;
        kube_env::mkdir(&path.join("logs"))?;
        let dir = if std::env::var_os("AGENTGATE_KEEP_ENV").is_some() {
            let _ = std::fs::write(path.join("KEEP"), "AGENTGATE_KEEP_ENV was set\n");
            eprintln!("testenv: keeping {}", path.display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        let ca = certs::Ca::new("agentgate test CA")?;
        let kube = parts
            .kube
            .then(|| KubeEnv::start(&path, &bins))
            .transpose()?;
        let postgres = parts
            .postgres
            .then(|| PostgresEnv::start(&path, &bins, &ca))
            .transpose()?;
        let ssh = parts.ssh.then(|| SshEnv::start(&path)).transpose()?;
        Ok(Self {
            kube,
            postgres,
            ssh,
            bins,
            ca,
            path,
            dir,
        })
    }

    /// Starts the requested parts on a blocking thread, for async callers.
    pub async fn start_async(parts: Parts) -> Result<Self, Error> {
        tokio::task::spawn_blocking(move || Self::start(parts))
            .await
            .map_err(|e| Error::Http(format!("the start-up task failed: {e}")))?
    }

    /// The environment's directory (logs under `logs/`).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The CA that signs PostgreSQL's certificate (and that tests may use for their own
    /// servers).
    pub fn ca(&self) -> &certs::Ca {
        &self.ca
    }

    /// The Kubernetes part, or an error saying it was not started.
    pub fn kube(&self) -> Result<&KubeEnv, Error> {
        self.kube
            .as_ref()
            .ok_or_else(|| Error::Kube("the environment was started without Kubernetes".into()))
    }

    /// The Kubernetes part, mutable (to stop its API server in a fault test).
    pub fn kube_mut(&mut self) -> Result<&mut KubeEnv, Error> {
        self.kube
            .as_mut()
            .ok_or_else(|| Error::Kube("the environment was started without Kubernetes".into()))
    }

    /// The PostgreSQL part, or an error saying it was not started.
    pub fn postgres(&self) -> Result<&PostgresEnv, Error> {
        self.postgres
            .as_ref()
            .ok_or_else(|| Error::Http("the environment was started without PostgreSQL".into()))
    }

    /// The PostgreSQL part, to restart it.
    pub fn postgres_mut(&mut self) -> Result<&mut PostgresEnv, Error> {
        self.postgres
            .as_mut()
            .ok_or_else(|| Error::Http("the environment was started without PostgreSQL".into()))
    }

    /// The SSH part, or an error saying it was not started.
    pub fn ssh(&self) -> Result<&SshEnv, Error> {
        self.ssh
            .as_ref()
            .ok_or_else(|| Error::Http("the environment was started without sshd".into()))
    }

    /// Process ids of every server process of the environment.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = self.kube.as_ref().map(KubeEnv::pids).unwrap_or_default();
        pids.extend(self.postgres.as_ref().and_then(PostgresEnv::pid));
        pids.extend(self.ssh.as_ref().and_then(SshEnv::pid));
        pids
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Stop processes explicitly before the directory goes.
        self.ssh.take();
        self.postgres.take();
        self.kube.take();
        if self.dir.is_none() {
            eprintln!("testenv: kept {}", self.path.display());
        }
    }
}

/// Applies agentgate's CRDs (server-side apply) and waits until each is Established.
pub async fn install_crds(client: &kube::Client) -> Result<Vec<CustomResourceDefinition>, Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("agentgate-testenv").force();
    let mut out = Vec::new();
    for crd in agentgate_crds::generate::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let applied = api
            .patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(|e| Error::Kube(format!("apply CRD {name}: {e}")))?;
        out.push(applied);
    }
    for crd in &out {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let cond = kube::runtime::wait::conditions::is_crd_established();
        tokio::time::timeout(
            Duration::from_secs(30),
            kube::runtime::wait::await_condition(api.clone(), &name, cond),
        )
        .await
        .map_err(|_| Error::Kube(format!("CRD {name} not Established within 30s")))?
        .map_err(|e| Error::Kube(format!("wait for CRD {name}: {e}")))?;
    }
    Ok(out)
}

/// Installs aws-lc-rs as rustls's process-wide provider (kube would otherwise panic when
/// several providers are compiled in). Safe to call many times.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

pub(crate) fn current_user() -> Result<String, Error> {
    Ok(
        process::run(std::process::Command::new("id").arg("-un"), "id -un")?
            .trim()
            .to_owned(),
    )
}

/// `(uid, gid)` of the `postgres` user when running as root (PostgreSQL refuses root).
pub(crate) fn postgres_ids() -> Result<Option<(u32, u32)>, Error> {
    if !is_root() {
        return Ok(None);
    }
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| Error::io("read /etc/passwd", e))?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .ok_or_else(|| Error::Start {
            what: "postgres".into(),
            why: "running as root and there is no `postgres` user to run PostgreSQL as (install Debian's postgresql package)".into(),
            log: String::new(),
        })?;
    let fields: Vec<&str> = line.split(':').collect();
    let uid = fields.get(2).and_then(|v| v.parse().ok());
    let gid = fields.get(3).and_then(|v| v.parse().ok());
    match (uid, gid) {
        (Some(u), Some(g)) => Ok(Some((u, g))),
        _ => Err(Error::Start {
            what: "postgres".into(),
            why: format!("cannot read the postgres user from /etc/passwd: {line}"),
            log: String::new(),
        }),
    }
}

pub(crate) fn run_as_postgres() -> Result<Option<(String, String)>, Error> {
    Ok(postgres_ids()?.map(|(u, g)| (u.to_string(), g.to_string())))
}

/// Removes directories of earlier test processes that died without cleaning up.
fn sweep_stale_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("agentgate-env-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && !entry.path().join("KEEP").exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
