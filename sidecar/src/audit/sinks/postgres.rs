//! The PostgreSQL sink: an append-only table.
//!
//! The table (created by an administrator, see `examples/audit/postgres.sql`) keeps each
//! record's exact line in a `json` column beside columns to query by. The sink's role must be
//! able to INSERT and nothing more: before writing, the sink checks that it cannot UPDATE,
//! DELETE or TRUNCATE the table and does not own it, and refuses to deliver (records stay
//! spilled, commands are refused when the buffer fills) until that holds.
//!
//! Unless the connection string says `sslmode=disable`, the connection is TLS, and the
//! server's certificate must be valid for the host named (system roots plus
//! `--audit-ca-file`): `require`, `prefer` (the default), `verify-ca` and `verify-full` all
//! mean what libpq's `verify-full` does; a server that does not offer TLS gets nothing. A
//! Unix socket (local) is used as it is.

use std::path::PathBuf;

use agentgate_crds::audit::Record;
use bytes::Bytes;
use tokio_postgres::Client;

/// The PostgreSQL sink.
pub struct PostgresSink {
    conninfo: String,
    table: String,
    client: Option<Client>,
    /// Extra CA certificates trusted for the server's certificate.
    ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may carry a password.
        f.debug_struct("PostgresSink")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn quote_ident(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

impl PostgresSink {
    /// A sink writing to `table` over `conninfo` (libpq key=value or URL form).
    pub fn new(conninfo: String, table: String) -> Self {
        Self {
            conninfo,
            table,
            client: None,
            ca_file: None,
        }
    }

    /// Also trusts the CA certificates (PEM) in `ca_file` for the server's certificate.
    #[must_use]
    pub fn with_ca_file(mut self, ca_file: Option<PathBuf>) -> Self {
        self.ca_file = ca_file;
        self
    }

    async fn connect(&mut self) -> Result<&Client, String> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return self
                .client
                .as_ref()
                .ok_or_else(|| "not connected".to_owned());
        }
        self.client = None;
        let client = super::pgtls::connect(&self.conninfo, self.ca_file.as_deref()).await?;
        let row = client
            .query_one(
                "SELECT has_table_privilege($1::text, 'UPDATE') \
                   OR has_table_privilege($1::text, 'DELETE') \
                   OR has_table_privilege($1::text, 'TRUNCATE'), \
                 pg_has_role((SELECT relowner FROM pg_class WHERE oid = $1::text::regclass), 'USAGE')",
                &[&self.table],
            )
            .await
            .map_err(|e| {
                let why = e.as_db_error().map_or(e.to_string(), |d| d.message().to_owned());
                format!("check the audit table {}: {why}", self.table)
            })?;
        let (may_change, owns): (bool, bool) = (row.get(0), row.get(1));
        if may_change || owns {
            return Err(format!(
                "the audit table {} is not append-only for this role: it can {}; grant it INSERT only (see examples/audit/postgres.sql)",
                self.table,
                if owns {
                    "alter or drop it (it owns the table)"
                } else {
                    "UPDATE, DELETE or TRUNCATE it"
                }
            ));
        }
        Ok(self.client.insert(client))
    }

    /// Inserts `lines`; rows already present (a re-delivery) are skipped.
    pub async fn deliver(&mut self, lines: &[Bytes]) -> Result<(), String> {
        let mut streams = Vec::with_capacity(lines.len());
        let mut ns = Vec::with_capacity(lines.len());
        let mut sessions = Vec::with_capacity(lines.len());
        let mut seqs = Vec::with_capacity(lines.len());
        let mut times = Vec::with_capacity(lines.len());
        let mut kinds = Vec::with_capacity(lines.len());
        let mut identities = Vec::with_capacity(lines.len());
        let mut targets = Vec::with_capacity(lines.len());
        let mut verdicts = Vec::with_capacity(lines.len());
        let mut records = Vec::with_capacity(lines.len());
        for line in lines {
            let r: Record = serde_json::from_slice(line)
                .map_err(|e| format!("a spilled record does not parse: {e}"))?;
            streams.push(r.stream);
            ns.push(i64::try_from(r.n).unwrap_or(i64::MAX));
            sessions.push(r.session);
            seqs.push(r.seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX)));
            times.push(r.time.to_string());
            kinds.push(r.kind.as_str().to_owned());
            identities.push(r.identity);
            targets.push(r.target);
            verdicts.push(r.decision.map(|d| d.verdict.as_str().to_owned()));
            records.push(String::from_utf8_lossy(line).into_owned());
        }
        let sql = format!(
            "INSERT INTO {} (stream, n, session, seq, time, kind, identity, target, verdict, record) \
             SELECT s, n, se, sq, t::timestamptz, k, i, tg, v, r::json \
             FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::text[], \
                         $7::text[], $8::text[], $9::text[], $10::text[]) \
                  AS x(s, n, se, sq, t, k, i, tg, v, r) \
             ON CONFLICT (stream, n) DO NOTHING",
            quote_ident(&self.table)
        );
        let client = self.connect().await?;
        let res = client
            .execute(
                &sql,
                &[
                    &streams,
                    &ns,
                    &sessions,
                    &seqs,
                    &times,
                    &kinds,
                    &identities,
                    &targets,
                    &verdicts,
                    &records,
                ],
            )
            .await;
        if let Err(e) = res {
            self.client = None;
            let why = e
                .as_db_error()
                .map_or(e.to_string(), |d| d.message().to_owned());
            return Err(format!("insert into {}: {why}", self.table));
        }
        Ok(())
    }
}
