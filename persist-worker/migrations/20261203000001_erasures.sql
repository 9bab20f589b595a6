-- Erasure (`persist-worker erase`): one row per erased subject, holding a keyed hash of
-- the identifier (HMAC-SHA256 with ERASURE_KEY_FILE's key), never the identifier. Every
-- write (consume, replay, redrive) drops a record matching a row here, so nothing erased
-- is stored again.
CREATE TABLE erasures (
    id              bigserial PRIMARY KEY,
    company_id      uuid NOT NULL,
    -- phone, lead, external, call, company
    kind            text NOT NULL,
    hash            bytea NOT NULL UNIQUE,
    -- Which key made the hash (first 6 bytes of its SHA-256, hex).
    key_fingerprint text NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    rows_deleted    bigint NOT NULL DEFAULT 0,
    dead_letters_deleted bigint NOT NULL DEFAULT 0,
    messages_deleted bigint NOT NULL DEFAULT 0
);
CREATE INDEX erasures_company ON erasures (company_id);

-- Counts of what erasure and retention removed and of records dropped since, for the
-- status page and metrics across workers (never an identifier).
CREATE TABLE privacy_counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL DEFAULT 0
);

-- Retention (RETENTION_DAYS) deletes by call date in small batches.
CREATE INDEX call_history_call_date ON call_history (call_date);
