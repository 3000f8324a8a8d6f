//! What the database's catalog says about the columns a statement reads, for masking: over a
//! second connection (the Target's credentials, opened when first needed), cached per
//! session. Nothing the agent sends is interpolated into a catalog query except relation,
//! function and operator names, and those only inside quoted literals (quotes doubled) on a
//! session that reads strings as standard-conforming. The queries name `pg_catalog`'s
//! functions with their schema and compare values of exactly the types of a `pg_catalog`
//! operator, so a function or operator the agent created elsewhere (a better-matching
//! overload) cannot answer in their place.

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
use agentgate_crds::OperationClass;

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
/// holds, transaction ids. Any other volatile function is classed Exec. A name here vouches
/// only for the trusted functions of that name ([`TRUSTED_PROC`]): when any other function
/// has it, the call is Exec ([`Catalog::check_functions`]).
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
/// How long what the catalog said is kept: by this session (column rules, relations'
/// columns, functions and operators), and taken from another session's lookup (functions and
/// operators). Objects may be replaced by others meanwhile: this bounds how long an answer
/// can be stale.
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
    /// `(relation OID, column number)` → the rule masking it, and when that was read.
    /// Every cache of the catalog is kept for [`VOLATILITY_TTL`] at most: another session
    /// (or a person) may replace a view or create a function meanwhile.
    cache: HashMap<(u32, i16), (Option<crate::mask::Rule>, std::time::Instant)>,
    /// Relations as statements name them → their columns and rules, and when read.
    relations: HashMap<String, (Columns, std::time::Instant)>,
    /// What this session learnt of functions and operators (see
    /// [`Catalog::check_functions`]), by kind and name, and when.
    volatile: HashMap<String, (bool, std::time::Instant)>,
    /// DDL the session let through may be uncommitted: this connection sees the objects as
    /// they were before it (a view's old definition), so no answer about columns can be
    /// trusted or kept.
    ddl_open: bool,
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
            ddl_open: false,
        }
    }

    /// Says whether DDL the session let through may still be uncommitted. While it may,
    /// every column of a relation, and every computed value that reads a relation or calls
    /// a function, answers the first column rule (masked, as a computed value: this
    /// connection reads the objects as they were before the DDL, and a name may stand for
    /// another relation now), and nothing cached is used; when it ends, everything is
    /// forgotten ([`Self::forget`]).
    pub fn set_ddl_open(&mut self, open: bool) {
        if self.ddl_open && !open {
            self.forget();
        }
        self.ddl_open = open;
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
        if self.ddl_open {
            return Ok(masks.first_column_rule().map(Rule::for_computed));
        }
        if let Some((c, at)) = self.cache.get(&(oid, attnum))
            && at.elapsed() < VOLATILITY_TTL
        {
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
                 WHERE a.attrelid = {oid}::pg_catalog.oid AND a.attnum = {attnum}::pg_catalog.int2"
            ))
            .await?;
        let rule = match rows.first() {
            // Column 0: the whole row (`SELECT c FROM customers c`), which holds every
            // column's value.
            None if attnum == 0 => Box::pin(self.whole_row_rule(oid, masks)).await?,
            // A relation or column the catalog's connection cannot see (created or
            // replaced in the agent's transaction, not committed yet): what it holds cannot
            // be told, so it is masked, and asked again next time.
            None => {
                return Ok(masks
                    .first_column_rule()
                    .map(crate::mask::Rule::for_computed));
            }
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
        self.cache
            .insert((oid, attnum), (rule.clone(), std::time::Instant::now()));
        Ok(rule)
    }
}

impl Catalog {
    /// The rule for a whole row of relation `oid`: masked as a computed value when any of
    /// its columns is; masked when the relation cannot be seen.
    async fn whole_row_rule(
        &mut self,
        oid: u32,
        masks: &MaskSet,
    ) -> Result<Option<crate::mask::Rule>, String> {
        let rows = self
            .query(format!(
                "SELECT a.attnum::text FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = {oid}::pg_catalog.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum"
            ))
            .await?;
        if rows.is_empty() {
            return Ok(masks
                .first_column_rule()
                .map(crate::mask::Rule::for_computed));
        }
        for r in rows {
            let Some(attnum) = r
                .first()
                .cloned()
                .flatten()
                .and_then(|n| n.parse::<i16>().ok())
            else {
                return Err("the catalog named a column by something other than its number".into());
            };
            if let Some(rule) = self.rule(oid, attnum, masks).await? {
                return Ok(Some(rule.for_computed()));
            }
        }
        Ok(None)
    }

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
                    // Every relation an alias names (one alias may name several).
                    match st.aliases.get(&q) {
                        Some(targets) => targets.iter().map(|r| (r.clone(), col.clone())).collect(),
                        None => vec![(q, col.clone())],
                    }
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
                         WHERE attrelid = pg_catalog.to_regclass('{}')::pg_catalog.oid \
                         AND attnum > 0 AND NOT attisdropped",
                        quote(&rel)
                    ))
                    .await?
                } else {
                    self.query(format!(
                        "SELECT attrelid::int8, attnum FROM pg_catalog.pg_attribute \
                         WHERE attrelid = pg_catalog.to_regclass('{}')::pg_catalog.oid AND attname = '{}'",
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
        // Any call: whether it reads tables is for the catalog to say ([`Self::computed_rule`]).
        // (A definition as the server prints it has no attribute notation.)
        let calls_own = !st.functions.is_empty();
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
                 SELECT inhparent FROM pg_catalog.pg_inherits WHERE inhrelid = {oid}::pg_catalog.oid \
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

    /// Whether this connection sees relation `name` (as statements name it): not one the
    /// agent created in a transaction still open, nor its temporary table.
    pub async fn sees(&mut self, name: &str, masks: &MaskSet) -> Result<bool, String> {
        Ok(!self.relation_columns(name, masks).await?.is_empty())
    }

    /// The columns of a relation as a statement names it (`table` or `schema.table`, resolved
    /// with the role's search path), each with the rule that masks it; empty when this
    /// connection sees no such relation (the agent's temporary table, one created in a
    /// transaction still open).
    async fn relation_columns(&mut self, name: &str, masks: &MaskSet) -> Result<Columns, String> {
        if let Some((c, at)) = self.relations.get(name)
            && !self.ddl_open
            && at.elapsed() < VOLATILITY_TTL
        {
            return Ok(c.clone());
        }
        let ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let qualified = match crate::sql::classify::relation_parts(name) {
            (schema, rel) if schema.is_empty() => ident(&rel),
            (schema, rel) => format!("{}.{}", ident(&schema), ident(&rel)),
        };
        let rows = self
            .query(format!(
                "SELECT attrelid::int8, attnum, attname FROM pg_catalog.pg_attribute \
                 WHERE attrelid = pg_catalog.to_regclass('{}')::pg_catalog.oid AND attnum > 0 AND NOT attisdropped \
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
        self.relations.insert(
            name.to_owned(),
            (columns.clone(), std::time::Instant::now()),
        );
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
        // While DDL may be uncommitted, a name may stand for another relation than the one
        // this connection sees (renamed, replaced): what reads a relation or calls a function
        // is masked.
        if self.ddl_open
            && statements
                .iter()
                .any(|s| !s.relations.is_empty() || !s.functions.is_empty())
        {
            return Ok(masks.first_column_rule().map(Rule::for_computed));
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
                let columns = self.relation_columns(rel, masks).await?;
                if columns.is_empty() {
                    // A relation this connection cannot see (the agent's temporary table, one
                    // created or renamed in a transaction still open): what it holds cannot
                    // be told. (`WITH` queries are no relations.)
                    return Ok(masks.first_column_rule().map(Rule::for_computed));
                }
                for (name, rule) in columns.iter() {
                    known.insert(name.clone());
                    if let Some(rule) = rule {
                        masked.push((name.clone(), rule.clone()));
                    }
                }
            }
            // A function that is not the system's may read any table, masked columns
            // included, and return what it read, whatever volatility it declares: its
            // result has no table of origin.
            if let Some(rule) = masks.first_column_rule()
                && self.reads_tables(st).await?
            {
                return Ok(Some(rule.for_computed()));
            }
            // A one-part name that is an alias of a relation, or a relation's own name, is
            // a whole row of it (`json_agg(x)` over `customers AS x`), whatever columns of
            // that name other relations have: masked when any relation it may name has a
            // masked column.
            for refs in &st.columns {
                let [one] = refs.as_slice() else { continue };
                for rel in rows_named(st, one) {
                    if let Some(rule) = self
                        .relation_columns(&rel, masks)
                        .await?
                        .iter()
                        .find_map(|(_, r)| r.clone())
                    {
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

/// The relations a one-part name of `st` may be as a whole row: every relation it is an
/// alias of, and every relation of that table name.
fn rows_named(st: &Statement, name: &str) -> Vec<String> {
    let mut out: Vec<String> = st
        .aliases
        .get(name)
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    for rel in &st.relations {
        if crate::sql::classify::relation_parts(rel).1 == name && !out.contains(rel) {
            out.push(rel.clone());
        }
    }
    out
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
                "WITH p(s, i) AS (SELECT s, i FROM pg_catalog.unnest({path}) WITH ORDINALITY AS u(s, i)), \
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
                 FROM pg_catalog.unnest({}) WITH ORDINALITY AS r(name, i) ORDER BY r.i",
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

    /// What this session, or another session of the same database, learnt of functions
    /// under `key` within [`VOLATILITY_TTL`].
    fn known_answer(&self, key: &str) -> Option<bool> {
        let own = self
            .volatile
            .get(key)
            .filter(|(_, at)| at.elapsed() < VOLATILITY_TTL)
            .map(|(v, _)| *v);
        own.or_else(|| {
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
        self.volatile.insert(key, (v, std::time::Instant::now()));
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

    /// Forgets everything this session's catalog learnt (column rules, relations' columns,
    /// what functions and operators are), and what every session of this database shares
    /// about functions and operators: after DDL let through, a view may have been replaced,
    /// a relation altered, a function or operator created, replaced or overloaded.
    pub fn forget(&mut self) {
        self.cache.clear();
        self.relations.clear();
        self.volatile.clear();
        let db = self.database();
        if let Ok(mut m) = VOLATILITY.lock() {
            m.retain(|(d, _), _| *d != db);
        }
    }

    /// The same as [`Self::forget`] (its former name).
    pub fn forget_functions(&mut self) {
        self.forget();
    }

    /// Classes what `c` runs by what the catalog says of it, raising statements to Exec:
    ///
    /// - a call is taken as the built-in of its name only when it names no schema or a
    ///   system one (`pg_catalog`, `information_schema`) and no function of that name (any
    ///   overload, any letter case; for attribute notation, any of one argument) exists
    ///   outside the trusted ones (the system's, and members of an extension owned by a
    ///   superuser: `TRUSTED_PROC`): overload resolution may pick a user's
    ///   `public.random(int)` for `random(1)` whatever the search path; a call naming
    ///   another schema is Exec;
    /// - a trusted function that is volatile may change anything, unless the classifier
    ///   classes its name or knows it harmless (`HARMLESS_VOLATILE`, `pg_catalog`'s
    ///   `pg_stat_get_*` counters);
    /// - an operator (which runs its function) is trusted only when every operator of that
    ///   name is (`TRUSTED_OPERATOR`); `OPERATOR(pg_catalog.op)` always is, one of another
    ///   schema never;
    /// - a function or operator the catalog's connection cannot see at all (created in a
    ///   transaction still open) may do anything.
    ///
    /// Answers are shared by the sessions of one database for a minute; all of
    /// them in one round-trip. `catalog_later` (the search path puts a schema before
    /// `pg_catalog`) no longer changes anything: every call is checked whatever the path.
    /// `Err` when the catalog cannot be asked (the caller fails closed).
    pub async fn check_functions(
        &mut self,
        c: &mut crate::sql::Classified,
        catalog_later: bool,
    ) -> Result<(), String> {
        let _ = catalog_later;
        let plan = catalog_asks(c);
        // A function or operator of a schema of the database's own: anyone's code.
        for (schema, name) in &plan.other_calls {
            crate::sql::classify::raise_call(c, schema, name, OperationClass::Exec);
        }
        for (schema, op) in &plan.other_operators {
            crate::sql::classify::raise_operator(c, schema, op, OperationClass::Exec);
        }
        let mut risky: Vec<(&'static str, String)> = Vec::new();
        let mut unknown: Vec<(&'static str, String)> = Vec::new();
        for (kind, name) in plan.asks {
            match self.known_answer(&format!("{kind}:{name}")) {
                Some(true) => risky.push((kind, name)),
                Some(false) => {}
                None => unknown.push((kind, name)),
            }
        }
        if !unknown.is_empty() {
            let answers = self.ask_routines(&unknown).await?;
            for ((kind, name), a) in unknown.into_iter().zip(answers) {
                let (v, keep) = verdict(kind, &name, &a);
                if keep {
                    self.remember(format!("{kind}:{name}"), v);
                    // The same row says whether such a call may read tables (for masking:
                    // [`Self::reads_tables`]).
                    match kind {
                        "f" => self.remember(format!("r:{name}"), a.reads),
                        "a" => self.remember(format!("ra:{name}"), a.reads),
                        _ => {}
                    }
                }
                if v {
                    risky.push((kind, name));
                }
            }
        }
        for (kind, name) in risky {
            raise_risky(c, kind, &name);
        }
        Ok(())
    }

    /// Whether what the functions `st` calls return may be read from tables (masked
    /// columns included) without the statement naming them: a call naming a schema other
    /// than the system's, a function that runs SQL text (`query_to_xml`, `dblink`, …), and
    /// any name (any overload, any letter case) that some function outside the system's
    /// schemas has, unless that function is a trusted extension's ([`TRUSTED_PROC`]) and
    /// immutable; a name no function has that this connection sees (created in a
    /// transaction still open). Only `pg_catalog` and `information_schema` are trusted by
    /// name. Answers are shared like [`Self::check_functions`]'s.
    async fn reads_tables(&mut self, st: &Statement) -> Result<bool, String> {
        let Some(asks) = reads_asks(st) else {
            return Ok(true);
        };
        let mut unknown = Vec::new();
        for (kind, name) in asks {
            match self.known_answer(&format!("{kind}:{name}")) {
                Some(true) => return Ok(true),
                Some(false) => {}
                None => unknown.push((kind, name)),
            }
        }
        if unknown.is_empty() {
            return Ok(false);
        }
        let answers = self.ask_routines(&unknown).await?;
        let mut reads = false;
        for ((kind, name), a) in unknown.into_iter().zip(answers) {
            if !a.exists && kind == "r" {
                // Not remembered: it may be created in a transaction still open.
                reads = true;
                continue;
            }
            self.remember(format!("{kind}:{name}"), a.reads);
            reads |= a.reads;
        }
        Ok(reads)
    }

    /// Asks the catalog, in one round-trip, about each `(kind, name)`: kinds `f` (a
    /// function of any schema), `s` (one of the system's schemas), `a` and `ra` (one of one
    /// argument: attribute notation), `r` (any), `o` (an operator). Names are compared
    /// in lower case for functions (the classifier folds them), exactly for operators.
    async fn ask_routines(
        &mut self,
        asks: &[(&'static str, String)],
    ) -> Result<Vec<Routine>, String> {
        let rows = self.query(routines_query(asks)?).await?;
        if rows.len() != asks.len() {
            return Err("the catalog answered with the wrong number of names".into());
        }
        Ok(rows
            .iter()
            .map(|r| {
                let get = |i: usize| r.get(i).cloned().flatten().is_some_and(|v| v == "t");
                let exists = get(1);
                Routine {
                    exists,
                    untrusted: get(2),
                    volatile: get(3),
                    // A function reads tables when some function of that name outside the
                    // system may; a name that none has counts only through `exists`.
                    reads: get(4),
                }
            })
            .collect())
    }
}

/// What the catalog says of one name [`Catalog::ask_routines`] asked about.
struct Routine {
    /// Some function (or operator) of that name exists.
    exists: bool,
    /// Some of them is not trusted ([`TRUSTED_PROC`], [`TRUSTED_OPERATOR`]).
    untrusted: bool,
    /// Some trusted one is volatile (`pg_catalog`'s `pg_stat_get_*` counters aside).
    volatile: bool,
    /// Some function outside the system's schemas may read tables.
    reads: bool,
}

/// The catalog query of [`Catalog::ask_routines`]: one row per ask, in order, with whether
/// some function (or operator) of that name exists, whether some is not trusted, whether
/// some trusted one is volatile, whether some outside the system's schemas may read tables.
fn routines_query(asks: &[(&'static str, String)]) -> Result<String, String> {
    let lit = |s: &str| -> Result<String, String> {
        if s.contains('\0') {
            return Err("a name holds a NUL byte".into());
        }
        Ok(format!("'{}'", s.replace('\'', "''")))
    };
    let array = |items: Vec<&str>| -> Result<String, String> {
        let items: Vec<String> = items.into_iter().map(lit).collect::<Result<_, _>>()?;
        Ok(format!("ARRAY[{}]::pg_catalog.text[]", items.join(", ")))
    };
    let kinds = array(asks.iter().map(|(k, _)| *k).collect())?;
    let names = array(asks.iter().map(|(_, n)| n.as_str()).collect())?;
    let eq = "OPERATOR(pg_catalog.=)";
    let ne = "OPERATOR(pg_catalog.<>)";
    // The functions a kind asks about (`p`: pg_proc).
    let matching = format!(
        "pg_catalog.lower(p.proname::pg_catalog.text) {eq} q.n \
             AND (q.k {ne} ALL (ARRAY['a', 'ra']::pg_catalog.text[]) OR p.pronargs {eq} 1::pg_catalog.int2) \
             AND (q.k {ne} 's' OR p.pronamespace {eq} ANY ({SYSTEM_SCHEMAS}))"
    );
    Ok(format!(
        "SELECT q.i::pg_catalog.text, \
                 CASE WHEN q.k {eq} 'o' \
                   THEN EXISTS (SELECT FROM pg_catalog.pg_operator o WHERE o.oprname {eq} q.n::pg_catalog.name) \
                   ELSE EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE {matching}) END, \
                 CASE WHEN q.k {eq} 'o' \
                   THEN EXISTS (SELECT FROM pg_catalog.pg_operator o \
                     WHERE o.oprname {eq} q.n::pg_catalog.name AND NOT ({TRUSTED_OPERATOR})) \
                   ELSE EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE {matching} AND NOT ({TRUSTED_PROC})) END, \
                 CASE WHEN q.k {eq} 'o' THEN false \
                   ELSE EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE {matching} AND ({TRUSTED_PROC}) \
                     AND p.provolatile {eq} 'v' \
                     AND NOT (p.pronamespace {eq} 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid \
                       AND p.proname::pg_catalog.text OPERATOR(pg_catalog.~~) 'pg\\_stat\\_get\\_%')) END, \
                 CASE WHEN q.k {eq} 'o' THEN false \
                   ELSE EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE {matching} \
                     AND NOT (p.pronamespace {eq} ANY ({SYSTEM_SCHEMAS})) \
                     AND (NOT ({TRUSTED_PROC}) OR p.provolatile {ne} 'i')) END \
                 FROM ROWS FROM (pg_catalog.unnest({kinds}), pg_catalog.unnest({names})) \
                   WITH ORDINALITY AS q(k, n, i) \
                 ORDER BY q.i"
    ))
}

/// What [`Catalog::check_functions`] asks the catalog about a query string, and what it
/// classes Exec without asking.
#[derive(Debug, Default, PartialEq)]
struct Asks {
    /// `(kind, name)`: `f` a call naming no schema, `s` a call naming a system schema, `a` a
    /// name in attribute notation (a call of one argument), `o` an operator named without
    /// schema.
    asks: std::collections::BTreeSet<(&'static str, String)>,
    /// Calls naming another schema: `(schema, name)`.
    other_calls: Vec<(String, String)>,
    /// Operators naming a schema other than `pg_catalog`: `(schema, operator)`.
    other_operators: Vec<(String, String)>,
}

/// Sorts what `c` calls and uses into what to ask and what is Exec by its schema.
fn catalog_asks(c: &crate::sql::Classified) -> Asks {
    let mut out = Asks::default();
    for st in c.statements.iter() {
        for (schema, name) in &st.calls {
            match schema.as_str() {
                "" => {
                    out.asks.insert(("f", name.clone()));
                }
                "pg_catalog" | "information_schema" => {
                    out.asks.insert(("s", name.clone()));
                }
                _ => out.other_calls.push((schema.clone(), name.clone())),
            }
        }
        for name in &st.attribute_calls {
            out.asks.insert(("a", name.clone()));
        }
        for (schema, op) in &st.operators {
            match schema.as_str() {
                "" => {
                    out.asks.insert(("o", op.clone()));
                }
                // Looked up in pg_catalog only: the built-in (or the server's error).
                "pg_catalog" => {}
                _ => out.other_operators.push((schema.clone(), op.clone())),
            }
        }
    }
    out
}

/// What [`Catalog::reads_tables`] asks the catalog about `st` (`r`: a call naming no
/// schema, `ra`: a name in attribute notation), or `None` when a call reads tables
/// whatever the catalog says: it runs SQL text (`query_to_xml`, `dblink`, …) or names a
/// schema other than the system's.
fn reads_asks(st: &Statement) -> Option<std::collections::BTreeSet<(&'static str, String)>> {
    let mut asks = std::collections::BTreeSet::new();
    for (schema, name) in &st.calls {
        if crate::sql::classify::function_class(name) == Some(OperationClass::Exec) {
            return None;
        }
        match schema.as_str() {
            "" => {
                asks.insert(("r", name.clone()));
            }
            "pg_catalog" | "information_schema" => {}
            _ => return None,
        }
    }
    for name in &st.attribute_calls {
        asks.insert(("ra", name.clone()));
    }
    Some(asks)
}

/// Whether what the catalog answered for `(kind, name)` makes its use Exec, and whether
/// the answer may be kept (one about something not there is asked again: it may be created
/// in a transaction still open, and may do anything meanwhile).
fn verdict(kind: &str, name: &str, a: &Routine) -> (bool, bool) {
    if !a.exists && kind != "a" {
        return (true, false);
    }
    let exempt = crate::sql::classify::known_function(name) || HARMLESS_VOLATILE.contains(&name);
    (a.untrusted || (kind != "o" && a.volatile && !exempt), true)
}

/// Raises what uses `(kind, name)` (see [`Asks`]) to Exec.
fn raise_risky(c: &mut crate::sql::Classified, kind: &str, name: &str) {
    use crate::sql::classify::{raise_call, raise_function, raise_operator};
    match kind {
        "o" => raise_operator(c, "", name, OperationClass::Exec),
        "a" => raise_function(c, name, OperationClass::Exec),
        "s" => {
            for schema in ["pg_catalog", "information_schema"] {
                raise_call(c, schema, name, OperationClass::Exec);
            }
        }
        _ => raise_call(c, "", name, OperationClass::Exec),
    }
}

/// The OIDs of the system's schemas, as an SQL array. (Every function and operator in the
/// catalog's own queries is named with its schema, and compared values have the exact types
/// of a `pg_catalog` operator: an overload in another schema that matched better would run
/// instead.)
macro_rules! system_schemas {
    () => {
        "ARRAY['pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid, \
         'information_schema'::pg_catalog.regnamespace::pg_catalog.oid]"
    };
}

/// See [`TRUSTED_PROC`].
macro_rules! trusted_proc {
    () => {
        concat!(
            "(p.pronamespace OPERATOR(pg_catalog.=) ANY (",
            system_schemas!(),
            ") \
             OR (EXISTS (SELECT FROM pg_catalog.pg_depend d \
               WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass::pg_catalog.oid \
               AND d.objid OPERATOR(pg_catalog.=) p.oid \
               AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass::pg_catalog.oid \
               AND d.deptype OPERATOR(pg_catalog.=) 'e') \
             AND EXISTS (SELECT FROM pg_catalog.pg_roles r \
               WHERE r.oid OPERATOR(pg_catalog.=) p.proowner AND r.rolsuper)))"
        )
    };
}

/// The OIDs of the system's schemas (`pg_catalog`, `information_schema`), as an SQL array.
const SYSTEM_SCHEMAS: &str = system_schemas!();

/// Which functions (`p`, a row of `pg_proc`) are taken for what their name and declared
/// volatility say: the system's (`pg_catalog`, `information_schema`), and members of an
/// extension owned by a superuser (installed by `CREATE EXTENSION`, an `Admin` statement,
/// or by a trusted extension's script, which runs as the bootstrap superuser). Anything
/// else an agent may have written: however it is declared (`STABLE`, `IMMUTABLE`), it may
/// call `set_config`, `dblink_exec` or `pg_terminate_backend`, or read any table.
const TRUSTED_PROC: &str = trusted_proc!();

/// Which operators (`o`, a row of `pg_operator`) are trusted: `pg_catalog`'s, and members of
/// an extension owned by a superuser whose function is trusted too ([`TRUSTED_PROC`]).
const TRUSTED_OPERATOR: &str = concat!(
    "(o.oprnamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid \
     OR (EXISTS (SELECT FROM pg_catalog.pg_depend d \
           WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_operator'::pg_catalog.regclass::pg_catalog.oid \
           AND d.objid OPERATOR(pg_catalog.=) o.oid \
           AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass::pg_catalog.oid \
           AND d.deptype OPERATOR(pg_catalog.=) 'e') \
         AND EXISTS (SELECT FROM pg_catalog.pg_roles r \
           WHERE r.oid OPERATOR(pg_catalog.=) o.oprowner AND r.rolsuper) \
         AND EXISTS (SELECT FROM pg_catalog.pg_proc p \
           WHERE p.oid OPERATOR(pg_catalog.=) o.oprcode::pg_catalog.oid AND ",
    trusted_proc!(),
    ")))"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::classify as parse;

    fn classified(sql: &str) -> crate::sql::Classified {
        parse(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn catalog(database: &str) -> Catalog {
        let pg: agentgate_crds::target::PostgresTarget = serde_json::from_value(
            serde_json::json!({ "host": "db", "database": database, "credentials": { "name": "db" } }),
        )
        .unwrap_or_else(|e| panic!("a target: {e}"));
        let creds = Credentials {
            username: "app".into(),
            password: "pw".into(),
            ca_pem: None,
        };
        let pool = Arc::new(Pool::new(super::super::pool::PoolConfig::default()));
        Catalog::new(pg, creds, "agent", pool)
    }

    fn masks() -> MaskSet {
        let p: agentgate_crds::MaskPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "MaskPolicy",
            "metadata": { "name": "pii" },
            "spec": { "rules": [
                { "name": "emails", "columns": ["public.customers.email"], "action": "Partial" }
            ] }
        }))
        .unwrap_or_else(|e| panic!("a policy: {e}"));
        MaskSet::compile(&[&p], &|_| None).unwrap_or_else(|e| panic!("compiles: {e}"))
    }

    fn set<const N: usize>(
        items: [(&'static str, &str); N],
    ) -> std::collections::BTreeSet<(&'static str, String)> {
        items.into_iter().map(|(k, n)| (k, n.to_owned())).collect()
    }

    #[test]
    fn calls_are_asked_about_by_schema_and_other_schemas_are_exec() {
        let plan = catalog_asks(&classified(
            "SELECT app.random(), pg_catalog.now(), information_schema._pg_truetypid(a, t), \
             lower(x), t.c FROM t \
             WHERE a OPERATOR(public.+) 1 = 2 AND b OPERATOR(pg_catalog.+) 1 > 0",
        ));
        assert_eq!(
            plan.asks,
            set([
                ("a", "c"),
                ("f", "lower"),
                ("o", "="),
                ("o", ">"),
                ("s", "_pg_truetypid"),
                ("s", "now"),
            ])
        );
        assert_eq!(plan.other_calls, [("app".to_owned(), "random".to_owned())]);
        assert_eq!(
            plan.other_operators,
            [("public".to_owned(), "+".to_owned())]
        );
        // Names known to the classifier or known harmless are asked about too: another
        // overload of them may be anyone's.
        let plan = catalog_asks(&classified(
            "SELECT random(1), pg_stat_get_numscans(1), set_config('a', 'b', false)",
        ));
        assert_eq!(
            plan.asks,
            set([
                ("f", "pg_stat_get_numscans"),
                ("f", "random"),
                ("f", "set_config")
            ])
        );
    }

    #[test]
    fn what_the_catalog_says_decides_exec() {
        let r = |exists, untrusted, volatile| Routine {
            exists,
            untrusted,
            volatile,
            reads: false,
        };
        // A function of that name outside the trusted ones: `random(1)` may be
        // `public.random(int)`, `pg_stat_get_x()` a user's, whatever they declare.
        assert_eq!(verdict("f", "random", &r(true, true, true)), (true, true));
        assert_eq!(
            verdict("f", "pg_stat_get_x", &r(true, true, false)),
            (true, true)
        );
        assert_eq!(verdict("f", "lower", &r(true, true, false)), (true, true));
        assert_eq!(verdict("a", "email", &r(true, true, false)), (true, true));
        assert_eq!(verdict("o", "=", &r(true, true, false)), (true, true));
        // Trusted only: volatile ones are Exec unless known by name.
        assert_eq!(verdict("f", "random", &r(true, false, true)), (false, true));
        assert_eq!(
            verdict("s", "nextval", &r(true, false, true)),
            (false, true)
        );
        assert_eq!(
            verdict("f", "some_volatile", &r(true, false, true)),
            (true, true)
        );
        assert_eq!(verdict("f", "lower", &r(true, false, false)), (false, true));
        assert_eq!(verdict("o", "=", &r(true, false, false)), (false, true));
        // Nothing of that name seen: maybe made in a transaction still open; not kept.
        assert_eq!(
            verdict("f", "made_now", &r(false, false, false)),
            (true, false)
        );
        assert_eq!(
            verdict("s", "made_now", &r(false, false, false)),
            (true, false)
        );
        assert_eq!(verdict("o", "@@@", &r(false, false, false)), (true, false));
        // A name in attribute notation that no function has is a column.
        assert_eq!(
            verdict("a", "email", &r(false, false, false)),
            (false, true)
        );
    }

    #[test]
    fn risky_uses_are_raised_where_they_are() {
        let mut c =
            classified("SELECT random(1); SELECT pg_catalog.random(); SELECT 1 WHERE 1 = 1");
        raise_risky(&mut c, "f", "random");
        assert_eq!(
            c.statements.iter().map(|s| s.class).collect::<Vec<_>>(),
            [
                OperationClass::Exec,
                OperationClass::Read,
                OperationClass::Read
            ]
        );
        raise_risky(&mut c, "s", "random");
        raise_risky(&mut c, "o", "=");
        assert!(c.statements.iter().all(|s| s.class == OperationClass::Exec));
        assert_eq!(c.class, OperationClass::Exec);
    }

    #[test]
    fn functions_outside_the_system_are_taken_as_reading_tables() {
        let st = |sql: &str| classified(sql).statements[0].clone();
        // Runs SQL text, or names another schema: no need to ask.
        assert_eq!(
            reads_asks(&st(
                "SELECT query_to_xml('select * from customers', true, false, '')"
            )),
            None
        );
        assert_eq!(
            reads_asks(&st("SELECT public.dblink('x', 'select 1')")),
            None
        );
        assert_eq!(reads_asks(&st("SELECT app.leak(id) FROM orders")), None);
        // Otherwise every name is asked about, the system's schemas aside.
        assert_eq!(
            reads_asks(&st(
                "SELECT lower(email), pg_catalog.upper(x), o.y FROM orders o"
            )),
            Some(set([("r", "lower"), ("ra", "y")]))
        );
    }

    #[test]
    fn the_catalog_query_parses_and_quotes_names() {
        let asks: Vec<(&'static str, String)> = vec![
            ("f", "random".into()),
            ("s", "now".into()),
            ("a", "it's".into()),
            ("o", "=".into()),
            ("r", "leak".into()),
            ("ra", "x".into()),
        ];
        let sql = routines_query(&asks).unwrap_or_else(|e| panic!("{e}"));
        pg_query::parse(&sql, pg_query::ParserOptions::DEFAULT)
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
        assert!(sql.contains("'it''s'"), "{sql}");
        // Every function the query calls names its schema.
        let parsed = classified(&sql);
        for (schema, name) in &parsed.statements[0].calls {
            assert_eq!(schema, "pg_catalog", "{name}");
        }
        for (schema, op) in &parsed.statements[0].operators {
            assert_eq!(schema, "pg_catalog", "{op}");
        }
        assert!(routines_query(&[("f", "a\0b".into())]).is_err());
    }

    #[test]
    fn alias_and_table_names_are_whole_rows_of_every_relation_they_may_name() {
        let st = classified(
            "SELECT (SELECT json_agg(state) FROM customers AS state) AS leak, \
             (SELECT 1 FROM orders AS state LIMIT 1) AS decoy",
        )
        .statements[0]
            .clone();
        assert_eq!(rows_named(&st, "state"), ["customers", "orders"]);
        let st =
            classified("SELECT row_to_json(customers) FROM public.customers").statements[0].clone();
        assert_eq!(rows_named(&st, "customers"), ["public.customers"]);
        assert!(rows_named(&st, "email").is_empty());
    }

    #[test]
    fn forget_clears_every_cache_of_the_session_and_the_databases_shared_answers() {
        let mut cat = catalog("app");
        let other = catalog("other");
        let now = std::time::Instant::now();
        cat.cache.insert((16384, 2), (None, now));
        cat.relations
            .insert("v".into(), (Arc::new(Vec::new()), now));
        cat.remember("f:leak".into(), false);
        if let Ok(mut m) = VOLATILITY.lock() {
            m.insert(
                (other.database(), "f:kept".into()),
                (false, std::time::Instant::now()),
            );
        }
        assert_eq!(cat.known_answer("f:leak"), Some(false));
        cat.forget();
        assert!(cat.cache.is_empty() && cat.relations.is_empty() && cat.volatile.is_empty());
        assert_eq!(cat.known_answer("f:leak"), None);
        assert_eq!(other.known_answer("f:kept"), Some(false));
        // The former name does the same.
        cat.cache.insert((1, 1), (None, std::time::Instant::now()));
        cat.forget_functions();
        assert!(cat.cache.is_empty());
    }

    #[tokio::test]
    async fn while_ddl_may_be_uncommitted_every_column_is_masked_and_nothing_kept() {
        let mut cat = catalog("app");
        let masks = masks();
        cat.cache
            .insert((16384, 2), (None, std::time::Instant::now()));
        cat.set_ddl_open(true);
        // Answered without the catalog (no connection is opened), masked as computed, not
        // from what was learnt before the DDL.
        let rule = cat
            .rule(16384, 2, &masks)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rule.map(|r| r.name), Some("pii/emails".to_owned()));
        let st = classified("SELECT lower(name) FROM orders").statements[0].clone();
        let rule = cat
            .computed_rule(&masks, std::slice::from_ref(&st))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rule.is_some());
        // Its end forgets what was learnt before.
        cat.cache.insert((1, 1), (None, std::time::Instant::now()));
        cat.set_ddl_open(false);
        assert!(cat.cache.is_empty());
    }
}
