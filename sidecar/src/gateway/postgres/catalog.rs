//! What the database's catalog says about the columns a statement reads, for masking: over a
//! second connection (the Target's credentials, opened when first needed), cached per
//! session. Nothing the agent sends is interpolated into a catalog query except relation and
//! function names, and those only inside quoted literals (quotes doubled) on a session that
//! reads strings as standard-conforming.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::backend;
use super::frame::{MAX_MESSAGE, read_frame, write_frames};
use super::frontend::{self, Frontend};
use super::pool::{Key, Pool};
use super::search_path::split_setting;
use super::upstream::{Credentials, Upstream};
use crate::mask::{MaskSet, Rule};
use crate::sql::{Statement, classify};

/// Catalog relations whose values are other relations' values (planner statistics keep real
/// column values; other sessions' query texts quote what they wrote): every column of the
/// statistics, and the `query` column of the activity views, is masked while any column is.
const SENSITIVE_CATALOG: [&str; 7] = [
    "pg_stats",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic",
    "pg_statistic_ext_data",
    "pg_stat_activity",
    "pg_stat_statements",
];

/// Built-in (and common extensions') volatile functions that change nothing and reach
/// nothing beyond what the query reads: random values, clocks, sizes, locks the session
/// holds, transaction ids. Any other volatile function is classed Exec.
const HARMLESS_VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "gen_random_bytes",
    "gen_salt",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "txid_current",
    "txid_current_if_assigned",
    "txid_current_snapshot",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_current_snapshot",
    "currval",
    "lastval",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_table_size",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_indexes_size",
    "pg_database_size",
    "pg_tablespace_size",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_stat_clear_snapshot",
    "pg_lock_status",
    "pg_export_snapshot",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_notification_queue_usage",
    "pg_listening_channels",
    "pg_prepared_statement",
    "pg_cursor",
    "pg_prepared_xact",
    "pg_jit_available",
    "lo_get",
    "loread",
    "lo_open",
    "lo_close",
    "lo_lseek",
    "lo_lseek64",
    "lo_tell",
    "lo_tell64",
];

/// Function volatility by (database, function name), shared by sessions: whether some
/// function of that name is volatile, and when that was read.
type Volatility = HashMap<(String, String), (bool, std::time::Instant)>;
static VOLATILITY: std::sync::LazyLock<std::sync::Mutex<Volatility>> =
    std::sync::LazyLock::new(Default::default);
/// How long a function's volatility is taken from another session's lookup.
const VOLATILITY_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The catalog connection's startup settings. Names are quoted into literals: the session
/// must read strings as standard-conforming, whatever the database's defaults say.
const CATALOG_PARAMS: [(&str, &str); 3] = [
    ("application_name", "agentgate-catalog"),
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
];

/// A relation's columns, each with the rule that masks it.
type Columns = Arc<Vec<(String, Option<Rule>)>>;

/// Resolves `(table OID, column number)` to the masking rule of that column over a second
/// connection, opened when first needed; answers are cached per session. A view's column is
/// followed to what its definition reads.
pub struct Catalog {
    pg: agentgate_crds::target::PostgresTarget,
    creds: Credentials,
    /// Where the connection comes from and goes back to, and its key there.
    pool: Arc<Pool>,
    key: Key,
    conn: Option<Upstream>,
    /// A query was sent and its answer not read to the end (its future was dropped): the
    /// connection is closed, never pooled.
    busy: bool,
    cache: HashMap<(u32, i16), Option<crate::mask::Rule>>,
    /// Relations as statements name them → their columns and rules.
    relations: HashMap<String, Columns>,
    /// Function names → whether some function of that name is volatile (and not known
    /// harmless).
    volatile: HashMap<String, bool>,
}

impl Catalog {
    /// A catalog for one session of `principal`; it connects when first asked.
    pub fn new(
        pg: agentgate_crds::target::PostgresTarget,
        creds: Credentials,
        principal: &str,
        pool: Arc<Pool>,
    ) -> Self {
        let key = Key::catalog(
            principal,
            &pg,
            &creds,
            &CATALOG_PARAMS.map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        Self {
            pg,
            creds,
            pool,
            key,
            conn: None,
            busy: false,
            cache: HashMap::new(),
            relations: HashMap::new(),
            volatile: HashMap::new(),
        }
    }

    /// The Target's login the catalog (and the session) connects as.
    pub fn login(&self) -> &str {
        &self.creds.username
    }

    /// Hands the connection back to the pool (at the session's end), unless a query on it
    /// was left unfinished.
    pub fn release(&mut self) {
        if let Some(up) = self.conn.take() {
            if self.busy {
                super::pool::close(up);
            } else {
                self.pool.release(self.key.clone(), up);
            }
        }
    }

    /// Runs a catalog query and returns its rows as text.
    async fn query(&mut self, sql: String) -> Result<Vec<Vec<Option<String>>>, String> {
        if self.busy {
            // The last query's answer was not read to its end.
            if let Some(up) = self.conn.take() {
                super::pool::close(up);
            }
            self.busy = false;
        }
        if self.conn.is_none() {
            let params = CATALOG_PARAMS.map(|(k, v)| (k.to_owned(), v.to_owned()));
            let (up, _) = self
                .pool
                .connect(&self.key, &self.pg, &self.creds, &params)
                .await
                .map_err(|e| e.to_string())?;
            self.conn = Some(up);
        }
        let conn = &mut self.conn.as_mut().ok_or("no catalog connection")?.stream;
        self.busy = true;
        write_frames(conn, &[frontend::encode(&Frontend::Query(sql))])
            .await
            .map_err(|e| e.to_string())?;
        let mut rows = Vec::new();
        let mut failed = false;
        loop {
            let f = read_frame(conn, MAX_MESSAGE)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("catalog connection closed")?;
            match f.tag {
                b'D' => {
                    let v = backend::decode_data_row(&f).map_err(|e| e.to_string())?;
                    rows.push(
                        v.iter()
                            .map(|x| x.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
                            .collect(),
                    );
                }
                b'E' => failed = true,
                b'Z' => break,
                _ => {}
            }
        }
        self.busy = false;
        if failed {
            return Err("a catalog query failed".into());
        }
        Ok(rows)
    }

    /// The rule masking column `attnum` of relation `oid`. `Err` when the catalog cannot be
    /// asked (the caller fails closed).
    pub async fn rule(
        &mut self,
        oid: u32,
        attnum: i16,
        masks: &MaskSet,
    ) -> Result<Option<crate::mask::Rule>, String> {
        if let Some(c) = self.cache.get(&(oid, attnum)) {
            return Ok(c.clone());
        }
        // Integers only: nothing from the agent is interpolated.
        let rows = self
            .query(format!(
                "SELECT n.nspname, c.relname, a.attname, c.relkind::text, \
                 CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END \
                 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE a.attrelid = {oid} AND a.attnum = {attnum}"
            ))
            .await?;
        let rule = match rows.first() {
            None => None,
            Some(r) => {
                let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                let column = crate::mask::Column {
                    schema: get(0),
                    table: get(1),
                    column: get(2),
                };
                let sensitive = (column.schema == "pg_catalog"
                    || column.table == "pg_stat_statements")
                    && SENSITIVE_CATALOG.contains(&column.table.as_str())
                    // Of the activity views, only the query texts.
                    && (!column.table.starts_with("pg_stat_")
                        || matches!(column.column.as_str(), "query"));
                let inherited = if masks.column_rule(&column).is_none() && !sensitive {
                    self.inherited_rule(oid, &column.column, masks).await?
                } else {
                    None
                };
                match (masks.column_rule(&column), r.get(4).cloned().flatten()) {
                    _ if sensitive => masks.first_column_rule().cloned(),
                    (Some(rule), _) => Some(rule.clone()),
                    _ if inherited.is_some() => inherited,
                    // The system's own views show the catalogs and the statistics: which
                    // of their columns hold values is the list above.
                    (None, Some(_))
                        if matches!(
                            column.schema.as_str(),
                            "pg_catalog" | "information_schema"
                        ) =>
                    {
                        None
                    }
                    // A view: mask what its definition's column reads, through any depth of
                    // views.
                    (None, Some(def)) => Box::pin(self.view_rule(&def, attnum, masks)).await?,
                    (None, None) => None,
                }
            }
        };
        self.cache.insert((oid, attnum), rule.clone());
        Ok(rule)
    }
}

impl Catalog {
    /// The rule for column `attnum` of a view defined as `def`: what that output column reads
    /// (or, when the definition cannot be split by column, what any of it reads), followed into
    /// the relations it names, which may be views themselves.
    async fn view_rule(
        &mut self,
        def: &str,
        attnum: i16,
        masks: &MaskSet,
    ) -> Result<Option<crate::mask::Rule>, String> {
        let classified =
            classify(def).map_err(|e| format!("a view definition does not parse: {e}"))?;
        let st = classified
            .statements
            .first()
            .cloned()
            .ok_or("an empty view definition")?;
        let refs =
            crate::sql::classify::target_column_refs(def, usize::try_from(attnum - 1).unwrap_or(0))
                .unwrap_or_else(|| st.columns.clone());
        let mut named = st.clone();
        named.columns = refs.clone();
        if let Some(rule) = masks.computed_rule(std::slice::from_ref(&named)) {
            return Ok(Some(rule.clone()));
        }
        // Follow each referenced column to its relation (a table, or another view).
        let quote = |s: &str| s.replace('\'', "''");
        let mut unresolved = false;
        for fields in &refs {
            let pairs: Vec<(String, String)> = match fields.as_slice() {
                [rel @ .., col] if !rel.is_empty() => {
                    let q = rel.join(".");
                    let rel = st.aliases.get(&q).cloned().unwrap_or(q);
                    vec![(rel, col.clone())]
                }
                [col] => st
                    .relations
                    .iter()
                    .map(|r| (r.clone(), col.clone()))
                    .collect(),
                _ => continue,
            };
            let mut found = false;
            for (rel, col) in pairs {
                let rows = if col == "*" {
                    self.query(format!(
                        "SELECT attrelid::int8, attnum FROM pg_catalog.pg_attribute \
                         WHERE attrelid = pg_catalog.to_regclass('{}') \
                         AND attnum > 0 AND NOT attisdropped",
                        quote(&rel)
                    ))
                    .await?
                } else {
                    self.query(format!(
                        "SELECT attrelid::int8, attnum FROM pg_catalog.pg_attribute \
                         WHERE attrelid = pg_catalog.to_regclass('{}') AND attname = '{}'",
                        quote(&rel),
                        quote(&col)
                    ))
                    .await?
                };
                found |= !rows.is_empty();
                for r in rows {
                    let oid = r
                        .first()
                        .cloned()
                        .flatten()
                        .and_then(|v| v.parse::<u32>().ok());
                    let num = r
                        .get(1)
                        .cloned()
                        .flatten()
                        .and_then(|v| v.parse::<i16>().ok());
                    if let (Some(oid), Some(num)) = (oid, num)
                        && let Some(rule) = Box::pin(self.rule(oid, num, masks)).await?
                    {
                        return Ok(Some(rule));
                    }
                }
            }
            unresolved |= !found;
        }
        let calls_own = st
            .functions
            .iter()
            .any(|f| !crate::sql::classify::known_function(f));
        if st.derived {
            // Rows of a sub-select, a WITH query or a function: an output name may be any
            // column the definition reads, so every reference in it counts.
            return Box::pin(self.computed_rule(masks, std::slice::from_ref(&st))).await;
        }
        if unresolved || st.renamed || calls_own {
            // A name that is no column of a relation the view names (a sub-select's or a
            // WITH query's output), columns renamed by an alias list, or a function of the
            // database's own: judged as a computed value of the whole definition, masked
            // when anything it reads has a masked column.
            return Box::pin(self.computed_rule(masks, &[named])).await;
        }
        Ok(None)
    }
}

impl Catalog {
    /// The rule of column `name` in a table that relation `oid` inherits from or is a
    /// partition of (a child's rows are the parent's rows).
    async fn inherited_rule(
        &mut self,
        oid: u32,
        name: &str,
        masks: &MaskSet,
    ) -> Result<Option<Rule>, String> {
        let rows = self
            .query(format!(
                "WITH RECURSIVE anc(oid) AS (\
                 SELECT inhparent FROM pg_catalog.pg_inherits WHERE inhrelid = {oid} \
                 UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN anc ON i.inhrelid = anc.oid) \
                 SELECT n.nspname, c.relname FROM anc \
                 JOIN pg_catalog.pg_class c ON c.oid = anc.oid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            ))
            .await?;
        Ok(rows.iter().find_map(|r| {
            let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            masks
                .column_rule(&crate::mask::Column {
                    schema: get(0),
                    table: get(1),
                    column: name.to_owned(),
                })
                .cloned()
        }))
    }

    /// The columns of a relation as a statement names it (`table` or `schema.table`, resolved
    /// with the role's search path), each with the rule that masks it; empty when no such
    /// relation exists (a CTE's name, say).
    async fn relation_columns(&mut self, name: &str, masks: &MaskSet) -> Result<Columns, String> {
        if let Some(c) = self.relations.get(name) {
            return Ok(c.clone());
        }
        let ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let qualified = match name.split_once('.') {
            Some((schema, rel)) => format!("{}.{}", ident(schema), ident(rel)),
            None => ident(name),
        };
        let rows = self
            .query(format!(
                "SELECT attrelid::int8, attnum, attname FROM pg_catalog.pg_attribute \
                 WHERE attrelid = pg_catalog.to_regclass('{}') AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attnum",
                qualified.replace('\'', "''")
            ))
            .await?;
        let mut columns = Vec::new();
        for r in rows {
            let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            let (Ok(oid), Ok(num)) = (get(0).parse::<u32>(), get(1).parse::<i16>()) else {
                return Err("the catalog answered with a malformed attribute".into());
            };
            let rule = Box::pin(self.rule(oid, num, masks)).await?;
            columns.push((get(2), rule));
        }
        let columns = Arc::new(columns);
        self.relations.insert(name.to_owned(), columns.clone());
        Ok(columns)
    }

    /// The rule masking the computed output columns (those with no table of origin) of
    /// `statements`, and every `COPY … TO` of them. Conservative: a computed value is masked
    /// when the statement reads a relation with a masked column and refers to that column by
    /// name (under any qualifier or alias), to a whole row or `*`, or to a name that is no
    /// column of what it reads (a renamed column, a subquery's output); a cursor's rows, whose
    /// query the gateway may not have seen, are masked whenever any column is. Partial and
    /// Hash act as Redact on computed values. `Err` when the catalog cannot be asked (the
    /// caller fails closed).
    pub async fn computed_rule(
        &mut self,
        masks: &MaskSet,
        statements: &[Statement],
    ) -> Result<Option<Rule>, String> {
        if !masks.has_column_rules() {
            return Ok(None);
        }
        if let Some(r) = masks.computed_rule(statements) {
            return Ok(Some(r.for_computed()));
        }
        for st in statements {
            // A cursor's or a prepared statement's rows (their query was another message),
            // and other sessions' query texts (they quote what those sessions wrote).
            if matches!(st.tag.as_str(), "FETCH" | "EXECUTE")
                || st.functions.iter().any(|f| {
                    crate::sql::classify::function_reads(f)
                        .is_some_and(|r| r != "pg_catalog.pg_largeobject")
                })
            {
                return Ok(masks.first_column_rule().map(Rule::for_computed));
            }
            let mut masked: Vec<(String, Rule)> = Vec::new();
            let mut known: HashSet<String> = HashSet::new();
            for rel in &st.relations {
                for (name, rule) in self.relation_columns(rel, masks).await?.iter() {
                    known.insert(name.clone());
                    if let Some(rule) = rule {
                        masked.push((name.clone(), rule.clone()));
                    }
                }
            }
            // A function of the database's own (not a built-in) that is not immutable may
            // read any table, masked columns included, and return what it read: its result
            // has no table of origin.
            if let Some(rule) = masks.first_column_rule() {
                for f in &st.functions {
                    if !crate::sql::classify::known_function(f) && self.reads_tables(f).await? {
                        return Ok(Some(rule.for_computed()));
                    }
                }
            }
            let Some((_, first)) = masked.first() else {
                continue;
            };
            // Columns renamed by an alias list: a name may stand for a masked column.
            if st.renamed {
                return Ok(Some(first.for_computed()));
            }
            for refs in &st.columns {
                let Some(last) = refs.last() else { continue };
                if let Some((_, rule)) = masked.iter().find(|(n, _)| n == last) {
                    return Ok(Some(rule.for_computed()));
                }
                if last == "*" || !known.contains(last) {
                    return Ok(Some(first.for_computed()));
                }
            }
        }
        Ok(None)
    }
}

impl Catalog {
    /// Where each of `names` (unqualified relation names) may point on a search path: the
    /// schemas holding a relation of that name, in the order the server looks (`pg_catalog`
    /// first unless the path lists it, schemas that do not exist or the login may not use
    /// skipped; the server takes the first, and every one counts, as what this connection
    /// sees may differ from what the session's uncommitted changes made), and the schema a
    /// new relation of that name would be created in (the first usable schema of the path). `path` lists the schema names (`$user` already replaced); `None` is the
    /// login's own default path. The agent's temporary tables are not seen (they are its
    /// own). `Err` when the catalog cannot be asked.
    pub async fn resolve(
        &mut self,
        path: Option<&[String]>,
        names: &[String],
    ) -> Result<Vec<(Vec<String>, Option<String>)>, String> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let lit = |s: &str| -> Result<String, String> {
            if s.contains('\0') {
                return Err("a name holds a NUL byte".into());
            }
            Ok(format!("'{}'", s.replace('\'', "''")))
        };
        let array = |items: &[String]| -> Result<String, String> {
            let items: Vec<String> = items.iter().map(|s| lit(s)).collect::<Result<_, _>>()?;
            Ok(format!("ARRAY[{}]::text[]", items.join(", ")))
        };
        let path = match path {
            Some([]) => "ARRAY[]::text[]".to_owned(),
            Some(p) => array(p)?,
            None => "pg_catalog.current_schemas(false)::text[]".to_owned(),
        };
        let rows = self
            .query(format!(
                "WITH p(s, i) AS (SELECT s, i FROM unnest({path}) WITH ORDINALITY AS u(s, i)), \
                 e(s, i) AS (SELECT 'pg_catalog'::text, 0::int8 \
                   WHERE NOT EXISTS (SELECT 1 FROM p WHERE p.s = 'pg_catalog') \
                   UNION ALL SELECT s, i FROM p) \
                 SELECT (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(n.nspname), ',' ORDER BY e.i) \
                   FROM e JOIN pg_catalog.pg_namespace n ON n.nspname = e.s \
                   JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = r.name \
                   WHERE pg_catalog.has_schema_privilege(n.oid, 'USAGE')), \
                 (SELECT pg_catalog.quote_ident(n.nspname) FROM p \
                   JOIN pg_catalog.pg_namespace n ON n.nspname = p.s \
                   WHERE pg_catalog.has_schema_privilege(n.oid, 'USAGE') ORDER BY p.i LIMIT 1) \
                 FROM unnest({}) WITH ORDINALITY AS r(name, i) ORDER BY r.i",
                array(names)?
            ))
            .await?;
        if rows.len() != names.len() {
            return Err("the catalog answered with the wrong number of names".into());
        }
        // Schemas come quoted as identifiers (a name may hold a comma), joined by commas.
        rows.into_iter()
            .map(|r| {
                let get = |i: usize| r.get(i).cloned().flatten();
                let holders = get(0).map(|l| split_setting(&l)).unwrap_or_default();
                let creation = get(1).and_then(|one| split_setting(&one).pop());
                Ok((holders, creation))
            })
            .collect()
    }

    /// Whether some function named `name` (any letter case, outside the system's schemas)
    /// is not immutable, so may read tables. A built-in's name is the built-in's (a path
    /// that puts another schema first makes the call Exec: [`Self::check_functions`]).
    /// Shared like volatility.
    async fn reads_tables(&mut self, name: &str) -> Result<bool, String> {
        let key = format!("{name}#reads");
        let known = self.known_answer(&key);
        if let Some(v) = known {
            return Ok(v);
        }
        let rows = self
            .query(format!(
                "SELECT coalesce(bool_or(provolatile <> 'i') \
                   FILTER (WHERE pronamespace NOT IN ('pg_catalog'::pg_catalog.regnamespace, \
                     'information_schema'::pg_catalog.regnamespace)), false) \
                   AND NOT bool_or(pronamespace = 'pg_catalog'::pg_catalog.regnamespace) \
                 FROM pg_catalog.pg_proc WHERE lower(proname) = '{}'",
                name.replace('\'', "''")
            ))
            .await?;
        let reads = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .is_some_and(|v| v == "t");
        self.remember(key, reads);
        Ok(reads)
    }

    /// What this session, or another session of the same database within
    /// [`VOLATILITY_TTL`], learnt of functions under `key`.
    fn known_answer(&self, key: &str) -> Option<bool> {
        self.volatile.get(key).copied().or_else(|| {
            VOLATILITY.lock().ok().and_then(|m| {
                m.get(&(self.database(), key.to_owned()))
                    .filter(|(_, at)| at.elapsed() < VOLATILITY_TTL)
                    .map(|(v, _)| *v)
            })
        })
    }

    /// Keeps an answer about functions for this session and shares it (the shared map is
    /// bounded: cleared when full).
    fn remember(&mut self, key: String, v: bool) {
        let shared_key = (self.database(), key.clone());
        self.volatile.insert(key, v);
        if let Ok(mut m) = VOLATILITY.lock() {
            if m.len() >= 16_384 {
                m.clear();
            }
            m.insert(shared_key, (v, std::time::Instant::now()));
        }
    }

    /// The database this catalog reads, as the shared function caches key it.
    fn database(&self) -> String {
        format!("{}:{}/{}", self.pg.host, self.pg.port, self.pg.database)
    }

    /// Forgets what is known of functions' volatility, in this session and for every session
    /// of this database: after DDL let through, a function may have been created, replaced
    /// or overloaded.
    pub fn forget_functions(&mut self) {
        self.volatile.clear();
        let db = self.database();
        if let Ok(mut m) = VOLATILITY.lock() {
            m.retain(|(d, _), _| *d != db);
        }
    }

    /// Classes the functions of `c` that the classifier does not know by what the catalog
    /// says: a volatile one (of any schema, any overload, any letter case) may change
    /// anything, so its statement is at least Exec; stable and immutable functions cannot
    /// change data. `Err` when the catalog cannot be asked (the caller fails closed).
    pub async fn check_functions(
        &mut self,
        c: &mut crate::sql::Classified,
        all: bool,
    ) -> Result<(), String> {
        let known = |f: &str| {
            crate::sql::classify::known_function(f)
                || HARMLESS_VOLATILE.contains(&f)
                || f.starts_with("pg_stat_get_")
        };
        let wanted = |f: &&String| all || !known(f);
        // (name, whether only one-argument functions count: attribute notation)
        let mut names: Vec<(String, bool)> = c
            .statements
            .iter()
            .flat_map(|s| s.functions.iter())
            .filter(wanted)
            .map(|f| (f.clone(), false))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let calls: HashSet<String> = c
            .statements
            .iter()
            .flat_map(|s| s.attribute_calls.iter())
            .filter(wanted)
            .filter(|f| !names.iter().any(|(n, _)| n == *f))
            .cloned()
            .collect();
        names.extend(calls.into_iter().map(|f| (f, true)));
        for (name, one_arg) in names {
            // A built-in's name, on a path that puts another schema before pg_catalog: any
            // function of that name elsewhere may be the one called.
            let shadow = known(&name);
            let key = match (one_arg, shadow) {
                (true, false) => format!("{name}/1"),
                (false, false) => name.clone(),
                (true, true) => format!("{name}/1#shadow"),
                (false, true) => format!("{name}#shadow"),
            };
            // Shared by the sessions of one database for a minute, so most sessions never
            // open a catalog connection for this (function volatility rarely changes).
            let risky = match self.known_answer(&key) {
                Some(v) => v,
                None => {
                    let rows = self
                        .query(format!(
                            "SELECT coalesce(bool_or({}), false), count(*) > 0 \
                             FROM pg_catalog.pg_proc WHERE lower(proname) = '{}'{}",
                            if shadow {
                                "pronamespace <> 'pg_catalog'::pg_catalog.regnamespace"
                            } else {
                                "provolatile = 'v'"
                            },
                            name.replace('\'', "''"),
                            if one_arg { " AND pronargs = 1" } else { "" }
                        ))
                        .await?;
                    let get = |i: usize| {
                        rows.first()
                            .and_then(|r| r.get(i).cloned().flatten())
                            .is_some_and(|v| v == "t")
                    };
                    let (v, exists) = (get(0), get(1));
                    if !exists && !one_arg {
                        // No function of that name that this connection sees: one the
                        // session created in a transaction still open, say. It may do
                        // anything; asked again next time (the server fails the call if
                        // there is none).
                        crate::sql::classify::raise_function(
                            c,
                            &name,
                            agentgate_crds::OperationClass::Exec,
                        );
                        continue;
                    }
                    self.remember(key, v);
                    v
                }
            };
            if risky {
                crate::sql::classify::raise_function(
                    c,
                    &name,
                    agentgate_crds::OperationClass::Exec,
                );
            }
        }
        Ok(())
    }
}
