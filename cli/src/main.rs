//! `kubectl agentgate`: the approvers' and auditors' CLI.
//!
//! Installed on the PATH as `kubectl-agentgate`, kubectl runs it as `kubectl agentgate …`.
//! Grants and the session list come from the cluster (the current kubeconfig context);
//! records come from a sink: `--from` a JSON-lines file or directory, or `--postgres` the
//! PostgreSQL sink's table.

mod export;
mod source;

use std::collections::BTreeMap;
use std::path::PathBuf;

use agentgate_crds::audit::{Expectations, Record, RecordKind, verify};
use agentgate_crds::{AccessGrant, AgentSession};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use source::Source;

/// agentgate's CLI for approvers and auditors: grants, sessions, timelines, replay, chain
/// verification and evidence export.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-agentgate",
    bin_name = "kubectl agentgate",
    version,
    about
)]
struct Cli {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Output: a table for people, or json / yaml for scripts; `export` also writes csv and
    /// oscal.
    #[arg(short, long, global = true, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
    Csv,
    Oscal,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List, request, approve, deny or revoke AccessGrants.
    #[command(subcommand)]
    Grants(GrantCmd),
    /// List sessions (AgentSessions in the cluster, or from records with --from/--postgres).
    Sessions(SessionsArgs),
    /// One session's timeline, from records.
    Show {
        /// The session id.
        session: String,
        #[command(flatten)]
        from: From,
    },
    /// Replay a session: SSH sessions as an asciicast v2 file (play it with `asciinema
    /// play`), SQL and Kubernetes sessions as a timeline of requests and results.
    Replay {
        /// The session id.
        session: String,
        #[command(flatten)]
        from: From,
    },
    /// Verify the hash chain and signatures of records; exits 1 when anything was tampered
    /// with.
    Verify(VerifyArgs),
    /// Export evidence for a period and identity mapped to NIST SP 800-53 controls (-o json,
    /// csv or oscal).
    Export(ExportArgs),
}

#[derive(Args, Debug, Clone)]
struct From {
    /// Records from these JSON-lines files or directories (the file sink's).
    #[arg(long = "from")]
    files: Vec<PathBuf>,
    /// Records from the PostgreSQL sink: a connection string. Over the network the
    /// connection is TLS, and the server's certificate is verified for the host named, unless
    /// the string says `sslmode=disable` (as the sink connects).
    #[arg(long, env = "AGENTGATE_AUDIT_POSTGRES", hide_env_values = true)]
    postgres: Option<String>,
    /// With --postgres: extra CA certificates (PEM) trusted for the server's certificate,
    /// besides the system's.
    #[arg(long, env = "AGENTGATE_AUDIT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The PostgreSQL sink's table.
    #[arg(long, default_value = "agentgate_audit")]
    table: String,
}

impl From {
    fn source(&self) -> anyhow::Result<Option<Source>> {
        Ok(match (&self.postgres, self.files.is_empty()) {
            (Some(c), true) => Some(Source::Postgres {
                conninfo: c.clone(),
                table: self.table.clone(),
                ca_file: self.ca_file.clone(),
            }),
            (None, false) => Some(Source::Files(self.files.clone())),
            (None, true) => None,
            (Some(_), false) => bail!("read records either --from files or --postgres, not both"),
        })
    }

    fn required(&self) -> anyhow::Result<Source> {
        self.source()?.context(
            "say where the records are: --from <file or directory> (the file sink) or --postgres <connection string>",
        )
    }
}

/// The scope flags of `grants request`.
#[derive(Args, Debug, Default)]
struct ScopeArgs {
    /// PostgreSQL: only these tables (`table`, `schema.table`, globs such as `public.*`).
    #[arg(long = "table", value_delimiter = ',')]
    tables: Vec<String>,
    /// Kubernetes: the verbs allowed on --resource (`get,list,watch`, `*`).
    #[arg(long = "verb", value_delimiter = ',', requires = "resources")]
    verbs: Vec<String>,
    /// Kubernetes: resources as `kubectl create role` takes them: `pods`, `pods/log`,
    /// `deployments.apps`, `deployments.apps/scale`, `*`.
    #[arg(long = "resource", value_delimiter = ',', requires = "verbs")]
    resources: Vec<String>,
    /// Kubernetes: only these objects (by name).
    #[arg(long = "resource-name", value_delimiter = ',', requires = "resources")]
    resource_names: Vec<String>,
    /// Kubernetes: only in these namespaces (globs). Not the grant's own namespace (`-n`).
    #[arg(long = "in-namespace", value_delimiter = ',', requires = "resources")]
    in_namespaces: Vec<String>,
    /// Kubernetes: Secrets read under the grant are sent with their values in clear.
    #[arg(long, requires = "resources")]
    reveal_secret_data: bool,
    /// SSH: remote logins allowed (default: the Target's default login).
    #[arg(long = "ssh-login", value_delimiter = ',')]
    ssh_logins: Vec<String>,
    /// SSH: a command allowed, as a glob over the command line (`systemctl status *`);
    /// repeat for more.
    #[arg(long = "ssh-command")]
    ssh_commands: Vec<String>,
    /// SSH: allow port forwarding (`ssh -L`, `-R`, `-W`).
    #[arg(long)]
    ssh_port_forwarding: bool,
    /// SSH: allow agent forwarding (`ssh -A`).
    #[arg(long)]
    ssh_agent_forwarding: bool,
    /// SSH: allow X11 forwarding (`ssh -X`).
    #[arg(long)]
    ssh_x11_forwarding: bool,
}

impl ScopeArgs {
    /// The scope these flags describe (without its operations).
    fn to_json(&self) -> anyhow::Result<serde_json::Value> {
        let mut scope = serde_json::json!({});
        if !self.tables.is_empty() {
            scope["tables"] = serde_json::json!(self.tables);
        }
        if !self.resources.is_empty() {
            // One rule per API group, as `kubectl create role` makes them.
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for r in &self.resources {
                let (group, resource) = kube_resource(r)?;
                match groups.iter_mut().find(|(g, _)| *g == group) {
                    Some((_, list)) => list.push(resource),
                    None => groups.push((group, vec![resource])),
                }
            }
            let rules: Vec<serde_json::Value> = groups
                .into_iter()
                .map(|(group, resources)| {
                    let mut rule = serde_json::json!({
                        "verbs": self.verbs, "apiGroups": [group], "resources": resources,
                    });
                    if !self.in_namespaces.is_empty() {
                        rule["namespaces"] = serde_json::json!(self.in_namespaces);
                    }
                    if !self.resource_names.is_empty() {
                        rule["resourceNames"] = serde_json::json!(self.resource_names);
                    }
                    if self.reveal_secret_data {
                        rule["revealSecretData"] = serde_json::json!(true);
                    }
                    rule
                })
                .collect();
            scope["kubernetes"] = serde_json::json!(rules);
        }
        let ssh = !self.ssh_logins.is_empty()
            || !self.ssh_commands.is_empty()
            || self.ssh_port_forwarding
            || self.ssh_agent_forwarding
            || self.ssh_x11_forwarding;
        if ssh {
            let mut s = serde_json::json!({});
            if !self.ssh_logins.is_empty() {
                s["logins"] = serde_json::json!(self.ssh_logins);
            }
            if !self.ssh_commands.is_empty() {
                s["commands"] = serde_json::json!(self.ssh_commands);
            }
            for (on, key) in [
                (self.ssh_port_forwarding, "portForwarding"),
                (self.ssh_agent_forwarding, "agentForwarding"),
                (self.ssh_x11_forwarding, "x11Forwarding"),
            ] {
                if on {
                    s[key] = serde_json::json!(true);
                }
            }
            scope["ssh"] = s;
        }
        Ok(scope)
    }
}

/// The core group's resources: a bare `--resource` name must be one of them (others need
/// their group, which `kubectl create role` finds by discovery).
const CORE_RESOURCES: &[&str] = &[
    "bindings",
    "componentstatuses",
    "configmaps",
    "endpoints",
    "events",
    "limitranges",
    "namespaces",
    "nodes",
    "persistentvolumeclaims",
    "persistentvolumes",
    "pods",
    "podtemplates",
    "replicationcontrollers",
    "resourcequotas",
    "secrets",
    "serviceaccounts",
    "services",
];

/// `resource[.group][/subresource]` (kubectl's form) → (API group, `resource[/subresource]`).
fn kube_resource(r: &str) -> anyhow::Result<(String, String)> {
    let (main, sub) = match r.split_once('/') {
        Some((m, s)) => (m, Some(s)),
        None => (r, None),
    };
    let (resource, group) = match main.split_once('.') {
        Some((res, group)) if !group.is_empty() => (res, group),
        Some(_) => bail!(
            "--resource {r:?} is not a resource: write it as kubectl does (`pods`, `pods/log`, `deployments.apps`)"
        ),
        // `*` alone: every resource of every group.
        None if main == "*" => ("*", "*"),
        None if CORE_RESOURCES.contains(&main) => (main, ""),
        None => bail!(
            "--resource {r:?}: name its API group as `kubectl create role` resolves it ({main}.apps, {main}.batch, …), or write {main}.* for any group; a bare name is the core group's, and {main} is not one of its resources"
        ),
    };
    if resource.is_empty() || sub.is_some_and(str::is_empty) {
        bail!(
            "--resource {r:?} is not a resource: write it as kubectl does (`pods`, `pods/log`, `deployments.apps`)"
        );
    }
    Ok((
        group.to_owned(),
        match sub {
            Some(s) => format!("{resource}/{s}"),
            None => resource.to_owned(),
        },
    ))
}

#[derive(Args, Debug)]
struct Filter {
    /// Only this AgentIdentity.
    #[arg(long)]
    identity: Option<String>,
    /// Only this Target.
    #[arg(long)]
    target: Option<String>,
    /// From this time (RFC 3339, or a duration ago: `24h`).
    #[arg(long)]
    since: Option<String>,
    /// Until this time (RFC 3339, or a duration ago).
    #[arg(long)]
    until: Option<String>,
}

fn when(s: &str) -> anyhow::Result<Timestamp> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let ago = agentgate_crds::common::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("{s:?} is neither a time (RFC 3339) nor a duration: {e}"))?;
    Ok(Timestamp::now() - jiff::SignedDuration::try_from(ago)?)
}

impl Filter {
    fn range(&self) -> anyhow::Result<(Option<Timestamp>, Option<Timestamp>)> {
        Ok((
            self.since.as_deref().map(when).transpose()?,
            self.until.as_deref().map(when).transpose()?,
        ))
    }

    fn keeps(&self, r: &Record, range: (Option<Timestamp>, Option<Timestamp>)) -> bool {
        self.identity
            .as_ref()
            .is_none_or(|i| r.identity.as_ref() == Some(i))
            && self
                .target
                .as_ref()
                .is_none_or(|t| r.target.as_ref() == Some(t))
            && range.0.is_none_or(|s| r.time >= s)
            && range.1.is_none_or(|u| r.time <= u)
    }
}

#[derive(Args, Debug)]
struct SessionsArgs {
    #[command(flatten)]
    filter: Filter,
    /// Only sessions with a request of this decision (Allowed, Refused, Held, Approved,
    /// Denied).
    #[arg(long)]
    decision: Option<String>,
    #[command(flatten)]
    from: From,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Trusted public keys: base64 raw Ed25519 keys, or files holding one (the sidecar's
    /// `signing-key.pk8.pub`). Without one, each stream's own key is used (and said so).
    #[arg(long)]
    key: Vec<String>,
    /// Accept streams whose beginning is not in the input (rotated files deleted by
    /// retention).
    #[arg(long)]
    allow_partial: bool,
    /// Also compare with the AgentSessions' chain heads in the cluster (finds a cut tail,
    /// and sessions whose records are missing from the trail).
    #[arg(long)]
    sessions: bool,
    /// The trail of a sidecar still running: accept, with a warning, a stream without a
    /// StreamEnd and its last records not yet covered by a signature (it signs at least every
    /// second). Without it, a trail that ends without a StreamEnd fails: it may have been cut.
    #[arg(long)]
    open: bool,
    #[command(flatten)]
    from: From,
    /// Files or directories (same as --from).
    paths: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    filter: Filter,
    /// Trusted public keys for the chain verification behind every finding (without one, AU-9
    /// and AU-10 are not satisfied and the others at most partially: the signatures are only
    /// checked against each stream's own key).
    #[arg(long)]
    key: Vec<String>,
    #[command(flatten)]
    from: From,
}

#[derive(Subcommand, Debug)]
enum GrantCmd {
    /// List grants (pending first).
    List,
    /// Request access for an identity.
    Request {
        /// The grant's name.
        name: String,
        /// The AgentIdentity.
        #[arg(long)]
        identity: String,
        /// The Target.
        #[arg(long)]
        target: String,
        /// Operations (Read, Write, DDL, Privilege, Admin, Exec).
        #[arg(long, value_delimiter = ',', required = true)]
        operations: Vec<String>,
        /// What the grant is limited to, per protocol (without any: all the operations allow).
        #[command(flatten)]
        scope: Box<ScopeArgs>,
        /// How long the access lasts once approved.
        #[arg(long, default_value = "1h")]
        duration: String,
        /// Why it is needed.
        #[arg(long)]
        reason: String,
    },
    /// Approve a pending grant (you are recorded as the approver), after showing it.
    #[command(
        after_help = "The grant is read and shown first (identity, target, scope and, for a held command, its full text and fingerprint). The approval applies to that version only: if the grant was changed or replaced meanwhile, nothing is approved."
    )]
    Approve {
        /// The grant.
        name: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        /// Show the grant, then approve only after `y` is answered on standard input.
        #[arg(long)]
        confirm: bool,
    },
    /// Deny a pending grant.
    Deny {
        /// The grant.
        name: String,
        /// Why (the agent is told).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke a grant: its access ends now, also in open sessions.
    Revoke {
        /// The grant.
        name: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn client(ns: &Option<String>) -> anyhow::Result<(kube::Client, String)> {
    let client = kube::Client::try_default()
        .await
        .context("connect to the cluster (kubeconfig)")?;
    let ns = ns
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    Ok((client, ns))
}

fn print<T: serde::Serialize>(output: Output, value: &T) -> anyhow::Result<()> {
    match output {
        Output::Yaml => print!("{}", serde_norway::to_string(value)?),
        // (csv and oscal are refused before a command runs, see `run`.)
        Output::Table | Output::Json | Output::Csv | Output::Oscal => {
            println!("{}", serde_json::to_string_pretty(value)?)
        }
    }
    Ok(())
}

/// Text safe to print in a terminal: control characters (escape sequences an agent could
/// plant in a statement, a client name or a database name, or a forger in a stream name)
/// and other characters that do not print as themselves (bidirectional overrides,
/// zero-width and unassigned code points) shown as `\u{…}`.
fn printable(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || !prints_as_itself(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `c`, after another character, is left as it is by `str::escape_debug`: it is
/// printable (quotes and the backslash are, though `escape_debug` escapes them; combining
/// marks are, after a character).
fn prints_as_itself(c: char) -> bool {
    if matches!(c, '\\' | '\'' | '"') {
        return true;
    }
    let mut buf = [0u8; 5];
    buf[0] = b'a';
    let len = 1 + c.encode_utf8(&mut buf[1..]).len();
    std::str::from_utf8(&buf[..len]).is_ok_and(|s| s.escape_debug().count() == 2)
}

fn table(rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    // Refused before any work: `verify -o csv` must not read a whole trail, then fail.
    if matches!(cli.output, Output::Csv | Output::Oscal)
        && !matches!(cli.command, Command::Export(_))
    {
        anyhow::bail!(
            "-o csv and -o oscal are formats of `kubectl agentgate export`; this command prints table, json or yaml"
        );
    }
    match cli.command {
        Command::Grants(cmd) => grants(cmd, &cli.namespace, cli.output).await,
        Command::Sessions(args) => sessions(args, &cli.namespace, cli.output).await,
        Command::Show { session, from } => show(&session, &from, cli.output, false).await,
        Command::Replay { session, from } => show(&session, &from, cli.output, true).await,
        Command::Verify(args) => verify_cmd(args, &cli.namespace, cli.output).await,
        Command::Export(args) => export_cmd(args, cli.output).await,
    }
}

async fn grants(cmd: GrantCmd, ns: &Option<String>, output: Output) -> anyhow::Result<i32> {
    let (client, ns) = client(ns).await?;
    let api: Api<AccessGrant> = Api::namespaced(client, &ns);
    let decide = |verdict: &str, reason: &Option<String>| {
        let mut d = serde_json::json!({ "verdict": verdict });
        if let Some(r) = reason {
            d["reason"] = r.clone().into();
        }
        serde_json::json!({ "spec": { "decision": d } })
    };
    let patched = match cmd {
        GrantCmd::List => {
            let mut list = api.list(&ListParams::default()).await?.items;
            list.sort_by_key(|g| {
                let phase = g
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_default();
                (phase != "Pending", g.metadata.name.clone())
            });
            if output != Output::Table {
                print(output, &list)?;
                return Ok(0);
            }
            let mut rows = vec![
                [
                    "NAME", "PHASE", "IDENTITY", "TARGET", "SCOPE", "DURATION", "REASON",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for g in list {
                let operations = operations(&g);
                // A held command with its class: the class is what an approval lets run.
                let scope = match &g.spec.command {
                    Some(c) => format!(
                        "command ({}): {}",
                        c.operation.map_or(operations, |o| o.as_str().to_owned()),
                        c.text
                    ),
                    None => operations,
                };
                rows.push(vec![
                    g.metadata.name.clone().unwrap_or_default(),
                    g.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .map(|p| format!("{p:?}"))
                        .unwrap_or_else(|| "Pending".into()),
                    g.spec.identity.clone(),
                    g.spec.target.clone(),
                    cut(&scope, 60),
                    g.spec.duration.clone(),
                    cut(&g.spec.reason, 60),
                ]);
            }
            table(rows);
            return Ok(0);
        }
        GrantCmd::Request {
            name,
            identity,
            target,
            operations,
            scope,
            duration,
            reason,
        } => {
            let mut scope = scope.to_json()?;
            scope["operations"] = serde_json::json!(operations);
            let g: AccessGrant = serde_json::from_value(serde_json::json!({
                "apiVersion": "agentgate.dev/v1alpha1",
                "kind": "AccessGrant",
                "metadata": { "name": name, "namespace": ns },
                "spec": {
                    "identity": identity, "target": target, "duration": duration,
                    "reason": reason, "scope": scope,
                }
            }))?;
            let g = api.create(&PostParams::default(), &g).await?;
            println!(
                "accessgrant/{} requested: an approver runs: kubectl agentgate grants approve {} -n {ns}",
                g.metadata.name.clone().unwrap_or_default(),
                g.metadata.name.unwrap_or_default()
            );
            return Ok(0);
        }
        GrantCmd::Approve {
            name,
            reason,
            confirm,
        } => {
            // The approver sees what they approve, and approves exactly that version.
            let g = match api.get(&name).await {
                Ok(g) => g,
                Err(kube::Error::Api(e)) => {
                    eprintln!("error: accessgrant/{name} was not approved: {}", e.message);
                    return Ok(1);
                }
                Err(e) => return Err(e.into()),
            };
            print!("{}", describe_grant(&g, &ns));
            let (Some(uid), Some(version)) = (&g.metadata.uid, &g.metadata.resource_version) else {
                bail!(
                    "the API server sent accessgrant/{name} without a uid or resourceVersion: not approving what cannot be pinned"
                );
            };
            if confirm && !confirmed().await? {
                eprintln!("error: accessgrant/{name} was not approved: not confirmed");
                return Ok(1);
            }
            let mut body = decide("Approve", &reason);
            // Preconditions the API server checks: the same object (uid), unchanged since
            // it was shown (resourceVersion).
            body["metadata"] = serde_json::json!({ "uid": uid, "resourceVersion": version });
            (
                name.clone(),
                api.patch(&name, &PatchParams::default(), &Patch::Merge(body))
                    .await,
                "approved",
            )
        }
        GrantCmd::Deny { name, reason } => (
            name.clone(),
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(decide("Deny", &reason)),
            )
            .await,
            "denied",
        ),
        GrantCmd::Revoke { name, reason } => (
            name.clone(),
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({ "spec": { "revocation": { "reason": reason } } }),
                ),
            )
            .await,
            "revoked",
        ),
    };
    let (name, res, what) = patched;
    match res {
        Ok(_) => {
            println!("accessgrant/{name} {what}");
            Ok(0)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            eprintln!(
                "error: accessgrant/{name} was not {what}: it was changed or replaced after it was shown ({}); run the command again and check what it shows",
                e.message
            );
            Ok(1)
        }
        Err(kube::Error::Api(e)) => {
            eprintln!("error: accessgrant/{name} was not {what}: {}", e.message);
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

/// `s` cut to at most `max` characters, a cut marked with "…".
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A grant's operation classes, comma-separated.
fn operations(g: &AccessGrant) -> String {
    g.spec
        .scope
        .operations
        .iter()
        .map(|o| o.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// What an approver reads before approving: the whole grant as it will be decided, the
/// command's full text included, every line made safe for the terminal.
fn describe_grant(g: &AccessGrant, ns: &str) -> String {
    use std::fmt::Write as _;
    let spec = &g.spec;
    let mut out = String::new();
    let mut field = |label: &str, value: &str| {
        let _ = writeln!(out, "  {label:<13} {}", printable(value));
    };
    let name = g.metadata.name.clone().unwrap_or_default();
    field("grant:", &format!("accessgrant/{name} -n {ns}"));
    field(
        "phase:",
        &g.status
            .as_ref()
            .and_then(|s| s.phase)
            .map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}")),
    );
    field("identity:", &spec.identity);
    field("target:", &spec.target);
    field("operations:", &operations(g));
    let scope = serde_json::to_string(&spec.scope).unwrap_or_default();
    field("scope:", &scope);
    field("duration:", &spec.duration);
    field("reason:", &spec.reason);
    if let Some(by) = &spec.requested_by {
        field("requested by:", &by.username);
    }
    if let Some(c) = &spec.command {
        field("class:", c.operation.map_or("(not given)", |o| o.as_str()));
        if let Some(rule) = &c.rule {
            field("held by:", rule);
        }
        field("fingerprint:", &c.fingerprint);
        let _ = writeln!(out, "  command (the whole text, sensitive values masked):");
        for line in c.text.split('\n') {
            let _ = writeln!(out, "    {}", printable(line));
        }
    }
    out
}

/// Asks on standard error, reads standard input: true for `y` or `yes`.
async fn confirmed() -> anyhow::Result<bool> {
    eprint!("Approve it? [y/N] ");
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .context("read the answer")?
    .context("read the answer from standard input")?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// A session summarised from its records.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionRow {
    session: String,
    identity: String,
    target: String,
    started: String,
    ended: String,
    requests: u64,
    allowed: u64,
    refused: u64,
    held: u64,
    masked: u64,
    rows: u64,
}

async fn sessions(args: SessionsArgs, ns: &Option<String>, output: Output) -> anyhow::Result<i32> {
    let range = args.filter.range()?;
    let mut out: Vec<SessionRow> = Vec::new();
    if let Some(src) = args.from.source()? {
        let records = src.records().await?;
        let mut by: BTreeMap<String, SessionRow> = BTreeMap::new();
        let mut decisions: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in records.iter().filter(|r| args.filter.keeps(r, range)) {
            let Some(s) = &r.session else { continue };
            let row = by.entry(s.clone()).or_insert_with(|| SessionRow {
                session: s.clone(),
                identity: r.identity.clone().unwrap_or_default(),
                target: r.target.clone().unwrap_or_default(),
                started: r.time.to_string(),
                ..Default::default()
            });
            match r.kind {
                RecordKind::SessionEnd => row.ended = r.time.to_string(),
                RecordKind::Request => row.requests += 1,
                _ => {}
            }
            if let Some(v) = r.verdict() {
                decisions
                    .entry(s.clone())
                    .or_default()
                    .push(v.as_str().to_owned());
                match v {
                    agentgate_crds::audit::Verdict::Allowed
                    | agentgate_crds::audit::Verdict::Approved => row.allowed += 1,
                    agentgate_crds::audit::Verdict::Refused
                    | agentgate_crds::audit::Verdict::Denied => row.refused += 1,
                    agentgate_crds::audit::Verdict::Held => row.held += 1,
                }
            }
            if let Some(o) = &r.outcome {
                row.masked += o.masked_total();
                row.rows += o.rows;
            }
        }
        out = by
            .into_values()
            .filter(|row| {
                args.decision.as_ref().is_none_or(|d| {
                    decisions
                        .get(&row.session)
                        .is_some_and(|v| v.iter().any(|x| x.eq_ignore_ascii_case(d)))
                })
            })
            .collect();
    } else {
        let (client, ns) = client(ns).await?;
        let api: Api<AgentSession> = Api::namespaced(client, &ns);
        for s in api.list(&ListParams::default()).await?.items {
            let st = s.status.clone().unwrap_or_default();
            let c = &st.counters;
            let keep = args
                .filter
                .identity
                .as_ref()
                .is_none_or(|i| &s.spec.identity == i)
                && args
                    .filter
                    .target
                    .as_ref()
                    .is_none_or(|t| &s.spec.target == t)
                && range.0.is_none_or(|t| s.spec.started_at.0 >= t)
                && range.1.is_none_or(|t| s.spec.started_at.0 <= t)
                && args.decision.as_deref().is_none_or(|d| match d {
                    "Refused" | "Denied" => c.refused > 0,
                    "Held" | "Approved" => c.held > 0,
                    _ => c.allowed > 0,
                });
            if keep {
                out.push(SessionRow {
                    session: s.spec.session_id.clone(),
                    identity: s.spec.identity.clone(),
                    target: s.spec.target.clone(),
                    started: s.spec.started_at.0.to_string(),
                    ended: st.ended_at.map(|t| t.0.to_string()).unwrap_or_default(),
                    requests: c.requests,
                    allowed: c.allowed,
                    refused: c.refused,
                    held: c.held,
                    masked: c.masked_values,
                    rows: c.rows,
                });
            }
        }
    }
    if output != Output::Table {
        print(output, &out)?;
        return Ok(0);
    }
    let mut rows = vec![
        [
            "SESSION", "IDENTITY", "TARGET", "STARTED", "ENDED", "REQUESTS", "REFUSED", "HELD",
            "MASKED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for s in out {
        rows.push(vec![
            s.session,
            s.identity,
            s.target,
            s.started,
            if s.ended.is_empty() {
                "-".into()
            } else {
                s.ended
            },
            s.requests.to_string(),
            s.refused.to_string(),
            s.held.to_string(),
            s.masked.to_string(),
        ]);
    }
    table(rows);
    Ok(0)
}

async fn show(session: &str, from: &From, output: Output, replay: bool) -> anyhow::Result<i32> {
    let records: Vec<Record> = from
        .required()?
        .records()
        .await?
        .into_iter()
        .filter(|r| r.session.as_deref() == Some(session))
        .collect();
    if records.is_empty() {
        bail!("no records of session {session} in the given records");
    }
    let ssh = records.iter().any(|r| r.io.is_some());
    if replay && ssh {
        // asciicast v2: a header line, then [seconds, "o"|"i"|"r", data] events.
        let start = records[0].time;
        // The terminal's size as the agent's client first gave it (`r` events), if it did.
        let (width, height) = records
            .iter()
            .filter_map(|r| r.io.as_ref())
            .filter(|io| io.stream == "r")
            .find_map(|io| {
                let (w, h) = io.data.split_once('x')?;
                Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?))
            })
            .filter(|(w, h)| *w > 0 && *h > 0)
            .unwrap_or((120, 40));
        println!(
            "{}",
            serde_json::json!({"version": 2, "width": width, "height": height,
                "timestamp": start.as_second(), "title": format!("agentgate session {session}")})
        );
        for r in &records {
            if let Some(io) = &r.io {
                let secs = r.time.duration_since(start).as_secs_f64();
                // JSON escapes C0 controls; DEL and C1 (an 8-bit CSI) are escaped too, so
                // the line printed to a terminal never drives it.
                let line = serde_json::json!([secs, io.stream, io.data]).to_string();
                let line: String = line
                    .chars()
                    .map(|c| match c {
                        '\u{7f}' | '\u{80}'..='\u{9f}' => format!("\\u{:04x}", c as u32),
                        c => c.to_string(),
                    })
                    .collect();
                println!("{line}");
            }
        }
        return Ok(0);
    }
    if output != Output::Table {
        print(output, &records)?;
        return Ok(0);
    }
    let start = records[0].time;
    let mut rows = vec![
        ["+TIME", "SEQ", "EVENT", "REQUEST", "DECISION", "DETAIL"]
            .map(String::from)
            .to_vec(),
    ];
    for r in &records {
        let (request, decision, detail) = describe(r);
        rows.push(vec![
            format!("{:.3}s", r.time.duration_since(start).as_secs_f64()),
            r.seq.map(|s| s.to_string()).unwrap_or_default(),
            r.kind.as_str().to_owned(),
            request,
            decision,
            detail,
        ]);
    }
    table(rows);
    Ok(0)
}

fn describe(r: &Record) -> (String, String, String) {
    let request = r
        .request
        .as_ref()
        .map(|q| {
            if q.text.is_empty() {
                format!("#{}", q.id)
            } else {
                format!("#{} {}", q.id, q.text)
            }
        })
        .unwrap_or_default();
    let decision = r
        .decision
        .as_ref()
        .map(|d| {
            let mut s = d.verdict.as_str().to_owned();
            if let Some(rule) = &d.rule {
                s.push_str(&format!(" ({rule})"));
            }
            if let Some(g) = &d.grant {
                s.push_str(&format!(" grant {g}"));
            }
            if let Some(a) = &d.approver {
                s.push_str(&format!(" by {a}"));
            }
            s
        })
        .unwrap_or_default();
    let detail = if let Some(o) = &r.outcome {
        let mut s = format!("#{} {} rows, {} µs", o.id, o.rows, o.latency_us);
        if o.masked_total() > 0 {
            s.push_str(&format!(", {} masked", o.masked_total()));
        }
        if let Some(e) = &o.error {
            s.push_str(&format!(", error {e}"));
        }
        s
    } else if let Some(d) = r.decision.as_ref().and_then(|d| d.reason.clone()) {
        d
    } else {
        r.note.clone().or(r.client.clone()).unwrap_or_default()
    };
    (request, decision, detail)
}

/// The trusted public keys given with `--key` (a file holding one, or the key itself): each
/// must be an Ed25519 public key in base64. One that is not is an error, never skipped: a
/// mistyped path would otherwise leave nothing pinned and each stream's own key trusted.
fn keys(args: &[String]) -> anyhow::Result<Vec<String>> {
    args.iter()
        .map(|k| {
            let p = PathBuf::from(k);
            let key = if p.exists() {
                std::fs::read_to_string(&p)
                    .with_context(|| format!("read {}", p.display()))?
                    .trim()
                    .to_owned()
            } else {
                k.trim().to_owned()
            };
            match agentgate_crds::audit::public_key_bytes(&key) {
                Some(_) => Ok(key),
                _ if p.exists() => anyhow::bail!(
                    "--key {k}: the file does not hold an Ed25519 public key in base64 (the sidecar's signing-key.pk8.pub, or the key a stream's start record names)"
                ),
                _ => anyhow::bail!(
                    "--key {k}: no such file, and not an Ed25519 public key in base64 (32 bytes): check the path"
                ),
            }
        })
        .collect()
}

async fn verify_cmd(args: VerifyArgs, ns: &Option<String>, output: Output) -> anyhow::Result<i32> {
    let mut from = args.from.clone();
    from.files.extend(args.paths.iter().cloned());
    let lines = from.required()?.lines().await?;
    let mut expect = Expectations {
        keys: keys(&args.key)?,
        allow_partial: args.allow_partial,
        allow_open: args.open,
        ..Default::default()
    };
    if args.sessions {
        let (client, ns) = client(ns).await?;
        let api: Api<AgentSession> = Api::namespaced(client, &ns);
        for s in api.list(&ListParams::default()).await?.items {
            let status = s.status.unwrap_or_default();
            if let Some(h) = status.chain_head {
                expect
                    .session_heads
                    .insert(s.spec.session_id.clone(), (h.seq, h.hash));
            }
            // The keys the sidecars published where agents cannot write, unless given.
            if args.key.is_empty()
                && let Some(k) = status.signing_key
                && !expect.keys.contains(&k)
            {
                expect.keys.push(k);
            }
        }
    }
    let report = verify(
        lines
            .iter()
            .map(|l| (l.location.clone(), l.bytes.as_slice())),
        &expect,
    );
    if output != Output::Table {
        print(output, &report)?;
    } else {
        // Everything printed from the trail (stream names, key ids, file names, messages
        // quoting them) is escaped: a forged name must not hide the lines after it.
        for s in &report.streams {
            println!(
                "stream {}: records n={}..={} ({}), {} sessions, signed through {}, key {}{}",
                printable(&s.stream),
                s.first,
                s.last,
                s.records,
                s.sessions,
                s.signed_through
                    .map_or("nothing".to_owned(), |n| format!("n={n}")),
                printable(s.key_id.as_deref().unwrap_or("unknown")),
                if s.ended { ", ended" } else { ", open" }
            );
        }
        for w in &report.warnings {
            println!("warning: {}", printable(w));
        }
        for p in &report.problems {
            println!(
                "TAMPERED {:?} at {}: {}",
                p.kind,
                if p.location.is_empty() {
                    "-".to_owned()
                } else {
                    printable(&p.location)
                },
                printable(&p.message)
            );
        }
        if report.ok() {
            println!(
                "OK: {} records verified ({} duplicates skipped)",
                report.records, report.duplicates
            );
        } else {
            println!("FAILED: {} problems", report.problems.len());
        }
    }
    Ok(if report.ok() { 0 } else { 1 })
}

async fn export_cmd(args: ExportArgs, output: Output) -> anyhow::Result<i32> {
    let src = args.from.required()?;
    let lines = src.lines().await?;
    // Verified twice: leniently (a trail trimmed by retention, a sidecar still running) to
    // tell tampering from an incomplete trail, and strictly, as AU-9 and AU-10 are only
    // satisfied by a trail that is whole, closed and signed throughout.
    let keys = keys(&args.key)?;
    let check = |allow: bool| {
        verify(
            lines
                .iter()
                .map(|l| (l.location.clone(), l.bytes.as_slice())),
            &Expectations {
                keys: keys.clone(),
                allow_partial: allow,
                allow_open: allow,
                ..Default::default()
            },
        )
    };
    let chain = export::ChainCheck {
        lenient: check(true),
        strict: check(false),
        pinned: !keys.is_empty(),
    };
    let range = args.filter.range()?;
    let records: Vec<Record> = src
        .records()
        .await?
        .into_iter()
        .filter(|r| args.filter.keeps(r, range))
        .collect();
    let findings = export::findings(&records, &chain);
    let start = range
        .0
        .or(records.first().map(|r| r.time))
        .unwrap_or_else(Timestamp::now)
        .to_string();
    let end = range
        .1
        .or(records.last().map(|r| r.time))
        .unwrap_or_else(Timestamp::now)
        .to_string();
    let scope = args
        .filter
        .identity
        .clone()
        .unwrap_or_else(|| "all identities".into());
    match output {
        Output::Oscal => println!(
            "{}",
            serde_json::to_string_pretty(&export::oscal(
                &findings,
                &start,
                &end,
                &scope,
                &Timestamp::now().to_string()
            ))?
        ),
        Output::Csv => print!("{}", export::csv(&findings)),
        Output::Json | Output::Yaml => print(
            output,
            &serde_json::json!({
                "scope": scope, "start": start, "end": end,
                "records": records.len(), "chain": chain.strict, "findings": findings,
            }),
        )?,
        Output::Table => {
            let mut rows = vec![
                ["CONTROL", "STATE", "EVIDENCE", "SUMMARY"]
                    .map(String::from)
                    .to_vec(),
            ];
            for f in &findings {
                rows.push(vec![
                    f.control.to_uppercase(),
                    f.state.to_owned(),
                    f.evidence.len().to_string(),
                    f.summary.clone(),
                ]);
            }
            table(rows);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(args: &[&str]) -> anyhow::Result<agentgate_crds::AccessScope> {
        let base = [
            "kubectl-agentgate",
            "grants",
            "request",
            "g",
            "--identity",
            "claude",
            "--target",
            "t",
            "--operations",
            "Read,Write",
            "--reason",
            "r",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(args))?;
        let Command::Grants(GrantCmd::Request {
            scope, operations, ..
        }) = cli.command
        else {
            bail!("not a request")
        };
        let mut json = scope.to_json()?;
        json["operations"] = serde_json::json!(operations);
        Ok(serde_json::from_value(json)?)
    }

    #[test]
    fn request_flags_make_the_scope_they_describe() -> anyhow::Result<()> {
        // Kubernetes: one rule per API group, as `kubectl create role` makes them.
        let s = scope(&[
            "--verb",
            "get,patch",
            "--resource",
            "pods,pods/log,deployments.apps,deployments.apps/scale",
            "--in-namespace",
            "shop",
            "--resource-name",
            "web",
        ])?;
        assert_eq!(s.kubernetes.len(), 2);
        assert_eq!(s.kubernetes[0].api_groups, [""]);
        assert_eq!(s.kubernetes[0].resources, ["pods", "pods/log"]);
        assert_eq!(s.kubernetes[1].api_groups, ["apps"]);
        assert_eq!(
            s.kubernetes[1].resources,
            ["deployments", "deployments/scale"]
        );
        for r in &s.kubernetes {
            assert_eq!(r.verbs, ["get", "patch"]);
            assert_eq!(r.namespaces, ["shop"]);
            assert_eq!(r.resource_names, ["web"]);
            assert!(!r.reveal_secret_data);
        }
        assert!(s.tables.is_empty() && s.ssh.is_none());
        // SSH: commands keep their commas; forwarding only when asked for.
        let s = scope(&[
            "--ssh-login",
            "deploy,root",
            "--ssh-command",
            "systemctl status *",
            "--ssh-command",
            "echo a,b",
            "--ssh-port-forwarding",
        ])?;
        let ssh = s.ssh.expect("an ssh scope");
        assert_eq!(ssh.logins, ["deploy", "root"]);
        assert_eq!(ssh.commands, ["systemctl status *", "echo a,b"]);
        assert!(ssh.port_forwarding && !ssh.agent_forwarding && !ssh.x11_forwarding);
        // PostgreSQL tables; nothing else set.
        let s = scope(&["--table", "public.orders,billing.*"])?;
        assert_eq!(s.tables, ["public.orders", "billing.*"]);
        assert!(s.kubernetes.is_empty() && s.ssh.is_none());
        // Half a Kubernetes rule, or a malformed resource, is refused.
        assert!(scope(&["--verb", "get"]).is_err());
        assert!(scope(&["--resource", "pods"]).is_err());
        assert!(scope(&["--verb", "get", "--resource", "pods/"]).is_err());
        assert!(scope(&["--verb", "get", "--resource", ".apps"]).is_err());
        // A bare name is the core group's: others need their group, or `.*`; `*` is all.
        let e = scope(&["--verb", "get", "--resource", "deployments"]).unwrap_err();
        assert!(e.to_string().contains("deployments.apps"), "{e}");
        assert!(scope(&["--verb", "get", "--resource", "po"]).is_err());
        let s = scope(&["--verb", "get", "--resource", "*,deployments.*"])?;
        assert_eq!(s.kubernetes.len(), 1);
        assert_eq!(s.kubernetes[0].api_groups, ["*"]);
        assert_eq!(s.kubernetes[0].resources, ["*", "deployments"]);
        Ok(())
    }

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        // Escape sequences (7-bit and the 8-bit CSI), bell, DEL, newlines, bidirectional
        // overrides and isolates, zero-width characters, unassigned code points.
        assert_eq!(
            printable("a\u{1b}[8mb\u{7}\u{7f}\u{9b}2J\nc"),
            "a\\u{1b}[8mb\\u{7}\\u{7f}\\u{9b}2J\\u{a}c"
        );
        assert_eq!(
            printable("x\u{202e}y\u{2066}\u{200b}\u{feff}\u{e0001}\u{10ffff}"),
            "x\\u{202e}y\\u{2066}\\u{200b}\\u{feff}\\u{e0001}\\u{10ffff}"
        );
        // What prints as itself stays: quotes, backslashes, accents (also combining), CJK,
        // emoji.
        for s in [
            "SELECT 'a', \"b\" FROM t WHERE x ~ '\\d'",
            "Zoë e\u{301} 東京 🔑",
        ] {
            assert_eq!(printable(s), s);
        }
    }
}
