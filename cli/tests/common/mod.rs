//! What the CLI's end-to-end tests share: PostgreSQL with a target table and the audit
//! table, a policy, and the sidecar started with the PostgreSQL sink.
#![allow(clippy::expect_used, clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use testenv::process::{Proc, Spec, free_port, wait_listening};
use testenv::{Parts, TestEnv};

pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-agentgate"))
        .args(args)
        .output()
        .expect("run kubectl-agentgate")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[allow(dead_code)] // not every test file reads stderr
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The sidecar binary, built by the same `cargo test --workspace` (next to this crate's).
pub fn sidecar_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("agentgate-sidecar");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build agentgate-sidecar first)",
        bin.display()
    );
    bin
}

pub struct Setup {
    pub env: TestEnv,
    pub policy: tempfile::TempDir,
    pub targets: tempfile::TempDir,
    pub audit_dir: PathBuf,
    pub sink: String,
}

pub fn setup() -> Setup {
    let env = TestEnv::start(Parts {
        postgres: true,
        ..Default::default()
    })
    .expect("environment");
    let pg = env.postgres().unwrap();
    pg.psql_run(
        "app",
        "CREATE TABLE customers (id int PRIMARY KEY, email text);
         INSERT INTO customers SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 50) g;
         GRANT SELECT ON customers TO agentgate;",
    )
    .unwrap();
    let policy = tempfile::tempdir().unwrap();
    std::fs::write(
        policy.path().join("policy.yaml"),
        format!(
            r#"apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: db }}
spec:
  protocol: Postgres
  postgres: {{ host: 127.0.0.1, port: {port}, database: app, tls: {{ mode: Disable }}, credentials: {{ name: db }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: claude }}
spec:
  owner: team
  authentication: {{ serviceAccount: {{ name: claude }} }}
  baseline: [ {{ target: db, scope: {{ operations: [Read] }} }} ]
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec: {{ rules: [ {{ name: emails, detectors: [Email], action: Redact }} ] }}
"#,
            port = pg.port()
        ),
    )
    .unwrap();
    let targets = tempfile::tempdir().unwrap();
    pg.write_credentials(targets.path(), "db", "agentgate")
        .unwrap();
    let sink = pg.audit_table().unwrap();
    let audit_dir = env.dir().join("audit");
    Setup {
        env,
        policy,
        targets,
        audit_dir,
        sink,
    }
}

impl Setup {
    pub fn start(&self, name: &str, extra: &[String]) -> (Proc, u16) {
        self.start_with_sink(name, &self.sink, extra)
    }

    /// Starts a sidecar whose PostgreSQL sink connects with `sink`.
    pub fn start_with_sink(&self, name: &str, sink: &str, extra: &[String]) -> (Proc, u16) {
        let port = free_port().unwrap();
        let mut args = vec![
            format!("--policy-dir={}", self.policy.path().display()),
            "--identity=claude".into(),
            format!("--targets-dir={}", self.targets.path().display()),
            format!("--pg-addr=127.0.0.1:{port}"),
            "--kube-addr=127.0.0.1:0".into(),
            "--ssh-addr=127.0.0.1:0".into(),
            format!("--audit-dir={}", self.audit_dir.display()),
            format!("--audit-postgres={sink}"),
        ];
        args.extend_from_slice(extra);
        let spec = Spec::new(name, sidecar_bin()).args(args);
        let mut proc = Proc::start(spec, &self.env.dir().join("logs")).unwrap();
        wait_listening(&mut proc, port, Duration::from_secs(20)).unwrap();
        (proc, port)
    }

    pub fn psql(&self, port: u16, sql: &str) -> Output {
        Command::new(self.env.bins.pg_bin.join("psql"))
            .arg(format!(
                "host=127.0.0.1 port={port} dbname=db user=claude sslmode=disable application_name=audit-test"
            ))
            .args(["-X", "-At", "-c", sql])
            .output()
            .expect("run psql")
    }

    pub fn file(&self) -> String {
        std::fs::read_to_string(self.audit_dir.join("audit.jsonl")).unwrap_or_default()
    }

    /// Distinct records in the file sink (a re-delivery after a kill may repeat a few).
    pub fn file_records(&self) -> usize {
        self.file()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| format!("{}/{}", v["stream"], v["n"]))
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    pub fn table(&self, sql: &str) -> String {
        self.env
            .postgres()
            .unwrap()
            .psql_run("app", sql)
            .unwrap()
            .trim()
            .to_owned()
    }

    /// The table sink goes down: its role cannot log in, its connection is cut.
    pub fn sink_down(&self) {
        self.table("ALTER ROLE agentgate_audit_writer NOLOGIN");
        self.table(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'agentgate_audit_writer'",
        );
    }

    /// How an auditor reads the table (the writer cannot read it).
    pub fn reader(&self) -> String {
        let pg = self.env.postgres().unwrap();
        format!(
            "host=127.0.0.1 port={} dbname=app user=postgres password={} sslmode=disable",
            pg.port(),
            pg.password()
        )
    }

    pub fn key(&self) -> String {
        self.audit_dir
            .join("signing-key.pk8.pub")
            .display()
            .to_string()
    }
}
