//! placeholder until the classifier lands
use agentgate_crds::OperationClass;
use std::collections::BTreeSet;
/// A command line as guardrails see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// class
    pub class: OperationClass,
    /// keys
    pub keys: BTreeSet<String>,
    /// commands
    pub commands: Vec<String>,
}
/// Why a line cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unparsable {
    /// syntax
    #[error("syntax: {0}")]
    Syntax(String),
}
/// classify
pub fn classify(line: &str) -> Result<Parsed, Unparsable> {
    let class = if line.contains("rm -rf /") {
        OperationClass::Admin
    } else {
        OperationClass::Read
    };
    Ok(Parsed {
        class,
        keys: BTreeSet::new(),
        commands: vec![line.trim().to_owned()],
    })
}
/// incomplete
pub fn is_incomplete(text: &str) -> bool {
    text.matches('"').count() % 2 == 1
}
