//! The session's search path, as far as the gateway can follow it: which table an
//! unqualified name in the agent's statements is, so that a scope naming tables judges the
//! table the server will use, not one of the same name in `public`.
//!
//! The path a session starts on is the login's default (read from the catalog). `SET
//! search_path`, `RESET`, `RESET ALL` and `DISCARD ALL` let through are followed; since a
//! `SET` may be undone by a rollback or end with its transaction (`SET LOCAL`), every path
//! the session may be on is kept, and a name must be covered wherever it may point. What
//! cannot be followed (`set_config`, `SET ROLE`, a DO block, a procedure or a volatile
//! function, which may change the path out of sight) leaves unqualified names of unknown
//! schema for the rest of the session: scopes that name tables then need schema-qualified
//! names.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate_crds::common::OperationClass;
use tokio::sync::Mutex;

use super::catalog::Catalog;
use crate::sql::classify::{relation_name, unqualified};
use crate::sql::{Classified, Flag, PathChange, Resolved, Statement};

/// The most paths a session is followed on; more, and its path is taken as unknown.
const MAX_PATHS: usize = 8;

/// How long a resolved name is reused (relations may be created or dropped by others).
const CACHE_TTL: Duration = Duration::from_secs(2);

/// A path as set: schema names as written (`$user` unexpanded); `None` is the login's
/// default path.
type Path = Option<Vec<String>>;

/// The paths a session may be on.
#[derive(Debug, Clone, PartialEq)]
struct State {
    /// Every path the session may be on now; the first is its initial one.
    possible: Vec<Path>,
    /// Why the path can no longer be followed.
    unknown: Option<Arc<str>>,
}

impl State {
    /// Follows one statement; `true` when the paths changed.
    fn apply(&mut self, st: &Statement) -> bool {
        let before = self.clone();
        for f in &st.flags {
            let Flag::SearchPath(change) = f else {
                continue;
            };
            match change {
                PathChange::To(path) => self.add(Some(path.clone())),
                PathChange::Initial => self.add(None),
                PathChange::Role => self.give_up(
                    "a SET ROLE or SET SESSION AUTHORIZATION changed whose schemas it reads",
                ),
                PathChange::Unknown => self.give_up("it was set in a form agentgate cannot follow"),
            }
        }
        if st.functions.contains("set_config") {
            self.give_up("set_config may have changed it");
        }
        if matches!(st.class, OperationClass::Exec | OperationClass::Admin) {
            self.give_up("a DO block, procedure or function ran that may have changed it");
        }
        if matches!(st.tag.as_str(), "ALTER ROLE SET" | "ALTER DATABASE SET") {
            self.give_up("the role's or the database's default settings changed");
        }
        *self != before
    }

    fn add(&mut self, path: Path) {
        if self.unknown.is_some() || self.possible.contains(&path) {
            return;
        }
        if self.possible.len() >= MAX_PATHS {
            self.give_up("it was changed too many times in this session");
            return;
        }
        self.possible.push(path);
    }

    fn give_up(&mut self, why: &str) {
        if self.unknown.is_none() {
            self.unknown = Some(Arc::from(format!(
                "the session's search path is not known: {why}"
            )));
        }
    }
}

/// One session's search path.
#[derive(Debug)]
pub struct SearchPath {
    /// The login: what `$user` names.
    login: String,
    state: State,
    /// (path, name) → the schema it resolved to, and when.
    cache: HashMap<(Path, String), (Option<String>, Instant)>,
}

impl SearchPath {
    /// A session of `login`, on the login's default path.
    pub fn new(login: &str) -> Self {
        Self {
            login: login.to_owned(),
            state: State {
                possible: vec![None],
                unknown: None,
            },
            cache: HashMap::new(),
        }
    }

    /// Whether the session may be on a path other than its initial one.
    pub fn changed(&self) -> bool {
        self.state.unknown.is_some() || self.state.possible.iter().any(Option::is_some)
    }

    /// Whether a statement of `c` may run on a path other than the session's initial one
    /// (the session's path changed, or an earlier statement of `c` changes it).
    pub fn changed_for(&self, c: &Classified) -> bool {
        if self.changed() {
            return true;
        }
        let mut state = self.state.clone();
        c.statements.iter().any(|st| state.apply(st))
    }

    /// Takes note of a statement the gateway let through.
    pub fn observe(&mut self, c: &Classified) {
        for st in &c.statements {
            if matches!(st.class, OperationClass::Ddl | OperationClass::Privilege) {
                // A schema or relation created, dropped or renamed, a privilege changed.
                self.cache.clear();
            }
            self.state.apply(st);
        }
    }

    /// Resolves the unqualified relation names of `c` on every path the session may be on
    /// when each of its statements runs (an earlier statement of the same string may set
    /// it), into `c.resolved`: each name → every `schema.name` it may be, or why that cannot
    /// be told. `Err` when the catalog cannot be asked (the caller fails closed).
    pub async fn resolve(
        &mut self,
        catalog: &Mutex<Catalog>,
        c: &mut Classified,
    ) -> Result<(), String> {
        let mut out = Resolved::new();
        let mut state = self.state.clone();
        for st in &c.statements {
            let names: BTreeSet<(String, String)> = st
                .relations
                .iter()
                .filter_map(|r| unqualified(r).map(|t| (r.clone(), t)))
                .collect();
            self.resolve_on(catalog, &state, &names, &mut out).await?;
            state.apply(st);
        }
        c.resolved = (!out.is_empty()).then(|| Arc::new(out));
        Ok(())
    }

    /// Resolves `names` (as written, and unquoted) on every path of `state` into `out`.
    async fn resolve_on(
        &mut self,
        catalog: &Mutex<Catalog>,
        state: &State,
        names: &BTreeSet<(String, String)>,
        out: &mut Resolved,
    ) -> Result<(), String> {
        if names.is_empty() {
            return Ok(());
        }
        if let Some(why) = &state.unknown {
            for (name, _) in names {
                out.insert(name.clone(), Err(why.clone()));
            }
            return Ok(());
        }
        for path in &state.possible {
            let now = Instant::now();
            let missing: Vec<String> = names
                .iter()
                .filter(|(_, t)| {
                    self.cache
                        .get(&(path.clone(), t.clone()))
                        .is_none_or(|(_, at)| now.duration_since(*at) >= CACHE_TTL)
                })
                .map(|(_, t)| t.clone())
                .collect();
            if !missing.is_empty() {
                let expanded = path.as_ref().map(|p| {
                    p.iter()
                        .map(|s| {
                            if s == "$user" {
                                self.login.clone()
                            } else {
                                s.clone()
                            }
                        })
                        .collect::<Vec<_>>()
                });
                let schemas = catalog
                    .lock()
                    .await
                    .resolve(expanded.as_deref(), &missing)
                    .await?;
                for (t, schema) in missing.into_iter().zip(schemas) {
                    self.cache.insert((path.clone(), t), (schema, now));
                }
            }
            for (name, t) in names {
                let schema = self
                    .cache
                    .get(&(path.clone(), t.clone()))
                    .and_then(|(s, _)| s.clone());
                let entry = out.entry(name.clone()).or_insert_with(|| Ok(Vec::new()));
                match (schema, entry) {
                    (Some(s), Ok(list)) => {
                        let q = relation_name(&s, t);
                        if !list.contains(&q) {
                            list.push(q);
                        }
                    }
                    (None, e) => {
                        *e = Err(Arc::from(
                            "no schema on the session's search path holds it or may hold it",
                        ));
                    }
                    (Some(_), Err(_)) => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::classify;

    fn observe(p: &mut SearchPath, sql: &str) {
        p.observe(&classify(sql).expect("classified"));
    }

    #[test]
    fn paths_set_are_followed_and_kept_as_possible() {
        let mut p = SearchPath::new("agent");
        assert!(!p.changed());
        observe(&mut p, "SELECT 1");
        assert!(!p.changed());
        observe(&mut p, "SET search_path TO secret, \"$user\"");
        assert_eq!(
            p.state.possible,
            vec![None, Some(vec!["secret".to_owned(), "$user".to_owned()])]
        );
        // Quoted and string forms are one schema name each, exactly.
        observe(&mut p, "SET LOCAL search_path = 'Mixed', \"a b\"");
        assert_eq!(
            p.state.possible[2],
            Some(vec!["Mixed".to_owned(), "a b".to_owned()])
        );
        observe(&mut p, "RESET search_path");
        observe(&mut p, "SET search_path TO DEFAULT");
        observe(&mut p, "DISCARD ALL");
        assert_eq!(p.state.possible.len(), 3);
        assert!(p.state.unknown.is_none());
    }

    #[test]
    fn what_cannot_be_followed_makes_the_path_unknown() {
        for sql in [
            "SELECT set_config('search_path', 'secret', false)",
            "SET ROLE other",
            "SET SESSION AUTHORIZATION other",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CALL p()",
            "ALTER ROLE agent SET search_path = secret",
            "ALTER DATABASE app SET search_path = secret",
        ] {
            let mut p = SearchPath::new("agent");
            observe(&mut p, sql);
            assert!(p.state.unknown.is_some(), "{sql}");
            assert!(p.changed(), "{sql}");
        }
        let mut p = SearchPath::new("agent");
        for i in 0..MAX_PATHS {
            observe(&mut p, &format!("SET search_path = s{i}"));
        }
        assert!(p.state.unknown.is_some());
    }
}
