//! The session's search path, as far as the gateway can follow it: which table an
//! unqualified name in the agent's statements is, so that a scope naming tables judges the
//! table the server will use, not one of the same name in `public`.
//!
//! The path a session starts on is read on its own server connection when that is opened
//! or reset (`current_setting('search_path')`, `current_user`). `SET
//! search_path`, `RESET`, `RESET ALL` and `DISCARD ALL` let through are followed; since a
//! `SET` may be undone by a rollback or end with its transaction (`SET LOCAL`), every path
//! the session may be on is kept, and a name must be covered wherever it may point, until
//! the server answered the change without an error and outside a transaction block (the
//! writer confirms it; the paths before it are then gone). What
//! cannot be followed (`set_config`, `SET ROLE`, a DO block, a procedure or a volatile
//! function, which may change the path out of sight) leaves unqualified names of unknown
//! schema for the rest of the session: scopes that name tables then need schema-qualified
//! names.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Where a name may point on one path: the schemas holding a relation of that name, and the
/// one a new relation of that name would be created in.
type Schemas = (Vec<String>, Option<String>);

/// The schema names of a `search_path` setting (or of names `quote_ident` joined by commas)
/// as the server reads them: comma-separated, a double-quoted name as written (doubled
/// quotes undone), any other lower-cased (ASCII) and trimmed; each cut to the server's
/// identifier length.
pub(super) fn split_setting(setting: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = setting.chars().peekable();
    loop {
        // The server's whitespace: ASCII only.
        let space = |c: &char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
        while chars.peek().is_some_and(space) {
            chars.next();
        }
        let mut name = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            name = crate::sql::classify::quoted_identifier(&mut chars);
            while chars.peek().is_some_and(|c| *c != ',') {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                name.push(c.to_ascii_lowercase());
                chars.next();
            }
            name = name.trim_end_matches(|c| space(&c)).to_owned();
        }
        if !name.is_empty() {
            out.push(crate::sql::classify::truncate_identifier(&name));
        }
        if chars.next().is_none() {
            return out;
        }
    }
}

/// The paths a session may be on.
#[derive(Debug, Clone, PartialEq)]
struct State {
    /// The path the session started on (`RESET` goes back to it).
    initial: Path,
    /// Every path the session may be on now, each with the change that set it (0: the
    /// initial path); the first is the oldest.
    possible: Vec<(u64, Path)>,
    /// Why the path can no longer be followed.
    unknown: Option<Arc<str>>,
}

/// Whether a statement may change the search path or what names on it find.
fn may_change(st: &Statement) -> bool {
    st.flags.iter().any(|f| matches!(f, Flag::SearchPath(_)))
        || st.functions.contains("set_config")
        || matches!(st.class, OperationClass::Exec | OperationClass::Admin)
        || st.tag == "ALTER ROLE SET"
        || st.tag == "ALTER DATABASE SET"
        || (st.class != OperationClass::Read
            && st
                .relations
                .iter()
                .any(|r| r == "pg_settings" || r == "pg_catalog.pg_settings"))
}

impl State {
    /// Follows one statement (change `seq`); `true` when the paths changed.
    fn apply(&mut self, st: &Statement, seq: u64) -> bool {
        if !may_change(st) {
            return false;
        }
        let before = self.clone();
        for f in &st.flags {
            let Flag::SearchPath(change) = f else {
                continue;
            };
            match change {
                PathChange::To { path, .. } => self.add(seq, Some(path.clone())),
                PathChange::Initial { .. } => self.add(seq, self.initial.clone()),
                PathChange::Role => self.give_up(
                    "a SET ROLE or SET SESSION AUTHORIZATION changed whose schemas it reads",
                ),
                PathChange::Unknown => self.give_up("it was set in a form agentgate cannot follow"),
                PathChange::Names => self.give_up(
                    "a relation or schema was renamed or moved, or a schema created, in this session",
                ),
            }
        }
        if st.class != OperationClass::Read
            && st
                .relations
                .iter()
                .any(|r| r == "pg_settings" || r == "pg_catalog.pg_settings")
        {
            self.give_up("pg_settings was written");
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

    fn add(&mut self, seq: u64, path: Path) {
        if self.unknown.is_some() || self.possible.iter().any(|(_, p)| *p == path) {
            return;
        }
        if self.possible.len() >= MAX_PATHS {
            self.give_up("it was changed too many times in this session");
            return;
        }
        self.possible.push((seq, path));
    }

    fn give_up(&mut self, why: &str) {
        if self.unknown.is_none() {
            self.unknown = Some(Arc::from(format!(
                "the session's search path is not known: {why}"
            )));
        }
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        self.possible.iter().map(|(_, p)| p)
    }
}

/// One session's search path.
#[derive(Debug)]
pub struct SearchPath {
    /// The login: what `$user` names.
    login: String,
    state: State,
    /// The last change number given out.
    seq: u64,
    /// The latest change the server may confirm, and the path it leaves.
    pending: Option<(u64, Path)>,
    /// The latest change the server confirmed (see [`SearchPath::confirmation`]).
    confirmed: Arc<AtomicU64>,
    /// (path, name) → the schemas holding it and the one it would be created in, and when.
    cache: HashMap<(Path, String), (Schemas, Instant)>,
}

impl SearchPath {
    /// A session of `login` that started on the path and as the user `names` says (its
    /// `search_path` setting and `current_user`, as its connection reported them), or, when
    /// not known, on the login's default path as the catalog connection reads it.
    pub fn new(login: &str, names: Option<&(String, String)>) -> Self {
        let (initial, login) = match names {
            Some((setting, user)) => (Some(split_setting(setting)), user.clone()),
            None => (None, login.to_owned()),
        };
        Self {
            login,
            state: State {
                initial: initial.clone(),
                possible: vec![(0, initial)],
                unknown: None,
            },
            seq: 0,
            pending: None,
            confirmed: Arc::default(),
            cache: HashMap::new(),
        }
    }

    /// Where the writer confirms a change ([`SearchPath::observe`] numbers them): the
    /// simple query that made it was answered without an error and left no transaction open,
    /// so the path it set holds for good.
    pub fn confirmation(&self) -> Arc<AtomicU64> {
        self.confirmed.clone()
    }

    /// Takes in the server's latest confirmation: the paths the session was on before the
    /// confirmed change are gone.
    fn sync(&mut self) {
        let confirmed = self.confirmed.load(Ordering::Acquire);
        if let Some((seq, path)) = self.pending.take_if(|(seq, _)| *seq <= confirmed) {
            self.state.possible.retain(|(s, _)| *s > seq);
            self.state.possible.insert(0, (seq, path));
        }
    }

    /// Whether the session's own connection reported the path it started on (the catalog
    /// connection's default may differ from it).
    pub fn initial_known(&self) -> bool {
        self.state.initial.is_some()
    }

    /// Whether the session may be on a path other than its initial one.
    pub fn changed(&mut self) -> bool {
        self.sync();
        self.state.unknown.is_some() || self.state.paths().any(|p| *p != self.state.initial)
    }

    /// Whether a statement of `c` may run on a path other than the session's initial one
    /// (the session's path changed, or an earlier statement of `c` changes it).
    pub fn changed_for(&mut self, c: &Classified) -> bool {
        if self.changed() {
            return true;
        }
        if !c.statements.iter().any(may_change) {
            return false;
        }
        let mut state = self.state.clone();
        c.statements.iter().any(|st| state.apply(st, u64::MAX))
    }

    /// Whether a statement of `c` may run on a path that puts a schema before `pg_catalog`
    /// (or one that cannot be told): a function of a built-in's name may then be another.
    pub fn catalog_later_for(&mut self, c: &Classified) -> bool {
        self.sync();
        let later = |s: &State| {
            s.unknown.is_some()
                || s.paths().any(|p| {
                    p.as_ref()
                        .and_then(|p| p.iter().position(|x| x == "pg_catalog"))
                        .is_some_and(|i| i > 0)
                })
        };
        if later(&self.state) {
            return true;
        }
        if !c.statements.iter().any(may_change) {
            return false;
        }
        let mut state = self.state.clone();
        c.statements.iter().any(|st| {
            state.apply(st, u64::MAX);
            later(&state)
        })
    }

    /// Takes note of a statement the gateway let through. When the server can confirm its
    /// change (`by_server`: a simple query; every change a `SET` or `RESET` outside any
    /// transaction block it opens, none `LOCAL`), returns the change's number for the
    /// writer to confirm.
    pub fn observe(&mut self, c: &Classified, by_server: bool) -> Option<u64> {
        self.sync();
        self.seq += 1;
        let seq = self.seq;
        let mut confirmable = by_server;
        let mut last = None;
        for st in c.statements.iter() {
            if matches!(st.class, OperationClass::Ddl | OperationClass::Privilege) {
                // A schema or relation created, dropped or renamed, a privilege changed.
                self.cache.clear();
            }
            if st.tag.contains("TRANSACTION") || st.tag.contains("COMMIT") {
                confirmable = false;
            }
            for f in &st.flags {
                match f {
                    Flag::SearchPath(PathChange::To { path, local }) => {
                        confirmable &= !local;
                        last = Some(Some(path.clone()));
                    }
                    Flag::SearchPath(PathChange::Initial { local }) => {
                        confirmable &= !local;
                        last = Some(self.state.initial.clone());
                    }
                    Flag::SearchPath(_) => confirmable = false,
                    _ => {}
                }
            }
            self.state.apply(st, seq);
        }
        match last {
            Some(path) if confirmable && self.state.unknown.is_none() => {
                self.pending = Some((seq, path));
                Some(seq)
            }
            _ => None,
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
        self.sync();
        let mut out = Resolved::new();
        let mut state = self.state.clone();
        for st in c.statements.iter() {
            let names: BTreeSet<(String, String)> = st
                .relations
                .iter()
                .filter_map(|r| unqualified(r).map(|t| (r.clone(), t)))
                .collect();
            self.resolve_on(catalog, &state, &names, &st.created, &mut out)
                .await?;
            state.apply(st, u64::MAX);
        }
        c.resolved = (!out.is_empty()).then(|| Arc::new(out));
        Ok(())
    }

    /// Resolves `names` (as written, and unquoted) on every path of `state` into `out`: the
    /// tables of that name on the path, or, when there are none or the statement `creates`
    /// it, the schema it would be created in too.
    async fn resolve_on(
        &mut self,
        catalog: &Mutex<Catalog>,
        state: &State,
        names: &BTreeSet<(String, String)>,
        creates: &BTreeSet<String>,
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
        for path in state.paths() {
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
                let (mut schemas, creation) = self
                    .cache
                    .get(&(path.clone(), t.clone()))
                    .map(|(s, _)| s.clone())
                    .unwrap_or_default();
                if (schemas.is_empty() || creates.contains(name))
                    && let Some(c) = creation
                    && !schemas.contains(&c)
                {
                    schemas.push(c);
                }
                let entry = out.entry(name.clone()).or_insert_with(|| Ok(Vec::new()));
                match entry {
                    Ok(_) if schemas.is_empty() => {
                        *entry = Err(Arc::from(
                            "no schema on the session's search path holds it or may hold it",
                        ));
                    }
                    Ok(list) => {
                        for s in schemas {
                            let q = relation_name(&s, t);
                            if !list.contains(&q) {
                                list.push(q);
                            }
                        }
                    }
                    Err(_) => {}
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

    fn observe(p: &mut SearchPath, sql: &str) -> Option<u64> {
        p.observe(&classify(sql).expect("classified"), true)
    }

    fn paths(p: &SearchPath) -> Vec<Path> {
        p.state.paths().cloned().collect()
    }

    fn path(names: &[&str]) -> Path {
        Some(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn paths_set_are_followed_and_kept_as_possible_until_confirmed() {
        let mut p = SearchPath::new("agent", None);
        assert!(!p.changed());
        assert_eq!(observe(&mut p, "SELECT 1"), None);
        assert!(!p.changed());
        let first = observe(&mut p, "SET search_path TO secret, \"$user\"");
        assert!(first.is_some());
        assert_eq!(paths(&p), vec![None, path(&["secret", "$user"])]);
        // Quoted and string forms are one schema name each, exactly; SET LOCAL ends with its
        // transaction, so the server never confirms it.
        assert_eq!(
            observe(&mut p, "SET LOCAL search_path = 'Mixed', \"a b\""),
            None
        );
        assert_eq!(paths(&p)[2], path(&["Mixed", "a b"]));
        assert_eq!(observe(&mut p, "BEGIN; SET search_path = x; COMMIT"), None);
        assert_eq!(paths(&p).len(), 4);
        // RESET and DISCARD ALL are back to the initial path, which is kept already.
        observe(&mut p, "RESET search_path");
        observe(&mut p, "DISCARD ALL");
        assert_eq!(paths(&p).len(), 4);
        // The server confirms a SET that committed: the paths before it are gone, later
        // ones stay until confirmed too.
        let set = observe(&mut p, "SET search_path = crm").expect("confirmable");
        observe(&mut p, "SET LOCAL search_path = y");
        p.confirmation().fetch_max(set, Ordering::AcqRel);
        assert!(p.changed());
        assert_eq!(paths(&p), vec![path(&["crm"]), path(&["y"])]);
        // An older confirmation changes nothing more.
        p.confirmation()
            .fetch_max(first.unwrap_or_default(), Ordering::AcqRel);
        assert_eq!(paths(&p), vec![path(&["crm"]), path(&["y"])]);
        let reset = observe(&mut p, "RESET search_path").expect("confirmable");
        p.confirmation().fetch_max(reset, Ordering::AcqRel);
        assert!(!p.changed());
        assert!(p.state.unknown.is_none());
    }

    #[test]
    fn names_are_cut_to_the_servers_identifier_length() {
        // The server keeps 63 bytes of an identifier: in the search path it reads, and in
        // the statements it parses.
        let long = format!("s{}", "é".repeat(40));
        let mut p = SearchPath::new("agent", None);
        observe(&mut p, &format!("SET search_path = '{long}'"));
        let cut = crate::sql::classify::truncate_identifier(&long);
        assert_eq!(cut.len(), 63);
        assert_eq!(paths(&p)[1], path(&[cut.as_str()]));
        let c = classify(&format!("SELECT * FROM \"{long}\".\"{long}\"")).expect("classified");
        assert_eq!(
            c.statements[0].relations.iter().next().map(String::as_str),
            Some(format!("{cut}.{cut}").as_str())
        );
    }

    #[test]
    fn the_initial_path_is_the_sessions_own() {
        assert_eq!(
            split_setting("\"$user\", public"),
            ["$user".to_owned(), "public".to_owned()]
        );
        assert_eq!(
            split_setting(" Crm ,\"Mixed Case\", \"a\"\"b\",x"),
            ["crm", "Mixed Case", "a\"b", "x"].map(str::to_owned)
        );
        assert!(split_setting("").is_empty());
        assert!(split_setting("\"\"").is_empty());
        let names = ("secret, public".to_owned(), "agent".to_owned());
        let mut p = SearchPath::new("login", Some(&names));
        assert_eq!(paths(&p), vec![path(&["secret", "public"])]);
        assert!(!p.changed());
        assert_eq!(p.login, "agent");
        observe(&mut p, "SET search_path = public");
        assert!(p.changed());
        // RESET goes back to where the session started.
        let reset = observe(&mut p, "RESET search_path").expect("confirmable");
        p.confirmation().fetch_max(reset, Ordering::AcqRel);
        assert!(!p.changed());
        assert_eq!(paths(&p), vec![path(&["secret", "public"])]);
    }

    #[test]
    fn relations_a_statement_creates_are_known() {
        for (sql, created) in [
            ("CREATE TABLE orders (id int)", "orders"),
            ("CREATE TABLE crm.orders (id int)", "crm.orders"),
            ("CREATE TEMP TABLE t AS SELECT 1", "pg_temp.t"),
            ("CREATE UNLOGGED TABLE u (id int)", "u"),
            ("SELECT * INTO x FROM y", "x"),
            ("CREATE VIEW v AS SELECT 1", "v"),
            ("CREATE MATERIALIZED VIEW m AS SELECT 1", "m"),
            ("CREATE SEQUENCE s", "s"),
            ("CREATE FOREIGN TABLE f (a int) SERVER srv", "f"),
        ] {
            let c = classify(sql).expect("classified");
            assert_eq!(
                c.statements[0].created.iter().collect::<Vec<_>>(),
                [created],
                "{sql}"
            );
        }
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
            "SET search_path = a; SELECT set_config('search_path', 'b', false)",
            "ALTER TABLE crm.payroll RENAME TO payroll_x",
            "ALTER SCHEMA crm RENAME TO crm_old",
            "ALTER TABLE crm.payroll SET SCHEMA archive",
            "CREATE SCHEMA newer",
            "UPDATE pg_settings SET setting = 'secret' WHERE name = 'search_path'",
        ] {
            let mut p = SearchPath::new("agent", None);
            assert_eq!(observe(&mut p, sql), None, "{sql}");
            assert!(p.state.unknown.is_some(), "{sql}");
            assert!(p.changed(), "{sql}");
            // No confirmation brings it back.
            let later = observe(&mut p, "SET search_path = public");
            assert_eq!(later, None, "{sql}");
            assert!(p.changed(), "{sql}");
        }
        let mut p = SearchPath::new("agent", None);
        for i in 0..MAX_PATHS {
            observe(&mut p, &format!("SET search_path = s{i}"));
        }
        assert!(p.state.unknown.is_some());
    }
}
