//! A real OpenSSH server (Debian's package) on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::Error;
use crate::kube_env::{mkdir, write};
use crate::process::{self, Proc, Spec};

/// sshd with its own host key and config, accepting one client key for the current user.
pub struct SshEnv {
    proc: Proc,
    dir: PathBuf,
    port: u16,
    user: String,
}

impl SshEnv {
    /// Generates host and client keys under `dir` and starts `sshd -D` on a free port.
    pub fn start(dir: &Path) -> Result<Self, Error> {
        let ssh = dir.join("ssh");
        mkdir(&ssh)?;
        let user = crate::current_user()?;
        for (file, comment) in [
            ("ssh_host_ed25519_key", "host"),
            ("client_key", "agentgate-test"),
        ] {
            process::run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                    .arg(ssh.join(file)),
                "ssh-keygen",
            )?;
        }
        let client_pub = std::fs::read_to_string(ssh.join("client_key.pub"))
            .map_err(|e| Error::io("read client_key.pub", e))?;
        write(&ssh.join("authorized_keys"), &client_pub)?;
        if crate::is_root() {
            // The privilege-separation directory systemd would create.
            mkdir(Path::new("/run/sshd"))?;
        }
        let sshd = PathBuf::from("/usr/sbin/sshd");
        let logs = dir.join("logs");
        let mut last = None;
        for _ in 0..3 {
            let port = process::free_port()?;
            let config = format!(
                "Port {port}\n\
                 ListenAddress 127.0.0.1\n\
                 HostKey {hk}\n\
                 PidFile {pid}\n\
                 AuthorizedKeysFile {ak}\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\n\
                 AllowUsers {user}\n\
                 Subsystem sftp internal-sftp\n\
                 AllowTcpForwarding yes\n\
                 X11Forwarding yes\n\
                 X11UseLocalhost yes\n\
                 XAuthLocation /usr/bin/xauth\n\
                 SetEnv XAUTHORITY={xauth}\n\
                 PrintMotd no\n\
                 MaxStartups 300\n\
                 MaxSessions 300\n\
                 LogLevel VERBOSE\n",
                hk = ssh.join("ssh_host_ed25519_key").display(),
                pid = ssh.join("sshd.pid").display(),
                ak = ssh.join("authorized_keys").display(),
                xauth = ssh.join("Xauthority").display(),
            );
            write(&ssh.join("sshd_config"), &config)?;
            let spec = Spec::new("sshd", &sshd).args([
                "-D".to_owned(),
                "-e".into(),
                "-f".into(),
                ssh.join("sshd_config").display().to_string(),
            ]);
            let mut proc = Proc::start(spec, &logs)?;
            let ready =
                process::wait_until(&mut proc, Duration::from_secs(20), "sshd listening", || {
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                });
            match ready {
                Ok(()) => {
                    let env = Self {
                        proc,
                        dir: ssh.clone(),
                        port,
                        user: user.clone(),
                    };
                    let host_pub = std::fs::read_to_string(ssh.join("ssh_host_ed25519_key.pub"))
                        .map_err(|e| Error::io("read the host key", e))?;
                    let mut parts = host_pub.split_whitespace();
                    let line = format!(
                        "[127.0.0.1]:{port} {} {}\n",
                        parts.next().unwrap_or_default(),
                        parts.next().unwrap_or_default()
                    );
                    write(&env.known_hosts(), &line)?;
                    return Ok(env);
                }
                Err(e) if proc.log_contains("Address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Http("sshd did not start".into())))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The login that the client key opens.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The client's private key (OpenSSH format).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// A `known_hosts` file with this server's host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// `ssh` to this server with the client key, strict host key checking, no user config.
    pub fn ssh(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.client_options()).args([
            "-p",
            &self.port.to_string(),
            &format!("{}@127.0.0.1", self.user),
        ]);
        cmd
    }

    /// The options every OpenSSH client (ssh, scp, sftp) needs for this server.
    pub fn client_options(&self) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-i".into(),
            self.client_key().display().to_string(),
        ]
    }

    /// A `Target` manifest (agentgate.dev/v1alpha1) for this server: its address, the login
    /// the client key opens, its host key as `knownHosts`, and the credentials Secret
    /// `<name>-key` (see [`Self::write_credentials`]).
    pub fn target_yaml(&self, name: &str) -> Result<String, Error> {
        let known = std::fs::read_to_string(self.known_hosts())
            .map_err(|e| Error::io("read known_hosts", e))?;
        Ok(format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: Target\nmetadata: {{ name: {name} }}\nspec:\n  protocol: SSH\n  ssh:\n    host: 127.0.0.1\n    port: {port}\n    user: {user}\n    credentials: {{ name: {name}-key }}\n    knownHosts: |\n      {kh}\n",
            port = self.port,
            user = self.user,
            kh = known.trim().replace('\n', "\n      "),
        ))
    }

    /// Writes the Target's credentials as the sidecar finds them mounted:
    /// `<targets_dir>/<name>/ssh-privatekey` (the client key).
    pub fn write_credentials(&self, targets_dir: &Path, name: &str) -> Result<(), Error> {
        let dir = targets_dir.join(name);
        mkdir(&dir)?;
        let key = std::fs::read_to_string(self.client_key())
            .map_err(|e| Error::io("read the client key", e))?;
        write(&dir.join("ssh-privatekey"), &key)
    }

    /// The process id of the listener.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Checks the server is still running.
    pub fn check_running(&mut self) -> Result<(), Error> {
        self.proc.check_running()
    }
}
