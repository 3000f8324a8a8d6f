//! The policy engine: a snapshot of the identity's policy objects, and [`decide`], a pure
//! function of a snapshot, a request and the clock. No I/O happens on the hot path; sources
//! ([`folder`], and the Kubernetes watch) replace the snapshot in a [`PolicyStore`].

pub mod approval;
pub mod cluster;
pub mod folder;
pub mod glob;
pub mod hint;
pub mod live;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use agentgate_crds::lifecycle::in_force;
use agentgate_crds::target::Guardrail;
use agentgate_crds::{
    AccessGrant, AccessScope, AgentIdentity, GuardrailAction, MaskPolicy, OperationClass, Target,
};
use jiff::Timestamp;

use crate::sql::{Classified, Flag};

/// Everything the sidecar knows about policy at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// AgentIdentities by name.
    pub identities: BTreeMap<String, AgentIdentity>,
    /// Targets by name.
    pub targets: BTreeMap<String, Target>,
    /// AccessGrants by name.
    pub grants: BTreeMap<String, AccessGrant>,
    /// MaskPolicies by name.
    pub masks: BTreeMap<String, MaskPolicy>,
    /// Where it came from (a folder, or the API server).
    pub source: String,
    /// Objects that were skipped, and why.
    pub warnings: Vec<String>,
}

/// Holds the current snapshot; sources replace it, gateways read it.
#[derive(Debug)]
pub struct PolicyStore {
    current: RwLock<Option<Arc<Snapshot>>>,
    error: RwLock<Option<String>>,
    /// Counts the snapshot's replacements: requests that outlive one (a watch, an exec, a
    /// running statement) are decided again when it changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            error: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl PolicyStore {
    /// The current snapshot, if one was ever loaded.
    pub fn get(&self) -> Option<Arc<Snapshot>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    /// Replaces the snapshot and clears the last error.
    pub fn set(&self, snapshot: Snapshot) {
        if let Ok(mut c) = self.current.write() {
            *c = Some(Arc::new(snapshot));
        }
        if let Ok(mut e) = self.error.write() {
            *e = None;
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Drops the snapshot: every request is refused until a new one is loaded.
    pub fn clear(&self, why: String) {
        if let Ok(mut c) = self.current.write() {
            *c = None;
        }
        self.set_error(why);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Told each time the snapshot is replaced or dropped.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records why the last load failed (the last good snapshot stays in force).
    pub fn set_error(&self, why: String) {
        if let Ok(mut e) = self.error.write() {
            *e = Some(why);
        }
    }

    /// Why the last load failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.read().ok().and_then(|e| e.clone())
    }
}

/// A request as the policy sees it, whatever the protocol.
#[derive(Debug, Clone)]
pub struct Command {
    /// Its operation class.
    pub class: OperationClass,
    /// The exact-command fingerprint (grants bound to one command match it), computed only
    /// when some grant is bound to a command.
    pub fingerprint: crate::sql::Fingerprint,
    /// What guardrail `matches` patterns are compared with: statement tags (`DROP TABLE`),
    /// function names, `UPDATE without WHERE`, Kubernetes `verb resource`, shell commands.
    pub keys: BTreeSet<String>,
    /// Tables (or other objects) the command touches, for scopes limited to some: as
    /// `schema.table` when the gateway resolved them on the session's search path, else as
    /// written (an unqualified name is then read as `public.name`).
    pub tables: BTreeSet<String>,
    /// Each statement's class and keys, when the command has more than one: each meets its
    /// own guardrail, and the most restrictive decides.
    pub parts: Vec<(OperationClass, BTreeSet<String>)>,
    /// Why the schema of the unqualified names in `tables` cannot be told (the session's
    /// search path was changed in a way the gateway cannot follow): a scope then covers such
    /// a name only with a pattern for any schema (`*.orders`).
    pub unresolved: Option<String>,
    /// A Kubernetes API request: what scopes' `kubernetes` rules are matched with.
    pub kube: Option<KubeAccess>,
    /// An SSH request: what scopes' `ssh` settings are matched with.
    pub ssh: Option<SshAccess>,
}

/// An SSH request, as scopes' `ssh` settings see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshAccess {
    /// The remote login asked for.
    pub login: String,
    /// The Target's default login (allowed when a scope names no logins).
    pub default_login: String,
    /// The simple commands of the request, normalized (`systemctl status nginx`); empty for
    /// a login, a file transfer or a forwarding.
    pub commands: Vec<String>,
    /// A forwarding asked for, which a scope must allow by name.
    pub forwarding: Option<SshForwarding>,
}

/// A kind of SSH forwarding, refused unless a scope allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshForwarding {
    /// Local (`-L`) or remote (`-R`) port forwarding.
    Port,
    /// SSH agent forwarding (`-A`).
    Agent,
    /// X11 forwarding (`-X`).
    X11,
}

impl SshAccess {
    /// Whether a scope's `ssh` settings allow this request (no settings: the default login,
    /// any command, no forwarding).
    pub fn allowed_by(&self, scope: Option<&agentgate_crds::common::SshScope>) -> bool {
        let default = agentgate_crds::common::SshScope::default();
        let scope = scope.unwrap_or(&default);
        let login_ok = if scope.logins.is_empty() {
            self.login == self.default_login
        } else {
            scope.logins.iter().any(|l| l == "*" || l == &self.login)
        };
        let commands_ok = scope.commands.is_empty()
            || self
                .commands
                .iter()
                .all(|c| scope.commands.iter().any(|p| glob::matches_command(p, c)));
        let forwarding_ok = match self.forwarding {
            None => true,
            Some(SshForwarding::Port) => scope.port_forwarding,
            Some(SshForwarding::Agent) => scope.agent_forwarding,
            Some(SshForwarding::X11) => scope.x11_forwarding,
        };
        login_ok && commands_ok && forwarding_ok
    }
}

/// A Kubernetes API request, as scopes' `kubernetes` rules see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeAccess {
    /// The verb (`get`, `list`, `create`, …).
    pub verb: String,
    /// The API group (`""` for core).
    pub group: String,
    /// The resource, with its subresource when there is one (`pods/exec`).
    pub resource: String,
    /// The namespace (`""` when cluster-scoped or across namespaces).
    pub namespace: String,
    /// The object's name (`""` for lists and creates).
    pub name: String,
}

impl KubeAccess {
    /// Whether one rule of a scope allows this request.
    pub fn allowed_by(&self, rule: &agentgate_crds::common::KubernetesRule) -> bool {
        let any = |list: &[String], value: &str| list.iter().any(|x| x == "*" || x == value);
        let resource_ok = rule.resources.iter().any(|r| {
            r == "*"
                || r == &self.resource
                // `pods/*` covers every subresource of pods; `*/scale` every resource's scale.
                || self.resource.split_once('/').is_some_and(|(res, sub)| {
                    r == &format!("{res}/*") || r == &format!("*/{sub}")
                })
        });
        // A rule naming namespaces never covers a request across namespaces (or of a
        // cluster-scoped resource): that would reach namespaces it does not name.
        let namespace_ok = rule.namespaces.is_empty()
            || (!self.namespace.is_empty()
                && rule
                    .namespaces
                    .iter()
                    .any(|n| glob::matches(n, &self.namespace)));
        // A rule naming objects covers only requests for one of them (not lists or creates).
        let name_ok = rule.resource_names.is_empty()
            || (!self.name.is_empty() && rule.resource_names.iter().any(|n| n == &self.name));
        any(&rule.verbs, &self.verb)
            && (rule.api_groups.is_empty() && self.group.is_empty()
                || any(&rule.api_groups, &self.group))
            && resource_ok
            && namespace_ok
            && name_ok
    }
}

impl From<&Classified> for Command {
    fn from(c: &Classified) -> Self {
        let mut keys = BTreeSet::new();
        let mut tables = BTreeSet::new();
        let mut unresolved = None;
        let mut parts = Vec::new();
        for s in c.statements.iter() {
            let mut own = BTreeSet::new();
            own.insert(s.tag.clone());
            own.extend(s.functions.iter().cloned());
            for f in &s.flags {
                match f {
                    Flag::NoWhere(verb) => {
                        own.insert(format!("{verb} without WHERE"));
                    }
                    Flag::Truncate => {
                        own.insert("TRUNCATE".into());
                    }
                    Flag::CopyServerSide => {
                        own.insert("COPY PROGRAM".into());
                    }
                    // What a guardrail allowing search path changes (and nothing else
                    // of `SET`'s Privilege class) names.
                    Flag::SearchPath(
                        crate::sql::PathChange::To { .. } | crate::sql::PathChange::Initial { .. },
                    ) if s.tag == "SET" => {
                        own.insert("SET search_path".into());
                    }
                    Flag::ExecutePrepared(_)
                    | Flag::DeclareCursor(_)
                    | Flag::UseCursor(_)
                    | Flag::Function(_)
                    | Flag::Unknown(_)
                    | Flag::CopyBinary
                    | Flag::StoresValues
                    | Flag::SearchPath(_) => {}
                }
            }
            if c.statements.len() > 1 {
                parts.push((s.class, own.clone()));
            }
            if keys.is_empty() {
                keys = own;
            } else {
                keys.extend(own);
            }
            for r in &s.relations {
                match c.resolved.as_ref().and_then(|m| m.get(r)) {
                    Some(Ok(schemas)) if !schemas.is_empty() => {
                        tables.extend(schemas.iter().cloned())
                    }
                    Some(Err(why)) => {
                        unresolved.get_or_insert_with(|| why.to_string());
                        tables.insert(r.clone());
                    }
                    _ => {
                        tables.insert(r.clone());
                    }
                }
            }
        }
        Self {
            class: c.class,
            fingerprint: c.fingerprint.clone(),
            keys,
            tables,
            parts,
            unresolved,
            kube: None,
            ssh: None,
        }
    }
}

/// What happens to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It runs.
    Allow,
    /// It is refused.
    Refuse,
    /// It waits for an approver (an AccessGrant bound to it must be approved).
    Hold,
}

/// A decision and what it rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow, refuse or hold.
    pub verdict: Verdict,
    /// The rule behind it: a guardrail's name, `baseline`, `grant`, or why nothing applied.
    pub rule: String,
    /// The AccessGrant used, when one was.
    pub grant: Option<String>,
    /// What to tell the agent (without the request's values).
    pub message: String,
}

impl Decision {
    /// A refusal by `rule`, telling the agent `message`.
    pub fn refuse(rule: &str, message: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Refuse,
            rule: rule.to_owned(),
            grant: None,
            message: message.into(),
        }
    }

    fn hold(rule: &str, message: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Hold,
            rule: rule.to_owned(),
            grant: None,
            message: message.into(),
        }
    }

    fn allow(rule: &str, grant: Option<String>) -> Self {
        Self {
            verdict: Verdict::Allow,
            rule: rule.to_owned(),
            grant,
            message: String::new(),
        }
    }
}

/// The guardrails every target has after its own.
pub fn default_guardrails() -> Vec<Guardrail> {
    let g =
        |name: &str, ops: &[OperationClass], matches: &[&str], action, message: &str| Guardrail {
            name: name.to_owned(),
            operations: ops.to_vec(),
            matches: matches.iter().map(|m| (*m).to_owned()).collect(),
            action,
            message: Some(message.to_owned()),
        };
    vec![
        g(
            "agentgate-block-admin",
            &[OperationClass::Admin],
            &[],
            GuardrailAction::Block,
            "server administration, server-side files and programs, and other sessions are off limits to agents",
        ),
        g(
            "agentgate-block-privilege",
            &[OperationClass::Privilege],
            &[],
            GuardrailAction::Block,
            "changing roles, ownership or privileges is off limits to agents",
        ),
        g(
            "agentgate-hold-unbounded",
            &[],
            &["UPDATE without WHERE", "DELETE without WHERE", "TRUNCATE"],
            GuardrailAction::RequireApproval,
            "a change to every row needs a person's approval",
        ),
        g(
            "agentgate-hold-drop",
            &[],
            &["DROP *"],
            GuardrailAction::RequireApproval,
            "dropping objects needs a person's approval",
        ),
        g(
            "agentgate-hold-kube-delete",
            &[],
            &[
                "delete namespaces",
                "deletecollection namespaces",
                "delete nodes",
                "deletecollection nodes",
                "delete customresourcedefinitions.*",
                "deletecollection customresourcedefinitions.*",
            ],
            GuardrailAction::RequireApproval,
            "deleting namespaces, nodes or custom resource definitions needs a person's approval",
        ),
        g(
            "agentgate-grant-secrets",
            &[],
            &["get secrets", "list secrets", "watch secrets"],
            GuardrailAction::RequireGrant,
            "reading Secrets needs an AccessGrant, and their values stay masked unless it reveals them",
        ),
        g(
            "agentgate-hold-exec",
            &[OperationClass::Exec],
            &[],
            GuardrailAction::RequireApproval,
            "running code on the server needs a person's approval",
        ),
    ]
}

fn guardrail_matches(g: &Guardrail, class: OperationClass, keys: &BTreeSet<String>) -> bool {
    let class_ok = g.operations.is_empty() || g.operations.contains(&class);
    let match_ok = g.matches.is_empty()
        || g.matches
            .iter()
            .any(|m| keys.iter().any(|k| glob::matches_ci(m, k)));
    class_ok && match_ok
}

/// Whether `scope` covers `cmd` (class, and tables when the scope names some).
///
/// A scope limited with another protocol's settings (`kubernetes` rules on a PostgreSQL
/// request, say) covers nothing: read as this protocol reads it, it would allow every
/// operation of its classes, more than its author wrote. The grant webhook refuses such
/// grants; this also holds for baselines and for policy folders, which no webhook checks.
pub fn covers(scope: &AccessScope, cmd: &Command) -> bool {
    if !scope.operations.contains(&cmd.class) {
        return false;
    }
    let foreign = if cmd.kube.is_some() {
        !scope.tables.is_empty() || scope.ssh.is_some()
    } else if cmd.ssh.is_some() {
        !scope.tables.is_empty() || !scope.kubernetes.is_empty()
    } else {
        !scope.kubernetes.is_empty() || scope.ssh.is_some()
    };
    if foreign {
        return false;
    }
    if let Some(k) = &cmd.kube {
        return scope.kubernetes.is_empty() || scope.kubernetes.iter().any(|r| k.allowed_by(r));
    }
    if let Some(a) = &cmd.ssh {
        return a.allowed_by(scope.ssh.as_ref());
    }
    if scope.tables.is_empty() {
        return true;
    }
    let qualify = |name: &str| match crate::sql::classify::unqualified(name) {
        Some(_) => format!("public.{name}"),
        None => name.to_owned(),
    };
    cmd.tables.iter().all(|t| {
        if cmd.unresolved.is_some()
            && let Some(table) = crate::sql::classify::unqualified(t)
        {
            // In a schema that cannot be told: only a pattern for any schema covers it.
            return scope.tables.iter().any(|p| {
                p.split_once('.')
                    .is_some_and(|(schema, pt)| schema == "*" && glob::matches(pt, &table))
            });
        }
        let qualified = qualify(t);
        scope
            .tables
            .iter()
            .any(|p| glob::matches(&qualify(p), &qualified))
    })
}

/// Whether some scope that `identity` may use on `target` names tables (its baseline, or a
/// grant in any state): its PostgreSQL statements' unqualified names must then be resolved
/// on the session's search path before they are decided.
pub fn table_scoped(s: &Snapshot, identity: &str, target: &str) -> bool {
    let baseline = s.identities.get(identity).is_some_and(|id| {
        id.spec
            .baseline
            .iter()
            .any(|b| b.target == target && !b.scope.tables.is_empty())
    });
    baseline
        || s.grants.values().any(|g| {
            g.spec.identity == identity
                && g.spec.target == target
                && !g.spec.scope.tables.is_empty()
        })
}

/// Whether a Kubernetes request may see Secrets' data in clear: a baseline entry or an
/// AccessGrant in force that covers it has a `kubernetes` rule with `revealSecretData`.
pub fn reveals_secret_data(
    s: &Snapshot,
    identity: &str,
    target: &str,
    cmd: &Command,
    now: Timestamp,
) -> bool {
    let Some(k) = &cmd.kube else {
        return false;
    };
    let Some(id) = s.identities.get(identity) else {
        return false;
    };
    let reveals = |scope: &AccessScope| {
        scope.operations.contains(&cmd.class)
            && scope
                .kubernetes
                .iter()
                .any(|r| r.reveal_secret_data && k.allowed_by(r))
    };
    id.spec
        .baseline
        .iter()
        .any(|b| b.target == target && reveals(&b.scope))
        || s.grants.values().any(|g| {
            g.spec.identity == identity
                && g.spec.target == target
                && g.spec.command.is_none()
                && in_force(g, Some(id), now)
                && reveals(&g.spec.scope)
        })
}

/// The MaskPolicies that apply to `identity` on `target`.
pub fn masks_for<'a>(s: &'a Snapshot, identity: &str, target: &str) -> Vec<&'a MaskPolicy> {
    s.masks
        .values()
        .filter(|m| {
            (m.spec.targets.is_empty() || m.spec.targets.iter().any(|p| glob::matches(p, target)))
                && (m.spec.identities.is_empty()
                    || m.spec.identities.iter().any(|p| glob::matches(p, identity)))
        })
        .collect()
}

/// Decides a request: pure, no I/O. `None` for the snapshot means policy is not loaded.
pub fn decide(
    snapshot: Option<&Snapshot>,
    identity: &str,
    target: &str,
    cmd: &Command,
    now: Timestamp,
) -> Decision {
    let Some(s) = snapshot else {
        return Decision::refuse(
            "policy-not-loaded",
            "agentgate has no policy loaded yet, so it refuses everything; retry shortly, or check the sidecar's log",
        );
    };
    let Some(id) = s.identities.get(identity) else {
        return Decision::refuse(
            "unknown-identity",
            format!("no AgentIdentity {identity} is known to this gateway"),
        );
    };
    if id.spec.disabled {
        return Decision::refuse(
            "identity-disabled",
            format!("AgentIdentity {identity} is disabled"),
        );
    }
    let Some(t) = s.targets.get(target) else {
        return Decision::refuse(
            "unknown-target",
            format!("no Target {target} is known to this gateway"),
        );
    };
    let grants: Vec<&AccessGrant> = s
        .grants
        .values()
        .filter(|g| {
            g.spec.identity == identity && g.spec.target == target && in_force(g, Some(id), now)
        })
        .collect();
    let bound = grants
        .iter()
        .find(|g| {
            g.spec
                .command
                .as_ref()
                .is_some_and(|c| c.fingerprint == cmd.fingerprint.get())
        })
        .map(|g| g.metadata.name.clone().unwrap_or_default());
    let scoped = grants
        .iter()
        .find(|g| g.spec.command.is_none() && covers(&g.spec.scope, cmd))
        .map(|g| g.metadata.name.clone().unwrap_or_default());
    let baseline = id
        .spec
        .baseline
        .iter()
        .any(|b| b.target == target && covers(&b.scope, cmd));

    static DEFAULTS: std::sync::LazyLock<Vec<Guardrail>> =
        std::sync::LazyLock::new(default_guardrails);
    // Each statement meets the first guardrail that matches it; the string gets the most
    // restrictive of those (a guardrail that allows one statement never lets another pass).
    let rank = |a: GuardrailAction| match a {
        GuardrailAction::Allow => 0,
        GuardrailAction::RequireGrant => 1,
        GuardrailAction::RequireApproval => 2,
        GuardrailAction::Block => 3,
    };
    let mut strictest: Option<&Guardrail> = None;
    let mut meet = |class: OperationClass, keys: &BTreeSet<String>| {
        let first = t
            .spec
            .guardrails
            .iter()
            .chain(DEFAULTS.iter())
            .find(|g| guardrail_matches(g, class, keys));
        if let Some(g) = first
            && strictest.is_none_or(|s| rank(g.action) > rank(s.action))
        {
            strictest = Some(g);
        }
    };
    if cmd.parts.is_empty() {
        meet(cmd.class, &cmd.keys);
    } else {
        for (class, keys) in &cmd.parts {
            meet(*class, keys);
        }
    }
    if let Some(g) = strictest {
        let note = g
            .message
            .clone()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        return match g.action {
            GuardrailAction::Block => {
                Decision::refuse(&g.name, format!("refused by guardrail {}{note}", g.name))
            }
            GuardrailAction::RequireApproval => match bound {
                Some(grant) => Decision::allow(&g.name, Some(grant)),
                None => Decision::hold(&g.name, format!("held by guardrail {}{note}", g.name)),
            },
            GuardrailAction::RequireGrant => match bound.or(scoped) {
                Some(grant) => Decision::allow(&g.name, Some(grant)),
                None => Decision::hold(
                    &g.name,
                    format!("guardrail {} needs an AccessGrant{note}", g.name),
                ),
            },
            GuardrailAction::Allow => allow_by_scope(bound, baseline, scoped, cmd, target),
        };
    }
    allow_by_scope(bound, baseline, scoped, cmd, target)
}

fn allow_by_scope(
    bound: Option<String>,
    baseline: bool,
    scoped: Option<String>,
    cmd: &Command,
    target: &str,
) -> Decision {
    if let Some(g) = bound {
        return Decision::allow("grant", Some(g));
    }
    if baseline {
        return Decision::allow("baseline", None);
    }
    if let Some(g) = scoped {
        return Decision::allow("grant", Some(g));
    }
    let tables = if cmd.tables.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            cmd.tables.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    let tables = match &cmd.unresolved {
        Some(why)
            if cmd
                .tables
                .iter()
                .any(|t| crate::sql::classify::unqualified(t).is_some()) =>
        {
            format!(
                "{tables}; agentgate cannot tell which schema an unqualified name is in ({why}): name tables with their schema (schema.table)"
            )
        }
        _ => tables,
    };
    Decision::hold(
        "not-in-scope",
        format!(
            "no baseline or active grant allows {} on {target}{tables}",
            cmd.class
        ),
    )
}

#[cfg(test)]
mod tests;
