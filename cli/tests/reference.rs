//! `docs/cli-reference.md` is the CLI's own `--help` for every command, so it cannot drift
//! from the code. After changing a command, rewrite it with
//! `AGENTGATE_UPDATE_DOCS=1 cargo test -p agentgate-cli --test reference`.

use std::path::Path;
use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-agentgate"))
        .args(args)
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .unwrap_or_else(|e| panic!("run kubectl-agentgate {args:?} --help: {e}"));
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands a help text lists (without `help`).
fn subcommands(text: &str) -> Vec<String> {
    text.split_once("Commands:\n")
        .map(|(_, rest)| {
            rest.lines()
                .take_while(|l| l.starts_with("  "))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| *c != "help")
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn section(out: &mut String, path: &[String]) {
    let args: Vec<&str> = path.iter().map(String::as_str).collect();
    let text = help(&args);
    let title = if path.is_empty() {
        "kubectl agentgate".to_owned()
    } else {
        format!("kubectl agentgate {}", path.join(" "))
    };
    let level = "#".repeat(2 + path.len());
    out.push_str(&format!(
        "\n{level} `{title}`\n\n```text\n{}\n```\n",
        text.trim_end()
    ));
    for sub in subcommands(&text) {
        let mut next = path.to_vec();
        next.push(sub);
        section(out, &next);
    }
}

#[test]
fn the_cli_reference_is_the_help_of_every_command() {
    let mut doc = String::from(
        "<!-- Generated from `kubectl agentgate … --help` by cli/tests/reference.rs: do not edit. -->\n\
         # `kubectl agentgate` reference\n\n\
         The CLI for approvers and auditors, installed as the kubectl plugin `kubectl-agentgate`\n\
         (`cargo install --path cli`, or the `cli/Dockerfile` image). It uses the current\n\
         kubeconfig context; record commands read the file sink (`--from`) or the PostgreSQL sink\n\
         (`--postgres`).\n",
    );
    section(&mut doc, &[]);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli-reference.md");
    if std::env::var_os("AGENTGATE_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &doc).expect("write docs/cli-reference.md");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == doc,
        "docs/cli-reference.md is stale: run AGENTGATE_UPDATE_DOCS=1 cargo test -p agentgate-cli --test reference"
    );
}
