//! Statements as audit records keep them: every constant replaced by a placeholder and every
//! comment dropped, by PostgreSQL's own scanner, whatever the statement (DDL, utility
//! statements and unparsable text included), so no value reaches a record.

use pg_query::protobuf::Token;

/// `sql` with each constant (string, number, bit string, Unicode string) replaced by a `$n`
/// placeholder numbered after the statement's own parameters, and comments dropped. `None`
/// when the text does not scan (an unterminated quote): nothing of it can be kept safely.
pub fn redact(sql: &str) -> Option<String> {
    // `scan` (not `scan_tokens`): it is sound for texts without any token.
    let tokens = pg_query::scan(sql).ok()?.tokens;
    let text = |t: &pg_query::protobuf::ScanToken| {
        sql.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)
    };
    let mut next = tokens
        .iter()
        .filter(|t| t.token == Token::Param as i32)
        .filter_map(|t| text(t)?.strip_prefix('$')?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    let mut out = String::with_capacity(sql.len());
    let mut last_end = 0usize;
    for t in &tokens {
        let kind = Token::try_from(t.token).ok()?;
        let start = usize::try_from(t.start).ok()?;
        // What separated this token from the previous one (whitespace, or a dropped
        // comment): one space.
        if !out.is_empty() && start > last_end {
            out.push(' ');
        }
        last_end = usize::try_from(t.end).ok()?;
        match kind {
            Token::SqlComment | Token::CComment => {}
            Token::Sconst
            | Token::Usconst
            | Token::Fconst
            | Token::Iconst
            | Token::Bconst
            | Token::Xconst => {
                next += 1;
                out.push('$');
                out.push_str(&next.to_string());
            }
            _ => out.push_str(text(t)?),
        }
    }
    // A comment at the end leaves a space.
    Some(out.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn constants_and_comments_never_survive() {
        let cases = [
            (
                "SELECT 1 /* card 4111111111111111 */ -- pw hunter2\n",
                "SELECT $1",
            ),
            (
                "CREATE TABLE leak AS SELECT '4111111111111111' AS card",
                "CREATE TABLE leak AS SELECT $1 AS card",
            ),
            (
                "CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (password 'hunter2')",
                "CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (password $1)",
            ),
            (
                "COMMENT ON TABLE t IS $$sk-live-abc$$",
                "COMMENT ON TABLE t IS $1",
            ),
            (
                "SELECT * FROM t WHERE a = $1 AND b = E'x\\'y' AND c = 1.5e3 AND d = B'101' AND e = X'ff' AND f = U&'\\0041'",
                "SELECT * FROM t WHERE a = $1 AND b = $2 AND c = $3 AND d = $4 AND e = $5 AND f = $6",
            ),
            ("ALTER ROLE app PASSWORD 'x'", "ALTER ROLE app PASSWORD $1"),
            ("DO $body$ BEGIN PERFORM 'secret'; END $body$", "DO $1"),
            ("-- only a comment", ""),
            ("", ""),
        ];
        for (sql, want) in cases {
            assert_eq!(redact(sql).as_deref(), Some(want), "{sql}");
        }
        assert_eq!(redact("SELECT 'unterminated"), None);
    }
}
