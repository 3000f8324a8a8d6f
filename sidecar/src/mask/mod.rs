//! Masking: MaskPolicies compiled into a [`MaskSet`] that decides, for every value, whether it
//! reaches the agent in clear.
//!
//! Rules are tried in order. A rule that matches the value's *source column* (resolved by the
//! gateway through aliases, expressions and views) masks the whole value and decides. Detector
//! and pattern rules then look inside the value and mask the parts they find, wherever the
//! value came from. Masking never fails open: a policy that cannot be compiled (a pattern that
//! does not compile, a missing hash key) makes the gateway refuse the traffic it covers.

pub mod detect;

use agentgate_crds::common::SecretKeyRef;
use agentgate_crds::{Detector, MaskAction, MaskPolicy};
use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;

use crate::policy::glob;

/// Why policies could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    /// A custom pattern does not compile.
    #[error("MaskPolicy {policy} rule {rule}: pattern {index} does not compile: {message}")]
    Pattern {
        /// The policy.
        policy: String,
        /// The rule.
        rule: String,
        /// The pattern's index.
        index: usize,
        /// The compiler's message.
        message: String,
    },
    /// A `Hash` rule has no usable key.
    #[error(
        "MaskPolicy {policy} rule {rule}: the hash key {secret}/{key} is missing or shorter than 32 bytes"
    )]
    HashKey {
        /// The policy.
        policy: String,
        /// The rule.
        rule: String,
        /// The Secret.
        secret: String,
        /// The key inside it.
        key: String,
    },
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `policy/rule`, as records name it.
    pub name: String,
    columns: Vec<String>,
    detectors: Vec<Detector>,
    patterns: Vec<Regex>,
    kubernetes: Vec<agentgate_crds::mask::KubernetesFieldMatch>,
    action: MaskAction,
    keep_last: usize,
    replacement: String,
    hash_key: Option<Vec<u8>>,
}

/// What masking did to a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masked {
    /// Nothing matched: the value passes unchanged.
    Clear,
    /// Replaced by this text.
    Text(String),
    /// Replaced by NULL.
    Null,
}

/// The compiled MaskPolicies for one identity and target.
#[derive(Debug, Clone, Default)]
pub struct MaskSet {
    rules: Vec<Rule>,
}

/// A source column, as the gateway resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Column {
    /// Schema.
    pub schema: String,
    /// Table (or view).
    pub table: String,
    /// Column.
    pub column: String,
}

impl Column {
    fn matches(&self, pattern: &str) -> bool {
        let parts = pattern.split('.').count();
        let full = format!("{}.{}.{}", self.schema, self.table, self.column);
        let short = format!("{}.{}", self.table, self.column);
        match parts {
            1 => glob::matches(pattern, &self.column),
            2 => glob::matches(pattern, &short),
            _ => glob::matches(pattern, &full),
        }
    }
}

impl MaskSet {
    /// Compiles `policies` in order; `key` reads a hash key from its Secret.
    pub fn compile(
        policies: &[&MaskPolicy],
        key: &dyn Fn(&SecretKeyRef) -> Option<Vec<u8>>,
    ) -> Result<Self, MaskError> {
        let mut rules = Vec::new();
        for p in policies {
            let policy = p.metadata.name.clone().unwrap_or_default();
            for r in &p.spec.rules {
                let patterns = r
                    .patterns
                    .iter()
                    .enumerate()
                    .map(|(index, pat)| {
                        regex::RegexBuilder::new(pat)
                            .size_limit(1 << 20)
                            .build()
                            .map_err(|e| MaskError::Pattern {
                                policy: policy.clone(),
                                rule: r.name.clone(),
                                index,
                                message: e
                                    .to_string()
                                    .lines()
                                    .last()
                                    .unwrap_or_default()
                                    .to_owned(),
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let hash_key = if r.action == MaskAction::Hash {
                    let missing = || MaskError::HashKey {
                        policy: policy.clone(),
                        rule: r.name.clone(),
                        secret: p
                            .spec
                            .hash_key
                            .as_ref()
                            .map(|k| k.name.clone())
                            .unwrap_or_default(),
                        key: p
                            .spec
                            .hash_key
                            .as_ref()
                            .map(|k| k.key.clone())
                            .unwrap_or_default(),
                    };
                    let k = p.spec.hash_key.as_ref().and_then(key).ok_or_else(missing)?;
                    if k.len() < 32 {
                        return Err(missing());
                    }
                    Some(k)
                } else {
                    None
                };
                rules.push(Rule {
                    name: format!("{policy}/{}", r.name),
                    columns: r.columns.clone(),
                    detectors: r.detectors.clone(),
                    patterns,
                    kubernetes: r.kubernetes.clone(),
                    action: r.action,
                    keep_last: r.keep_last.unwrap_or(4) as usize,
                    replacement: r.replacement.clone().unwrap_or_else(|| "****".into()),
                    hash_key,
                });
            }
        }
        Ok(Self { rules })
    }

    /// Whether no rule exists (nothing is ever masked).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule that masks `column` as a whole, if any.
    pub fn column_rule(&self, column: &Column) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.columns.iter().any(|p| column.matches(p)))
    }

    /// The first rule that could mask some column of `schema.table` (for whole-row references
    /// such as `row_to_json(c)` or `c.*`).
    pub fn table_rule(&self, schema: &str, table: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.columns.iter().any(|p| {
                let parts: Vec<&str> = p.split('.').collect();
                match parts.as_slice() {
                    [_] => true,
                    [t, _] => glob::matches(t, table),
                    [s, t, ..] => glob::matches(s, schema) && glob::matches(t, table),
                    [] => false,
                }
            })
        })
    }

    /// The first rule that masks a value computed from what `statements` reference: a column
    /// under a column rule, or a whole row of a table that has one. Conservative: a reference
    /// that could be such a column counts. An alias may name several relations (it may be
    /// reused in another scope of the statement): a reference through it counts for each,
    /// and a one-part name that is an alias, or a relation's own name, is a whole row of
    /// each relation it may name (even when another relation has a column of that name).
    pub fn computed_rule(&self, statements: &[crate::sql::Statement]) -> Option<&Rule> {
        // `schema.table` → its parts; an unqualified name is read as `public`'s.
        let split = |rel: &str| -> (String, String) {
            match crate::sql::classify::relation_parts(rel) {
                (s, t) if s.is_empty() => ("public".to_owned(), t),
                parts => parts,
            }
        };
        // The rule for column `c` (`*`: any column) of `schema.table`.
        let qualified = |s: &str, t: &str, c: &str| {
            if c == "*" {
                self.table_rule(s, t)
            } else {
                self.column_rule(&Column {
                    schema: s.to_owned(),
                    table: t.to_owned(),
                    column: c.to_owned(),
                })
            }
        };
        for st in statements {
            let rels: Vec<(String, String)> = st.relations.iter().map(|r| split(r)).collect();
            // What a qualifier or a one-part name may name: every relation it is an alias
            // of, every relation of that table name; else the name itself as a relation.
            let named = |q: &str| -> Vec<(String, String)> {
                let mut out: Vec<(String, String)> = st
                    .aliases
                    .get(q)
                    .into_iter()
                    .flatten()
                    .map(|r| split(r))
                    .collect();
                out.extend(rels.iter().filter(|(_, t)| t == q).cloned());
                out
            };
            for fields in &st.columns {
                let found = match fields.as_slice() {
                    [one] if one == "*" => rels.iter().find_map(|(s, t)| self.table_rule(s, t)),
                    [one] => {
                        // A relation used as a whole row, or a column of any relation.
                        let as_row = named(one).iter().find_map(|(s, t)| self.table_rule(s, t));
                        as_row.or_else(|| {
                            rels.iter().find_map(|(s, t)| {
                                self.column_rule(&Column {
                                    schema: s.clone(),
                                    table: t.clone(),
                                    column: one.clone(),
                                })
                            })
                        })
                    }
                    [q, c] => {
                        let mut targets = named(q);
                        if targets.is_empty() {
                            targets.push(split(q));
                        }
                        targets.iter().find_map(|(s, t)| qualified(s, t, c))
                    }
                    // `schema.table.column`, or with the database first: the last three.
                    [.., s, t, c] => qualified(s, t, c),
                    [] => None,
                };
                if found.is_some() {
                    return found;
                }
            }
        }
        None
    }

    /// The first rule that masks by column: what masks a computed value whose origin the
    /// gateway cannot tell (a cursor's rows, a renamed column over a masked relation).
    pub fn first_column_rule(&self) -> Option<&Rule> {
        self.rules.iter().find(|r| !r.columns.is_empty())
    }

    /// Whether any rule masks by column.
    pub fn has_column_rules(&self) -> bool {
        self.rules.iter().any(|r| !r.columns.is_empty())
    }

    /// The rules with Kubernetes field paths for objects of `group`/`kind`, each with its
    /// paths.
    pub fn kube_paths(&self, group: &str, kind: &str) -> Vec<(&Rule, &str)> {
        let mut out = Vec::new();
        for r in &self.rules {
            for m in &r.kubernetes {
                if (m.api_group == "*" || m.api_group == group)
                    && (m.kind == "*" || m.kind.eq_ignore_ascii_case(kind))
                {
                    out.extend(m.paths.iter().map(|p| (r, p.as_str())));
                }
            }
        }
        out
    }

    /// Whether any rule names Kubernetes field paths.
    pub fn has_kube_paths(&self) -> bool {
        self.rules.iter().any(|r| !r.kubernetes.is_empty())
    }

    /// Whether any rule looks inside values (detectors or patterns).
    pub fn has_value_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|r| !r.detectors.is_empty() || !r.patterns.is_empty())
    }

    /// Whether every value rule is a built-in detector (no MaskPolicy `patterns`, which may
    /// be anchored to a whole value): a text in which the detectors find nothing then holds
    /// no value any rule would mask, wherever it is cut.
    pub fn detectors_only(&self) -> bool {
        self.rules.iter().all(|r| r.patterns.is_empty())
    }

    /// Masks one text value from `column` (when known). Returns what to send and the rules
    /// that applied.
    pub fn mask(&self, column: Option<&Column>, value: &str) -> (Masked, Vec<String>) {
        if let Some(col) = column
            && let Some(rule) = self.column_rule(col)
        {
            return (rule.apply_whole(value), vec![rule.name.clone()]);
        }
        let mut text = value.to_owned();
        let mut applied = Vec::new();
        for rule in &self.rules {
            let mut spans: Vec<std::ops::Range<usize>> = rule
                .detectors
                .iter()
                .flat_map(|d| detect::find(*d, &text))
                .chain(
                    rule.patterns
                        .iter()
                        .flat_map(|p| p.find_iter(&text).map(|m| m.range())),
                )
                .filter(|r| !r.is_empty())
                .collect();
            if spans.is_empty() {
                continue;
            }
            applied.push(rule.name.clone());
            if rule.action == MaskAction::SetNull {
                return (Masked::Null, applied);
            }
            spans.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
            // Merge overlaps, then replace from the end so earlier offsets stay valid.
            let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
            for s in spans {
                match merged.last_mut() {
                    Some(last) if s.start <= last.end => last.end = last.end.max(s.end),
                    _ => merged.push(s),
                }
            }
            for s in merged.into_iter().rev() {
                let replaced = match rule.apply_whole(&text[s.clone()]) {
                    Masked::Text(t) => t,
                    Masked::Clear | Masked::Null => String::new(),
                };
                text.replace_range(s, &replaced);
            }
        }
        if applied.is_empty() {
            (Masked::Clear, applied)
        } else {
            (Masked::Text(text), applied)
        }
    }
}

impl Rule {
    /// The rule as it applies to a value computed from a masked column: Partial and Hash
    /// become Redact, since `substr(card, 1, 4)` keeping its last four, or the keyed hash of
    /// one character of a value, would give the value away piece by piece.
    pub fn for_computed(&self) -> Rule {
        let mut r = self.clone();
        if matches!(r.action, MaskAction::Partial | MaskAction::Hash) {
            r.action = MaskAction::Redact;
        }
        r
    }

    /// The rule's action on a whole value.
    pub fn apply_whole(&self, value: &str) -> Masked {
        match self.action {
            MaskAction::SetNull => Masked::Null,
            MaskAction::Redact => Masked::Text(self.replacement.clone()),
            MaskAction::Partial => Masked::Text(partial(value, self.keep_last)),
            MaskAction::Hash => {
                let key = self.hash_key.as_deref().unwrap_or_default();
                match Hmac::<Sha256>::new_from_slice(key) {
                    Ok(mut mac) => {
                        mac.update(value.as_bytes());
                        let out = mac.finalize().into_bytes();
                        Masked::Text(out.iter().map(|b| format!("{b:02x}")).collect())
                    }
                    // Unreachable with a compiled rule (the key was checked); never clear.
                    Err(_) => Masked::Text(self.replacement.clone()),
                }
            }
        }
    }
}

/// Keeps the last `keep` letters and digits; masks the other letters and digits with `*` and
/// keeps separators, so `4111-1111-1111-1111` becomes `****-****-****-1111`.
pub fn partial(value: &str, keep: usize) -> String {
    let total = value.chars().filter(|c| c.is_alphanumeric()).count();
    // Never reveal more than half of a short value.
    let keep = keep.min(total / 2);
    let mut seen = 0;
    value
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                seen += 1;
                if seen > total - keep { c } else { '*' }
            } else {
                c
            }
        })
        .collect()
}

/// MaskPolicies compiled per identity and Target, kept while the policy snapshot they were
/// compiled from is current (a new snapshot compiles them again).
#[derive(Debug, Default)]
pub struct MaskCache {
    #[allow(clippy::type_complexity)]
    compiled: std::sync::Mutex<
        std::collections::HashMap<
            (String, String),
            (
                std::sync::Arc<crate::policy::Snapshot>,
                std::sync::Arc<MaskSet>,
            ),
        >,
    >,
}

impl MaskCache {
    /// The MaskPolicies of `snapshot` that apply to `identity` on `target`, compiled; hash
    /// keys are read from `<targets_dir>/mask-keys/<Secret>/<key>`.
    pub fn get(
        &self,
        snapshot: &std::sync::Arc<crate::policy::Snapshot>,
        identity: &str,
        target: &str,
        targets_dir: &std::path::Path,
    ) -> Result<std::sync::Arc<MaskSet>, String> {
        let key = (identity.to_owned(), target.to_owned());
        if let Ok(m) = self.compiled.lock()
            && let Some((from, set)) = m.get(&key)
            && std::sync::Arc::ptr_eq(from, snapshot)
        {
            return Ok(set.clone());
        }
        let policies = crate::policy::masks_for(snapshot, identity, target);
        let set = std::sync::Arc::new(
            MaskSet::compile(&policies, &|k| {
                std::fs::read(targets_dir.join("mask-keys").join(&k.name).join(&k.key)).ok()
            })
            .map_err(|e| format!("a MaskPolicy is broken: {e}"))?,
        );
        if let Ok(mut m) = self.compiled.lock() {
            m.insert(key, (snapshot.clone(), set.clone()));
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod alias_tests {
    use super::*;

    /// Masks `public.customers.email` and `billing.orders.card` only.
    fn set() -> MaskSet {
        let p: MaskPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "MaskPolicy",
            "metadata": { "name": "pii" },
            "spec": { "rules": [
                { "name": "emails", "columns": ["public.customers.email"], "action": "Redact" },
                { "name": "cards", "columns": ["billing.orders.card"], "action": "Redact" }
            ] }
        }))
        .unwrap_or_else(|e| panic!("a policy: {e}"));
        MaskSet::compile(&[&p], &|_| None).unwrap_or_else(|e| panic!("compiles: {e}"))
    }

    fn computed(sql: &str) -> Option<String> {
        let c = crate::sql::classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        set().computed_rule(&c.statements).map(|r| r.name.clone())
    }

    #[test]
    fn an_alias_reused_for_another_relation_does_not_hide_a_whole_row() {
        for sql in [
            "SELECT (SELECT json_agg(state) FROM customers AS state) AS leak, \
             (SELECT 1 FROM orders AS state LIMIT 1) AS decoy",
            "SELECT (SELECT 1 FROM orders AS state LIMIT 1) AS decoy, \
             (SELECT json_agg(state) FROM customers AS state) AS leak",
            "SELECT (SELECT state.email FROM customers state LIMIT 1), \
             (SELECT 1 FROM orders state LIMIT 1)",
            "SELECT (SELECT row_to_json(x) FROM orders x), (SELECT 1 FROM public.customers x)",
            "SELECT (SELECT x.* FROM orders x LIMIT 1), (SELECT 1 FROM customers x)",
            // A relation's own name as a whole row.
            "SELECT row_to_json(customers) FROM customers",
        ] {
            assert_eq!(computed(sql).as_deref(), Some("pii/emails"), "{sql}");
        }
        for sql in [
            "SELECT (SELECT json_agg(state) FROM orders AS state)",
            "SELECT count(*) FROM customers",
            "SELECT lower(name) FROM customers c",
        ] {
            assert_eq!(computed(sql), None, "{sql}");
        }
    }

    #[test]
    fn a_qualifier_that_is_a_relations_name_means_that_relation() {
        // `orders.card` over `billing.orders`: not `public.orders`.
        assert_eq!(
            computed("SELECT lower(orders.card) FROM billing.orders").as_deref(),
            Some("pii/cards")
        );
        assert_eq!(
            computed("SELECT lower(o.card) FROM billing.orders o").as_deref(),
            Some("pii/cards")
        );
        // A four-part reference: database, schema, table, column.
        assert_eq!(
            computed("SELECT lower(app.billing.orders.card) FROM billing.orders").as_deref(),
            Some("pii/cards")
        );
        assert_eq!(computed("SELECT lower(o.note) FROM billing.orders o"), None);
    }
}
