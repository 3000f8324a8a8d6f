//! The PostgreSQL gateway, standalone (a folder of manifests), between real psql/pgbench and a
//! real PostgreSQL server with TLS and SCRAM.

#![allow(clippy::expect_used)]

#[path = "support/fixtures.rs"]
mod fixtures;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

struct Gateway {
    env: TestEnv,
    proc: Proc,
    port: u16,
    policy: tempfile::TempDir,
    _targets: tempfile::TempDir,
}

fn policy(pg_port: u16) -> String {
    format!(
        r#"{}---
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: md5-db }}
spec:
  protocol: Postgres
  postgres: {{ host: 127.0.0.1, port: {pg_port}, database: app, tls: {{ mode: Disable }}, credentials: {{ name: md5 }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: claude }}
spec:
  owner: team-orders
  authentication: {{ serviceAccount: {{ name: claude }} }}
  baseline:
    - {{ target: orders-db, scope: {{ operations: [Read] }} }}
    - {{ target: md5-db, scope: {{ operations: [Read] }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec:
  rules:
    - {{ name: names, columns: ["public.customers.name"], action: Redact, replacement: "[name]" }}
    - {{ name: secrets, columns: ["public.events.secret"], action: Redact, replacement: "[secret]" }}
    - {{ name: phones, columns: ["crm.contacts.phone"], action: Partial, keepLast: 2 }}
    - {{ name: emails, detectors: [Email], action: Redact }}
    - {{ name: cards, detectors: [CardNumber], action: Partial, keepLast: 4 }}
"#,
        fixtures::orders_db(pg_port)
    )
}

async fn start() -> anyhow::Result<Gateway> {
    start_with(&[]).await
}

/// Starts the environment and a sidecar with `sidecar_env` added to its environment.
async fn start_with(sidecar_env: &[(&str, String)]) -> anyhow::Result<Gateway> {
    let env = TestEnv::start_async(Parts {
        postgres: true,
        ..Default::default()
    })
    .await?;
    let pg = env.postgres()?;
    pg.psql_run(
        "app",
        "CREATE TABLE customers (id int PRIMARY KEY, email text, card text, name text);
         INSERT INTO customers VALUES (1, 'ada@example.com', '4111 1111 1111 1111', 'Ada'), (2, NULL, NULL, 'Bob');
         CREATE TABLE orders (id int PRIMARY KEY, state text, customer_id int);
         INSERT INTO orders VALUES (4711, 'paid', 1), (4712, 'paid', 2);
         CREATE VIEW customer_names AS SELECT id, name, upper(name) AS shout FROM customers;
         CREATE VIEW customer_ids AS SELECT id FROM customers;
         CREATE VIEW nested_names AS SELECT n.id, n.shout AS loud FROM customer_names n;
         GRANT ALL ON ALL TABLES IN SCHEMA public TO agentgate, agentgate_md5;",
    )?;
    let policy_dir = tempfile::tempdir()?;
    std::fs::write(policy_dir.path().join("policy.yaml"), policy(pg.port()))?;
    let targets = tempfile::tempdir()?;
    for (target, user) in [("orders-db", "agentgate"), ("md5-db", "agentgate_md5")] {
        pg.write_credentials(targets.path(), target, user)?;
    }
    let port = free_port()?;
    let spec = Spec::new("sidecar", env!("CARGO_BIN_EXE_agentgate-sidecar")).args([
        format!("--policy-dir={}", policy_dir.path().display()),
        "--identity=claude".into(),
        format!("--targets-dir={}", targets.path().display()),
        format!("--pg-addr=127.0.0.1:{port}"),
        format!(
            "--pg-socket-dir={}",
            env.dir().join(format!("sock-{port}")).display()
        ),
        "--kube-addr=127.0.0.1:0".into(),
        "--ssh-addr=127.0.0.1:0".into(),
        format!(
            "--audit-dir={}",
            env.dir().join(format!("audit-{port}")).display()
        ),
    ]);
    let spec = sidecar_env
        .iter()
        .fold(spec, |spec, (k, v)| spec.env(k, v.clone()));
    let mut proc = Proc::start(spec, &env.dir().join("logs"))?;
    testenv::process::wait_listening(&mut proc, port, Duration::from_secs(20))?;
    Ok(Gateway {
        env,
        proc,
        port,
        policy: policy_dir,
        _targets: targets,
    })
}

impl Gateway {
    /// A tokio-postgres client through the gateway (as agent `claude` on `orders-db`); its
    /// connection runs on a task of its own.
    async fn client(
        &self,
    ) -> anyhow::Result<(
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    )> {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable",
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await?;
        Ok((client, tokio::spawn(conn)))
    }

    fn psql(&self, db: &str, sql: &str) -> Output {
        Command::new(self.env.bins.pg_bin.join("psql"))
            .arg(format!(
                "host=127.0.0.1 port={} dbname={db} user=claude sslmode=disable",
                self.port
            ))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql")
    }

    fn ok(&self, sql: &str) -> String {
        let out = self.psql("orders-db", sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn err(&self, sql: &str) -> String {
        let out = self.psql("orders-db", sql);
        assert!(
            !out.status.success(),
            "{sql} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each of `commands` as its own Query message, in one session.
fn psql_each(gw: &Gateway, commands: &[&str]) -> Output {
    let mut cmd = Command::new(gw.env.bins.pg_bin.join("psql"));
    cmd.arg(format!(
        "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable",
        gw.port
    ))
    .args(["-X", "-At", "-v", "ON_ERROR_STOP=1"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.output().expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masking_holds_against_renamed_columns_views_cursors_partitions_and_errors()
-> anyhow::Result<()> {
    let gw = start().await?;
    let pg = gw.env.postgres()?;
    pg.psql_run(
        "app",
        "CREATE TABLE events (id int, secret text) PARTITION BY RANGE (id);
         CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100);
         INSERT INTO events VALUES (1, 'S3CRET-VALUE');
         CREATE SCHEMA crm;
         CREATE TABLE crm.contacts (id int, phone text);
         INSERT INTO crm.contacts VALUES (1, '555-0100');
         GRANT USAGE ON SCHEMA crm TO agentgate;
         GRANT SELECT ON ALL TABLES IN SCHEMA public, crm TO agentgate;
         CREATE VIEW renamed AS SELECT id AS k, name AS n FROM customers;
         CREATE VIEW sub_view AS SELECT q.s, q.id FROM (SELECT name AS s, id FROM customers) q;
         CREATE VIEW cte_view AS
           WITH x AS (SELECT id, name AS s FROM customers) SELECT id, s FROM x;
         CREATE VIEW alias_view AS SELECT t.id FROM customers t(a, b, c, id);
         CREATE FUNCTION all_customers() RETURNS SETOF customers LANGUAGE sql STABLE
           AS $$ SELECT * FROM customers $$;
         CREATE FUNCTION first_name() RETURNS text LANGUAGE sql STABLE
           AS $$ SELECT name FROM customers ORDER BY id LIMIT 1 $$;
         CREATE FUNCTION twice(i int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT i * 2 $$;
         CREATE VIEW fn_view AS SELECT first_name() AS n;
         CREATE VIEW relabel AS SELECT id FROM (SELECT name AS id FROM customers) s;
         CREATE VIEW order_states AS SELECT s.state FROM (SELECT state FROM orders) s;
         GRANT SELECT ON renamed, sub_view, cte_view, alias_view, fn_view, relabel, order_states
           TO agentgate;
         CREATE FUNCTION scs_off() RETURNS text LANGUAGE sql STABLE
           AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$;
         CREATE FUNCTION touch_orders() RETURNS int LANGUAGE sql
           AS $$ UPDATE orders SET state = state WHERE id = 0 RETURNING 1 $$;
         CREATE FUNCTION touch_one(o orders) RETURNS int LANGUAGE sql
           AS $$ UPDATE orders SET state = state WHERE id = 0 RETURNING 1 $$;
         ANALYZE customers;",
    )?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    // Computed values over the masked column, however it is named.
    for sql in [
        // An alias that a subquery reuses for another table.
        "SELECT upper(c.name) FROM customers c WHERE c.id = 1 AND NOT EXISTS (SELECT 1 FROM orders c WHERE false)",
        "WITH z AS (SELECT 1 FROM orders c) SELECT upper(c.name) FROM customers c WHERE c.id = 1",
        // Columns renamed by an alias list.
        "SELECT n || '' FROM customers AS c(i, e, k, n) WHERE i = 1",
        // A join's alias, and a four-part name.
        "SELECT j.name || '' FROM (customers CROSS JOIN (SELECT 1) z) AS j WHERE j.id = 1",
        "SELECT upper(app.public.customers.name) FROM customers WHERE id = 1",
        // Views, also with renamed columns, and whole rows of them.
        "SELECT upper(name) FROM customer_names WHERE id = 1",
        "SELECT n || '!' FROM renamed WHERE k = 1",
        "SELECT row_to_json(r)::text FROM renamed r WHERE k = 1",
        "SELECT x FROM (SELECT name AS x FROM customers WHERE id = 1) s",
        // Views whose columns come out of a sub-select or a WITH query.
        "SELECT s FROM sub_view WHERE id = 1",
        "SELECT s FROM cte_view WHERE id = 1",
        "WITH x AS (SELECT name AS s FROM customers WHERE id = 1) SELECT s FROM x",
        "WITH customers AS (SELECT name AS s FROM customers WHERE id = 1) SELECT s || '' FROM customers",
        // An alias list that gives the masked column the name of one that is not.
        "SELECT t.id || '' FROM customers AS t(a, b, c, id) WHERE t.a = 1",
        "SELECT j.id || '' FROM (customers CROSS JOIN (SELECT 1) z) AS j(a, b, c, id) WHERE j.a = 1",
        "SELECT id FROM alias_view WHERE id = 'Ada'",
        // A view over a function of the database's own that reads the table.
        "SELECT n FROM fn_view",
        // A sub-select's output named like a column of the table it reads.
        "SELECT id FROM relabel LIMIT 1",
    ] {
        let out = gw.ok(sql);
        assert_eq!(out, "[name]", "{sql}");
    }
    // Columns that read nothing masked stay clear.
    assert_eq!(gw.ok("SELECT k + 1 FROM renamed WHERE k = 1"), "2");
    // Functions that are not the system's may run any code, whatever volatility they
    // declare: an approver decides (the agent's baseline does not cover Exec).
    for sql in [
        "SELECT name FROM all_customers() WHERE id = 1",
        "SELECT first_name()",
        "SELECT twice(21)",
    ] {
        let e = gw.err(sql);
        assert!(e.contains("held for approval"), "{sql}: {e}");
    }
    // (A view over a sub-select that reads a masked column masks all its columns: which
    // inner column an outer name carries is not followed.)
    assert_eq!(gw.ok("SELECT state FROM order_states LIMIT 1"), "paid");
    assert_eq!(
        gw.ok("WITH customers AS (SELECT 'clear' AS name) SELECT name || '' FROM customers"),
        "clear"
    );
    assert_eq!(gw.ok("SELECT count(*) FROM customers"), "2");
    // COPY of a view over the masked column, or of a column renamed by an alias list.
    for sql in [
        "COPY (SELECT * FROM customer_names) TO STDOUT",
        "COPY (SELECT t.id FROM customers AS t(a, b, c, id)) TO STDOUT",
    ] {
        let e = gw.err(sql);
        assert!(
            e.contains("agentgate refuses COPY of columns masked"),
            "{sql}: {e}"
        );
    }
    // Errors raised while the statement runs keep only their kind, whatever the SQLSTATE
    // and however they spell the value.
    for (sql, kind, value) in [
        (
            "SELECT to_tsquery('simple', ':' || name) FROM customers WHERE id = 1",
            "syntax error in tsquery",
            "Ada",
        ),
        (
            "SELECT translate(name, ' .', '__')::regoper FROM customers WHERE id = 1",
            "operator does not exist",
            "Ada",
        ),
        (
            "SELECT convert_to(chr(1024 + ascii(substr(name, 1, 1))), 'LATIN1') FROM customers WHERE id = 1",
            "character with byte sequence",
            "0xd1",
        ),
        (
            "SELECT get_byte('\\x00'::bytea, length(name) * 1000) FROM customers WHERE id = 1",
            "out of valid range",
            "3000",
        ),
        // A type's input function parses the value and points into it.
        (
            "SELECT ('int ' || quote_literal(translate(name, 'A', 'b')))::regtype FROM customers WHERE id = 1",
            "syntax error",
            "bda",
        ),
    ] {
        let e = gw.err(sql);
        assert!(e.contains(kind) && !e.contains(value), "{sql}: {e}");
    }
    // A syntax error in the agent's own statement still shows where it is.
    let e = gw.err("SELECT name FROM customers WHERE id = = 1");
    assert!(e.contains("syntax error at or near \"=\""), "{e}");
    // Other sessions' query texts, however they are read.
    let background = {
        let conn = format!(
            "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable",
            gw.port
        );
        let psql = gw.env.bins.pg_bin.join("psql");
        std::thread::spawn(move || {
            Command::new(psql)
                .arg(conn)
                .args(["-X", "-At", "-c", "SELECT pg_sleep(4), 'Ada-in-a-query'"])
                .output()
        })
    };
    wait_for("the background statement runs", || {
        gw.ok("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'") == "1"
    });
    for sql in [
        "SELECT query FROM pg_stat_get_activity(NULL) WHERE wait_event = 'PgSleep'",
        "SELECT (pg_stat_get_activity(NULL)).query LIMIT 1",
        "SELECT a.q FROM pg_stat_get_activity(NULL) AS a(d, p, u, an, st, q) WHERE a.q LIKE '%pg_sleep%'",
        "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s \
         WHERE pg_stat_get_backend_activity(s) LIKE '%pg_sleep%'",
    ] {
        let out = gw.ok(sql);
        assert!(!out.contains("Ada-in-a-query"), "{sql}: {out}");
    }
    background.join().expect("background psql")?;
    // SELECT … INTO in the first branch of a set operation creates a table: not a read.
    let e = gw.err("SELECT 1 AS a INTO agent_made UNION SELECT 2");
    assert!(!e.contains("SELECT 2"), "{e}");
    assert_eq!(gw.ok("SELECT to_regclass('agent_made') IS NULL"), "t");
    // A cursor's rows: its query was another message.
    let out = psql_each(
        &gw,
        &[
            "BEGIN",
            "DECLARE c CURSOR FOR SELECT upper(name), id FROM customers WHERE id = 1",
            "FETCH ALL FROM c",
            "COMMIT",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[name]|1") && !text.contains("ADA"), "{text}");
    // A partition of a masked table is masked like its parent.
    assert_eq!(gw.ok("SELECT secret FROM events_1"), "[secret]");
    assert_eq!(gw.ok("SELECT lower(secret) FROM events_1"), "[secret]");
    let e = gw.err("COPY events_1 TO STDOUT");
    assert!(
        e.contains("agentgate refuses COPY of columns masked by pii/secrets"),
        "{e}"
    );
    // Another schema: Partial on the column itself, Redact on what is computed from it.
    assert_eq!(gw.ok("SELECT phone FROM crm.contacts"), "***-**00");
    assert_eq!(
        gw.ok("SELECT lower(contacts.phone) FROM crm.contacts"),
        "****"
    );
    assert_eq!(
        gw.ok("SELECT '0000' || substr(phone, 1, 4) FROM crm.contacts"),
        "****"
    );
    // Planner statistics keep real values.
    let out = gw.ok(
        "SELECT histogram_bounds::text, histogram_bounds FROM pg_stats WHERE tablename = 'customers' AND attname = 'name'",
    );
    assert!(!out.contains("Ada") && out.contains("[name]"), "{out}");
    // Other sessions' query texts are masked; the rest of the activity view is not.
    let out = gw.ok("SELECT query, state FROM pg_stat_activity WHERE pid = pg_backend_pid()");
    assert_eq!(out, "[name]|active");
    // Errors that quote a value read from a masked column.
    for sql in [
        "SELECT now() AT TIME ZONE name FROM customers WHERE id = 1",
        "SELECT current_setting(name) FROM customers WHERE id = 1",
        "SELECT name::regclass FROM customers WHERE id = 1",
    ] {
        let e = gw.err(sql);
        assert!(!e.contains("Ada") && e.contains("hidden"), "{sql}: {e}");
    }
    // Guesses in the statement do not bring a value back: the error about the value has no
    // position in the statement.
    let e = gw.err("SELECT substr(name, 1, 1)::regclass FROM customers WHERE id = 1 /* A a */");
    assert!(!e.contains(r#""A""#) && e.contains("hidden"), "{e}");
    // What the agent's own statement named is still shown.
    let e = gw.err("SELECT * FROM no_such_table");
    assert!(
        e.contains(r#"relation "no_such_table" does not exist"#),
        "{e}"
    );
    let e = gw.err("SELECT name, nosuchcolumn FROM customers");
    assert!(e.contains(r#"column "nosuchcolumn" does not exist"#), "{e}");
    // SQL run from a string, and calls in attribute notation, are refused.
    let e = gw
        .err("SELECT word FROM ts_stat($$SELECT array_to_tsvector(ARRAY[name]) FROM customers$$)");
    assert!(e.contains("held for approval") && !e.contains("Ada"), "{e}");
    let e = gw.err("SELECT ('/etc/passwd'::text).pg_read_file");
    assert!(e.contains("agentgate-block-admin"), "{e}");
    // A volatile function the classifier does not know may change anything: held, however
    // it is spelled; harmless built-ins and stable functions run.
    for sql in [
        "SELECT touch_orders()",
        "SELECT public.TOUCH_ORDERS()",
        "SELECT * FROM orders WHERE id = touch_orders()",
        // In attribute notation.
        "SELECT o.touch_one FROM orders o",
        "SELECT (o).touch_one FROM orders o",
    ] {
        let e = gw.err(sql);
        assert!(
            e.contains("held for approval") && e.contains("agentgate-hold-exec"),
            "{sql}: {e}"
        );
    }
    assert_eq!(
        gw.ok("SELECT random() < 2, pg_table_size('orders') >= 0, length(md5('x'))"),
        "t|t|32"
    );
    // A function that could change the session's string rules (any function that is not
    // the system's, whatever volatility it declares) runs only once an approver decides.
    let e = gw.err("SELECT scs_off()");
    assert!(
        e.contains("held for approval") && e.contains("agentgate-hold-exec"),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_through_the_gateway() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });

    // Reads pass, masked in the protocol; NULL stays NULL.
    assert_eq!(
        gw.ok("SELECT id, email, card, name FROM customers ORDER BY id"),
        "1|****|**** **** **** 1111|[name]\n2|||[name]"
    );
    // Evasions of the value detectors: aliases, casts, functions, JSON.
    assert_eq!(
        gw.ok("SELECT upper(email)::varchar AS x FROM customers WHERE id = 1"),
        "****"
    );
    assert_eq!(
        gw.ok("SELECT row_to_json(o) FROM orders o WHERE id = 4711"),
        r#"{"id":4711,"state":"paid","customer_id":1}"#
    );
    assert_eq!(
        gw.ok("SELECT json_build_object('e', email) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = 4711"),
        r#"{"e" : "****"}"#
    );
    // A column rule follows the source column through aliases, casts, functions, whole rows.
    for (sql, want) in [
        ("SELECT name AS n FROM customers c WHERE id = 1", "[name]"),
        (
            "SELECT c.name::varchar(3) FROM customers c WHERE id = 1",
            "[name]",
        ),
        (
            "SELECT upper(name) || '!' FROM customers WHERE id = 1",
            "[name]",
        ),
        (
            "SELECT x.nm FROM (SELECT name AS nm FROM customers WHERE id = 1) x",
            "[name]",
        ),
        ("SELECT string_agg(name, ',') FROM customers", "[name]"),
        // A JSON result stays valid JSON: the whole value becomes a JSON string.
        (
            "SELECT row_to_json(c) FROM customers c WHERE id = 2",
            "\"[name]\"",
        ),
        ("SELECT json_agg(c.*) FROM customers c", "\"[name]\""),
        ("SELECT (SELECT name FROM customers WHERE id = 1)", "[name]"),
    ] {
        assert_eq!(gw.ok(sql), want, "{sql}");
    }
    // Errors that quote a value do not show a masked one.
    let e = gw.err("SELECT name::int FROM customers WHERE id = 1");
    assert!(
        e.contains("invalid input syntax for type integer: (the value is not shown"),
        "{e}"
    );
    assert!(!e.contains("Ada"), "{e}");
    let e = gw.err("SELECT email::int FROM customers WHERE id = 1");
    assert!(!e.contains("ada@example.com"), "{e}");
    // COPY TO STDOUT: value rules apply to each row; masked columns are refused, not guessed.
    assert_eq!(
        gw.ok("COPY (SELECT id, email FROM customers ORDER BY id) TO STDOUT"),
        "1\t****\n2\t\\N"
    );
    assert_eq!(
        gw.ok("COPY orders TO STDOUT"),
        "4711\tpaid\t1\n4712\tpaid\t2"
    );
    for sql in [
        "COPY customers TO STDOUT",
        "COPY (SELECT upper(name) FROM customers) TO STDOUT",
        "COPY public.customers (id, name) TO STDOUT",
    ] {
        let e = gw.err(sql);
        assert!(
            e.contains("agentgate refuses COPY of columns masked by pii/names"),
            "{sql}: {e}"
        );
    }
    let e = gw.err("COPY orders TO STDOUT (FORMAT binary)");
    assert!(
        e.contains("refuses binary COPY while masking applies"),
        "{e}"
    );
    // Views: the rule follows the view's column to the table's, through views of views.
    assert_eq!(
        gw.ok("SELECT id, name, shout FROM customer_names WHERE id = 1"),
        "1|[name]|[name]"
    );
    assert_eq!(gw.ok("SELECT id FROM customer_ids ORDER BY id"), "1\n2");
    assert_eq!(
        gw.ok("SELECT id, loud FROM nested_names WHERE id = 1"),
        "1|[name]"
    );
    assert_eq!(gw.ok("SELECT * FROM nested_names WHERE id = 2"), "2|[name]");
    // Columns without a rule pass.
    assert_eq!(
        gw.ok("SELECT id, state FROM orders ORDER BY id"),
        "4711|paid\n4712|paid"
    );
    assert_eq!(
        gw.ok("SELECT string_agg(email, ',') FROM customers"),
        "****"
    );

    // The upstream login used SCRAM over verified TLS, as the gateway's role.
    assert_eq!(
        gw.ok("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"),
        "agentgate|t"
    );

    // The same gateway on its Unix socket (PGHOST=<dir>): masked and refused alike.
    let dir = gw.env.dir().join(format!("sock-{}", gw.port));
    let socket = dir.join(format!(".s.PGSQL.{}", gw.port));
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket)?.permissions()) & 0o777,
        0o666,
        "the socket is open to the agent's user; its directory's mount confines it"
    );
    let over_socket = |sql: &str| {
        Command::new(gw.env.bins.pg_bin.join("psql"))
            .arg(format!(
                "host={} port={} dbname=orders-db user=claude",
                dir.display(),
                gw.port
            ))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql")
    };
    let out = over_socket("SELECT id, email, name FROM customers WHERE id = 1");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1|****|[name]",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = over_socket("DROP TABLE orders");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused by guardrail no-drop-table"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Refused, with the rule and its message.
    let e = gw.err("DROP TABLE orders");
    assert!(
        e.contains(
            "refused by guardrail no-drop-table: dropping tables is never allowed for agents"
        ),
        "{e}"
    );
    assert!(
        e.contains("DROP TABLE was refused by rule no-drop-table"),
        "{e}"
    );
    let e = gw.err("SELECT pg_read_file('/etc/passwd')");
    assert!(e.contains("agentgate-block-admin"), "{e}");
    let e = gw.err("SET ROLE postgres");
    assert!(e.contains("agentgate-block-privilege"), "{e}");
    let e = gw.err("SELEC 1");
    assert!(
        e.contains("agentgate refuses what it cannot parse: syntax error"),
        "{e}"
    );
    // Held: no grant for writes.
    let e = gw.err("UPDATE orders SET state = 'shipped' WHERE id = 4711");
    assert!(
        e.contains("held for approval: AccessGrant claude-")
            && e.contains("no baseline or active grant allows Write on orders-db (public.orders)"),
        "{e}"
    );
    assert!(e.contains("HINT:  an approver adds to"), "{e}");
    // A write hidden in a CTE or after a read is the same write.
    let e = gw.err(
        "WITH x AS (UPDATE orders SET state = 'x' WHERE id = 4711 RETURNING 1) SELECT * FROM x",
    );
    assert!(e.contains("held for approval"), "{e}");
    let e = gw.err("SELECT 1; DELETE FROM orders WHERE id = 4712");
    assert!(e.contains("held for approval"), "{e}");
    // Nothing refused reached the database.
    let pg = gw.env.postgres()?;
    assert_eq!(
        pg.psql_run(
            "app",
            "SELECT string_agg(state, ',' ORDER BY id) FROM orders"
        )?
        .trim(),
        "paid,paid"
    );

    // An approved grant (a manifest in the folder) lets the write through.
    let now = jiff::Timestamp::now();
    std::fs::write(
        gw.policy.path().join("grant.yaml"),
        format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AccessGrant\nmetadata: {{ name: ship-4711, creationTimestamp: \"{now}\" }}\nspec:\n  identity: claude\n  target: orders-db\n  scope: {{ operations: [Write], tables: [public.orders] }}\n  duration: 10m\n  reason: ship it\n  decision: {{ verdict: Approve, decidedAt: \"{now}\", decidedBy: {{ username: alice }} }}\n"
        ),
    )?;
    wait_for("the grant is loaded", || {
        gw.psql(
            "orders-db",
            "UPDATE orders SET state = 'shipped' WHERE id = 4711",
        )
        .status
        .success()
    });
    assert_eq!(
        pg.psql_run("app", "SELECT state FROM orders WHERE id = 4711")?
            .trim(),
        "shipped"
    );
    // COPY FROM STDIN is a write under the same grant.
    let mut child = Command::new(gw.env.bins.pg_bin.join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable",
            gw.port
        ))
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "COPY orders FROM STDIN",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"4713\tnew\t1\n4714\tnew\t2\n\\.\n")?;
    }
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        pg.psql_run("app", "SELECT count(*) FROM orders WHERE state = 'new'")?
            .trim(),
        "2"
    );
    // ... within its scope only.
    let e = gw.err("UPDATE customers SET name = 'x' WHERE id = 1");
    assert!(e.contains("held for approval"), "{e}");
    // ... and never for every row.
    let e = gw.err("UPDATE orders SET state = 'lost'");
    assert!(e.contains("agentgate-hold-unbounded"), "{e}");
    // During COPY FROM STDIN the server ignores Sync and Flush, and ends the COPY at any
    // other message, which it drops: the gateway reads them the same way, so every answer
    // after it stays matched with its request (and its masking). Sent all at once, before
    // the server said the COPY started.
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let select = message(b'Q', b"SELECT upper(email) FROM customers WHERE id = 1\0");
    let out = text(raw(
        gw.port,
        &[
            startup("claude", "orders-db"),
            message(b'Q', b"COPY orders FROM STDIN\0"),
            message(b'S', b""),
            message(b'H', b""),
            message(b'd', b"4715\tnew\t1\n"),
            message(b'c', b""),
            select.clone(),
            message(b'X', b""),
        ]
        .concat(),
    ));
    assert!(!out.contains("ADA@"), "{out:?}");
    assert!(out.contains("COPY 1") && out.contains("****"), "{out:?}");
    let out = text(raw(
        gw.port,
        &[
            startup("claude", "orders-db"),
            message(b'Q', b"COPY orders FROM STDIN\0"),
            message(b'd', b"4716\tnew\t1\n"),
            select.clone(),
            select,
            message(b'X', b""),
        ]
        .concat(),
    ));
    assert!(
        out.contains("the agent sent a Query message during COPY FROM STDIN"),
        "{out:?}"
    );
    assert!(!out.contains("ADA@") && out.contains("****"), "{out:?}");
    assert_eq!(
        pg.psql_run(
            "app",
            "SELECT count(*) FROM orders WHERE id IN (4715, 4716)"
        )?
        .trim(),
        "1"
    );
    // A message refused in the middle of an extended-protocol batch fails the batch where
    // it stands, as the server fails it at a statement it cannot run: what was forwarded
    // before it (an allowed INSERT) is rolled back with the implicit transaction.
    let out = text(raw(
        gw.port,
        &[
            startup("claude", "orders-db"),
            message(b'P', b"\0INSERT INTO orders VALUES (4720, 'new', 1)\0\0\0"),
            message(b'B', b"\0\0\0\0\0\0\0\0"),
            message(b'E', b"\0\0\0\0\0"),
            message(b'P', b"\0SELEC broken\0\0\0"),
            message(b'S', b""),
            message(b'X', b""),
        ]
        .concat(),
    ));
    assert!(
        out.contains("agentgate refuses what it cannot parse"),
        "{out:?}"
    );
    assert!(!out.contains("agentgate-refused"), "{out:?}");
    // The portal name the gateway fails batches with is never the agent's to bind (or an
    // Execute of it would run the agent's portal unchecked).
    let out2 = text(raw(
        gw.port,
        &[
            startup("claude", "orders-db"),
            message(b'P', b"s9\0SELECT email FROM customers\0\0\0"),
            message(b'B', b"\x01agentgate-refused\0s9\0\0\0\0\0\0\0"),
            message(b'E', b"nope\0\0\0\0\0"),
            message(b'S', b""),
            message(b'X', b""),
        ]
        .concat(),
    ));
    assert!(
        out2.contains("agentgate reserves portal names that begin with the byte 0x01"),
        "{out2:?}"
    );
    assert!(!out2.contains("ada@example.com"), "{out2:?}");
    // Nor a SQL cursor's (cursors and portals share the server's names).
    let e = gw.err(
        r#"DECLARE U&"\0001agentgate-refused" CURSOR WITH HOLD FOR SELECT email FROM customers"#,
    );
    assert!(e.contains("reserves cursor and portal names"), "{e}");
    assert_eq!(
        pg.psql_run("app", "SELECT count(*) FROM orders WHERE id = 4720")?
            .trim(),
        "0"
    );
    // A statement the parser stops at tells the agent where; the record keeps no token of
    // it (it may be a literal: a password).
    let e = gw.err("ALTER ROLE app PASSWORD 'old' 'N3wSecret'");
    assert!(e.contains("agentgate refuses what it cannot parse"), "{e}");
    let file = gw.env.dir().join(format!("audit-{}/audit.jsonl", gw.port));
    wait_for("the refusal recorded", || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains("at or near a token not recorded")
    });
    let trail = std::fs::read_to_string(&file)?;
    assert!(!trail.contains("N3wSecret"), "the trail holds a literal");

    // md5 upstream authentication works too.
    let out = gw.psql("md5-db", "SELECT current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "agentgate_md5",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Unknown target: refused at connection, naming the known ones.
    let out = gw.psql("prod-db", "SELECT 1");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("no PostgreSQL Target named \"prod-db\"") && e.contains("md5-db, orders-db"),
        "{e}"
    );
    Ok(())
}

/// A scope that names tables judges the table the server will use: unqualified names are
/// resolved on the session's search path (a `SET search_path` in the same string or earlier
/// in the session, the login's own schema, `pg_catalog`, a statement prepared before the
/// path changed), and a path the gateway cannot follow leaves only schema-qualified names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_scopes_judge_the_table_the_search_path_reaches() -> anyhow::Result<()> {
    let gw = start().await?;
    let pg = gw.env.postgres()?;
    pg.psql_run(
        "app",
        "CREATE SCHEMA secret;
         CREATE TABLE secret.orders (id int, state text);
         INSERT INTO secret.orders VALUES (1, 'top-secret');
         GRANT USAGE ON SCHEMA secret TO agentgate;
         GRANT SELECT ON secret.orders TO agentgate;
         CREATE SCHEMA crm;
         CREATE TABLE crm.contacts (id int, phone text);
         INSERT INTO crm.contacts VALUES (1, '555-0100');
         CREATE TABLE public.contacts (id int, phone text);
         INSERT INTO public.contacts VALUES (1, '555-0199');
         GRANT USAGE ON SCHEMA crm TO agentgate;
         GRANT SELECT ON crm.contacts, public.contacts TO agentgate;",
    )?;
    // The identity reads a few tables only, and may set its search path.
    let base = policy(pg.port());
    let scoped = base
        .replace(
            "- { target: orders-db, scope: { operations: [Read] } }",
            "- { target: orders-db, scope: { operations: [Read, Privilege, DDL], tables: [public.orders, public.customers, public.contacts, crm.contacts] } }",
        )
        .replace(
            "action: Block, message: dropping tables is never allowed for agents }",
            "action: Block, message: dropping tables is never allowed for agents }\n    - { name: paths, operations: [Privilege], matches: [SET search_path, set_config], action: Allow }",
        );
    assert!(scoped.contains("tables: [public.orders") && scoped.contains("name: paths"));
    std::fs::write(gw.policy.path().join("policy.yaml"), scoped)?;
    wait_for("the scoped baseline is loaded", || {
        !gw.psql("orders-db", "SELECT state FROM secret.orders")
            .status
            .success()
    });
    let session = |commands: &[&str]| {
        let mut cmd = Command::new(gw.env.bins.pg_bin.join("psql"));
        cmd.arg(format!(
            "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable",
            gw.port
        ))
        .args(["-X", "-At"]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        let out = cmd.output().expect("psql runs");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The default path: `orders` is public.orders.
    let (out, err) = session(&["SELECT state FROM orders ORDER BY id"]);
    assert_eq!(out, "paid\npaid\n", "{err}");
    let e = gw.err("SELECT state FROM secret.orders");
    assert!(
        e.contains("held for approval") && e.contains("(secret.orders)"),
        "{e}"
    );
    // A WITH query's name is no table: it reads what its body reads. Its body does not see
    // its own name (without RECURSIVE), so a WITH query named after an allowed table cannot
    // hide the table it reads.
    assert_eq!(
        gw.ok(
            "WITH paid AS (SELECT id FROM orders WHERE state = 'paid') SELECT count(*) FROM paid"
        ),
        "2"
    );
    assert_eq!(
        gw.ok(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3), \
             o AS (SELECT * FROM orders) SELECT count(*) FROM n, o"
        ),
        "6"
    );
    for sql in [
        "WITH paid AS (SELECT * FROM secret.orders) SELECT state FROM paid",
        "WITH customers AS (SELECT * FROM secret.orders) SELECT state FROM customers",
        "WITH orders AS (SELECT 1) SELECT state FROM secret.orders",
        "SELECT state FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, secret.orders",
    ] {
        let e = gw.err(sql);
        assert!(
            e.contains("held for approval") && e.contains("(secret.orders)"),
            "{sql}: {e}"
        );
    }
    // What a function returns from a relation the statement does not name is read from
    // that relation: large objects, other sessions' query texts.
    for (sql, relation) in [
        ("SELECT lo_get(16400)", "pg_catalog.pg_largeobject"),
        (
            "SELECT query FROM pg_stat_get_activity(NULL)",
            "pg_catalog.pg_stat_activity",
        ),
    ] {
        let e = gw.err(sql);
        assert!(
            e.contains("held for approval") && e.contains(relation),
            "{sql}: {e}"
        );
    }
    // A WITH query of one part of a statement is a table in another.
    let e = gw.err("SELECT * FROM (WITH paid AS (SELECT 1) SELECT * FROM paid) s, paid");
    assert!(e.contains("held for approval") && e.contains("paid"), "{e}");
    // A path set in the same string, before the read.
    let (out, err) = session(&["SET search_path = secret; SELECT state FROM orders"]);
    assert!(!out.contains("top-secret"), "{out}");
    assert!(
        err.contains("held for approval") && err.contains("secret.orders"),
        "{err}"
    );
    // A path set earlier in the session (psql stops at the first error: what is allowed
    // comes first). The server answered the SET without an error and outside a
    // transaction: the old path is gone. `orders` is secret.orders there, and every table
    // of that name further down the path counts too.
    let (out, err) = session(&[
        "SET search_path = secret, public",
        "SELECT count(*) FROM customers",
        "SELECT state FROM orders",
    ]);
    assert!(!out.contains("top-secret"), "{out}");
    assert!(
        err.contains("(public.orders, secret.orders)") && err.contains("held for approval"),
        "{err}"
    );
    // `customers` is public.customers on that path: allowed.
    assert_eq!(out, "SET\n2\n", "{err}");
    let (out, err) = session(&["SET search_path = secret", "SELECT state FROM orders"]);
    assert!(!out.contains("top-secret"), "{out}");
    assert!(err.contains("(secret.orders)"), "{err}");
    // Masking follows the path too: crm.contacts.phone is masked (Partial on the column,
    // Redact on what is computed from it); public.contacts.phone is not.
    let (out, err) = session(&[
        "SELECT lower(phone) FROM contacts",
        "SET search_path = crm",
        "SELECT phone FROM contacts",
        "SELECT lower(phone) FROM contacts",
        "SELECT lower(c.phone) FROM contacts c",
        "SELECT lower(contacts.phone) FROM contacts",
    ]);
    assert_eq!(out, "555-0199\nSET\n***-**00\n****\n****\n****\n", "{err}");
    // A table created where it does not exist yet: as the schema it would be created in
    // (the first on the path), and as the tables of that name further down.
    let (out, err) = session(&[
        "SET search_path = crm, public",
        "CREATE TABLE orders (id int)",
    ]);
    assert_eq!(out, "SET\n", "{err}");
    assert!(err.contains("(crm.orders, public.orders)"), "{err}");
    // Until a transaction ends, the path before it may come back: a name is judged on both.
    let (out, err) = session(&[
        "BEGIN",
        "SET LOCAL search_path = secret",
        "SELECT state FROM orders",
    ]);
    assert_eq!(out, "BEGIN\nSET\n", "{err}");
    assert!(err.contains("(public.orders, secret.orders)"), "{err}");
    // A path the gateway cannot follow: unqualified names are refused with a way out;
    // schema-qualified ones still work.
    let (out, err) = session(&[
        "SELECT set_config('search_path', 'secret', false)",
        "SELECT state FROM public.orders ORDER BY id",
        "SELECT state FROM orders",
    ]);
    assert!(!out.contains("top-secret"), "{out}");
    assert!(
        err.contains("cannot tell which schema an unqualified name is in")
            && err.contains("set_config may have changed it")
            && err.contains("name tables with their schema"),
        "{err}"
    );
    assert_eq!(out, "secret\npaid\npaid\n", "{err}");
    // The extended protocol: a Parse after the change, and a statement prepared before it
    // (the server plans it again on the new path).
    let (client, _conn) = gw.client().await?;
    let prepared = client.prepare("SELECT state FROM orders").await?;
    assert_eq!(client.query(&prepared, &[]).await?.len(), 2);
    client.batch_execute("SET search_path = secret").await?;
    let message = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string())
    };
    let e = message(
        client
            .query("SELECT state FROM orders", &[])
            .await
            .expect_err("refused"),
    );
    assert!(e.contains("secret.orders"), "{e}");
    let e = message(client.query(&prepared, &[]).await.expect_err("refused"));
    assert!(e.contains("secret.orders"), "{e}");
    drop(client);
    // A SET prepared by name runs, and changes the path, when it is executed.
    let (client, _conn) = gw.client().await?;
    let set_secret = client.prepare("SET search_path = secret").await?;
    client.batch_execute("SET search_path = public").await?;
    assert_eq!(
        client.query("SELECT state FROM orders", &[]).await?.len(),
        2
    );
    client.execute(&set_secret, &[]).await?;
    let e = message(
        client
            .query("SELECT state FROM orders", &[])
            .await
            .expect_err("refused"),
    );
    assert!(e.contains("(secret.orders)"), "{e}");
    drop(client);
    // A function named like a built-in, in a schema the path puts before pg_catalog, is
    // judged as what it may be: any function, held.
    pg.psql_run(
        "app",
        "CREATE FUNCTION crm.random() RETURNS float8 LANGUAGE sql VOLATILE
           AS $$ SELECT length(set_config('search_path', 'secret', false))::float8 $$;
         GRANT EXECUTE ON FUNCTION crm.random() TO agentgate;",
    )?;
    // Any function of that name outside pg_catalog makes the name one that may be it.
    let (out, err) = session(&["SELECT random() < 1"]);
    assert_eq!(out, "", "{err}");
    assert!(err.contains("held"), "{err}");
    let (out, err) = session(&[
        "SET search_path = crm, pg_catalog, public",
        "SELECT random() < 1",
    ]);
    assert_eq!(out, "SET\n", "{err}");
    assert!(err.contains("held"), "{err}");
    // Catalog tables are pg_catalog's, whatever the path says.
    let e = gw.err("SELECT count(*) FROM pg_class");
    assert!(e.contains("(pg_catalog.pg_class)"), "{e}");
    // A schema named like the login comes first on the default path.
    pg.psql_run(
        "app",
        "CREATE SCHEMA agentgate AUTHORIZATION agentgate;
         CREATE TABLE agentgate.orders (id int, state text);
         INSERT INTO agentgate.orders VALUES (1, 'shadow');
         GRANT SELECT ON agentgate.orders TO agentgate;",
    )?;
    let e = gw.err("SELECT state FROM orders");
    assert!(e.contains("(agentgate.orders, public.orders)"), "{e}");
    let (out, err) = session(&["SELECT state FROM public.orders ORDER BY id"]);
    assert_eq!(out, "paid\npaid\n", "{err}");
    // The role's default path changed outside agentgate: a session on a new server
    // connection (another application_name: not one of the pooled ones) starts on it, and
    // is judged on it, whatever the gateway's catalog connection started on.
    pg.psql_run(
        "app",
        "ALTER ROLE agentgate SET search_path = secret, public",
    )?;
    let out = Command::new(gw.env.bins.pg_bin.join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable application_name=fresh",
            gw.port
        ))
        .args(["-X", "-At", "-c", "SELECT state FROM orders"])
        .output()?;
    let (out, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.contains("top-secret"), "{out}");
    assert!(err.contains("(public.orders, secret.orders)"), "{err}");
    // Creating a function is running code (Exec): held, in a transaction or not; a call to
    // one in another schema is Exec too.
    let (out, err) = session(&[
        "BEGIN",
        "CREATE FUNCTION agentgate.sneaky() RETURNS int LANGUAGE sql VOLATILE AS $$ SELECT 1 $$",
        "SELECT agentgate.sneaky()",
    ]);
    assert_eq!(out, "BEGIN\n", "{err}");
    assert!(err.contains("held"), "{err}");
    let (out, err) = session(&["SELECT agentgate.later()"]);
    assert_eq!(out, "", "{err}");
    assert!(err.contains("held"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol_through_the_gateway() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let script = gw.env.dir().join("read.sql");
    std::fs::write(
        &script,
        "\\set id random(4711, 4712)\nSELECT state FROM orders WHERE id = :id;\n",
    )?;
    let pgbench = |mode: &str, script: &Path| {
        Command::new(gw.env.bins.pg_bin.join("pgbench"))
            .arg(format!(
                "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable",
                gw.port
            ))
            .args(["-n", "-M", mode, "-t", "50", "-c", "4", "-f"])
            .arg(script)
            .output()
            .expect("run pgbench")
    };
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(mode, &script);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("number of transactions actually processed: 200/200"),
            "{mode}: {stdout}"
        );
    }
    // A refused statement in the extended protocol is an error for pgbench, with the reason.
    let bad = gw.env.dir().join("write.sql");
    std::fs::write(&bad, "UPDATE orders SET state = 'x' WHERE id = 4711;\n")?;
    let out = pgbench("extended", &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("held for approval"),
        "{stderr}"
    );
    Ok(())
}

/// A raw connection: bytes in, whatever the gateway answers out (until it closes).
fn raw(port: u16, send: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(send);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn startup(user: &str, db: &str) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_protocol_error_never_a_panic_or_a_hang() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let hello = startup("claude", "orders-db");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage startup",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "invalid message length",
        ),
        (
            "protocol 2",
            vec![0, 0, 0, 8, 0, 2, 0, 0],
            "unsupported protocol version 2.0",
        ),
        (
            "unknown message",
            [hello.clone(), message(b'!', b"")].concat(),
            "unknown message type",
        ),
        (
            "oversized",
            [hello.clone(), vec![b'Q', 0x7f, 0xff, 0xff, 0xff]].concat(),
            "invalid message length",
        ),
        (
            "invalid UTF-8",
            [hello.clone(), message(b'Q', b"SELECT '\xff\xfe'\0")].concat(),
            "Query is not valid UTF-8",
        ),
        (
            "unterminated query",
            [hello.clone(), message(b'Q', b"SELECT 1")].concat(),
            "not NUL-terminated",
        ),
        (
            "NUL inside",
            [
                hello.clone(),
                message(b'Q', b"SELECT 1\0; DROP TABLE orders\0"),
            ]
            .concat(),
            "bytes after the end of the message",
        ),
        (
            "fast path",
            [hello.clone(), message(b'F', b"\0\0\0\x01")].concat(),
            "refuses the fast-path function call protocol",
        ),
    ];
    for (name, bytes, want) in cases {
        let out = text(raw(gw.port, &bytes));
        assert!(out.contains(want), "{name}: {out:?}");
    }
    // A client that disconnects mid-query leaves the gateway serving.
    let _ = raw(
        gw.port,
        &[
            hello.clone(),
            message(b'Q', b"SELECT pg_sleep(0.2)\0")[..7].to_vec(),
        ]
        .concat(),
    );
    assert_eq!(gw.ok("SELECT 42"), "42");
    // A refusal pipelined behind forwarded messages (a driver closing a statement, then
    // preparing one that is held, in one write) is answered: what was forwarded is flushed to
    // the server first, or the refusal, queued behind its answers, would wait forever.
    let out = text(raw(
        gw.port,
        &[
            hello.clone(),
            message(b'P', b"s1\0SELECT 1\0\0\0"),
            message(b'S', b""),
            message(b'C', b"Ss1\0"),
            message(b'S', b""),
            message(b'P', b"s2\0DELETE FROM orders\0\0\0"),
            message(b'S', b""),
        ]
        .concat(),
    ));
    assert!(out.contains("held for approval"), "{out:?}");
    assert_eq!(out.matches("Z\0\0\0\x05I").count(), 4, "{out:?}");
    // Rows of an Execute the agent never described are masked all the same (the gateway
    // describes the portal itself), and a computed column's rule belongs to its own query
    // even when the next one is already sent (pipelined).
    let out = text(raw(
        gw.port,
        &[
            hello.clone(),
            message(
                b'P',
                b"\0SELECT name, upper(name) FROM customers WHERE id = 1\0\0\0",
            ),
            message(b'B', b"\0\0\0\0\0\0\0\0"),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
            message(
                b'Q',
                b"SELECT upper(name) || '!' FROM customers WHERE id = 1\0",
            ),
            message(b'Q', b"SELECT 1\0"),
        ]
        .concat(),
    ));
    assert!(!out.contains("Ada") && !out.contains("ADA"), "{out:?}");
    assert_eq!(out.matches("[name]").count(), 3, "{out:?}");
    // The gateway's prepared-statement map always names what the server has: a name is
    // never reused, and an unnamed statement whose Parse the server may have skipped (after
    // an error earlier in its batch) cannot be executed later.
    let out = text(raw(
        gw.port,
        &[
            hello.clone(),
            message(b'P', b"s1\0SELECT 'old'\0\0\0"),
            message(b'S', b""),
            message(b'P', b"s1\0SELECT 'new'\0\0\0"),
            message(b'S', b""),
            message(b'P', b"\0SELECT 'old'\0\0\0"),
            message(b'S', b""),
            message(b'B', b"\0nosuch\0\0\0\0\0\0\0"),
            message(b'P', b"\0SELECT 'new'\0\0\0"),
            message(b'S', b""),
            message(b'B', b"\0\0\0\0\0\0\0\0"),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
        ]
        .concat(),
    ));
    assert!(
        out.contains("prepared statement \"s1\" was already used in this session"),
        "{out:?}"
    );
    assert!(
        out.contains("executing a statement it has not seen prepared"),
        "{out:?}"
    );
    assert!(!out.contains("old"), "{out:?}");
    assert!(
        gw.err("PREPARE p AS SELECT 1")
            .contains("SQL PREPARE is not supported"),
        "SQL PREPARE"
    );
    // COPY through Parse/Execute would skip COPY's own checks: refused.
    let out = text(raw(
        gw.port,
        &[
            hello.clone(),
            message(b'P', b"\0COPY customers TO STDOUT\0\0\0"),
            message(b'B', b"\0\0\0\0\0\0\0\0"),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
        ]
        .concat(),
    ));
    assert!(
        out.contains("agentgate runs COPY only as a simple query"),
        "{out:?}"
    );
    assert!(!out.contains("ada@example.com"), "{out:?}");
    // Nothing malformed reached the database.
    let pg = gw.env.postgres()?;
    assert_eq!(
        pg.psql_run("app", "SELECT count(*) FROM orders")?.trim(),
        "2"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_driver_works_through_the_gateway() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let (client, _conn) = gw.client().await?;
    // Extended protocol with parameters, typed results, masking.
    let rows = client
        .query(
            "SELECT id, email, name FROM customers WHERE id = $1",
            &[&1i32],
        )
        .await?;
    assert_eq!(rows.len(), 1);
    let id: i32 = rows[0].get(0);
    let email: Option<String> = rows[0].get(1);
    let name: String = rows[0].get(2);
    assert_eq!(
        (id, email.as_deref(), name.as_str()),
        (1, Some("****"), "[name]")
    );
    // Binary results after a statement Describe and a Bind asking for binary: the gateway
    // reads the Bind's formats, so a card number hidden in a bigint is still caught.
    let row = client
        .query_one("SELECT 4111111111111111::bigint, 42::bigint", &[])
        .await?;
    assert_eq!(
        (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)),
        (None, Some(42))
    );
    // A prepared statement reused.
    let st = client
        .prepare("SELECT state FROM orders WHERE id = $1")
        .await?;
    for id in [4711i32, 4712] {
        let r = client.query_one(&st, &[&id]).await?;
        assert_eq!(r.get::<_, String>(0), "paid");
    }
    // A refusal is a database error with SQLSTATE and message; the connection stays usable.
    let err = client
        .execute("DELETE FROM orders WHERE id = $1", &[&4711i32])
        .await
        .expect_err("held");
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "55000");
    assert!(
        db.message().starts_with("held for approval"),
        "{}",
        db.message()
    );
    let err = client
        .batch_execute("DROP TABLE orders")
        .await
        .expect_err("refused");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42501"));
    assert_eq!(
        client
            .query_one("SELECT 1::int", &[])
            .await?
            .get::<_, i32>(0),
        1
    );
    // Transactions pass through.
    client.batch_execute("BEGIN; SELECT 1; COMMIT").await?;
    Ok(())
}

fn approve(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let now = jiff::Timestamp::now();
    let approved = text.replace(
        "spec:\n",
        &format!("spec:\n  decision: {{ verdict: Approve, decidedAt: \"{now}\", decidedBy: {{ username: alice }} }}\n"),
    );
    // Atomic, as an editor or a GitOps tool writes.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, approved)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_file_a_request_and_the_command_runs_once_approved() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let pg = gw.env.postgres()?;
    let requests = gw.policy.path().join("requests");

    // Held: a request bound to this exact command is filed, and the agent is told its name.
    let sql = "UPDATE orders SET state = 'shipped' WHERE id = 4712";
    let e = gw.err(sql);
    assert!(e.contains("held for approval: AccessGrant claude-"), "{e}");
    let name = e
        .split("AccessGrant ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_default()
        .to_owned();
    let path = requests.join(format!("{name}.yaml"));
    let filed = std::fs::read_to_string(&path)?;
    assert!(
        filed.contains("fingerprint:")
            && filed.contains("UPDATE orders SET state = 'shipped' WHERE id = 4712"),
        "{filed}"
    );
    assert!(!filed.contains("decision"), "{filed}");
    // Asking again files nothing new.
    gw.err(sql);
    assert_eq!(std::fs::read_dir(&requests)?.count(), 1);

    // Approved: that command (and only it) now runs.
    approve(&path)?;
    wait_for("the approval is loaded", || {
        gw.psql("orders-db", sql).status.success()
    });
    assert_eq!(
        pg.psql_run("app", "SELECT state FROM orders WHERE id = 4712")?
            .trim(),
        "shipped"
    );
    let e = gw.err("UPDATE orders SET state = 'shipped' WHERE id = 4711");
    assert!(e.contains("held for approval"), "{e}");

    // With a hold timeout the agent's command waits for the decision, then runs.
    let policy = std::fs::read_to_string(gw.policy.path().join("policy.yaml"))?;
    std::fs::write(
        gw.policy.path().join("policy.yaml"),
        policy.replacen("  guardrails:\n", "  holdTimeout: 30s\n  guardrails:\n", 1),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let waiting = "UPDATE orders SET state = 'waited' WHERE id = 4711";
    let port = gw.port;
    let psql = gw.env.bins.pg_bin.join("psql");
    let agent = std::thread::spawn(move || {
        Command::new(psql)
            .arg(format!(
                "host=127.0.0.1 port={port} dbname=orders-db user=claude sslmode=disable"
            ))
            .args(["-X", "-At", "-c", waiting])
            .output()
            .expect("psql")
    });
    let filed = filed_with(&requests, "the waiting command files a request", "'waited'");
    approve(&filed)?;
    let out = agent.join().expect("agent thread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        pg.psql_run("app", "SELECT state FROM orders WHERE id = 4711")?
            .trim(),
        "waited"
    );

    // A client that cancels a held command (psql's Ctrl-C, a driver's cancel) gets it back at
    // once as canceled; it never runs.
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} dbname=orders-db user=claude sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    let cancel = client.cancel_token();
    let started = Instant::now();
    let held = tokio::spawn(async move {
        client
            .batch_execute("UPDATE orders SET state = 'canceled' WHERE id = 4712")
            .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await?;
    let err = held.await?.expect_err("canceled");
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "57014");
    assert!(
        db.message()
            .starts_with("canceling statement due to user request: it was held for approval"),
        "{}",
        db.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not the 30s hold"
    );
    assert_eq!(
        pg.psql_run(
            "app",
            "SELECT count(*) FROM orders WHERE state = 'canceled'"
        )?
        .trim(),
        "0"
    );

    // A client that goes away while its command is held (psql killed): the approval that
    // comes later runs nothing.
    let mut gave_up = Command::new(gw.env.bins.pg_bin.join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=orders-db user=claude sslmode=disable"
        ))
        .args([
            "-X",
            "-At",
            "-c",
            "UPDATE orders SET state = 'abandoned' WHERE id = 4712",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let filed = filed_with(
        &requests,
        "the abandoned command files a request",
        "'abandoned'",
    );
    gave_up.kill()?;
    gave_up.wait()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    approve(&filed)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pg.psql_run(
            "app",
            "SELECT count(*) FROM orders WHERE state = 'abandoned'"
        )?
        .trim(),
        "0",
        "a statement ran for a client that had gone"
    );
    // Likewise for a driver on the extended protocol, whose Bind, Execute and Sync follow
    // the held Parse in the same write (they wait unread while the socket is watched).
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} dbname=orders-db user=claude sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await?;
    let conn = tokio::spawn(conn);
    let held = tokio::spawn(async move {
        client
            .execute(
                "UPDATE orders SET state = 'pipelined' WHERE id = $1",
                &[&4712i32],
            )
            .await
    });
    let filed = filed_with(
        &requests,
        "the pipelined command files a request",
        "'pipelined'",
    );
    held.abort();
    conn.abort();
    tokio::time::sleep(Duration::from_secs(1)).await;
    approve(&filed)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pg.psql_run(
            "app",
            "SELECT count(*) FROM orders WHERE state = 'pipelined'"
        )?
        .trim(),
        "0",
        "a pipelined statement ran for a client that had gone"
    );
    Ok(())
}

/// The request filed in `requests` whose text contains `needle` (waited for).
fn filed_with(requests: &std::path::Path, what: &str, needle: &str) -> std::path::PathBuf {
    let mut filed = None;
    wait_for(what, || {
        filed = std::fs::read_dir(requests)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(needle)));
        filed.is_some()
    });
    filed.expect("filed")
}

/// psycopg 3 (Debian's python3-psycopg): server-side parameters (extended protocol), prepared
/// statements, binary results, COPY, transactions, and a refusal as a Python exception.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_works_through_the_gateway() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let script = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1])
with conn.cursor() as cur:
    cur.execute("SELECT id, email, card, name FROM customers WHERE id = %s", (1,))
    print(cur.fetchone())
    for _ in range(3):
        cur.execute("SELECT id, email FROM customers WHERE id = %s", (2,), prepare=True)
    print(cur.fetchall())
    cur.execute("SELECT name, length(name), to_jsonb(name) FROM customers WHERE id = %s", (1,), binary=True)
    print(cur.fetchone())
    cur.execute("SELECT email, id, 4111111111111111::bigint, 42::bigint, '{\"mail\": \"x@example.com\"}'::jsonb, now() > '2000-01-01' FROM customers WHERE id = %s", (1,), binary=True)
    print(cur.fetchone())
    cur.execute("SELECT 4111111111111111::bigint, 42::bigint, now() > '2000-01-01'", binary=False)
    print(cur.fetchone())
    try:
        cur.execute("DELETE FROM orders WHERE id = %s", (4711,))
    except psycopg.Error as e:
        print(e.sqlstate, e.diag.message_primary.split(";")[0])
    conn.rollback()
    with cur.copy("COPY (SELECT email FROM customers ORDER BY id) TO STDOUT") as copy:
        print([bytes(r).decode() for r in copy])
    cur.execute("SELECT state FROM orders ORDER BY id")
    print(cur.fetchall())
conn.commit()
conn.close()
print("done")
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(format!(
            "host=127.0.0.1 port={} dbname=orders-db user=claude sslmode=disable",
            gw.port
        ))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = [
        // Server-side parameters: column rule, detectors, partial.
        "(1, '****', '**** **** **** 1111', '[name]')",
        // A prepared statement (named, reused): NULL stays NULL.
        "[(2, None)]",
        // Binary results: the masked text column carries the mask; an integer computed from
        // it cannot, so it is NULL; JSON stays JSON.
        "('[name]', None, '[name]')",
        // Binary: a card number hidden in a bigint is caught (and cannot carry the mask);
        // other integers, JSON (masked inside) and booleans pass.
        "('****', 1, None, 42, {'mail': '****'}, True)",
        // Text: the same for a text-format bigint.
        "(None, 42, True)",
        // A refusal is a psycopg exception with SQLSTATE and message.
        "55000 held for approval: AccessGrant claude-8d422cf948e4",
        // COPY TO STDOUT, masked line by line.
        r"['****\n', '\\N\n']",
        "[('paid',), ('paid',)]",
        "done",
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), want);
    Ok(())
}

/// JDBC (the PostgreSQL driver from Maven Central, on the newest JDK): prepared statements
/// that switch to named server-side statements after five runs, binary transfer, a refusal
/// as an SQLException, a cursor fetched one row at a time (a named portal across Syncs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_works_through_the_gateway() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let src = gw.env.dir().join("Agent.java");
    std::fs::write(
        &src,
        r#"
import java.sql.*;
public class Agent {
  public static void main(String[] a) throws Exception {
    try (Connection c = DriverManager.getConnection(a[0])) {
      try (PreparedStatement p = c.prepareStatement("SELECT id, email, name, card FROM customers WHERE id = ?")) {
        for (int i = 0; i < 7; i++) {
          p.setInt(1, 1);
          try (ResultSet r = p.executeQuery()) {
            r.next();
            if (i == 0 || i == 6) System.out.println(r.getInt(1) + " " + r.getString(2) + " " + r.getString(3) + " " + r.getString(4));
          }
        }
      }
      try (Statement s = c.createStatement()) {
        try { s.executeUpdate("DELETE FROM orders WHERE id = 4711"); }
        catch (SQLException e) { System.out.println(e.getSQLState() + " " + e.getMessage().split(";")[0]); }
      }
      c.setAutoCommit(false);
      try (PreparedStatement p = c.prepareStatement("SELECT id, state FROM orders ORDER BY id")) {
        p.setFetchSize(1);
        try (ResultSet r = p.executeQuery()) {
          int n = 0;
          while (r.next()) n++;
          System.out.println("rows " + n);
        }
      }
      c.commit();
    }
    System.out.println("done");
  }
}
"#,
    )?;
    let java = testenv::keycloak_env::java_home()
        .map(|h| h.join("bin/java"))
        .unwrap_or_else(|| "java".into());
    let out = Command::new(java)
        .arg("-cp")
        .arg(testenv::postgres_env::jdbc_jar()?)
        .arg(&src)
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/orders-db?user=claude&sslmode=disable",
            gw.port
        ))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "1 **** [name] **** **** **** 1111",
            "1 **** [name] **** **** **** 1111",
            "55000 ERROR: held for approval: AccessGrant claude-16670b815f07",
            "rows 2",
            "done",
        ]
    );
    Ok(())
}

/// The upstream PostgreSQL restarts while an agent's transaction has a statement running:
/// the agent gets a clear error (not a hang), the record shows the statement failed and why
/// the session ended, and the next connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarting_mid_transaction_is_a_clear_error_and_recorded()
-> anyhow::Result<()> {
    let mut gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let (client, conn) = gw.client().await?;
    client.batch_execute("BEGIN").await?;
    let row = client
        .query_one("SELECT state FROM orders WHERE id = 4711", &[])
        .await?;
    assert_eq!(row.get::<_, String>(0), "paid");
    let sleeping = tokio::spawn(async move {
        let r = client.query_one("SELECT pg_sleep(30)", &[]).await;
        (r.map(|_| ()), client)
    });
    // The statement is running upstream; then the server restarts under it.
    let admin = gw.env.postgres()?.admin_url();
    wait_for("the statement is running", || {
        Command::new(gw.env.bins.pg_bin.join("psql"))
            .args([
                &admin,
                "-XAtc",
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1")
    });
    let restarted = Instant::now();
    gw.env.postgres_mut()?.restart()?;
    let (result, client) = tokio::time::timeout(Duration::from_secs(20), sleeping).await??;
    let err = result.expect_err("the statement cannot have completed");
    let text = format!("{err} {:?}", err.as_db_error().map(|e| e.message()));
    assert!(
        text.contains("terminating connection")
            || text.contains("agentgate: the database closed the connection"),
        "{text}"
    );
    assert!(restarted.elapsed() < Duration::from_secs(20));
    // The connection is over, and says so.
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    // The next connection works, and the rolled-back transaction left nothing behind.
    wait_for("a new connection works", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    assert_eq!(gw.ok("SELECT state FROM orders WHERE id = 4711"), "paid");
    // The record: the statement's outcome is an error, and the session's end says why.
    let file = gw.env.dir().join(format!("audit-{}/audit.jsonl", gw.port));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let records: Vec<serde_json::Value> = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let sleep_req = records.iter().find(|r| {
            r["kind"] == "Request"
                && r["request"]["text"] == "SELECT pg_sleep($1)"
                && r["request"]["via"] == "execute"
        });
        let outcome = sleep_req.and_then(|q| {
            records.iter().find(|o| {
                o["kind"] == "Outcome"
                    && o["session"] == q["session"]
                    && o["outcome"]["id"] == q["request"]["id"]
            })
        });
        let end = sleep_req.and_then(|q| {
            records
                .iter()
                .find(|e| e["kind"] == "SessionEnd" && e["session"] == q["session"])
        });
        if let (Some(o), Some(e)) = (outcome, end) {
            // PostgreSQL's own error for it (57P01: terminated by an administrator).
            assert_eq!(o["outcome"]["error"], "57P01 error", "{o}");
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no outcome and end for the interrupted statement in:\n{}",
            records
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        ended["note"], "the database closed the connection",
        "{ended}"
    );
    Ok(())
}

/// No operator runs here (a folder of manifests is the policy), yet an approved grant stops
/// working at its expiry, in a connection that stays open: the sidecar judges expiry itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_ends_at_its_expiry_in_an_open_connection_without_the_operator()
-> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let (client, _conn) = gw.client().await?;
    let update = "UPDATE orders SET state = 'granted' WHERE id = 4711";
    assert!(client.execute(update, &[]).await.is_err(), "no grant yet");
    let now = jiff::Timestamp::now();
    std::fs::write(
        gw.policy.path().join("brief-grant.yaml"),
        format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AccessGrant\nmetadata: {{ name: brief-write, creationTimestamp: \"{now}\" }}\nspec:\n  identity: claude\n  target: orders-db\n  scope: {{ operations: [Write], tables: [orders] }}\n  duration: 12s\n  reason: a short fix\n  decision: {{ verdict: Approve, decidedAt: \"{now}\", decidedBy: {{ username: alice }} }}\n"
        ),
    )?;
    // In force once loaded...
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.execute(update, &[]).await.is_err() {
        assert!(Instant::now() < deadline, "the grant never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A cursor whose query needs the grant (it locks rows: a write), opened while it holds.
    client
        .batch_execute("BEGIN; DECLARE wc CURSOR FOR SELECT id FROM orders ORDER BY id FOR UPDATE")
        .await?;
    let first = client.query("FETCH 1 FROM wc", &[]).await?;
    assert_eq!(first.first().map(|r| r.get::<_, i32>(0)), Some(4711));
    // ...and over at its expiry, on the same connection, with nobody marking it Expired.
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        match client.execute(update, &[]).await {
            Ok(_) => {
                assert!(Instant::now() < deadline, "the grant outlived its expiry");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => break e,
        }
    };
    let expired_after = jiff::Timestamp::now().duration_since(now);
    assert!(
        expired_after >= jiff::SignedDuration::from_secs(12),
        "refused before the expiry: {expired_after:?}"
    );
    let text = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(text.contains("held for approval"), "{text}");
    // The cursor's query runs as its rows are fetched: it ends with the grant too.
    let err = client
        .query("FETCH 1 FROM wc", &[])
        .await
        .err()
        .and_then(|e| e.as_db_error().map(|e| e.message().to_owned()))
        .unwrap_or_default();
    assert!(
        err.contains("the query of cursor wc is no longer allowed"),
        "{err}"
    );
    Ok(())
}

/// The libfaketime library (Debian's `libfaketime`): preloaded, it moves the sidecar's clock
/// and nobody else's.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The sidecar's clock steps forward past a grant's end, then back to the real time: the
/// grant ended when the clock said so and stays ended (it is not revived when the clock goes
/// back), the records' times never go back, and the sidecar says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_stepping_forward_then_back_never_revives_a_grant() -> anyhow::Result<()> {
    assert!(
        Path::new(FAKETIME).exists(),
        "{FAKETIME} is missing: tests/env/install.sh installs Debian's libfaketime"
    );
    let offset_dir = tempfile::tempdir()?;
    let offset = offset_dir.path().join("offset");
    std::fs::write(&offset, "+0\n")?;
    let gw = start_with(&[
        ("LD_PRELOAD", FAKETIME.into()),
        ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
        ("FAKETIME_CACHE_DURATION", "1".into()),
        // Timers and timeouts keep real time; only the wall clock moves.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ])
    .await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let (client, _conn) = gw.client().await?;
    let update = "UPDATE orders SET state = 'clock' WHERE id = 4711";
    let now = jiff::Timestamp::now();
    std::fs::write(
        gw.policy.path().join("hour-grant.yaml"),
        format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AccessGrant\nmetadata: {{ name: hour-write, creationTimestamp: \"{now}\" }}\nspec:\n  identity: claude\n  target: orders-db\n  scope: {{ operations: [Write], tables: [orders] }}\n  duration: 1h\n  reason: clock test\n  decision: {{ verdict: Approve, decidedAt: \"{now}\", decidedBy: {{ username: alice }} }}\n"
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.execute(update, &[]).await.is_err() {
        assert!(Instant::now() < deadline, "the grant never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two hours forward: the grant's hour is over.
    std::fs::write(&offset, "+2h\n")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.execute(update, &[]).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the grant outlived a clock two hours ahead"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Back to the real time, when the grant's hour has not passed: it stays ended.
    std::fs::write(&offset, "+0\n")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..5 {
        let err = client
            .execute(update, &[])
            .await
            .expect_err("a grant revived by the clock going back");
        let text = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(text.contains("held for approval"), "{text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The trail's times never go back, and the sidecar said why time stands still.
    let file = gw.env.dir().join(format!("audit-{}/audit.jsonl", gw.port));
    let times: Vec<jiff::Timestamp> = std::fs::read_to_string(&file)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["time"].as_str()?.parse().ok())
        .collect();
    assert!(times.len() > 10, "{} records", times.len());
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "record times go back: {times:?}"
    );
    assert!(
        gw.proc.log_contains("the system clock went back"),
        "{}",
        gw.proc.log_tail(20)
    );
    Ok(())
}

/// What the server's superuser sees: `sql`'s first column, one line per row.
fn admin(gw: &Gateway, sql: &str) -> String {
    let out = Command::new(gw.env.bins.pg_bin.join("psql"))
        .args([
            &gw.env.postgres().expect("postgres").admin_url(),
            "-XAtc",
            sql,
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The gateway's idle server connections for the test's tokio-postgres sessions (which set
/// no application name; psql's and the catalog's are kept apart).
fn pooled(gw: &Gateway) -> usize {
    admin(gw, &format!("SELECT count(*) FROM ({IDLE}) idle"))
        .parse()
        .expect("a count")
}

const IDLE: &str = "SELECT pid FROM pg_stat_activity WHERE usename = 'agentgate' \
                    AND application_name = '' AND state = 'idle'";

/// The first column of the first DataRow in `answer` (the server's messages after startup).
fn first_value(answer: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 5 <= answer.len() {
        let tag = answer[at];
        let len = i32::from_be_bytes(answer[at + 1..at + 5].try_into().ok()?) as usize;
        let body = answer.get(at + 5..at + 1 + len)?;
        if tag == b'D' {
            let n = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?) as usize;
            return Some(String::from_utf8_lossy(body.get(6..6 + n)?).into_owned());
        }
        at += 1 + len;
    }
    None
}

/// A client that connects once per command reuses the server connection of the session
/// before, reset: nothing that session left (settings, prepared statements, cursors) is seen
/// by the next. A session that ends inside a transaction, or a connection the server closed
/// while idle, is never handed out; at most `--pg-pool-max-idle` are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_serves_the_next_session_only_after_a_reset() -> anyhow::Result<()> {
    let gw = start_with(&[("AGENTGATE_PG_POOL_MAX_IDLE", "4".into())]).await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    async fn pid(c: &tokio_postgres::Client) -> anyhow::Result<i32> {
        Ok(c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0))
    }
    async fn end(
        c: tokio_postgres::Client,
        conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ) -> anyhow::Result<()> {
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), conn).await???;
        Ok(())
    }
    // A session leaves state behind: a setting, a prepared statement, a held cursor.
    let (client, conn) = gw.client().await?;
    let first = pid(&client).await?;
    client
        .batch_execute("SET statement_timeout = '123s'")
        .await?;
    let kept = client
        .prepare("SELECT state FROM orders WHERE id = $1")
        .await?;
    client
        .batch_execute("DECLARE left_open CURSOR WITH HOLD FOR SELECT id FROM orders")
        .await?;
    let cursors: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_cursors WHERE name = 'left_open'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(cursors, 1);
    std::mem::forget(kept);
    end(client, conn).await?;
    wait_for("the connection is back in the pool", || pooled(&gw) == 1);

    // The next session is served by the same server process, with nothing of the last one.
    let (client, conn) = gw.client().await?;
    assert_eq!(pid(&client).await?, first);
    let row = client
        .query_one(
            "SELECT current_setting('statement_timeout'), \
             (SELECT count(*) FROM pg_prepared_statements), \
             (SELECT count(*) FROM pg_cursors WHERE name = 'left_open')",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "0");
    // Only this query's own statement.
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(row.get::<_, i64>(2), 0);
    let row = client
        .query_one("SELECT state FROM orders WHERE id = 4711", &[])
        .await?;
    assert_eq!(row.get::<_, String>(0), "paid");

    // A session that ends inside a transaction is not reused: the server rolls it back.
    client.batch_execute("BEGIN").await?;
    end(client, conn).await?;
    wait_for("the server process of the open transaction ends", || {
        admin(
            &gw,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {first}"),
        ) == "0"
    });
    let (client, conn) = gw.client().await?;
    let second = pid(&client).await?;
    assert_ne!(second, first);
    end(client, conn).await?;

    // The server ends the idle connection (a restart, an administrator, a timeout): the next
    // session notices before it uses it, and gets a new one.
    wait_for("one connection in the pool", || pooled(&gw) == 1);
    assert_eq!(
        admin(&gw, &format!("SELECT pg_terminate_backend({second})")),
        "t"
    );
    wait_for("the server process ends", || {
        admin(
            &gw,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {second}"),
        ) == "0"
    });
    let (client, conn) = gw.client().await?;
    assert_ne!(pid(&client).await?, second);
    end(client, conn).await?;

    // A client that says goodbye without waiting for its answer: the server finishes the
    // statement, the agent still gets the answer, and the connection is not kept.
    let mut send = startup("claude", "orders-db");
    send.extend(message(b'Q', b"SELECT pg_backend_pid(), pg_sleep(1)\0"));
    send.extend(message(b'X', b""));
    let started = Instant::now();
    let answer = raw(gw.port, &send);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let unanswered = first_value(&answer).expect("the statement's row reached the agent");
    wait_for("the server process of the unanswered session ends", || {
        admin(
            &gw,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {unanswered}"),
        ) == "0"
    });

    // A session whose statement was canceled is not kept either: the cancel could still be
    // on its way to the server.
    let (client, conn) = gw.client().await?;
    let canceled = pid(&client).await?;
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let r = client.query_one("SELECT pg_sleep(10)", &[]).await;
        (r, client)
    });
    wait_for("the statement is running", || {
        admin(
            &gw,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = {canceled} AND query = 'SELECT pg_sleep(10)'"
            ),
        ) == "1"
    });
    token.cancel_query(tokio_postgres::NoTls).await?;
    let (r, client) = sleeping.await?;
    let e = r.expect_err("canceled");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e}"
    );
    end(client, conn).await?;
    wait_for("the canceled session's server process ends", || {
        admin(
            &gw,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {canceled}"),
        ) == "0"
    });

    // Six sessions at once, ended: four connections are kept (`--pg-pool-max-idle`), two
    // closed.
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (c, conn) = gw.client().await?;
        pid(&c).await?;
        clients.push((c, conn));
    }
    for (c, conn) in clients {
        end(c, conn).await?;
    }
    wait_for("four idle connections kept", || pooled(&gw) == 4);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pooled(&gw), 4);
    Ok(())
}

/// `--pg-pool-idle-timeout` closes unused server connections; a connection checked with a
/// round trip before it is handed out (`--pg-pool-check-after`) still serves;
/// `--pg-pool-max-idle 0` keeps none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_are_closed_after_their_timeout_or_not_kept() -> anyhow::Result<()>
{
    let psql_idle = |gw: &Gateway| {
        admin(
            gw,
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'agentgate' \
             AND application_name = 'psql' AND state = 'idle'",
        )
    };
    let gw = start_with(&[
        ("AGENTGATE_PG_POOL_IDLE_TIMEOUT", "1s".into()),
        ("AGENTGATE_PG_POOL_CHECK_AFTER", "0s".into()),
    ])
    .await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let first = gw.ok("SELECT pg_backend_pid()");
    assert_eq!(gw.ok("SELECT pg_backend_pid()"), first);
    assert_eq!(gw.ok("SHOW TimeZone"), admin(&gw, "SHOW TimeZone"));
    wait_for("the idle connection is closed", || psql_idle(&gw) == "0");
    assert_ne!(gw.ok("SELECT pg_backend_pid()"), first);
    drop(gw);

    let gw = start_with(&[("AGENTGATE_PG_POOL_MAX_IDLE", "0".into())]).await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let first = gw.ok("SELECT pg_backend_pid()");
    assert_ne!(gw.ok("SELECT pg_backend_pid()"), first);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(psql_idle(&gw), "0");
    Ok(())
}

/// A statement a grant allowed is canceled at the server when the grant is revoked while it
/// runs; the agent is told why, and the outcome record says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_statement_is_canceled_when_its_grant_is_revoked() -> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    let now = jiff::Timestamp::now();
    let grant = |revoked: bool| {
        format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AccessGrant\nmetadata: {{ name: slow-write, creationTimestamp: \"{now}\" }}\nspec:\n  identity: claude\n  target: orders-db\n  scope: {{ operations: [Write], tables: [orders] }}\n  duration: 1h\n  reason: a slow fix\n  decision: {{ verdict: Approve, decidedAt: \"{now}\", decidedBy: {{ username: alice }} }}\n{}",
            if revoked {
                format!(
                    "  revocation: {{ reason: wrong table, revokedAt: \"{}\", revokedBy: {{ username: alice }} }}\n",
                    jiff::Timestamp::now()
                )
            } else {
                String::new()
            }
        )
    };
    let file = gw.policy.path().join("slow-grant.yaml");
    std::fs::write(&file, grant(false))?;
    let (client, _conn) = gw.client().await?;
    let quick = "UPDATE orders SET state = 'paid' WHERE id = 4711";
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.execute(quick, &[]).await.is_err() {
        assert!(Instant::now() < deadline, "the grant never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A write that takes a minute, allowed by the grant.
    let slow = tokio::spawn(async move {
        client
            .execute(
                "UPDATE orders SET state = 'slow' WHERE id = 4711 AND pg_sleep(60) IS NOT NULL",
                &[],
            )
            .await
    });
    wait_for("the slow write runs at the server", || {
        admin(
            &gw,
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(60)%' AND query NOT LIKE '%pg_stat_activity%'",
        ) == "1"
    });
    // Revoked while it runs.
    let started = Instant::now();
    std::fs::write(file.with_extension("tmp"), grant(true))?;
    std::fs::rename(file.with_extension("tmp"), &file)?;
    let err = tokio::time::timeout(Duration::from_secs(30), slow)
        .await
        .expect("the slow write ended")?
        .expect_err("the slow write was canceled");
    assert!(started.elapsed() < Duration::from_secs(30));
    let db = err.as_db_error().expect("an error from the gateway");
    assert_eq!(db.code().code(), "57014");
    assert!(
        db.message()
            .contains("agentgate: access ended while the request ran")
            && db
                .message()
                .contains("no baseline or active grant allows Write"),
        "{}",
        db.message()
    );
    // Nothing was written, and the write is not allowed any more.
    assert_eq!(
        admin(&gw, "SELECT state FROM orders WHERE id = 4711"),
        "paid"
    );
    let (client, _conn) = gw.client().await?;
    let err = client.execute(quick, &[]).await.expect_err("no grant now");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("held for approval")),
        "{err}"
    );
    // The outcome record says why it ended.
    let audit = gw
        .env
        .dir()
        .join(format!("audit-{}", gw.port))
        .join("audit.jsonl");
    wait_for("the outcome is recorded", || {
        std::fs::read_to_string(&audit).is_ok_and(|t| {
            t.lines().any(|l| {
                l.contains(r#""kind":"Outcome""#)
                    && l.contains("agentgate: access ended while the request ran")
            })
        })
    });

    // A read the baseline allows ends too when the identity is disabled.
    let (client, _conn) = gw.client().await?;
    let reading = tokio::spawn(async move { client.query("SELECT pg_sleep(60)", &[]).await });
    wait_for("the slow read runs at the server", || {
        admin(
            &gw,
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(60)'",
        ) == "1"
    });
    let main = gw.policy.path().join("policy.yaml");
    let text = std::fs::read_to_string(&main)?;
    let disabled = text.replace(
        "  owner: team-orders\n",
        "  owner: team-orders\n  disabled: true\n",
    );
    assert_ne!(text, disabled);
    std::fs::write(main.with_extension("tmp"), disabled)?;
    std::fs::rename(main.with_extension("tmp"), &main)?;
    let err = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .expect("the slow read ended")?
        .expect_err("the slow read was canceled");
    let db = err.as_db_error().expect("an error from the gateway");
    assert_eq!(db.code().code(), "57014");
    assert!(
        db.message().contains("AgentIdentity claude is disabled"),
        "{}",
        db.message()
    );
    wait_for("the server stopped the read", || {
        admin(
            &gw,
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        ) == "0"
    });
    Ok(())
}

/// A whole row of a masked table, a value a type's input function quotes back in a syntax
/// error, a portal whose statement was parsed again before it ran, and a statement sent
/// right behind one that changed how the server reads strings: none gets a masked value out
/// or a statement past the checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_rows_value_errors_rebound_portals_and_pipelined_settings_hold_the_rules()
-> anyhow::Result<()> {
    let gw = start().await?;
    wait_for("policy loaded", || {
        gw.psql("orders-db", "SELECT 1").status.success()
    });
    // A whole row holds every column's value: masked as a computed value.
    assert_eq!(gw.ok("SELECT c FROM customers c WHERE id = 1"), "[name]");
    assert_eq!(
        gw.ok("SELECT customers FROM customers WHERE id = 1"),
        "[name]"
    );
    assert_eq!(
        gw.ok("SELECT c.id, c FROM customers c WHERE id = 2"),
        "2|[name]"
    );
    // A view's whole row too.
    assert_eq!(
        gw.ok("SELECT v FROM customer_names v WHERE id = 1"),
        "[name]"
    );

    // `::regtype` parses its input and quotes it in a syntax error; a comment where the
    // error points lists every letter the value may have. Nothing of it comes back.
    let err = gw.err(
        "/*xx'A''B''a''b''d'*/SELECT ('int ' || quote_literal(substr(name, 1, 1)))::regtype FROM customers WHERE id = 1",
    );
    assert!(!err.contains("'A'"), "{err}");
    assert!(
        err.contains("syntax error at or near \"(hidden: agentgate masks columns here)\""),
        "{err}"
    );
    // Errors about names the agent wrote still name them.
    let err = gw.err("SELECT nosuchcolumn FROM customers");
    assert!(err.contains("nosuchcolumn"), "{err}");
    let err = gw.err("SELECT * FROM \"NoSuchTable\"");
    assert!(err.contains("\"NoSuchTable\""), "{err}");

    // The unnamed statement parsed again between a Bind and its Execute: the portal runs
    // what was bound, and is masked as that.
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let parse = |sql: &str| message(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    let bind = message(b'B', b"\0\0\0\0\0\0\0\0");
    let execute = message(b'E', b"\0\0\0\0\0");
    let answer = text(raw(
        gw.port,
        &[
            startup("claude", "orders-db"),
            parse("SELECT upper(name) AS n FROM customers WHERE id = 1"),
            bind.clone(),
            parse("SELECT 1"),
            execute.clone(),
            message(b'S', b""),
            message(b'X', b""),
        ]
        .concat(),
    ));
    assert!(!answer.contains("ADA"), "{answer}");
    assert!(answer.contains("[name]"), "{answer}");

    // A statement pipelined right behind one that turns standard_conforming_strings off is
    // read by the server with backslash escapes: the gateway checks it only after the
    // server reported the change, which ends the session; the hidden statement never runs.
    let pg = gw.env.postgres()?;
    let widened = policy(pg.port())
        .replace(
            "- { target: orders-db, scope: { operations: [Read] } }",
            "- { target: orders-db, scope: { operations: [Read, Write, DDL, Privilege] } }",
        )
        .replace(
            "action: Block, message: dropping tables is never allowed for agents }",
            "action: Block, message: dropping tables is never allowed for agents }\n    - { name: settings, operations: [Privilege], matches: [set_config], action: Allow }",
        );
    assert!(widened.contains("name: settings"));
    std::fs::write(gw.policy.path().join("policy.yaml"), widened)?;
    wait_for("set_config allowed", || {
        gw.psql(
            "orders-db",
            "SELECT set_config('application_name', 'x', false)",
        )
        .status
        .success()
    });
    // A statement that writes while it reads a masked column could store the value where
    // no rule masks it (or return it under another column's name): refused.
    for copying in [
        "UPDATE orders SET state = c.name FROM customers c WHERE c.id = orders.customer_id RETURNING orders.state",
        "INSERT INTO orders SELECT 9, name, 1 FROM customers WHERE id = 1 RETURNING state",
        "WITH x AS (INSERT INTO orders SELECT 9, name, 1 FROM customers WHERE id = 1 RETURNING 1) SELECT count(*) FROM x",
        "SELECT set_config('application_name', name, false) FROM customers WHERE id = 1",
        "SELECT lo_from_bytea(0, convert_to(name, 'UTF8')) FROM customers WHERE id = 1",
    ] {
        let err = gw.err(copying);
        assert!(
            err.contains("reads columns masked by pii/names"),
            "{copying}: {err}"
        );
    }
    assert_eq!(gw.ok("SELECT count(*) FROM orders WHERE id = 9"), "0");
    // A row lock stores nothing: its rows are masked as a query's.
    assert_eq!(
        gw.ok("SELECT name FROM customers WHERE id = 1 FOR UPDATE"),
        "[name]"
    );
    // Rules name columns: a schema change to a table with masked columns could move their
    // values out of them (a renamed column, a view the catalog cannot see yet).
    for change in [
        "ALTER TABLE customers RENAME COLUMN name TO label",
        "ALTER TABLE public.customers ALTER COLUMN name TYPE varchar(100)",
        "BEGIN; CREATE VIEW leak AS SELECT name AS e FROM customers; SELECT e FROM leak; COMMIT",
        "CREATE VIEW leak AS SELECT * FROM customers",
    ] {
        let err = gw.err(change);
        assert!(err.contains("masked by pii/names"), "{change}: {err}");
    }
    // Schemas too: rules name them.
    let err = gw.err("ALTER SCHEMA public RENAME TO elsewhere");
    assert!(err.contains("rules name schemas"), "{err}");
    // DDL elsewhere runs; in its transaction, writes and reads of what is not masked too.
    gw.ok("CREATE TABLE scratch (id int)");
    let out = psql_each(
        &gw,
        &[
            "BEGIN",
            "CREATE TABLE migration (v int)",
            "INSERT INTO migration VALUES (1)",
            "SELECT 1",
            // A name may stand for another relation until the DDL commits: what reads one
            // is masked, and a write that reads one waits for the commit.
            "SELECT state FROM orders WHERE id = 4712",
            "UPDATE orders SET state = 'paid' WHERE id = 4712",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "BEGIN\nCREATE TABLE\nINSERT 0 1\n1\n[name]",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reads columns masked by pii/names"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Code the server runs later on statements that do not name it (a trigger, a rule, a
    // function behind them) is Exec: an approver decides.
    for code in [
        "CREATE FUNCTION copy_email() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.state := (SELECT name FROM customers LIMIT 1); RETURN NEW; END$$",
        "CREATE TRIGGER copy BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION twice()",
    ] {
        let err = gw.err(code);
        assert!(err.contains("held for approval"), "{code}: {err}");
    }
    // Writes of the agent's own values, and rows named by columns that are not masked, run.
    assert_eq!(
        gw.ok("UPDATE orders SET state = 'shipped' WHERE customer_id IN (SELECT id FROM customers WHERE id = 1) RETURNING state"),
        "shipped\nUPDATE 1"
    );
    let query = |sql: &str| message(b'Q', &[sql.as_bytes(), b"\0"].concat());
    // A simple query inside an extended batch that ran something: refused until its Sync.
    let answer = text(raw(
        gw.port,
        &[
            startup("claude", "orders-db"),
            parse("SELECT set_config('standard_conforming_strings', 'off', false)"),
            bind.clone(),
            execute.clone(),
            query(r"SELECT 'a\', ' || 'leaked' || current_user --'"),
            message(b'S', b""),
            message(b'X', b""),
        ]
        .concat(),
    ));
    assert!(!answer.contains("leaked"), "{answer}");
    assert!(answer.contains("send a Sync before this query"), "{answer}");
    for hidden in [
        r"SELECT 'a\', ' ; SELECT 'leaked' || current_user --'",
        // One Parse in a batch that executed something before it: refused.
        "",
    ] {
        let send = if hidden.is_empty() {
            [
                startup("claude", "orders-db"),
                parse("SELECT set_config('standard_conforming_strings', 'off', false)"),
                bind.clone(),
                execute.clone(),
                parse(r"SELECT 'a\', ' || 'leaked' || current_user --'"),
                bind.clone(),
                execute.clone(),
                message(b'S', b""),
                message(b'X', b""),
            ]
            .concat()
        } else {
            [
                startup("claude", "orders-db"),
                query("SELECT set_config('standard_conforming_strings', 'off', false)"),
                query(hidden),
                message(b'X', b""),
            ]
            .concat()
        };
        let answer = text(raw(gw.port, &send));
        assert!(!answer.contains("leaked"), "{answer}");
        if hidden.is_empty() {
            assert!(answer.contains("send a Sync before this Parse"), "{answer}");
        } else {
            assert!(answer.contains("agentgate ends this session"), "{answer}");
        }
    }
    Ok(())
}
