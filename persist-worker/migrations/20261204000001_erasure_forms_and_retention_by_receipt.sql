-- Erasure entries that match more than one written form of an identifier (a phone number
-- as `+91…`, `91…`, `0…` and its national digits: one keyed hash per form), the hashing
-- scheme of each entry (1: numbers kept their `+`, before digit-only matching; 2: digits
-- only), and why an erasure is not complete yet (an archived object that could not be
-- read or rewritten), so that `erase --resume` and the operator see it.
ALTER TABLE erasures ADD COLUMN forms bytea[] NOT NULL DEFAULT '{}';
ALTER TABLE erasures ADD COLUMN scheme smallint NOT NULL DEFAULT 1;
ALTER TABLE erasures ALTER COLUMN scheme SET DEFAULT 2;
ALTER TABLE erasures ADD COLUMN incomplete_reason text;

-- Retention (RETENTION_DAYS) expires a call by the earlier of its call date and the time
-- the gateway received it: a call dated in the future no longer escapes it.
DROP INDEX IF EXISTS call_history_call_date;
CREATE INDEX call_history_retained_from ON call_history (LEAST(call_date, received_at));
