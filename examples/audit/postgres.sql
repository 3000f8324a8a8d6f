-- The PostgreSQL audit sink's table, append-only for the sidecar's role.
-- Run as an administrator (the table's owner is not the writer), then give the sidecar
--   --audit-postgres "host=… dbname=… user=agentgate_audit_writer password=…"
-- The sidecar refuses to deliver (records stay spilled; new commands are refused when its
-- buffer fills) if its role could UPDATE, DELETE or TRUNCATE the table, or owns it.
CREATE TABLE IF NOT EXISTS agentgate_audit (
    stream   text        NOT NULL,  -- the sidecar process's chain
    n        bigint      NOT NULL,  -- position in the stream
    session  text,                  -- the session (NULL for stream records)
    seq      bigint,                -- position in the session
    time     timestamptz NOT NULL,
    kind     text        NOT NULL,  -- SessionStart, Request, Outcome, …
    identity text,
    target   text,
    verdict  text,                  -- Allowed, Refused, Held, Approved, Denied
    record   json        NOT NULL,  -- the record exactly as sealed (json keeps its text)
    PRIMARY KEY (stream, n)
);
CREATE INDEX IF NOT EXISTS agentgate_audit_identity_time ON agentgate_audit (identity, time);
CREATE INDEX IF NOT EXISTS agentgate_audit_session ON agentgate_audit (session, seq);

DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agentgate_audit_writer') THEN
    CREATE ROLE agentgate_audit_writer LOGIN;
  END IF;
END $$;
REVOKE ALL ON agentgate_audit FROM agentgate_audit_writer;
GRANT INSERT ON agentgate_audit TO agentgate_audit_writer;
-- A re-delivered record (after a crash) is skipped with ON CONFLICT (stream, n) DO NOTHING,
-- which needs to read the key columns, and nothing else.
GRANT SELECT (stream, n) ON agentgate_audit TO agentgate_audit_writer;
-- Auditors read; nobody but the owner changes anything.
