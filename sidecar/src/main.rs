//! `agentgate-sidecar`: the gateway next to each agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentgate_sidecar::audit::sinks::file::FileSink;
use agentgate_sidecar::audit::sinks::http::{Encoding, HttpSink, Kind};
use agentgate_sidecar::audit::sinks::postgres::PostgresSink;
use agentgate_sidecar::audit::sinks::sessions::SessionSink;
use agentgate_sidecar::audit::{self, Auditor, sinks::Sink};
use agentgate_sidecar::gateway::kube as kube_gw;
use agentgate_sidecar::gateway::postgres::listener::{self, serve};
use agentgate_sidecar::gateway::postgres::pool::{Pool, PoolConfig};
use agentgate_sidecar::gateway::postgres::session::Gateway;
use agentgate_sidecar::gateway::relay::Relays;
use agentgate_sidecar::gateway::ssh as ssh_gw;
use agentgate_sidecar::identity::{Verifier, pod};
use agentgate_sidecar::policy::approval::Approvals;
use agentgate_sidecar::policy::{PolicyStore, cluster, folder};
use anyhow::Context;
use clap::Parser;

/// agentgate's gateway: runs next to an agent, authenticates it, enforces its grants and
/// guardrails, masks sensitive values and records every request. Proxies PostgreSQL, the
/// Kubernetes API and SSH.
#[derive(Parser, Debug)]
#[command(name = "agentgate-sidecar", version, about, long_about = None)]
struct Args {
    /// In-cluster mode (what the injected sidecar runs): watch AgentIdentity, AccessGrant,
    /// MaskPolicy and Target in the pod's namespace, file held commands as AccessGrants, and
    /// verify the pod's own token. Credentials come from the pod's service account, or
    /// KUBECONFIG when set.
    #[arg(long, env = "AGENTGATE_IN_CLUSTER", conflicts_with = "policy_dir")]
    in_cluster: bool,
    /// In-cluster: the namespace to watch (default: the pod's, from POD_NAMESPACE or the
    /// client's configuration).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// In-cluster: the pod's projected service-account token for audience `agentgate`; it is
    /// verified with a TokenReview and must belong to the AgentIdentity's service account.
    #[arg(
        long,
        env = "AGENTGATE_TOKEN_FILE",
        default_value = "/var/run/secrets/agentgate/token"
    )]
    token_file: PathBuf,
    /// In-cluster: how long a broken policy watch is tolerated before everything is refused
    /// (a revocation could otherwise be missed).
    #[arg(long, env = "AGENTGATE_POLICY_STALE_AFTER", default_value = "30s", value_parser = duration)]
    policy_stale_after: Duration,
    /// Standalone mode: read policy (AgentIdentity, AccessGrant, MaskPolicy, Target) from this
    /// folder of YAML manifests instead of the Kubernetes API; it is reloaded when it changes.
    #[arg(long, env = "AGENTGATE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// The AgentIdentity the agent next to this sidecar acts as (with `--pg-auth pod`).
    #[arg(long, env = "AGENTGATE_IDENTITY")]
    identity: Option<String>,
    /// How PostgreSQL clients authenticate: `pod` (every connection is the pod's identity) or
    /// `token` (the password is an OIDC token, verified and mapped to an AgentIdentity).
    #[arg(long, env = "AGENTGATE_PG_AUTH", default_value = "pod")]
    pg_auth: PgAuth,
    /// The cluster's service-account token issuer, trusted for projected tokens. Each token
    /// is also checked with that API server (TokenReview): standalone, KUBECONFIG names it.
    #[arg(long, env = "AGENTGATE_SA_ISSUER")]
    sa_issuer: Option<String>,
    /// Extra CA certificates (PEM) trusted when fetching issuers' keys.
    #[arg(long, env = "AGENTGATE_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,
    /// Read each token issuer's keys (JWKS) again once they are this old: how long a signing
    /// key the issuer withdrew is still trusted. A key id the keys read last do not hold makes
    /// the sidecar read them again sooner (at most every ten seconds).
    #[arg(long, env = "AGENTGATE_OIDC_KEYS_MAX_AGE", default_value = "5m", value_parser = duration)]
    oidc_keys_max_age: Duration,
    /// Where the Targets' credentials are: `<dir>/<target>/username`, `password`, CA files.
    #[arg(
        long,
        env = "AGENTGATE_TARGETS_DIR",
        default_value = "/var/run/agentgate/targets"
    )]
    targets_dir: PathBuf,
    /// Standalone: where approval requests for held commands are written (default: the
    /// `requests` folder inside --policy-dir).
    #[arg(long, env = "AGENTGATE_REQUESTS_DIR")]
    requests_dir: Option<PathBuf>,
    /// Loopback address of the Kubernetes API gateway (HTTPS; the kubeconfig in
    /// --client-dir points at it). `off` disables it.
    #[arg(long, env = "AGENTGATE_KUBE_ADDR", default_value = "127.0.0.1:16443")]
    kube_addr: String,
    /// Loopback address of the SSH gateway (the ssh_config in --client-dir points at it).
    /// `off` disables it.
    #[arg(long, env = "AGENTGATE_SSH_ADDR", default_value = "127.0.0.1:12222")]
    ssh_addr: String,
    /// Where the sidecar writes the agent's client files: `kubeconfig` (and the certificate
    /// it trusts, `kube-ca.crt`), `ssh_config` (with `ssh/known_hosts` and, for the pod's
    /// identity, the key `ssh/id_ed25519`).
    #[arg(
        long,
        env = "AGENTGATE_CLIENT_DIR",
        default_value = "/var/run/agentgate/client"
    )]
    client_dir: PathBuf,
    /// Loopback address of the PostgreSQL gateway.
    #[arg(long, env = "AGENTGATE_PG_ADDR", default_value = "127.0.0.1:15432")]
    pg_addr: SocketAddr,
    /// A directory (shared with the agent's containers) where the PostgreSQL gateway also
    /// listens on a Unix socket, `<dir>/.s.PGSQL.<port of --pg-addr>`: clients connect with
    /// `PGHOST=<dir>`. Cheaper per statement than loopback TCP. None when unset.
    #[arg(long, env = "AGENTGATE_PG_SOCKET_DIR")]
    pg_socket_dir: Option<PathBuf>,
    /// Where the health endpoints (`/livez`, `/healthz`, `/readyz`) are served; none when
    /// unset.
    #[arg(long, env = "AGENTGATE_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// Threads for the SSH gateway, the policy watches and the audit sinks:
    /// 0 (the default) for as many as the cores the sidecar may use (its CPU limit), 1 to run
    /// them all on one thread.
    #[arg(long, env = "AGENTGATE_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Threads relaying PostgreSQL connections, each with its own event loop (connections are
    /// spread over them): one relays about as many statements per second as a core allows,
    /// with no hand-off between threads per statement. 0 relays them on the threads of
    /// `--worker-threads`.
    #[arg(long, env = "AGENTGATE_PG_THREADS", default_value_t = 1)]
    pg_threads: usize,
    /// Idle connections to each PostgreSQL Target kept for the next session of the same
    /// identity (reset with `DISCARD ALL` first), so a client that connects per command skips
    /// the server's TLS and login. 0 opens a new server connection for every session.
    #[arg(long, env = "AGENTGATE_PG_POOL_MAX_IDLE", default_value_t = 16)]
    pg_pool_max_idle: usize,
    /// How long an idle server connection is kept unused before it is closed.
    #[arg(long, env = "AGENTGATE_PG_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pg_pool_idle_timeout: Duration,
    /// How long a server connection serves sessions at most (it is closed at the end of the
    /// first session past this age).
    #[arg(long, env = "AGENTGATE_PG_POOL_LIFETIME", default_value = "1h", value_parser = duration)]
    pg_pool_lifetime: Duration,
    /// An idle server connection unused for longer than this is asked a round trip before a
    /// session gets it (a server host that vanished is noticed there).
    #[arg(long, env = "AGENTGATE_PG_POOL_CHECK_AFTER", default_value = "30s", value_parser = duration)]
    pg_pool_check_after: Duration,
    /// Threads serving the Kubernetes gateway's connections, each with its own event loop.
    /// 0 serves them on the threads of `--worker-threads`.
    #[arg(long, env = "AGENTGATE_KUBE_THREADS", default_value_t = 1)]
    kube_threads: usize,
    /// The audit directory (a sidecar-only volume): the spill journal (`spill/`), the signing
    /// key when `--audit-key-file` is not set, and the default JSON-lines file.
    #[arg(
        long,
        env = "AGENTGATE_AUDIT_DIR",
        default_value = "/var/run/agentgate/audit"
    )]
    audit_dir: PathBuf,
    /// The Ed25519 signing key of the audit chain (PKCS#8 DER), readable by the sidecar only.
    /// Created when missing (its public key beside it as `<file>.pub`). Default:
    /// `<audit-dir>/signing-key.pk8`.
    #[arg(long, env = "AGENTGATE_AUDIT_KEY_FILE")]
    audit_key_file: Option<PathBuf>,
    /// The JSON-lines file sink (`off` to disable). Default: `<audit-dir>/audit.jsonl`.
    #[arg(long, env = "AGENTGATE_AUDIT_FILE")]
    audit_file: Option<String>,
    /// Rotate the JSON-lines file past this many bytes.
    #[arg(long, env = "AGENTGATE_AUDIT_FILE_MAX_BYTES", default_value_t = 100 << 20)]
    audit_file_max_bytes: u64,
    /// Keep at most this many rotated files (0: all).
    #[arg(long, env = "AGENTGATE_AUDIT_FILE_KEEP", default_value_t = 0)]
    audit_file_keep: usize,
    /// The PostgreSQL sink: a connection string (libpq `key=value` or URL) for a role that may
    /// only INSERT into the audit table.
    #[arg(long, env = "AGENTGATE_AUDIT_POSTGRES", hide_env_values = true)]
    audit_postgres: Option<String>,
    /// The PostgreSQL sink's table.
    #[arg(
        long,
        env = "AGENTGATE_AUDIT_POSTGRES_TABLE",
        default_value = "agentgate_audit"
    )]
    audit_postgres_table: String,
    /// The OTLP/HTTP sink: the collector's logs endpoint (e.g. `http://collector:4318/v1/logs`).
    #[arg(long, env = "AGENTGATE_AUDIT_OTLP")]
    audit_otlp: Option<String>,
    /// Headers for the OTLP sink, `name=value` (repeatable).
    #[arg(
        long,
        env = "AGENTGATE_AUDIT_OTLP_HEADERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    audit_otlp_header: Vec<String>,
    /// How the OTLP sink encodes its requests: `protobuf` (binary, `application/x-protobuf`,
    /// what OTLP exporters send by default) or `json`.
    #[arg(
        long,
        env = "AGENTGATE_AUDIT_OTLP_ENCODING",
        default_value = "protobuf"
    )]
    audit_otlp_encoding: OtlpEncoding,
    /// The webhook sink: batches of records are POSTed to this URL.
    #[arg(long, env = "AGENTGATE_AUDIT_WEBHOOK")]
    audit_webhook: Option<String>,
    /// A bearer token for the webhook, read from this file.
    #[arg(long, env = "AGENTGATE_AUDIT_WEBHOOK_TOKEN_FILE")]
    audit_webhook_token_file: Option<PathBuf>,
    /// A bearer token for the webhook, given in the environment (an injected sidecar gets it
    /// from the Secret the operator's `--sidecar-audit-credentials` names); the file wins
    /// when both are set.
    #[arg(long, env = "AGENTGATE_AUDIT_WEBHOOK_TOKEN", hide_env_values = true)]
    audit_webhook_token: Option<String>,
    /// Extra CA certificates (PEM) trusted by the HTTP sinks and the PostgreSQL sink (with
    /// `sslmode=require` in its connection string).
    #[arg(long, env = "AGENTGATE_AUDIT_CA_FILE")]
    audit_ca_file: Option<PathBuf>,
    /// In-cluster: how often an active AgentSession's status is updated at most.
    #[arg(long, env = "AGENTGATE_AUDIT_SESSION_INTERVAL", default_value = "5s", value_parser = duration)]
    audit_session_interval: Duration,
    /// Sync the spill journal to disk at each write burst, so records survive a node crash
    /// (group commit; off the request path). `false` keeps them safe from a process crash
    /// only.
    #[arg(long, env = "AGENTGATE_AUDIT_SYNC", default_value_t = true, action = clap::ArgAction::Set)]
    audit_sync: bool,
    /// The most undelivered records (MiB) the spill journal holds before new commands are
    /// refused.
    #[arg(long, env = "AGENTGATE_AUDIT_MAX_SPILL_MIB", default_value_t = 256)]
    audit_max_spill_mib: u64,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "AGENTGATE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn duration(s: &str) -> Result<Duration, String> {
    agentgate_crds::common::parse_duration(s).map_err(|e| e.to_string())
}

/// `--audit-otlp-encoding`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OtlpEncoding {
    /// Binary protobuf.
    Protobuf,
    /// OTLP's JSON encoding.
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PgAuth {
    Pod,
    Token,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    // kube (ring by default), pgwire and russh (aws-lc-rs) must agree on one provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    // The shared runtime: the SSH gateway, policy watches, audit sinks (and the PostgreSQL
    // and Kubernetes gateways when their own threads are off). 1: one thread; more (the
    // default: the cores the sidecar may use): work spread over them.
    let runtime = match args.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => {
            let cores = std::thread::available_parallelism().map_or(2, usize::from);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(if n == 0 { cores } else { n })
                .enable_all()
                .build()?
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    let verifier = match args.pg_auth {
        PgAuth::Token => Some(Arc::new(
            Verifier::new(args.sa_issuer.clone(), args.oidc_ca_file.as_deref())
                .map_err(anyhow::Error::msg)?
                .with_keys_max_age(args.oidc_keys_max_age)
                .with_pod_uid(std::env::var("POD_UID").ok()),
        )),
        PgAuth::Pod => None,
    };
    if verifier.is_none() && args.identity.is_none() {
        anyhow::bail!(
            "--identity (or AGENTGATE_IDENTITY) is required with --pg-auth pod: the AgentIdentity this sidecar serves"
        );
    }
    let identity = args.identity.clone();
    let store = Arc::new(PolicyStore::default());
    let mut sinks = audit_sinks(&args)?;
    let approvals;
    let mut pod_user = None;
    let mut namespace_for_users = None;
    if args.in_cluster {
        let client = kube::Client::try_default()
            .await
            .context("connect to the Kubernetes API (in-cluster, or KUBECONFIG)")?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        if let Some(v) = &verifier {
            v.review_with(client.clone());
        }
        tokio::spawn(cluster::watch(
            client.clone(),
            namespace.clone(),
            store.clone(),
            args.policy_stale_after,
        ));
        if args.pg_auth == PgAuth::Pod {
            let slot = Arc::new(std::sync::RwLock::new(Err("not verified yet".to_owned())));
            tokio::spawn(pod::keep_verified(
                client.clone(),
                args.token_file.clone(),
                slot.clone(),
                Duration::from_secs(60),
            ));
            pod_user = Some(slot);
        }
        tracing::info!(%namespace, "policy from the API server");
        namespace_for_users = Some(namespace.clone());
        sinks.push(Sink::Sessions(Box::new(
            SessionSink::new(client.clone(), &namespace, args.audit_session_interval)
                .with_pod_uid(std::env::var("POD_UID").ok().filter(|u| !u.is_empty())),
        )));
        approvals = Approvals::Cluster { client, namespace };
    } else if let Some(dir) = &args.policy_dir {
        // A service-account token's signature outlives its pod and service account: only
        // the API server knows they are gone, so trusting its issuer takes a client for
        // TokenReview here too (KUBECONFIG), or the sidecar does not start.
        if let (Some(v), Some(issuer)) = (&verifier, &args.sa_issuer) {
            let client = kube::Client::try_default().await.with_context(|| {
                format!(
                    "--sa-issuer {issuer}: service-account tokens are checked with the API server (TokenReview), which this sidecar cannot reach; set KUBECONFIG to a kubeconfig allowed to create tokenreviews, or drop --sa-issuer"
                )
            })?;
            v.review_with(client);
        }
        tokio::spawn(folder::watch(
            dir.clone(),
            store.clone(),
            Duration::from_secs(1),
        ));
        approvals = Approvals::Folder(
            args.requests_dir
                .clone()
                .unwrap_or_else(|| dir.join("requests")),
        );
    } else {
        anyhow::bail!(
            "no policy source: run in a cluster with --in-cluster, or standalone with --policy-dir"
        );
    }
    let mut config = audit::Config::new(
        args.audit_dir.join("spill"),
        args.audit_key_file
            .clone()
            .unwrap_or_else(|| args.audit_dir.join("signing-key.pk8")),
    );
    config.max_spill_bytes = args.audit_max_spill_mib << 20;
    config.sync = args.audit_sync;
    if let (Ok(ns), Ok(pod)) = (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
        config.pod = Some(format!("{ns}/{pod}"));
        config.stream_prefix = pod;
    }
    let auditor = Auditor::start(config, sinks).context("start the audit pipeline")?;
    tracing::info!(stream = auditor.stream(), key_id = %auditor.public_key().key_id, "audit chain started");
    let listener = tokio::net::TcpListener::bind(args.pg_addr)
        .await
        .with_context(|| format!("bind the PostgreSQL gateway on {}", args.pg_addr))?;
    // The port bound (`--pg-addr …:0` picks one): libpq names the socket after it.
    let pg_port = listener.local_addr()?.port();
    let relays = match args.pg_threads {
        0 => None,
        n => Some(Arc::new(
            Relays::start("pg", n).context("start the PostgreSQL relay threads")?,
        )),
    };
    tracing::info!(addr = %args.pg_addr, auth = ?args.pg_auth, threads = args.pg_threads, "PostgreSQL gateway listening");
    let unix = match &args.pg_socket_dir {
        Some(dir) => {
            let unix = listener::bind_unix(dir, pg_port).with_context(|| {
                format!(
                    "bind the PostgreSQL gateway's Unix socket in {}",
                    dir.display()
                )
            })?;
            tracing::info!(socket = %listener::socket_path(dir, pg_port).display(), "PostgreSQL gateway listening on a Unix socket");
            Some(unix)
        }
        None => None,
    };
    if let Some(addr) = args.health_addr {
        let health = agentgate_sidecar::health::Health {
            policy: store.clone(),
            pod_user: pod_user.clone(),
            identity: args.identity.clone(),
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the health endpoints on {addr}"))?;
        tokio::spawn(agentgate_sidecar::health::serve(listener, health));
    }
    let mut gw = Gateway::new(store, identity, verifier, args.targets_dir, auditor.clone());
    gw.approvals = approvals;
    gw.pod_user = pod_user;
    gw.pool = Arc::new(Pool::new(PoolConfig {
        max_idle: args.pg_pool_max_idle,
        idle_timeout: args.pg_pool_idle_timeout,
        lifetime: args.pg_pool_lifetime,
        check_after: args.pg_pool_check_after,
    }));
    tokio::spawn(gw.pool.clone().reap_every(
        (args.pg_pool_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15)),
    ));
    let gw = Arc::new(gw);
    // Turned true when the sidecar stops: no new PostgreSQL connection is accepted after.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    match &relays {
        None => {
            tokio::spawn(serve(listener, gw.clone(), stopping.clone()));
            if let Some(unix) = unix {
                tokio::spawn(listener::serve_unix(unix, gw.clone(), stopping.clone()));
            }
        }
        Some(relays) => {
            // Each relay thread accepts from the same sockets, on its own event loop: a new
            // connection is served where it was accepted.
            let tcp = listener.into_std()?;
            let unix = unix.map(|u| u.into_std()).transpose()?;
            for _ in 0..args.pg_threads {
                let thread = relays.next();
                let (tcp, on, stop) = (tcp.try_clone()?, gw.clone(), stopping.clone());
                thread.spawn(async move {
                    match tokio::net::TcpListener::from_std(tcp) {
                        Ok(l) => serve(l, on, stop).await,
                        Err(e) => tracing::error!(error = %e, "the PostgreSQL gateway cannot accept connections"),
                    }
                });
                if let Some(unix) = &unix {
                    let (unix, on, stop) = (unix.try_clone()?, gw.clone(), stopping.clone());
                    thread.spawn(async move {
                        match tokio::net::UnixListener::from_std(unix) {
                            Ok(l) => listener::serve_unix(l, on, stop).await,
                            Err(e) => tracing::error!(error = %e, "the PostgreSQL gateway cannot accept connections on its Unix socket"),
                        }
                    });
                }
            }
        }
    }
    if args.kube_addr != "off" {
        let addr: SocketAddr = args
            .kube_addr
            .parse()
            .with_context(|| format!("--kube-addr {:?} is not an address", args.kube_addr))?;
        let cert = kube_gw::serving_cert().map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the Kubernetes gateway on {addr}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "Kubernetes gateway listening");
        tokio::spawn(kube_gw::write_kubeconfig(
            args.client_dir.clone(),
            addr,
            cert.cert_pem.clone(),
            gw.policy.clone(),
            namespace_for_users.clone(),
        ));
        let kube = Arc::new(kube_gw::KubeGateway::new(gw.clone(), namespace_for_users));
        match args.kube_threads {
            0 => drop(tokio::spawn(kube_gw::serve(listener, cert.config, kube))),
            n => {
                let relays =
                    Relays::start("kube", n).context("start the Kubernetes gateway's threads")?;
                // Each thread accepts from the same socket, on its own event loop.
                let shared = listener.into_std()?;
                for _ in 0..n {
                    let listener = shared.try_clone()?;
                    let (tls, kube) = (cert.config.clone(), kube.clone());
                    relays.next().spawn(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => kube_gw::serve(l, tls, kube).await,
                            Err(e) => tracing::error!(error = %e, "the Kubernetes gateway cannot accept connections"),
                        }
                    });
                }
            }
        }
    }
    if args.ssh_addr != "off" {
        let addr: SocketAddr = args
            .ssh_addr
            .parse()
            .with_context(|| format!("--ssh-addr {:?} is not an address", args.ssh_addr))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the SSH gateway on {addr}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "SSH gateway listening");
        let ssh = Arc::new(ssh_gw::SshGateway::new(gw.clone()).map_err(anyhow::Error::msg)?);
        tokio::spawn(ssh_gw::write_client_files(
            args.client_dir.clone(),
            addr,
            ssh.clone(),
            args.in_cluster,
        ));
        tokio::spawn(ssh_gw::serve(listener, ssh));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handle SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        _ = term.recv() => tracing::info!("terminated: stopping"),
    }
    let _ = stop.send(true);
    // A signed StreamEnd closes the chain; undelivered records stay spilled for the next run.
    auditor.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// The sinks the flags configure (the AgentSession sink is added in a cluster).
fn audit_sinks(args: &Args) -> anyhow::Result<Vec<Sink>> {
    let mut sinks = Vec::new();
    match args.audit_file.as_deref() {
        Some("off") => {}
        file => sinks.push(Sink::File(FileSink::new(
            file.map(PathBuf::from)
                .unwrap_or_else(|| args.audit_dir.join("audit.jsonl")),
            args.audit_file_max_bytes,
            args.audit_file_keep,
        ))),
    }
    if let Some(conninfo) = &args.audit_postgres {
        sinks.push(Sink::Postgres(Box::new(
            PostgresSink::new(conninfo.clone(), args.audit_postgres_table.clone())
                .with_ca_file(args.audit_ca_file.clone()),
        )));
    }
    if let Some(url) = &args.audit_otlp {
        let headers = args
            .audit_otlp_header
            .iter()
            .map(|h| {
                h.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| {
                        // The value may be a credential: never printed.
                        anyhow::anyhow!(
                            "an --audit-otlp-header (AGENTGATE_AUDIT_OTLP_HEADERS) entry is not name=value"
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        sinks.push(Sink::Http(Box::new(
            HttpSink::new(Kind::Otlp, url, headers, args.audit_ca_file.as_deref())
                .map_err(anyhow::Error::msg)
                .context("the OTLP sink")?
                .with_encoding(match args.audit_otlp_encoding {
                    OtlpEncoding::Protobuf => Encoding::Protobuf,
                    OtlpEncoding::Json => Encoding::Json,
                }),
        )));
    }
    if let Some(url) = &args.audit_webhook {
        let mut headers = Vec::new();
        let token = match (&args.audit_webhook_token_file, &args.audit_webhook_token) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("read the webhook token {}", f.display()))?,
            ),
            (None, Some(t)) => Some(t.clone()),
            (None, None) => None,
        };
        if let Some(token) = token.filter(|t| !t.trim().is_empty()) {
            headers.push((
                "authorization".to_owned(),
                format!("Bearer {}", token.trim()),
            ));
        }
        sinks.push(Sink::Http(Box::new(
            HttpSink::new(Kind::Webhook, url, headers, args.audit_ca_file.as_deref())
                .map_err(anyhow::Error::msg)
                .context("the webhook sink")?,
        )));
    }
    if sinks.is_empty() {
        anyhow::bail!(
            "no audit sink: every request must be recorded somewhere (enable the file sink or configure another)"
        );
    }
    Ok(sinks)
}
