//! A real PostgreSQL server (Debian's package) on loopback, with TLS and SCRAM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::certs::Ca;
use crate::kube_env::{mkdir, write};
use crate::process::{self, Proc, Spec};
use crate::{Binaries, Error};

/// The superuser the harness creates.
pub const SUPERUSER: &str = "postgres";
/// The role agentgate's sidecar logs in with upstream (SCRAM-SHA-256).
pub const GATEWAY_USER: &str = "agentgate";
/// A role that authenticates with md5, for testing agentgate's md5 upstream support.
pub const MD5_USER: &str = "agentgate_md5";
/// The database created for tests.
pub const DATABASE: &str = "app";

/// A PostgreSQL server in its own data directory on a free port.
pub struct PostgresEnv {
    proc: Proc,
    dir: PathBuf,
    port: u16,
    password: String,
    ca_pem: String,
    bin: PathBuf,
    /// How the server was started, to start it again.
    spec: Spec,
    logs: PathBuf,
    restarts: u32,
}

impl PostgresEnv {
    /// Runs initdb under `dir` and starts the server with TLS on (certificate from `ca`).
    pub fn start(dir: &Path, bins: &Binaries, ca: &Ca) -> Result<Self, Error> {
        let pg = dir.join("postgres");
        mkdir(&pg)?;
        let data = pg.join("data");
        let password = format!("pw-{}", std::process::id());
        write(&pg.join("pwfile"), &format!("{password}\n"))?;
        let serving = ca.server("postgres", &[])?;
        write(&pg.join("server.crt"), &serving.cert)?;
        write(&pg.join("server.key"), &serving.key)?;
        set_mode(&pg.join("server.key"), 0o600)?;
        let run_as = crate::run_as_postgres()?;
        if let Some((uid, gid)) = crate::postgres_ids()? {
            chown_tree(&pg, uid, gid)?;
        }
        let logs = dir.join("logs");
        let initdb = bins.pg_bin.join("initdb");
        let mut cmd = match &run_as {
            Some((u, g)) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", u, "--regid", g, "--init-groups", "--"]);
                c.arg(&initdb);
                c
            }
            None => Command::new(&initdb),
        };
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
            ])
            .args(["--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pg.join("pwfile").display()));
        process::run(&mut cmd, "initdb")?;

        let mut last = None;
        for _ in 0..3 {
            let port = process::free_port()?;
            let mut spec = Spec::new("postgres", bins.pg_bin.join("postgres")).args([
                "-D".to_owned(),
                data.display().to_string(),
                "-c".into(),
                format!("port={port}"),
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
                "-c".into(),
                format!("unix_socket_directories={}", pg.display()),
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", pg.join("server.crt").display()),
                "-c".into(),
                format!("ssl_key_file={}", pg.join("server.key").display()),
                "-c".into(),
                "fsync=off".into(),
                "-c".into(),
                "max_connections=600".into(),
                "-c".into(),
                "log_min_messages=warning".into(),
            ]);
            spec.run_as = run_as.clone();
            spec.stop_signal = "INT";
            let again = spec.clone();
            let mut proc = Proc::start(spec, &logs)?;
            let ready = wait_ready(&mut proc, &bins.pg_bin, port);
            match ready {
                Ok(()) => {
                    let env = Self {
                        proc,
                        dir: pg.clone(),
                        port,
                        password: password.clone(),
                        ca_pem: ca.cert_pem(),
                        bin: bins.pg_bin.clone(),
                        spec: again,
                        logs: logs.clone(),
                        restarts: 0,
                    };
                    env.bootstrap()?;
                    return Ok(env);
                }
                Err(e) if proc.log_contains("could not bind") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Http("postgres did not start".into())))
    }

    fn bootstrap(&self) -> Result<(), Error> {
        let pw = &self.password;
        self.psql_run("postgres", &format!("CREATE DATABASE {DATABASE}"))?;
        self.psql_run(
            "postgres",
            &format!(
                "\
                 CREATE ROLE {GATEWAY_USER} LOGIN PASSWORD '{pw}';\n\
                 SET password_encryption = 'md5';\n\
                 CREATE ROLE {MD5_USER} LOGIN PASSWORD '{pw}';\n\
                 GRANT ALL ON DATABASE {DATABASE} TO {GATEWAY_USER}, {MD5_USER};"
            ),
        )?;
        self.psql_run(
            DATABASE,
            &format!("GRANT ALL ON SCHEMA public TO {GATEWAY_USER}, {MD5_USER};"),
        )?;
        // md5 for the md5 role, SCRAM for everyone else.
        let hba = self.dir.join("data").join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).map_err(|e| Error::io("read pg_hba.conf", e))?;
        write(
            &hba,
            &format!("host all {MD5_USER} 127.0.0.1/32 md5\n{old}"),
        )?;
        self.psql_run("postgres", "SELECT pg_reload_conf();")?;
        Ok(())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of the superuser and of the gateway roles.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The CA that signed the server certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A libpq URL for `user` on `db`, TLS verified against the test CA.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!(
            "postgresql://{user}:{}@127.0.0.1:{}/{db}?sslmode=verify-full&sslrootcert={}",
            self.password,
            self.port,
            self.ca_path().display()
        )
    }

    /// The superuser URL on the test database.
    pub fn admin_url(&self) -> String {
        self.url(SUPERUSER, DATABASE)
    }

    /// Creates the PostgreSQL audit sink's table in database `app` as an administrator would
    /// (`examples/audit/postgres.sql`: INSERT only for `agentgate_audit_writer`) and returns
    /// the connection string the sidecar's `--audit-postgres` takes.
    pub fn audit_table(&self) -> Result<String, Error> {
        self.psql_run("app", include_str!("../../examples/audit/postgres.sql"))?;
        self.psql_run(
            "app",
            &format!(
                "ALTER ROLE agentgate_audit_writer PASSWORD '{}'",
                self.password()
            ),
        )?;
        Ok(format!(
            "host=127.0.0.1 port={} dbname=app user=agentgate_audit_writer password={} sslmode=disable",
            self.port(),
            self.password()
        ))
    }

    /// Writes a Target's credentials as the sidecar reads them (the layout of the Secret
    /// mounted in a pod): `<dir>/<target>/{username,password,ca.crt}`, for role `user`.
    pub fn write_credentials(&self, dir: &Path, target: &str, user: &str) -> Result<(), Error> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
        for (file, value) in [
            ("username", user),
            ("password", self.password()),
            ("ca.crt", self.ca_pem()),
        ] {
            std::fs::write(d.join(file), value)
                .map_err(|e| Error::io(format!("write {file}"), e))?;
        }
        Ok(())
    }

    /// Where the CA certificate is written.
    pub fn ca_path(&self) -> PathBuf {
        let p = self.dir.join("ca.crt");
        if !p.exists() {
            let _ = std::fs::write(&p, &self.ca_pem);
        }
        p
    }

    /// `psql` as the superuser on `db`, quiet, stopping at the first error.
    pub fn psql(&self, db: &str) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.arg(self.url(SUPERUSER, db))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At"]);
        cmd
    }

    /// Runs SQL as the superuser on `db` and returns psql's output (unaligned, tuples only).
    pub fn psql_run(&self, db: &str, sql: &str) -> Result<String, Error> {
        process::run(self.psql(db).args(["-c", sql]), &format!("psql -c {sql:?}"))
    }

    /// The process id of the postmaster.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Restarts the server in place, on the same port and data: a fast shutdown (open
    /// connections are cut, their transactions roll back), then a start.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.proc.stop(Duration::from_secs(30));
        self.restarts += 1;
        let mut spec = self.spec.clone();
        spec.name = format!("postgres-restart-{}", self.restarts);
        self.proc = Proc::start(spec, &self.logs)?;
        wait_ready(&mut self.proc, &self.bin, self.port)
    }

    /// Checks the server is still running.
    pub fn check_running(&mut self) -> Result<(), Error> {
        self.proc.check_running()
    }
}

/// Waits until the server at `port` accepts connections.
fn wait_ready(proc: &mut Proc, pg_bin: &Path, port: u16) -> Result<(), Error> {
    let isready = pg_bin.join("pg_isready");
    process::wait_until(proc, Duration::from_secs(60), "pg_isready", || {
        Command::new(&isready)
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

fn set_mode(p: &Path, mode: u32) -> Result<(), Error> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {}", p.display()), e))
}

fn chown_tree(p: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .map_err(|e| Error::io(format!("chown {}", p.display()), e))?;
    if p.is_dir() {
        let entries =
            std::fs::read_dir(p).map_err(|e| Error::io(format!("list {}", p.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("list {}", p.display()), e))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The PostgreSQL JDBC driver jar `tests/env/install.sh` puts in the cache
/// (`$AGENTGATE_PGJDBC` overrides).
pub fn jdbc_jar() -> Result<PathBuf, Error> {
    let path = std::env::var_os("AGENTGATE_PGJDBC")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::cache_dir().join(format!(
                "pgjdbc-{}/postgresql.jar",
                crate::install_setting("PGJDBC_VERSION")
            ))
        });
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            what: "the PostgreSQL JDBC driver",
            path,
            var: "AGENTGATE_PGJDBC",
        })
    }
}
