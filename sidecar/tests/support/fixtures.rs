//! Policy manifests shared by the PostgreSQL gateway's tests and the load driver.

/// The Target `orders-db`: database `app` on the test PostgreSQL at `pg_port`, verified TLS,
/// credentials from `orders-db-credentials`, and one guardrail (`DROP TABLE` is blocked).
pub fn orders_db(pg_port: u16) -> String {
    format!(
        r#"apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: orders-db }}
spec:
  protocol: Postgres
  postgres:
    host: 127.0.0.1
    port: {pg_port}
    database: app
    tls: {{ mode: VerifyFull, ca: {{ name: pg, key: ca.crt }} }}
    credentials: {{ name: orders-db-credentials }}
  guardrails:
    - {{ name: no-drop-table, matches: ["DROP TABLE"], action: Block, message: dropping tables is never allowed for agents }}
"#
    )
}
