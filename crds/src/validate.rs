//! The CRDs' own validation rules, for objects that never went through an API server.
//!
//! The API server enforces each CRD's schema and its CEL rules (`x-kubernetes-validations`)
//! on every object it stores. A standalone sidecar reads the same manifests from a folder,
//! where nothing enforced them: an `oidc` identity with neither `subject` nor `claims` would
//! match every token of its issuer. [`Validate::problems`] states every rule that needs no
//! old object (the others guard updates, which a folder does not have) in Rust; a test holds
//! it to the generated CRDs, so a rule added there without its twin here fails the build.

use crate::common::{AccessScope, parse_duration};
use crate::grant::{AccessGrantSpec, Verdict};
use crate::identity::AgentIdentitySpec;
use crate::mask::{MaskAction, MaskPolicySpec};
use crate::target::{Protocol, TargetSpec, TlsMode, UpstreamTls};
use std::time::Duration;

/// What is wrong with an object, by the rules of its CRD.
pub trait Validate {
    /// Each broken rule's message, as the API server would say it; empty when valid.
    fn problems(&self) -> Vec<String>;
}

/// Whether `value` is a Go duration within `[min, max]`.
fn within(value: &str, min: Duration, max: Duration) -> bool {
    parse_duration(value).is_ok_and(|d| d >= min && d <= max)
}

fn rule(out: &mut Vec<String>, broken: bool, message: &str) {
    if broken {
        out.push(message.to_owned());
    }
}

fn unique<'a>(items: impl Iterator<Item = &'a str>) -> bool {
    let mut seen = std::collections::HashSet::new();
    items.into_iter().all(|i| seen.insert(i))
}

fn scope(out: &mut Vec<String>, s: &AccessScope) {
    rule(
        out,
        !unique(s.operations.iter().map(|o| o.as_str())),
        "operations must not repeat a class",
    );
}

fn tls(out: &mut Vec<String>, t: &UpstreamTls) {
    rule(
        out,
        t.mode == TlsMode::Disable && t.ca.is_some(),
        "tls.ca applies only when mode is VerifyCA or VerifyFull",
    );
}

impl Validate for AgentIdentitySpec {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let auth = &self.authentication;
        rule(
            &mut out,
            auth.service_account.is_none() && auth.oidc.is_none(),
            "authentication needs serviceAccount or oidc (or both)",
        );
        if let Some(o) = &auth.oidc {
            rule(
                &mut out,
                o.subject.is_none() && o.claims.is_empty(),
                "oidc needs a subject or at least one claim: otherwise every token of the issuer would match",
            );
            // The schema's own bounds (minLength 1), which a folder is not checked against.
            rule(
                &mut out,
                o.subject.as_deref() == Some("")
                    || o.claims.iter().any(|(k, v)| k.is_empty() || v.is_empty()),
                "oidc.subject and oidc.claims must not be empty",
            );
        }
        rule(
            &mut out,
            !within(
                &self.max_grant_duration,
                Duration::from_secs(60),
                Duration::from_secs(168 * 3600),
            ),
            "maxGrantDuration must be between 1m and 168h",
        );
        for b in &self.baseline {
            scope(&mut out, &b.scope);
        }
        out
    }
}

impl Validate for TargetSpec {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        rule(
            &mut out,
            (self.protocol == Protocol::Postgres) != self.postgres.is_some(),
            "spec.postgres is required exactly when protocol is Postgres",
        );
        rule(
            &mut out,
            (self.protocol == Protocol::Kubernetes) != self.kubernetes.is_some(),
            "spec.kubernetes is required exactly when protocol is Kubernetes",
        );
        rule(
            &mut out,
            (self.protocol == Protocol::Ssh) != self.ssh.is_some(),
            "spec.ssh is required exactly when protocol is SSH",
        );
        rule(
            &mut out,
            !unique(self.guardrails.iter().map(|g| g.name.as_str())),
            "guardrail names must be unique",
        );
        if let Some(k) = &self.kubernetes {
            rule(
                &mut out,
                k.tls.mode != TlsMode::VerifyFull,
                "spec.kubernetes.tls.mode must be VerifyFull: agentgate sends the agent's requests (and its own credential) to an API server only over TLS that names it",
            );
            tls(&mut out, &k.tls);
        }
        if let Some(p) = &self.postgres {
            tls(&mut out, &p.tls);
        }
        rule(
            &mut out,
            !within(
                &self.hold_timeout,
                Duration::ZERO,
                Duration::from_secs(3600),
            ),
            "spec.holdTimeout must be at most 1h",
        );
        for g in &self.guardrails {
            rule(
                &mut out,
                g.operations.is_empty() && g.matches.is_empty(),
                "a guardrail must match something: set operations or matches",
            );
            rule(
                &mut out,
                !unique(g.operations.iter().map(|o| o.as_str())),
                "operations must not repeat a class",
            );
        }
        out
    }
}

impl Validate for MaskPolicySpec {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        rule(
            &mut out,
            self.rules.iter().any(|r| r.action == MaskAction::Hash) && self.hash_key.is_none(),
            "spec.hashKey is required when a rule uses the Hash action",
        );
        rule(
            &mut out,
            !unique(self.rules.iter().map(|r| r.name.as_str())),
            "rule names must be unique",
        );
        for r in &self.rules {
            rule(
                &mut out,
                r.columns.is_empty()
                    && r.detectors.is_empty()
                    && r.patterns.is_empty()
                    && r.kubernetes.is_empty(),
                "a rule must match something: set columns, detectors, patterns or kubernetes",
            );
            rule(
                &mut out,
                r.action != MaskAction::Partial && r.keep_last.is_some(),
                "keepLast applies only to the Partial action",
            );
            rule(
                &mut out,
                r.action != MaskAction::Redact && r.replacement.is_some(),
                "replacement applies only to the Redact action",
            );
        }
        out
    }
}

impl Validate for AccessGrantSpec {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let week = Duration::from_secs(168 * 3600);
        rule(
            &mut out,
            !within(&self.duration, Duration::from_secs(10), week),
            "spec.duration must be between 10s and 168h",
        );
        rule(
            &mut out,
            !within(&self.pending_ttl, Duration::from_secs(10), week),
            "spec.pendingTTL must be between 10s and 168h",
        );
        rule(
            &mut out,
            self.revocation.is_some()
                && self
                    .decision
                    .as_ref()
                    .is_some_and(|d| d.verdict != Verdict::Approve),
            "spec.revocation applies to approved or pending grants; a denied grant cannot be revoked",
        );
        scope(&mut out, &self.scope);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{AccessGrant, AgentIdentity, MaskPolicy, Target};
    use std::collections::BTreeSet;

    /// Every rule message of the generated CRDs that needs no old object.
    fn crd_messages() -> BTreeSet<String> {
        fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::Array(rules)) = m.get("x-kubernetes-validations")
                    {
                        for r in rules {
                            let text = r["rule"].as_str().unwrap_or_default();
                            if !text.contains("oldSelf") {
                                out.insert(r["message"].as_str().unwrap_or_default().to_owned());
                            }
                        }
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        let mut out = BTreeSet::new();
        for crd in crate::generate::crds() {
            walk(&serde_json::to_value(&crd).unwrap(), &mut out);
        }
        out
    }

    fn problems(yaml: &str) -> Vec<String> {
        let v: serde_json::Value = serde_norway::from_str(yaml).expect(yaml);
        match v["kind"].as_str().unwrap() {
            "AgentIdentity" => serde_json::from_value::<AgentIdentity>(v)
                .expect(yaml)
                .spec
                .problems(),
            "Target" => serde_json::from_value::<Target>(v)
                .expect(yaml)
                .spec
                .problems(),
            "MaskPolicy" => serde_json::from_value::<MaskPolicy>(v)
                .expect(yaml)
                .spec
                .problems(),
            "AccessGrant" => serde_json::from_value::<AccessGrant>(v)
                .expect(yaml)
                .spec
                .problems(),
            k => panic!("{k}"),
        }
    }

    const ID: &str = "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: a}\nspec: {owner: o, ";
    const TARGET: &str =
        "apiVersion: agentgate.dev/v1alpha1\nkind: Target\nmetadata: {name: t}\nspec: {";
    const PG: &str = "postgres: {host: h, database: d, credentials: {name: c}}";
    const MASK: &str =
        "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: {name: m}\nspec: {";
    const GRANT: &str = "apiVersion: agentgate.dev/v1alpha1\nkind: AccessGrant\nmetadata: {name: g}\nspec: {identity: a, target: t, reason: r, ";

    #[test]
    fn every_rule_of_the_crds_holds_without_an_api_server() {
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{ID}authentication: {{}}}}"),
                "authentication needs serviceAccount or oidc (or both)",
            ),
            (
                format!("{ID}authentication: {{oidc: {{issuer: 'https://idp', audience: x}}}}}}"),
                "oidc needs a subject or at least one claim: otherwise every token of the issuer would match",
            ),
            (
                format!(
                    "{ID}authentication: {{serviceAccount: {{name: s}}}}, maxGrantDuration: 30s}}"
                ),
                "maxGrantDuration must be between 1m and 168h",
            ),
            (
                format!(
                    "{ID}authentication: {{serviceAccount: {{name: s}}}}, baseline: [{{target: t, scope: {{operations: [Read, Read]}}}}]}}"
                ),
                "operations must not repeat a class",
            ),
            (
                format!("{TARGET}protocol: SSH}}"),
                "spec.ssh is required exactly when protocol is SSH",
            ),
            (
                format!("{TARGET}protocol: Kubernetes, {PG}}}"),
                "spec.postgres is required exactly when protocol is Postgres",
            ),
            (
                format!(
                    "{TARGET}protocol: Postgres, {PG}, kubernetes: {{server: 'https://k', credentials: {{name: c}}}}}}"
                ),
                "spec.kubernetes is required exactly when protocol is Kubernetes",
            ),
            (
                format!(
                    "{TARGET}protocol: Kubernetes, kubernetes: {{server: 'https://k', credentials: {{name: c}}, tls: {{mode: VerifyCA}}}}}}"
                ),
                "spec.kubernetes.tls.mode must be VerifyFull: agentgate sends the agent's requests (and its own credential) to an API server only over TLS that names it",
            ),
            (
                format!(
                    "{TARGET}protocol: Postgres, postgres: {{host: h, database: d, credentials: {{name: c}}, tls: {{mode: Disable, ca: {{name: s, key: k}}}}}}}}"
                ),
                "tls.ca applies only when mode is VerifyCA or VerifyFull",
            ),
            (
                format!("{TARGET}protocol: Postgres, {PG}, holdTimeout: 2h}}"),
                "spec.holdTimeout must be at most 1h",
            ),
            (
                format!(
                    "{TARGET}protocol: Postgres, {PG}, guardrails: [{{name: g, action: Block}}]}}"
                ),
                "a guardrail must match something: set operations or matches",
            ),
            (
                format!(
                    "{TARGET}protocol: Postgres, {PG}, guardrails: [{{name: g, matches: [x], action: Block}}, {{name: g, matches: [y], action: Block}}]}}"
                ),
                "guardrail names must be unique",
            ),
            (
                format!("{MASK}rules: [{{name: r, detectors: [Email], action: Hash}}]}}"),
                "spec.hashKey is required when a rule uses the Hash action",
            ),
            (
                format!(
                    "{MASK}rules: [{{name: r, detectors: [Email], action: Redact}}, {{name: r, detectors: [Email], action: Redact}}]}}"
                ),
                "rule names must be unique",
            ),
            (
                format!("{MASK}rules: [{{name: r, action: Redact}}]}}"),
                "a rule must match something: set columns, detectors, patterns or kubernetes",
            ),
            (
                format!(
                    "{MASK}rules: [{{name: r, detectors: [Email], action: Redact, keepLast: 4}}]}}"
                ),
                "keepLast applies only to the Partial action",
            ),
            (
                format!(
                    "{MASK}rules: [{{name: r, detectors: [Email], action: SetNull, replacement: x}}]}}"
                ),
                "replacement applies only to the Redact action",
            ),
            (
                format!("{GRANT}scope: {{operations: [Read]}}, duration: 5s}}"),
                "spec.duration must be between 10s and 168h",
            ),
            (
                format!("{GRANT}scope: {{operations: [Read]}}, pendingTTL: 200h}}"),
                "spec.pendingTTL must be between 10s and 168h",
            ),
            (
                format!(
                    "{GRANT}scope: {{operations: [Read]}}, decision: {{verdict: Deny}}, revocation: {{reason: r}}}}"
                ),
                "spec.revocation applies to approved or pending grants; a denied grant cannot be revoked",
            ),
        ];
        let mut covered = BTreeSet::new();
        for (yaml, message) in &cases {
            let found = problems(yaml);
            assert!(
                found.iter().any(|m| m == message),
                "{yaml}\nwanted {message}\ngot {found:?}"
            );
            covered.insert((*message).to_owned());
        }
        let empty = problems(&format!(
            "{ID}authentication: {{oidc: {{issuer: 'https://idp', audience: x, subject: ''}}}}}}"
        ));
        assert!(
            empty
                .iter()
                .any(|m| m == "oidc.subject and oidc.claims must not be empty"),
            "{empty:?}"
        );
        let missing: Vec<_> = crd_messages().difference(&covered).cloned().collect();
        assert!(
            missing.is_empty(),
            "CRD rules without their twin in validate.rs (or a case here): {missing:?}"
        );
        // Valid objects have no problems.
        for ok in [
            format!(
                "{ID}authentication: {{oidc: {{issuer: 'https://idp', audience: x, subject: s}}}}}}"
            ),
            format!(
                "{TARGET}protocol: Postgres, {PG}, guardrails: [{{name: g, matches: [x], action: Block}}]}}"
            ),
            format!(
                "{MASK}rules: [{{name: r, detectors: [Email], action: Partial, keepLast: 4}}]}}"
            ),
            format!("{GRANT}scope: {{operations: [Read, Write]}}, duration: 15m}}"),
        ] {
            assert_eq!(problems(&ok), Vec::<String>::new(), "{ok}");
        }
    }
}
