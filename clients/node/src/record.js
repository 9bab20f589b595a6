// The record's shape, checked before it is queued: the API document's required field and
// types, so that a mistake is an error at `capture` rather than a 400 minutes later. The
// gateway checks everything again (lengths, formats, the API key's company); this check
// never refuses what the gateway would take.
import { randomUUID } from 'node:crypto';

export const OUTCOMES = ['converted', 'follow_up', 'not_answered', 'completed', 'not_interested'];
export const CALL_STATUSES = ['completed', 'busy', 'no-answer', 'failed', 'canceled',
  'queued', 'initiated', 'ringing', 'in-progress'];
const UUID_FIELDS = ['company_id', 'lead_id', 'employee_id'];
const STRING_FIELDS = ['notes', 'call_date', 'caller_number', 'recipient_number', 'recording_url',
  'start_time', 'end_time', 'external_call_id', 'external_system', 'next_follow_up', 'next_follow_up_time'];
const UUID = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

/** The record cannot be sent as it is: `field` names what to fix. */
export class RecordError extends Error {
  constructor(field, message) {
    super(message);
    this.name = 'RecordError';
    this.field = field;
  }
}

const given = (v) => v !== undefined && v !== null;

/** Throws RecordError for the first field the gateway would refuse by type. */
export function check(record) {
  if (typeof record !== 'object' || record === null || Array.isArray(record)) {
    throw new RecordError(null, "a record is an object of the API document's fields");
  }
  if (!given(record.company_id)) throw new RecordError('company_id', 'company_id is required');
  for (const name of UUID_FIELDS) {
    const v = record[name];
    if (given(v) && !(typeof v === 'string' && UUID.test(v))) {
      throw new RecordError(name, `${name} must be a UUID`);
    }
  }
  for (const name of STRING_FIELDS) {
    if (given(record[name]) && typeof record[name] !== 'string') {
      throw new RecordError(name, `${name} must be a string`);
    }
  }
  const d = record.duration_seconds;
  if (given(d) && !(Number.isInteger(d) && d >= 0)) {
    throw new RecordError('duration_seconds', 'duration_seconds must be a whole number of seconds, 0 or more');
  }
  if (given(record.outcome) && !OUTCOMES.includes(record.outcome)) {
    throw new RecordError('outcome', `outcome must be one of ${OUTCOMES.join(', ')}`);
  }
  if (given(record.call_status) && !CALL_STATUSES.includes(record.call_status)) {
    throw new RecordError('call_status', `call_status must be one of ${CALL_STATUSES.join(', ')}`);
  }
  if (given(record.auto_call_followup) && typeof record.auto_call_followup !== 'boolean') {
    throw new RecordError('auto_call_followup', 'auto_call_followup must be true or false');
  }
  const cd = record.call_details;
  if (given(cd) && (typeof cd !== 'object' || Array.isArray(cd))) {
    throw new RecordError('call_details', 'call_details must be an object');
  }
  if (given(record.next_follow_up) && !/^\d{4}-\d{2}-\d{2}$/.test(record.next_follow_up)) {
    throw new RecordError('next_follow_up', 'next_follow_up must be a date (YYYY-MM-DD)');
  }
}

/**
 * The record to queue: a copy with an `external_call_id` generated once when it has none,
 * so that every resend of it is the same record (the gateway derives the stored id from
 * `external_call_id`: a resend updates the row it made, never a second one).
 */
export function withIdentity(record) {
  const out = { ...record };
  if (!out.external_call_id) out.external_call_id = `callcap-js-${randomUUID().replaceAll('-', '')}`;
  return out;
}
