//! Keycloak, the OpenID Connect provider users run, from Maven Central (installed by
//! `tests/env/install.sh` into the cache, built once for an in-memory database). Each
//! instance serves HTTPS only, on a free loopback port, with a certificate from the
//! environment's CA and a fixed issuer; realms are created through the admin REST API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Proc, Spec};
use crate::{Error, TestEnv};

const ADMIN_PASSWORD: &str = "agentgate-test-admin";

/// The Keycloak version `install.sh` installs.
pub fn version() -> String {
    crate::install_setting("KEYCLOAK_VERSION")
}

/// Where Keycloak is: `$AGENTGATE_KEYCLOAK`, else the version-keyed cache.
pub fn home() -> Result<PathBuf, Error> {
    let path = std::env::var_os("AGENTGATE_KEYCLOAK")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cache_dir().join(format!("keycloak-{}", version())));
    if path.join("bin/kc.sh").exists() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            what: "Keycloak",
            path,
            var: "AGENTGATE_KEYCLOAK",
        })
    }
}

/// The newest JDK under /usr/lib/jvm (Keycloak prefers 21+), or `None` for `java` on PATH.
pub fn java_home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("AGENTGATE_JAVA_HOME") {
        return Some(PathBuf::from(h));
    }
    let mut homes: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/jvm")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("bin/java").exists())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let major = name
                .split(|c: char| !c.is_ascii_digit())
                .find(|p| !p.is_empty())?
                .parse()
                .ok()?;
            Some((major, e.path()))
        })
        .collect();
    homes.sort();
    homes.pop().map(|(_, p)| p)
}

/// A running Keycloak.
pub struct KeycloakEnv {
    proc: Proc,
    port: u16,
    ca_pem: String,
    dir: PathBuf,
}

impl KeycloakEnv {
    /// Starts Keycloak in `env`'s directory (about half a minute: it creates its schema).
    pub fn start(env: &TestEnv) -> Result<Self, Error> {
        let home = home()?;
        let dir = env.dir().join("keycloak");
        crate::kube_env::mkdir(&dir.join("tmp"))?;
        let pem = env.ca().server("keycloak", &[])?;
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, &pem.cert).map_err(|e| Error::io("write tls.crt", e))?;
        std::fs::write(&key, &pem.key).map_err(|e| Error::io("write tls.key", e))?;
        // kc.sh runs java as its child: a wrapper gives the JVM its own parent-death signal,
        // so it never outlives the test.
        let java = java_home()
            .map(|h| h.join("bin/java"))
            .unwrap_or_else(|| PathBuf::from("java"));
        let wrapper = dir.join("jdk/bin");
        crate::kube_env::mkdir(&wrapper)?;
        let script = format!(
            "#!/bin/sh\nexec setpriv --pdeathsig KILL -- '{}' \"$@\"\n",
            java.display()
        );
        std::fs::write(wrapper.join("java"), script).map_err(|e| Error::io("write java", e))?;
        std::fs::set_permissions(
            wrapper.join("java"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| Error::io("chmod java", e))?;
        let port = process::free_port()?;
        let mut spec = Spec::new("keycloak", home.join("bin/kc.sh"))
            .args([
                "start".to_owned(),
                "--optimized".into(),
                "--cache=local".into(),
                "--http-enabled=false".into(),
                "--http-host=127.0.0.1".into(),
                format!("--https-port={port}"),
                format!("--https-certificate-file={}", cert.display()),
                format!("--https-certificate-key-file={}", key.display()),
                format!("--hostname=https://127.0.0.1:{port}"),
            ])
            .env("JAVA_HOME", dir.join("jdk").display().to_string())
            .env(
                "JAVA_OPTS_APPEND",
                format!(
                    "-Djava.io.tmpdir={} -XX:-UsePerfData --add-opens=java.base/java.lang=ALL-UNNAMED -XX:TieredStopAtLevel=1 -Dliquibase.analytics.enabled=false -Dquarkus.transaction-manager.object-store.directory={}",
                    dir.join("tmp").display(),
                    dir.join("transaction-logs").display()
                ),
            )
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", "admin")
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD);
        spec.cwd = Some(dir.clone());
        let mut proc = Proc::start(spec, &env.dir().join("logs"))?;
        let client = crate::http::TlsClient::new(&env.ca().cert_pem(), None)?;
        process::wait_until(
            &mut proc,
            Duration::from_secs(240),
            "Keycloak answering",
            || {
                client
                    .get(port, "/realms/master/.well-known/openid-configuration")
                    .is_ok_and(|r| r.status == 200)
            },
        )?;
        Ok(Self {
            proc,
            port,
            ca_pem: env.ca().cert_pem(),
            dir,
        })
    }

    /// The issuer URL of `realm`.
    pub fn issuer(&self, realm: &str) -> String {
        format!("https://127.0.0.1:{}/realms/{realm}", self.port)
    }

    /// Keycloak's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process, for its log.
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    fn curl(&self, args: &[&str]) -> Result<String, Error> {
        let ca = self.dir.join("ca.crt");
        if !ca.exists() {
            std::fs::write(&ca, &self.ca_pem).map_err(|e| Error::io("write ca.crt", e))?;
        }
        process::run(
            Command::new("curl")
                .args(["-sS", "--fail-with-body", "--cacert"])
                .arg(&ca)
                .args(args),
            "curl (Keycloak)",
        )
    }

    /// Calls the admin REST API (`/admin/realms…`) as the bootstrap admin; returns the body.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, Error> {
        let token = self.token(
            "master",
            &[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", "admin"),
                ("password", ADMIN_PASSWORD),
            ],
        )?;
        let access = token["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let file = self.dir.join("admin-body.json");
        let mut args = vec![
            "-X".to_owned(),
            method.to_owned(),
            "-H".into(),
            format!("Authorization: Bearer {access}"),
        ];
        if let Some(b) = body {
            std::fs::write(&file, b.to_string()).map_err(|e| Error::io("write a body", e))?;
            args.extend([
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                format!("@{}", file.display()),
            ]);
        }
        args.push(format!("https://127.0.0.1:{}/admin{path}", self.port));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.curl(&refs)
    }

    /// Creates a realm from its JSON representation.
    pub fn create_realm(&self, realm: &serde_json::Value) -> Result<(), Error> {
        self.admin("POST", "/realms", Some(realm)).map(|_| ())
    }

    /// Calls `realm`'s token endpoint with `form`; returns the JSON answer.
    pub fn token(&self, realm: &str, form: &[(&str, &str)]) -> Result<serde_json::Value, Error> {
        let mut args: Vec<String> = Vec::new();
        for (k, v) in form {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        args.push(format!(
            "https://127.0.0.1:{}/realms/{realm}/protocol/openid-connect/token",
            self.port
        ));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.curl(&refs)?;
        serde_json::from_str(&out).map_err(|e| Error::Http(format!("token answer: {e}: {out}")))
    }

    /// The CA file Keycloak's certificate chains to.
    pub fn ca_path(&self) -> PathBuf {
        let ca = self.dir.join("ca.crt");
        let _ = std::fs::write(&ca, &self.ca_pem);
        ca
    }

    /// Keycloak's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
