-- Call Capture: initial schema. Forward-only; never edit once applied.

-- Companies, leads and employees as seen on calls. A call is never refused because its
-- lead or employee has not been synced from the CRM yet: the worker inserts the id here
-- in the same transaction as the call (ON CONFLICT DO NOTHING) and other systems enrich
-- the row later. call_history and follow_ups carry no FOREIGN KEY constraints to these
-- tables: the worker's transaction already guarantees the parents exist, and per-row
-- referential-integrity triggers cost the ingest path a large share of its throughput
-- (measured: see BENCHMARKS.md).
CREATE TABLE companies (
    id            uuid PRIMARY KEY,
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE leads (
    id            uuid PRIMARY KEY,
    company_id    uuid NOT NULL REFERENCES companies (id),
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE employees (
    id            uuid PRIMARY KEY,
    company_id    uuid NOT NULL REFERENCES companies (id),
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

-- One row per call; columns carry the API document's field names.
CREATE TABLE call_history (
    id                  uuid PRIMARY KEY,
    company_id          uuid NOT NULL,
    lead_id             uuid,
    employee_id         uuid,
    outcome             text CHECK (outcome IN ('converted', 'follow_up', 'not_answered', 'completed', 'not_interested')),
    notes               text,
    call_date           timestamptz NOT NULL,
    -- false while call_date is the gateway's receipt time (the client sent none); a later
    -- submission that does carry call_date replaces it, one that does not never does.
    call_date_given     boolean NOT NULL,
    caller_number       text,
    recipient_number    text,
    duration_seconds    integer CHECK (duration_seconds >= 0),
    recording_url       text,
    call_status         text CHECK (call_status IN ('completed', 'busy', 'no-answer', 'failed', 'canceled',
                                                    'queued', 'initiated', 'ringing', 'in-progress')),
    start_time          timestamptz,
    end_time            timestamptz,
    external_call_id    text,
    external_system     text,
    next_follow_up      date,
    next_follow_up_time time,
    auto_call_followup  boolean,
    call_details        jsonb,
    received_at         timestamptz NOT NULL,
    stored_at           timestamptz NOT NULL DEFAULT now(),
    -- JetStream sequence of the newest message applied to this row: an older message
    -- never overwrites what a newer one wrote.
    stream_seq          bigint NOT NULL,
    key_id              text
);

-- id is derived from these three, so this never fires in normal operation; it guards the
-- derivation itself. NULLS NOT DISTINCT (Postgres 15+): a call without external_system is
-- still one call.
CREATE UNIQUE INDEX call_history_external_id_key
    ON call_history (company_id, external_system, external_call_id) NULLS NOT DISTINCT
    WHERE external_call_id IS NOT NULL;

CREATE INDEX call_history_company_timeline ON call_history (company_id, call_date DESC);
CREATE INDEX call_history_lead_timeline ON call_history (lead_id, call_date DESC) WHERE lead_id IS NOT NULL;
CREATE INDEX call_history_employee_timeline ON call_history (employee_id, call_date DESC) WHERE employee_id IS NOT NULL;

-- One row per call that asked for an automatic follow-up.
CREATE TABLE follow_ups (
    call_id     uuid PRIMARY KEY REFERENCES call_history (id) ON DELETE CASCADE,
    company_id  uuid NOT NULL,
    lead_id     uuid,
    employee_id uuid,
    due_date    date,
    due_time    time,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX follow_ups_company_due ON follow_ups (company_id, due_date);

-- Stream messages that can never be stored, with why, for `persist-worker dlq`.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    stream_seq  bigint NOT NULL UNIQUE,
    subject     text NOT NULL,
    reason      text NOT NULL,
    payload     bytea NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    redriven_at timestamptz
);
