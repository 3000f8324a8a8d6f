//! Who may decide an AccessGrant: people.
//!
//! Four eyes means two people. A decision by a service account (a pipeline, a controller, a
//! pod's own token), by an agent the gateway impersonates (`agentgate:agent:*`, group
//! `agentgate:agents`), or by a member of a group that takes in every service account or
//! every user is refused, however RBAC or `spec.approvers` read. An installation that needs
//! an automation account to decide names it, exactly, in the operator's
//! `--automation-approvers` (Helm value `approvals.automationApprovers`); agents can never be
//! named there. Pure functions: the webhooks and controllers call them.

use agentgate_crds::common::UserRef;
use agentgate_crds::identity::{Approvers, OidcSubject};

/// The user-name prefix of every Kubernetes service account.
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// The user-name prefix of the agents agentgate's Kubernetes gateway impersonates.
pub const AGENT_PREFIX: &str = "agentgate:agent:";
/// The group of the agents agentgate's Kubernetes gateway impersonates.
pub const AGENTS_GROUP: &str = "agentgate:agents";

/// User-name prefixes of principals that are not people, and what they are.
const MACHINE_USER_PREFIXES: &[(&str, &str)] = &[
    (SERVICE_ACCOUNT_PREFIX, "a service account"),
    (AGENT_PREFIX, "an agent (agentgate's gateway acts as it)"),
    ("system:node:", "a node"),
];

/// Groups whose members are not people, and what they hold.
fn machine_group(group: &str) -> Option<&'static str> {
    match group {
        "system:serviceaccounts" => Some("every service account"),
        g if g.starts_with("system:serviceaccounts:") => {
            Some("the service accounts of a namespace")
        }
        AGENTS_GROUP => Some("the agents agentgate's gateway acts as"),
        "system:nodes" => Some("the nodes"),
        "system:unauthenticated" => Some("unauthenticated requests"),
        _ => None,
    }
}

/// Groups that take in everyone, so they list no one in particular.
fn everyone_group(group: &str) -> Option<&'static str> {
    match group {
        "system:authenticated" => Some("every authenticated user, service accounts included"),
        "system:unauthenticated" => Some("every unauthenticated request"),
        _ => None,
    }
}

/// Why `user` is not a person, if it is not: its name or one of its groups says it is a
/// service account, an agent, a node or anonymous.
pub fn not_a_person(user: &UserRef) -> Option<String> {
    let name = &user.username;
    if name == "system:anonymous" || name.is_empty() {
        return Some("the request is anonymous".to_owned());
    }
    if let Some((_, what)) = MACHINE_USER_PREFIXES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
    {
        return Some(format!("{name} is {what}, not a person"));
    }
    user.groups.iter().find_map(|g| {
        machine_group(g).map(|what| format!("{name} is in group {g} ({what}), not a person"))
    })
}

/// Whether `user`, not a person, is an automation account the installation allows to decide
/// (listed by exact name in `allowed`). Only service accounts can be; an agent never is.
pub fn automation_allowed(user: &UserRef, allowed: &[String]) -> bool {
    user.username.starts_with(SERVICE_ACCOUNT_PREFIX)
        && allowed.iter().any(|a| a == &user.username)
        && !user.groups.iter().any(|g| g == AGENTS_GROUP)
}

/// Why `user` may not decide grants at all, if so: not a person, and not an allowed
/// automation account. The message says what to do.
pub fn refuse_decider(user: &UserRef, allowed: &[String]) -> Option<String> {
    let why = not_a_person(user)?;
    if automation_allowed(user, allowed) {
        return None;
    }
    let what_now = if user.username.starts_with(SERVICE_ACCOUNT_PREFIX) {
        "; decide as a person, or, if this automation account must decide, list it in the operator's --automation-approvers (Helm value approvals.automationApprovers)"
    } else {
        "; decide as a person"
    };
    Some(format!(
        "{why}: grants are decided by people (four eyes){what_now}"
    ))
}

/// Whether group `group` of `spec.approvers.groups` counts: a group of service accounts,
/// agents or everyone never makes its members approvers.
pub fn approver_group_counts(group: &str) -> bool {
    machine_group(group).is_none() && everyone_group(group).is_none()
}

/// What is wrong with an identity's `spec.approvers`, each with what to do: groups that take
/// in machines or everyone, and users that are not people (unless `allowed` names them).
pub fn approvers_problems(approvers: &Approvers, allowed: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for g in &approvers.groups {
        if let Some(what) = everyone_group(g) {
            out.push(format!(
                "spec.approvers.groups lists {g}, which takes in {what}: anyone could approve this identity's grants; list a group of the people who should"
            ));
        } else if let Some(what) = machine_group(g) {
            out.push(format!(
                "spec.approvers.groups lists {g}, which holds {what}, not people: machines never decide grants; list a group of the people who should"
            ));
        }
    }
    for u in &approvers.users {
        let user = UserRef {
            username: u.clone(),
            ..Default::default()
        };
        if let Some(why) = refuse_decider(&user, allowed) {
            out.push(format!("spec.approvers.users lists {u}: {why}"));
        }
    }
    out
}

/// Whether `username`, as the API server authenticated it, is the OIDC principal `oidc`
/// describes: its subject, or the e-mail or preferred user name its claims pin, bare or
/// behind the prefix an API server puts before OIDC user names (`https://issuer#sub` by
/// default, or a configured one such as `oidc:`).
pub fn is_oidc_principal(username: &str, oidc: &OidcSubject) -> bool {
    let pinned = oidc.subject.iter().chain(
        ["sub", "email", "preferred_username", "upn"]
            .iter()
            .filter_map(|k| oidc.claims.get(*k)),
    );
    pinned.filter(|v| !v.is_empty()).any(|v| {
        username == v
            || username
                .strip_suffix(v.as_str())
                .is_some_and(|prefix| prefix.ends_with([':', '#', '/', '-', '_', '.']))
    })
}

/// Checks an `--automation-approvers` entry: the full user name of a service account.
pub fn parse_automation_approver(s: &str) -> Result<String, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "{s:?} is not a service account's user name: --automation-approvers lists service accounts as system:serviceaccount:<namespace>:<name> (people need no listing; agents can never be listed)"
        )
    };
    let rest = s.strip_prefix(SERVICE_ACCOUNT_PREFIX).ok_or_else(bad)?;
    let (ns, name) = rest.split_once(':').ok_or_else(bad)?;
    let dns = |x: &str, dots: bool| {
        !x.is_empty()
            && x.len() <= 253
            && x.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.')
            })
            && !x.starts_with(['-', '.'])
            && !x.ends_with(['-', '.'])
    };
    if dns(ns, false) && ns.len() <= 63 && dns(name, true) {
        Ok(s.to_owned())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> UserRef {
        UserRef {
            username: name.into(),
            uid: None,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    #[test]
    fn machines_are_not_people() {
        let sa = user(
            "system:serviceaccount:ci:bot",
            &["system:serviceaccounts", "system:serviceaccounts:ci"],
        );
        assert!(
            not_a_person(&sa).is_some_and(|w| w.contains("is a service account, not a person")),
            "{:?}",
            not_a_person(&sa)
        );
        let agent = user("agentgate:agent:agents:claude", &["agentgate:agents"]);
        assert!(not_a_person(&agent).is_some_and(|w| w.contains("an agent")));
        // A name that looks like a person's, in a group of machines: not a person either.
        let posing = user("alice", &["agentgate:agents"]);
        assert!(not_a_person(&posing).is_some_and(|w| w.contains("group agentgate:agents")));
        let posing = user("alice", &["system:serviceaccounts:ci"]);
        assert!(not_a_person(&posing).is_some());
        assert!(not_a_person(&user("system:anonymous", &[])).is_some());
        assert!(not_a_person(&user("system:node:n1", &["system:nodes"])).is_some());
        let alice = user("alice", &["agentgate-approvers", "system:authenticated"]);
        assert_eq!(not_a_person(&alice), None);
    }

    #[test]
    fn only_named_service_accounts_may_be_allowed() {
        let allowed = vec!["system:serviceaccount:ci:release-bot".to_owned()];
        let bot = user(
            "system:serviceaccount:ci:release-bot",
            &["system:serviceaccounts", "system:serviceaccounts:ci"],
        );
        assert_eq!(refuse_decider(&bot, &allowed), None);
        let other = user(
            "system:serviceaccount:ci:other",
            &["system:serviceaccounts"],
        );
        let why = refuse_decider(&other, &allowed).unwrap_or_default();
        assert!(
            why.contains("grants are decided by people") && why.contains("--automation-approvers"),
            "{why}"
        );
        // An agent is never allowed, listed or not, nor a listed name acting with the agents'
        // group.
        let listed = vec!["agentgate:agent:claude".to_owned()];
        let agent = user("agentgate:agent:claude", &["agentgate:agents"]);
        assert!(refuse_decider(&agent, &listed).is_some());
        let impersonated = user(
            "system:serviceaccount:ci:release-bot",
            &["agentgate:agents"],
        );
        assert!(refuse_decider(&impersonated, &allowed).is_some());
        assert_eq!(refuse_decider(&user("alice", &[]), &[]), None);
    }

    #[test]
    fn approver_lists_name_people() {
        let approvers = Approvers {
            users: vec![
                "alice".into(),
                "system:serviceaccount:ci:bot".into(),
                "agentgate:agent:claude".into(),
            ],
            groups: vec![
                "orders-oncall".into(),
                "system:authenticated".into(),
                "system:serviceaccounts".into(),
                "system:serviceaccounts:agents".into(),
                "agentgate:agents".into(),
                "system:unauthenticated".into(),
            ],
        };
        let problems = approvers_problems(&approvers, &[]);
        assert_eq!(problems.len(), 7, "{problems:#?}");
        assert!(problems[0].contains("system:authenticated, which takes in every"));
        assert!(problems.iter().all(|p| !p.contains("orders-oncall")));
        assert!(problems.iter().all(|p| !p.contains("lists alice")));
        let allowed = vec!["system:serviceaccount:ci:bot".to_owned()];
        assert_eq!(approvers_problems(&approvers, &allowed).len(), 6);
        for g in [
            "system:authenticated",
            "system:unauthenticated",
            "system:serviceaccounts",
            "system:serviceaccounts:x",
            "agentgate:agents",
        ] {
            assert!(!approver_group_counts(g), "{g}");
        }
        assert!(approver_group_counts("orders-oncall"));
    }

    #[test]
    fn oidc_principals_behind_a_prefix() {
        let oidc = OidcSubject {
            issuer: "https://idp.example".into(),
            audience: "agentgate".into(),
            subject: Some("robot-7".into()),
            claims: [("email".to_owned(), "ci@example.com".to_owned())].into(),
        };
        for name in [
            "robot-7",
            "https://idp.example#robot-7",
            "oidc:robot-7",
            "ci@example.com",
            "oidc:ci@example.com",
        ] {
            assert!(is_oidc_principal(name, &oidc), "{name}");
        }
        for name in ["alice", "robot-70", "notrobot-7x", ""] {
            assert!(!is_oidc_principal(name, &oidc), "{name}");
        }
    }

    #[test]
    fn automation_approvers_are_service_account_names() {
        assert_eq!(
            parse_automation_approver("system:serviceaccount:ci:release.bot"),
            Ok("system:serviceaccount:ci:release.bot".to_owned())
        );
        for bad in [
            "alice",
            "agentgate:agent:claude",
            "system:serviceaccount:ci",
            "system:serviceaccount::bot",
            "system:serviceaccount:CI:bot",
            "system:serviceaccount:ci:bot:x",
        ] {
            let e = parse_automation_approver(bad).err().unwrap_or_default();
            assert!(
                e.contains("system:serviceaccount:<namespace>:<name>"),
                "{bad}: {e}"
            );
        }
    }
}
