//! What to run to ask for access to a refused request: the `kubectl agentgate grants request`
//! command whose scope covers exactly that request, with the flags of its protocol.

use std::fmt::Write;

use super::{Command, Decision, SshForwarding};

/// The longest SSH command put into a hint whole; a longer one gets a placeholder.
const MAX_COMMAND: usize = 200;

/// `kubectl agentgate grants request …` for `cmd`, scoped as narrowly as the request itself:
/// its verb, resource, namespace and name for Kubernetes; its login, commands and forwarding
/// for SSH; its tables for PostgreSQL. `mask` is applied to SSH command lines (they may carry
/// secrets the agent typed).
pub fn request_hint(
    identity: &str,
    target: &str,
    cmd: &Command,
    mask: impl Fn(&str) -> String,
) -> String {
    let mut s = format!(
        "kubectl agentgate grants request <name> --identity {identity} --target {target} --operations {}",
        cmd.class
    );
    if let Some(k) = &cmd.kube {
        let resource = match k.resource.split_once('/') {
            Some((res, sub)) if !k.group.is_empty() => format!("{res}.{}/{sub}", k.group),
            _ if !k.group.is_empty() => format!("{}.{}", k.resource, k.group),
            _ => k.resource.clone(),
        };
        let _ = write!(
            s,
            " --verb {} --resource {}",
            literal(&k.verb, "verb"),
            literal(&resource, "resource")
        );
        if !k.namespace.is_empty() {
            let _ = write!(s, " --in-namespace {}", literal(&k.namespace, "namespace"));
        }
        if !k.name.is_empty() {
            let _ = write!(s, " --resource-name {}", literal(&k.name, "name"));
        }
    } else if let Some(a) = &cmd.ssh {
        if a.login != a.default_login {
            let _ = write!(s, " --ssh-login {}", literal(&a.login, "login"));
        }
        for c in &a.commands {
            let c = mask(c);
            // A `*` typed in the command would be a wildcard in the scope (`rm *` would allow
            // `rm -rf /`): the approver writes the glob.
            if c.chars().count() > MAX_COMMAND || c.contains('*') {
                s.push_str(" --ssh-command '<a glob for the command>'");
            } else {
                let _ = write!(s, " --ssh-command {}", quote(&c));
            }
        }
        match a.forwarding {
            Some(SshForwarding::Port) => s.push_str(" --ssh-port-forwarding"),
            Some(SshForwarding::Agent) => s.push_str(" --ssh-agent-forwarding"),
            Some(SshForwarding::X11) => s.push_str(" --ssh-x11-forwarding"),
            None => {}
        }
    } else {
        for t in &cmd.tables {
            // Also a wildcard in the scope; and the CLI splits the flag at commas.
            if t.contains(['*', ',']) {
                s.push_str(" --table '<the table>'");
            } else if cmd.unresolved.is_some() && crate::sql::classify::unqualified(t).is_some() {
                // Its schema cannot be told: the agent names it in the statement.
                let _ = write!(s, " --table {}", quote(&format!("<schema>.{t}")));
            } else {
                let _ = write!(s, " --table {}", quote(t));
            }
        }
    }
    s.push_str(" --reason <why>");
    s
}

/// For a held request no baseline or grant covers (`not-in-scope`): how to ask for access
/// that covers requests like it, not only this one; empty otherwise. Follows the message
/// naming the grant bound to the request.
pub fn scoped(
    identity: &str,
    target: &str,
    cmd: &Command,
    decision: &Decision,
    mask: impl Fn(&str) -> String,
) -> String {
    if decision.rule == "not-in-scope" {
        format!(
            "; or, for access beyond this one request: {}",
            request_hint(identity, target, cmd, mask)
        )
    } else {
        String::new()
    }
}

/// `w` as one value of a flag, shell-quoted; a placeholder naming `what` when `w` would not
/// be read as itself (a `*` is a wildcard in a scope, a `,` splits the CLI's lists).
fn literal(w: &str, what: &str) -> String {
    if w.contains(['*', ',']) {
        format!("'<the {what}>'")
    } else {
        quote(w)
    }
}

/// A POSIX shell word: as it is when it is plain, else in single quotes.
fn quote(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c));
    if plain {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{KubeAccess, SshAccess};
    use agentgate_crds::OperationClass;

    fn cmd(class: OperationClass) -> Command {
        Command {
            class,
            fingerprint: crate::sql::Fingerprint::known(String::new()),
            keys: Default::default(),
            tables: Default::default(),
            unresolved: None,
            parts: Vec::new(),
            kube: None,
            ssh: None,
        }
    }

    #[test]
    fn a_hint_scopes_the_grant_to_the_request() {
        let mut k = cmd(OperationClass::Write);
        k.kube = Some(KubeAccess {
            verb: "patch".into(),
            group: "apps".into(),
            resource: "deployments/scale".into(),
            namespace: "shop".into(),
            name: "web".into(),
        });
        assert_eq!(
            request_hint("claude", "cluster", &k, str::to_owned),
            "kubectl agentgate grants request <name> --identity claude --target cluster --operations Write --verb patch --resource deployments.apps/scale --in-namespace shop --resource-name web --reason <why>"
        );
        // What the agent's path said is never a wildcard or a list in the hint.
        let mut w = cmd(OperationClass::Read);
        w.kube = Some(KubeAccess {
            verb: "list".into(),
            resource: "pods".into(),
            namespace: "*".into(),
            name: "a,b".into(),
            ..Default::default()
        });
        assert!(
            request_hint("claude", "cluster", &w, str::to_owned)
                .contains("--in-namespace '<the namespace>' --resource-name '<the name>'")
        );
        let mut k = cmd(OperationClass::Read);
        k.kube = Some(KubeAccess {
            verb: "list".into(),
            resource: "pods".into(),
            ..Default::default()
        });
        assert!(
            request_hint("claude", "cluster", &k, str::to_owned)
                .ends_with("--operations Read --verb list --resource pods --reason <why>")
        );

        let mut a = cmd(OperationClass::Exec);
        a.ssh = Some(SshAccess {
            login: "root".into(),
            default_login: "deploy".into(),
            commands: vec!["systemctl restart nginx".into(), "echo it's".into()],
            forwarding: None,
        });
        assert!(
            request_hint("claude", "web-1", &a, |c| c.replace("nginx", "[masked]")).ends_with(
                r"--operations Exec --ssh-login root --ssh-command 'systemctl restart [masked]' --ssh-command 'echo it'\''s' --reason <why>"
            )
        );
        let mut f = cmd(OperationClass::Exec);
        f.ssh = Some(SshAccess {
            login: "deploy".into(),
            default_login: "deploy".into(),
            commands: vec!["x".repeat(300), "rm *".into()],
            forwarding: Some(SshForwarding::Port),
        });
        assert!(
            request_hint("claude", "web-1", &f, str::to_owned).ends_with(
                "--ssh-command '<a glob for the command>' --ssh-command '<a glob for the command>' --ssh-port-forwarding --reason <why>"
            )
        );

        let mut p = cmd(OperationClass::Write);
        p.tables = ["public.orders".to_owned(), "audit log".to_owned()].into();
        assert!(request_hint("claude", "db", &p, str::to_owned).ends_with(
            "--operations Write --table 'audit log' --table public.orders --reason <why>"
        ));
    }
}
