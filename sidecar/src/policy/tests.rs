use std::path::Path;

use jiff::Timestamp;

use super::*;
use crate::sql::classify;

const POLICY: &str = r#"
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: { name: orders-db }
spec:
  protocol: Postgres
  postgres: { host: 127.0.0.1, database: app, credentials: { name: c } }
  guardrails:
    - { name: no-drop-table, matches: ["DROP TABLE"], action: Block, message: ask the owning team }
    - { name: inserts-go-by-scope, operations: [Write], matches: ["INSERT"], action: Allow }
---
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: { name: ledger-db }
spec:
  protocol: Postgres
  postgres: { host: 127.0.0.1, database: ledger, credentials: { name: c } }
  guardrails:
    - { name: ledger-writes-need-grant, operations: [Write], action: RequireGrant }
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: { name: claude }
spec:
  owner: team
  authentication: { serviceAccount: { name: claude } }
  baseline:
    - { target: orders-db, scope: { operations: [Read] } }
    - { target: ledger-db, scope: { operations: [Read, Write] } }
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: { name: off }
spec:
  owner: team
  disabled: true
  authentication: { serviceAccount: { name: off } }
"#;

const GRANTS: &str = r#"
apiVersion: agentgate.dev/v1alpha1
kind: AccessGrant
metadata: { name: write-orders, creationTimestamp: "2026-11-22T09:30:00Z" }
spec:
  identity: claude
  target: orders-db
  scope: { operations: [Write], tables: [public.orders] }
  duration: 1h
  reason: fix
  decision: { verdict: Approve, decidedAt: "2026-11-22T10:00:00Z", decidedBy: { username: alice } }
status: { phase: Active, expiresAt: "2026-11-22T11:00:00Z" }
---
apiVersion: agentgate.dev/v1alpha1
kind: AccessGrant
metadata: { name: old-write, creationTimestamp: "2026-11-21T09:30:00Z" }
spec:
  identity: claude
  target: orders-db
  scope: { operations: [Write] }
  duration: 1h
  reason: old
  decision: { verdict: Approve, decidedAt: "2026-11-21T10:00:00Z" }
status: { phase: Active }
---
apiVersion: agentgate.dev/v1alpha1
kind: AccessGrant
metadata: { name: wipe-sessions, creationTimestamp: "2026-11-22T09:30:00Z" }
spec:
  identity: claude
  target: orders-db
  scope: { operations: [Write] }
  duration: 1h
  reason: cleanup
  command: { text: "DELETE FROM sessions", fingerprint: FP }
  decision: { verdict: Approve, decidedAt: "2026-11-22T10:00:00Z" }
---
apiVersion: agentgate.dev/v1alpha1
kind: AccessGrant
metadata: { name: revoked, creationTimestamp: "2026-11-22T09:30:00Z" }
spec:
  identity: claude
  target: orders-db
  scope: { operations: [Write, DDL] }
  duration: 1h
  reason: r
  decision: { verdict: Approve, decidedAt: "2026-11-22T10:00:00Z" }
  revocation: { reason: done }
---
apiVersion: agentgate.dev/v1alpha1
kind: AccessGrant
metadata: { name: undated, creationTimestamp: "2026-11-22T09:30:00Z" }
spec:
  identity: claude
  target: orders-db
  scope: { operations: [Admin] }
  reason: r
  decision: { verdict: Approve }
---
kind: Kustomization
apiVersion: kustomize.config.k8s.io/v1beta1
resources: [policy.yaml]
"#;

fn now() -> Timestamp {
    "2026-11-22T10:30:00Z".parse().unwrap()
}

fn snapshot() -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    std::fs::create_dir(dir.path().join("grants")).unwrap();
    let fp = classify("DELETE FROM sessions").unwrap().fingerprint;
    std::fs::write(
        dir.path().join("grants/grants.yml"),
        GRANTS.replace("FP", fp.get()),
    )
    .unwrap();
    folder::load(dir.path()).unwrap()
}

fn decide_sql(s: Option<&Snapshot>, identity: &str, target: &str, sql: &str) -> Decision {
    let c = classify(sql).unwrap();
    decide(s, identity, target, &Command::from(&c), now())
}

fn check(sql: &str, target: &str, verdict: Verdict, rule: &str) {
    let s = snapshot();
    let d = decide_sql(Some(&s), "claude", target, sql);
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (verdict, rule),
        "{sql} on {target}: {d:?}"
    );
}

#[test]
fn fail_closed_on_missing_policy_identity_or_target() {
    let d = decide_sql(None, "claude", "orders-db", "SELECT 1");
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (Verdict::Refuse, "policy-not-loaded")
    );
    let s = snapshot();
    let d = decide_sql(Some(&s), "mallory", "orders-db", "SELECT 1");
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (Verdict::Refuse, "unknown-identity")
    );
    let d = decide_sql(Some(&s), "off", "orders-db", "SELECT 1");
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (Verdict::Refuse, "identity-disabled")
    );
    let d = decide_sql(Some(&s), "claude", "prod-db", "SELECT 1");
    assert_eq!(
        (d.verdict, d.rule.as_str()),
        (Verdict::Refuse, "unknown-target")
    );
}

#[test]
fn baseline_grants_and_scope() {
    check(
        "SELECT * FROM orders",
        "orders-db",
        Verdict::Allow,
        "baseline",
    );
    // An active grant for public.orders covers orders, not customers.
    let s = snapshot();
    let d = decide_sql(
        Some(&s),
        "claude",
        "orders-db",
        "UPDATE orders SET state = 'x' WHERE id = 1",
    );
    assert_eq!(
        (d.verdict, d.grant.as_deref()),
        (Verdict::Allow, Some("write-orders")),
        "{d:?}"
    );
    check(
        "UPDATE customers SET name = 'x' WHERE id = 1",
        "orders-db",
        Verdict::Hold,
        "not-in-scope",
    );
    check(
        "INSERT INTO public.orders (id) VALUES (1)",
        "orders-db",
        Verdict::Allow,
        "grant",
    );
    // A write CTE inside a read is a write.
    check(
        "WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT * FROM d",
        "orders-db",
        Verdict::Hold,
        "not-in-scope",
    );
}

#[test]
fn expired_revoked_and_undated_grants_do_not_count() {
    // old-write says Active in its status, but its clock ran out a day ago: the sidecar
    // judges expiry itself.
    let s = snapshot();
    let d = decide_sql(
        Some(&s),
        "claude",
        "orders-db",
        "UPDATE customers SET name = 'x' WHERE id = 1",
    );
    assert_eq!(d.verdict, Verdict::Hold, "{d:?}");
    assert!(!s.grants.contains_key("undated"));
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("AccessGrant undated is ignored")),
        "{:?}",
        s.warnings
    );
    // After write-orders expires at 11:00, the same update is held.
    let c = classify("UPDATE orders SET state = 'x' WHERE id = 1").unwrap();
    let later: Timestamp = "2026-11-22T11:00:01Z".parse().unwrap();
    let d = decide(Some(&s), "claude", "orders-db", &Command::from(&c), later);
    assert_eq!(d.verdict, Verdict::Hold, "{d:?}");
}

#[test]
fn guardrails_block_hold_and_require_grants() {
    check(
        "DROP TABLE orders",
        "orders-db",
        Verdict::Refuse,
        "no-drop-table",
    );
    check(
        "SELECT 1; DROP TABLE orders",
        "orders-db",
        Verdict::Refuse,
        "no-drop-table",
    );
    check(
        "DROP INDEX orders_idx",
        "orders-db",
        Verdict::Hold,
        "agentgate-hold-drop",
    );
    check(
        "SELECT pg_read_file('/etc/passwd')",
        "orders-db",
        Verdict::Refuse,
        "agentgate-block-admin",
    );
    check(
        "COPY orders TO PROGRAM 'curl x'",
        "orders-db",
        Verdict::Refuse,
        "agentgate-block-admin",
    );
    check(
        "SET ROLE postgres",
        "orders-db",
        Verdict::Refuse,
        "agentgate-block-privilege",
    );
    check(
        "DO $$ BEGIN PERFORM 1; END $$",
        "orders-db",
        Verdict::Hold,
        "agentgate-hold-exec",
    );
    // Every row: held even with a Write grant, unless the exact command was approved.
    check(
        "DELETE FROM orders",
        "orders-db",
        Verdict::Hold,
        "agentgate-hold-unbounded",
    );
    check(
        "UPDATE orders SET state = 'x' WHERE 1 = 1",
        "orders-db",
        Verdict::Hold,
        "agentgate-hold-unbounded",
    );
    check(
        "TRUNCATE orders",
        "orders-db",
        Verdict::Hold,
        "agentgate-hold-unbounded",
    );
    let s = snapshot();
    let d = decide_sql(
        Some(&s),
        "claude",
        "orders-db",
        "delete   from sessions -- approved",
    );
    assert_eq!(
        (d.verdict, d.grant.as_deref()),
        (Verdict::Allow, Some("wipe-sessions")),
        "{d:?}"
    );
    // ... and only that exact command.
    check(
        "DELETE FROM sessions WHERE true",
        "orders-db",
        Verdict::Hold,
        "agentgate-hold-unbounded",
    );
    // RequireGrant: the baseline allows writes on the ledger, the guardrail still wants a grant.
    check(
        "SELECT * FROM entries",
        "ledger-db",
        Verdict::Allow,
        "baseline",
    );
    check(
        "INSERT INTO entries VALUES (1)",
        "ledger-db",
        Verdict::Hold,
        "ledger-writes-need-grant",
    );
    // A guardrail with action Allow falls through to the scope check.
    check(
        "UPDATE orders SET state = 'x' WHERE id = 2",
        "orders-db",
        Verdict::Allow,
        "grant",
    );
}

#[test]
fn messages_say_what_happened() {
    let s = snapshot();
    let d = decide_sql(Some(&s), "claude", "orders-db", "DROP TABLE orders");
    assert_eq!(
        d.message,
        "refused by guardrail no-drop-table: ask the owning team"
    );
    let d = decide_sql(
        Some(&s),
        "claude",
        "orders-db",
        "UPDATE customers SET a = 1 WHERE id = 1",
    );
    assert_eq!(
        d.message,
        "no baseline or active grant allows Write on orders-db (customers)"
    );
}

#[test]
fn folder_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "a.yaml",
        "apiVersion: agentgate.dev/v1alpha1\nkind: Target\nmetadata: {name: t}\nspec: {protocol: Telnet}\n",
    );
    let e = folder::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("a.yaml") && e.contains("document 1") && e.contains("Telnet"),
        "{e}"
    );
    write("a.yaml", "key: [unclosed\n");
    let e = folder::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("a.yaml"), "{e}");
    write(
        "a.yaml",
        "apiVersion: agentgate.dev/v1alpha1\nkind: Widget\nmetadata: {name: w}\n",
    );
    let e = folder::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("unknown kind Widget"), "{e}");
    write("a.yaml", POLICY);
    write("b.yaml", POLICY);
    let e = folder::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("defined twice"), "{e}");
    assert!(folder::load(Path::new("/nonexistent/agentgate")).is_err());
    // The CRDs' own rules hold without an API server: an oidc identity naming neither a
    // subject nor a claim (every token of its issuer would be it) is refused.
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    write(
        "a.yaml",
        "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: anyone}\nspec: {owner: o, authentication: {oidc: {issuer: 'https://accounts.example.com', audience: app}}}\n",
    );
    let e = folder::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("AgentIdentity anyone")
            && e.contains("oidc needs a subject or at least one claim"),
        "{e}"
    );
}

#[test]
fn masks_apply_by_target_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        r#"
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: { name: everywhere }
spec: { rules: [ { name: e, detectors: [Email], action: Redact } ] }
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: { name: orders-only }
spec: { targets: ["orders-*"], identities: [claude], rules: [ { name: c, columns: ["*.card"], action: Partial, keepLast: 4 } ] }
"#,
    )
    .unwrap();
    let s = folder::load(dir.path()).unwrap();
    let names = |t: &str, i: &str| {
        masks_for(&s, i, t)
            .iter()
            .map(|m| m.metadata.name.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(names("orders-db", "claude"), ["everywhere", "orders-only"]);
    assert_eq!(names("ledger-db", "claude"), ["everywhere"]);
    assert_eq!(names("orders-db", "gpt"), ["everywhere"]);
}

#[tokio::test]
async fn the_folder_reloads_on_change_and_keeps_the_last_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
    let store = Arc::new(PolicyStore::default());
    let task = tokio::spawn(folder::watch(
        dir.path().to_owned(),
        store.clone(),
        std::time::Duration::from_millis(20),
    ));
    let wait = |f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    tokio::task::spawn_blocking({
        let store = store.clone();
        let dir = dir.path().to_owned();
        move || {
            wait(&|| store.get().is_some_and(|s| s.identities.len() == 2));
            // A disabled identity takes effect on reload.
            std::fs::write(dir.join("p.yaml"), POLICY.replace("owner: team\n  authentication: { serviceAccount: { name: claude } }", "owner: team\n  disabled: true\n  authentication: { serviceAccount: { name: claude } }")).unwrap();
            wait(&|| store.get().is_some_and(|s| s.identities.get("claude").is_some_and(|i| i.spec.disabled)));
            // A broken edit keeps the last good policy and reports the error.
            std::fs::write(dir.join("p.yaml"), "kind: [").unwrap();
            wait(&|| store.error().is_some());
            assert!(store.get().is_some_and(|s| s.identities.get("claude").is_some_and(|i| i.spec.disabled)));
        }
    })
    .await
    .unwrap();
    task.abort();
}

#[test]
fn a_scope_limited_with_another_protocols_settings_covers_nothing() {
    let scope = |extra: serde_json::Value| -> AccessScope {
        let mut v = serde_json::json!({ "operations": ["Read", "Write"] });
        for (k, x) in extra.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    };
    let sql = Command::from(&classify::classify("UPDATE orders SET a = 1 WHERE id = 1").unwrap());
    let pods = serde_json::json!({ "kubernetes": [{ "verbs": ["get"], "resources": ["pods"] }] });
    let ssh = serde_json::json!({ "ssh": { "commands": ["uptime"] } });
    let tables = serde_json::json!({ "tables": ["orders"] });
    // PostgreSQL: Kubernetes rules or SSH settings would be ignored, leaving every table.
    assert!(covers(&scope(serde_json::json!({})), &sql));
    assert!(covers(&scope(tables.clone()), &sql));
    assert!(!covers(&scope(pods.clone()), &sql));
    assert!(!covers(&scope(ssh.clone()), &sql));
    // Kubernetes: tables or SSH settings.
    let mut get = sql.clone();
    get.class = OperationClass::Read;
    get.kube = Some(KubeAccess {
        verb: "get".into(),
        resource: "pods".into(),
        namespace: "shop".into(),
        ..Default::default()
    });
    assert!(covers(&scope(pods), &get));
    assert!(!covers(&scope(tables.clone()), &get));
    assert!(!covers(&scope(ssh.clone()), &get));
    // SSH: tables or Kubernetes rules.
    let mut cmd = sql.clone();
    cmd.class = OperationClass::Read;
    cmd.ssh = Some(SshAccess {
        login: "deploy".into(),
        default_login: "deploy".into(),
        commands: vec!["uptime".into()],
        forwarding: None,
    });
    assert!(covers(&scope(ssh), &cmd));
    assert!(!covers(&scope(tables), &cmd));
}

#[test]
fn tables_resolved_on_the_search_path_are_judged_as_resolved() {
    let scope = |tables: &[&str]| AccessScope {
        operations: vec![OperationClass::Read],
        tables: tables.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    };
    let resolved = |sql: &str, to: Result<Vec<&str>, &str>| {
        let mut c = classify(sql).expect("classified");
        let name = c.statements[0]
            .relations
            .iter()
            .next()
            .cloned()
            .expect("a relation");
        let mut map = crate::sql::Resolved::new();
        map.insert(
            name,
            to.map(|v| v.iter().map(|s| (*s).to_owned()).collect())
                .map_err(std::sync::Arc::from),
        );
        c.resolved = Some(std::sync::Arc::new(map));
        Command::from(&c)
    };
    // As written: an unqualified name is read as public's.
    let plain = Command::from(&classify("SELECT * FROM orders").expect("classified"));
    assert!(covers(&scope(&["public.orders"]), &plain));
    // Resolved to another schema: judged there.
    let other = resolved("SELECT * FROM orders", Ok(vec!["secret.orders"]));
    assert_eq!(other.tables, ["secret.orders".to_owned()].into());
    assert!(!covers(&scope(&["public.orders", "orders"]), &other));
    assert!(covers(&scope(&["secret.*"]), &other));
    // More than one table it may be: every one must be covered.
    let both = resolved(
        "SELECT * FROM orders",
        Ok(vec!["public.orders", "secret.orders"]),
    );
    assert!(!covers(&scope(&["public.orders"]), &both));
    assert!(covers(&scope(&["public.orders", "secret.orders"]), &both));
    // A schema that cannot be told: only a pattern for any schema covers it, and the
    // message says how to go on.
    let unknown = resolved("SELECT * FROM orders", Err("the path is not known"));
    assert!(!covers(&scope(&["public.orders", "orders", "*"]), &unknown));
    assert!(covers(&scope(&["*.orders"]), &unknown));
    assert!(covers(&scope(&["*.*"]), &unknown));
    let d = allow_by_scope(None, false, None, &unknown, "db");
    assert!(
        d.message.contains("the path is not known")
            && d.message.contains("name tables with their schema"),
        "{}",
        d.message
    );
    // A name holding a dot is one quoted name, never a schema and a table.
    let dotted = Command::from(&classify("SELECT * FROM \"public.orders\"").expect("classified"));
    assert_eq!(dotted.tables, ["\"public.orders\"".to_owned()].into());
    assert!(!covers(&scope(&["public.orders"]), &dotted));
    assert_eq!(
        crate::sql::classify::unqualified("\"public.orders\"").as_deref(),
        Some("public.orders")
    );
    assert_eq!(crate::sql::classify::unqualified("public.orders"), None);
    assert_eq!(crate::sql::classify::unqualified("\"a\".\"b\""), None);
}

#[test]
fn a_guardrail_that_allows_must_allow_every_statement_of_a_string() {
    // `inserts-go-by-scope` allows INSERTs by scope; an UPDATE of every row riding along
    // in the same string is still held by the default guardrail.
    check(
        "INSERT INTO orders VALUES (1); UPDATE orders SET state = 'x'",
        "orders-db",
        Verdict::Hold,
        "agentgate-hold-unbounded",
    );
    check(
        "INSERT INTO orders VALUES (1); INSERT INTO orders VALUES (2)",
        "orders-db",
        Verdict::Allow,
        "grant",
    );
    check(
        "INSERT INTO orders VALUES (1)",
        "orders-db",
        Verdict::Allow,
        "grant",
    );
    // A search path change has a key of its own, for a guardrail that allows just that.
    let set = Command::from(&classify("SET search_path = app").unwrap());
    assert!(set.keys.contains("SET search_path"), "{:?}", set.keys);
    let role = Command::from(&classify("SET ROLE admin").unwrap());
    assert!(!role.keys.contains("SET search_path"), "{:?}", role.keys);
}

#[test]
fn each_simple_command_of_a_shell_line_meets_the_guardrails() {
    use crate::gateway::ssh::command;
    let target: agentgate_crds::target::Target = serde_json::from_value(serde_json::json!({
        "apiVersion": "agentgate.dev/v1alpha1",
        "kind": "Target",
        "metadata": { "name": "web" },
        "spec": {
            "protocol": "SSH",
            "ssh": { "host": "127.0.0.1", "port": 22, "user": "web", "knownHosts": "k", "credentials": { "name": "c" } },
            "guardrails": [ { "name": "status-is-fine", "matches": ["systemctl status *"], "action": "Allow" } ]
        }
    }))
    .unwrap();
    let mut s = snapshot();
    s.targets.insert("web".into(), target);
    let id = s.identities.get_mut("claude").unwrap();
    id.spec.baseline.push(
        serde_json::from_value(serde_json::json!({
            "target": "web", "scope": { "operations": ["Read", "Write", "Exec", "Admin"] }
        }))
        .unwrap(),
    );
    let decide_line = |line: &str| {
        let home = [Some("~".to_owned())];
        let parsed = command::classify_in(line, &home).unwrap();
        let cmd = Command {
            class: parsed.class,
            fingerprint: crate::sql::Fingerprint::known("f".into()),
            keys: parsed.keys.clone(),
            tables: Default::default(),
            unresolved: None,
            parts: command::parts(&parsed, &parsed.keys, &home),
            kube: None,
            ssh: None,
        };
        decide(Some(&s), "claude", "web", &cmd, now())
    };
    assert_eq!(
        decide_line("systemctl status nginx").verdict,
        Verdict::Allow
    );
    // The allowed command does not carry another past the default guardrails.
    let d = decide_line("systemctl status nginx; rm -rf /");
    assert_eq!(d.verdict, Verdict::Refuse, "{d:?}");
}
