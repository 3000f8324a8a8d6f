//! Operator configuration: flags, each also settable from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentgate_crds::common::parse_duration;
use clap::Parser;

/// agentgate's control plane: reconciles AgentIdentity, AccessGrant, MaskPolicy, Target and
/// AgentSession, serves the approval and injection webhooks, and expires grants on time.
#[derive(Parser, Debug, Clone)]
#[command(name = "agentgate-operator", version, about, long_about = None)]
pub struct Config {
    /// The operator's own namespace: it holds the webhook certificate Secret and the leader
    /// Lease, and is never injected.
    #[arg(long, env = "AGENTGATE_NAMESPACE", default_value = "agentgate-system")]
    pub namespace: String,

    /// Address the admission webhooks listen on (HTTPS).
    #[arg(long, env = "AGENTGATE_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,

    /// The Service in front of the webhooks; its DNS names go into the serving certificate.
    #[arg(
        long,
        env = "AGENTGATE_WEBHOOK_SERVICE",
        default_value = "agentgate-webhook"
    )]
    pub webhook_service: String,

    /// Extra names (DNS or IP) for the serving certificate, comma-separated (e.g. 127.0.0.1
    /// when the API server calls the webhook by URL).
    #[arg(long, env = "AGENTGATE_WEBHOOK_HOSTS", value_delimiter = ',')]
    pub webhook_hosts: Vec<String>,

    /// Who provides the webhook's serving certificate: `self` (the operator creates a CA and a
    /// certificate, stores them in a Secret, keeps caBundle current and rotates them) or
    /// `files` (e.g. cert-manager mounts tls.crt and tls.key into --webhook-cert-dir and its
    /// CA injector keeps caBundle current).
    #[arg(long, env = "AGENTGATE_WEBHOOK_CERT_MODE", default_value = "self")]
    pub webhook_cert_mode: CertMode,

    /// With `--webhook-cert-mode files`: the folder with tls.crt and tls.key.
    #[arg(
        long,
        env = "AGENTGATE_WEBHOOK_CERT_DIR",
        default_value = "/var/run/agentgate/webhook-certs"
    )]
    pub webhook_cert_dir: PathBuf,

    /// The Secret (in --namespace) that holds the self-managed CA and serving certificate.
    #[arg(
        long,
        env = "AGENTGATE_WEBHOOK_CERT_SECRET",
        default_value = "agentgate-webhook-tls"
    )]
    pub webhook_cert_secret: String,

    /// Lifetime of a self-managed serving certificate; it is renewed when a third remains.
    /// Between 10s and 87600h (ten years).
    #[arg(long, env = "AGENTGATE_WEBHOOK_CERT_VALIDITY", default_value = "720h", value_parser = cert_validity)]
    pub webhook_cert_validity: Duration,

    /// The MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, env = "AGENTGATE_MUTATING_WEBHOOK", default_value = "agentgate")]
    pub mutating_webhook: String,

    /// The ValidatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(
        long,
        env = "AGENTGATE_VALIDATING_WEBHOOK",
        default_value = "agentgate"
    )]
    pub validating_webhook: String,

    /// Address of /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long, env = "AGENTGATE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Run controllers only while holding the leader Lease (webhooks run on every replica).
    #[arg(long, env = "AGENTGATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader Lease in --namespace.
    #[arg(
        long,
        env = "AGENTGATE_LEASE_NAME",
        default_value = "agentgate-operator"
    )]
    pub lease_name: String,

    /// How long a leader's Lease lasts without renewal. Between 1s and 1h.
    #[arg(long, env = "AGENTGATE_LEASE_DURATION", default_value = "15s", value_parser = lease_duration)]
    pub lease_duration: Duration,

    /// This replica's identity in the Lease (defaults to the host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// AgentSessions are deleted this long after they end (records stay in external sinks).
    /// Between 1s and 87600h (ten years).
    #[arg(long, env = "AGENTGATE_SESSION_RETENTION", default_value = "720h", value_parser = session_retention)]
    pub session_retention: Duration,

    /// How often an Active AgentSession's pod is looked at: a session whose pod is gone, has
    /// stopped, or whose sidecar has restarted since the session began is marked Ended (its
    /// sidecar died without closing it). Between 1s and 24h.
    #[arg(long, env = "AGENTGATE_SESSION_CHECK_INTERVAL", default_value = "1m", value_parser = session_check_interval)]
    pub session_check_interval: Duration,

    /// The sidecar image injected into agent pods.
    #[arg(
        long,
        env = "AGENTGATE_SIDECAR_IMAGE",
        default_value = "ghcr.io/agentgate-dev/agentgate-sidecar:0.1.0"
    )]
    pub sidecar_image: String,

    /// CPU request of the injected sidecar.
    #[arg(long, env = "AGENTGATE_SIDECAR_CPU", default_value = "50m")]
    pub sidecar_cpu: String,

    /// Memory request and limit of the injected sidecar.
    #[arg(long, env = "AGENTGATE_SIDECAR_MEMORY", default_value = "128Mi")]
    pub sidecar_memory: String,

    /// Injected sidecars send their audit records to this OTLP/HTTP logs endpoint too
    /// (e.g. `http://otel-collector.observability:4318/v1/logs`).
    #[arg(long, env = "AGENTGATE_SIDECAR_AUDIT_OTLP")]
    pub sidecar_audit_otlp: Option<String>,

    /// Injected sidecars POST their audit records to this webhook too.
    #[arg(long, env = "AGENTGATE_SIDECAR_AUDIT_WEBHOOK")]
    pub sidecar_audit_webhook: Option<String>,

    /// A Secret (in each agent's namespace) whose key `postgres` is the connection string of
    /// the PostgreSQL audit sink, given to the sidecar only. The pod does not start while it
    /// is missing: records are never silently not sent.
    #[arg(long, env = "AGENTGATE_SIDECAR_AUDIT_SECRET")]
    pub sidecar_audit_secret: Option<String>,

    /// A Secret (in each agent's namespace) with the credentials of the OTLP and webhook
    /// sinks, given to the sidecar only: key `webhook-token` (a bearer token for
    /// `--sidecar-audit-webhook`) and key `otlp-headers` (comma-separated `name=value` headers
    /// for `--sidecar-audit-otlp`, e.g. `authorization=Bearer …`). An absent key sets nothing.
    #[arg(long, env = "AGENTGATE_SIDECAR_AUDIT_CREDENTIALS")]
    pub sidecar_audit_credentials: Option<String>,

    /// A ConfigMap (in each agent's namespace) whose key `ca.crt` holds the CA certificates
    /// (PEM) injected sidecars trust for their OTLP, webhook and PostgreSQL audit sinks, in
    /// addition to the system's. The pod does not start while it is missing: a sink whose
    /// certificate cannot be checked would take no records.
    #[arg(long, env = "AGENTGATE_SIDECAR_AUDIT_CA")]
    pub sidecar_audit_ca: Option<String>,

    /// Service accounts that may decide AccessGrants although they are not people (e.g. a
    /// release pipeline's), comma-separated full user names
    /// (`system:serviceaccount:<namespace>:<name>`). Each still needs the RBAC verb `approve`
    /// on accessgrants or a place in an identity's `spec.approvers.users`, and never decides
    /// for an identity it acts for. Empty by default: only people decide; agents never can.
    #[arg(long, env = "AGENTGATE_AUTOMATION_APPROVERS", value_delimiter = ',', value_parser = automation_approver)]
    pub automation_approvers: Vec<String>,

    /// Extra CA certificates (PEM) trusted when checking OIDC issuers.
    #[arg(long, env = "AGENTGATE_OIDC_CA_FILE")]
    pub oidc_ca_file: Option<PathBuf>,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "AGENTGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// Who provides the webhook serving certificate.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertMode {
    /// The operator manages a CA and certificate itself.
    #[value(name = "self")]
    SelfManaged,
    /// Read from files (cert-manager).
    Files,
}

/// Log output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Ten years: the longest period a duration flag takes, far from the end of time (the
/// self-managed CA lives four certificate lifetimes).
pub const MAX_PERIOD: Duration = Duration::from_secs(87_600 * 3600);

/// A Go duration ("90s", "15m", "720h") within `[min, max]`. Days are no unit of it: the
/// error says how to write them in hours.
pub fn duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let show = agentgate_crds::common::format_duration;
    let range = format!("between {} and {}", show(min), show(max));
    let d = parse_duration(s).map_err(|e| {
        if s.contains('d') {
            format!("{e}: days are not a unit here; write hours (30d is 720h), {range}")
        } else {
            format!("{e}; it must be {range}")
        }
    })?;
    if d < min || d > max {
        return Err(format!("{s} is out of range: it must be {range}"));
    }
    Ok(d)
}

fn cert_validity(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(10), MAX_PERIOD)
}

fn lease_duration(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(1), Duration::from_secs(3600))
}

fn session_retention(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(1), MAX_PERIOD)
}

fn session_check_interval(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(1), Duration::from_secs(24 * 3600))
}

fn automation_approver(s: &str) -> Result<String, String> {
    crate::approvers::parse_automation_approver(s)
}

impl Config {
    /// This replica's name, for the Lease and Events.
    pub fn identity(&self) -> String {
        self.pod_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| format!("agentgate-operator-{}", std::process::id()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("agentgate-operator").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn durations_out_of_range_or_in_days_are_refused_at_startup() {
        let ok = parse(&["--session-retention=720h", "--webhook-cert-validity=30s"]);
        assert!(ok.is_ok(), "{ok:?}");
        let e = parse(&["--session-retention=30d"])
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("--session-retention") && e.contains("write hours (30d is 720h)"),
            "{e}"
        );
        let e = parse(&["--session-retention=99999999h"])
            .err()
            .unwrap_or_default();
        assert!(e.contains("it must be between 1s and 87600h"), "{e}");
        let e = parse(&["--session-retention=87601h"])
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("87601h is out of range: it must be between 1s and 87600h"),
            "{e}"
        );
        for bad in [
            "--lease-duration=0s",
            "--lease-duration=2h",
            "--session-check-interval=0s",
            "--webhook-cert-validity=1s",
            "--webhook-cert-validity=9999999999999h",
        ] {
            let e = parse(&[bad]).err().unwrap_or_default();
            assert!(e.contains("it must be between"), "{bad}: {e}");
        }
    }

    #[test]
    fn automation_approvers_are_checked_at_startup() {
        let c = parse(&[
            "--automation-approvers=system:serviceaccount:ci:bot,system:serviceaccount:ci:bot2",
        ]);
        assert_eq!(
            c.map(|c| c.automation_approvers).unwrap_or_default(),
            [
                "system:serviceaccount:ci:bot",
                "system:serviceaccount:ci:bot2"
            ]
        );
        let e = parse(&["--automation-approvers=agentgate:agent:claude"])
            .err()
            .unwrap_or_default();
        assert!(e.contains("agents can never be listed"), "{e}");
        assert_eq!(
            parse(&[])
                .map(|c| c.automation_approvers)
                .unwrap_or_default(),
            Vec::<String>::new()
        );
    }
}
