//! kwok (sigs.k8s.io/kwok), the fake kubelet: it makes Nodes that carry the annotation
//! `kwok.x-k8s.io/node: fake` and their Pods look alive, and it serves the kubelet API that
//! the API server proxies `exec`, `attach` and `port-forward` to. Its `ClusterExec` runs the
//! requested command on this machine (in a work directory of the environment), so
//! `kubectl exec` has a real upstream that speaks the streaming protocols, with no container
//! runtime. Built from the Go module proxy by `tests/env/install.sh` into the cache.
//!
//! Limits of kwok's exec (its own): a command's exit code is not passed on (a failure is an
//! error), and stdin is never closed for the command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;
use crate::kube_env::{KubeEnv, write};
use crate::process::{self, Proc, Spec};

const KWOK_GOMOD: &str = include_str!("../env/kwok/go.mod");

/// The kwok release `tests/env/kwok/go.mod` pins.
pub fn version() -> String {
    KWOK_GOMOD
        .lines()
        .find_map(|l| l.trim().strip_prefix("require sigs.k8s.io/kwok v"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The kwok binary: `$AGENTGATE_KWOK`, else `<cache>/kwok-<version>/kwok`.
pub fn binary() -> Result<PathBuf, Error> {
    let path = std::env::var_os("AGENTGATE_KWOK")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::cache_dir()
                .join(format!("kwok-{}", version()))
                .join("kwok")
        });
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            what: "kwok",
            path,
            var: "AGENTGATE_KWOK",
        })
    }
}

/// kwok's configuration: two stages of our own (a fake Node becomes Ready; a Pending Pod on
/// one becomes Running with its containers running) and a `ClusterExec` that runs every
/// exec locally in `workdir`, and a `ClusterLogs` serving every container's log from `logs`
/// (CRI log format: see [`Kwok::log_line`]).
fn config(workdir: &Path, logs: &Path) -> String {
    format!(
        r#"apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {{ name: agentgate-node-ready }}
spec:
  resourceRef: {{ apiGroup: v1, kind: Node }}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      conditions:
      - type: Ready
        status: "True"
        reason: KubeletReady
        message: kwok is serving this fake node
        lastHeartbeatTime: {{{{ Now | Quote }}}}
        lastTransitionTime: {{{{ Now | Quote }}}}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {{ name: agentgate-pod-running }}
spec:
  resourceRef: {{ apiGroup: v1, kind: Pod }}
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Pending']
  next:
    statusTemplate: |
      phase: Running
      conditions:
      - type: Ready
        status: "True"
        lastTransitionTime: {{{{ Now | Quote }}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - name: {{{{ .name | Quote }}}}
        image: {{{{ .image | Quote }}}}
        ready: true
        restartCount: 0
        state:
          running:
            startedAt: {{{{ Now | Quote }}}}
      {{{{ end }}}}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterExec
metadata: {{ name: agentgate-local }}
spec:
  execs:
  - local: {{ workDir: "{}" }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterLogs
metadata: {{ name: agentgate-logs }}
spec:
  logs:
  - logsFile: "{}"
    follow: true
"#,
        workdir.display(),
        logs.display(),
    )
}

/// A running kwok serving the kubelet API on a loopback port.
pub struct Kwok {
    _proc: Proc,
    port: u16,
    /// Where exec'd commands run.
    pub workdir: PathBuf,
    /// The log every container serves (append with [`Kwok::log_line`]).
    pub logs: PathBuf,
}

impl Kwok {
    /// Starts kwok against `kube` (as its admin), its files in `dir`.
    pub fn start(kube: &KubeEnv, dir: &Path) -> Result<Self, Error> {
        let bin = binary()?;
        let workdir = dir.join("exec");
        std::fs::create_dir_all(&workdir)
            .map_err(|e| Error::io(format!("create {}", workdir.display()), e))?;
        let logs = dir.join("container.log");
        write(&logs, "")?;
        write(&dir.join("kwok.yaml"), &config(&workdir, &logs))?;
        let port = process::free_port()?;
        let mut spec = Spec::new("kwok", &bin).args([
            format!("--kubeconfig={}", kube.kubeconfig().display()),
            format!("--config={}", dir.join("kwok.yaml").display()),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--node-ip=127.0.0.1".into(),
            format!("--node-port={port}"),
            format!("--server-address=127.0.0.1:{port}"),
            "--node-lease-duration-seconds=0".into(),
        ]);
        // Never a kwok.yaml of the user's (kwok reads $KWOK_WORKDIR/kwok.yaml by itself).
        spec = spec.env("KWOK_WORKDIR", dir.display().to_string());
        spec.cwd = Some(dir.to_owned());
        let mut proc = Proc::start(spec, dir)?;
        process::wait_listening(&mut proc, port, Duration::from_secs(60))?;
        Ok(Self {
            _proc: proc,
            port,
            workdir,
            logs,
        })
    }

    /// Appends a line to the containers' log, as a container runtime writes it.
    pub fn log_line(&self, text: &str) -> Result<(), Error> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.logs)
            .map_err(|e| Error::io(format!("open {}", self.logs.display()), e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // RFC 3339 in UTC from the clock, without a date library.
        let secs = now.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil(days);
        writeln!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z stdout F {text}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            now.subsec_nanos()
        )
        .map_err(|e| Error::io(format!("write {}", self.logs.display()), e))
    }

    /// The port its kubelet API listens on (what a fake Node's status names).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A fake Node it serves, named `name`, reachable at its kubelet API.
    pub fn node_yaml(&self, name: &str) -> String {
        format!(
            r#"apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations: {{ kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0" }}
  labels: {{ kubernetes.io/hostname: {name}, kubernetes.io/os: linux, type: kwok }}
status:
  addresses: [ {{ type: InternalIP, address: 127.0.0.1 }} ]
  daemonEndpoints: {{ kubeletEndpoint: {{ Port: {} }} }}
"#,
            self.port
        )
    }
}

/// Days since 1970-01-01 as (year, month, day) in the proleptic Gregorian calendar.
fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
