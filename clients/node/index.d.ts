// Types of the Call Capture Node client (src/index.js).

/** A call record: the API document's fields (company_id required). */
export interface CallRecord {
  company_id: string;
  lead_id?: string | null;
  employee_id?: string | null;
  outcome?: 'converted' | 'follow_up' | 'not_answered' | 'completed' | 'not_interested' | null;
  notes?: string | null;
  call_date?: string | null;
  caller_number?: string | null;
  recipient_number?: string | null;
  duration_seconds?: number | null;
  recording_url?: string | null;
  call_status?: 'completed' | 'busy' | 'no-answer' | 'failed' | 'canceled' | 'queued' | 'initiated' | 'ringing' | 'in-progress' | null;
  start_time?: string | null;
  end_time?: string | null;
  external_call_id?: string | null;
  external_system?: string | null;
  next_follow_up?: string | null;
  next_follow_up_time?: string | null;
  auto_call_followup?: boolean | null;
  call_details?: Record<string, unknown> | null;
  [other: string]: unknown;
}

export interface ClientOptions {
  /** Records per batch (1-1000; default 500). */
  batchSize?: number;
  /** Longest a batch waits for more records after its first, in ms (default 200). */
  linger?: number;
  /** Records captured and not yet stored at most (default 10,000); past it capture waits or rejects. */
  maxQueue?: number;
  /** true (default): capture waits for room; false: it rejects with QueueFull. Nothing is dropped. */
  block?: boolean;
  /** Keep captured records on disk until their 201; a client started on it sends what a killed one left. */
  spoolDir?: string | null;
  /** 'append' (default): each record durable before capture resolves; 'batch': once per batch (a power cut may lose the records since the last batch; a crash cannot). */
  spoolFsync?: 'append' | 'batch';
  /** One request's timeout in ms (default 10,000). */
  timeout?: number;
  /** How long a record is retried (503, 429, timeouts, no connection) in ms (default 3,600,000). */
  retryBudget?: number;
  /** Backoff: full jitter over backoffBase·2^attempt up to backoffMax ms (200, 30,000), never sooner than Retry-After. */
  backoffBase?: number;
  backoffMax?: number;
  /** A record refused for good (400, 401, 403, 413: status) or out of retry budget (status null). */
  onError?: ((record: CallRecord, status: number | null, error: string | undefined, message: string | undefined) => void) | null;
  /** Send what is queued at exit (beforeExit, SIGTERM, SIGINT) within exitTimeout ms (default true, 10,000). */
  flushOnExit?: boolean;
  exitTimeout?: number;
  /** gzip bodies over 1 KiB (default true). */
  compress?: boolean;
  /** Where the client logs (default console). */
  logger?: Pick<Console, 'info' | 'warn' | 'error'>;
}

export interface ClientStats {
  captured: number; sent: number; retried: number; rejected: number;
  gave_up: number; spooled: number; blocked: number; queued: number;
}

export class Client {
  constructor(url: string, apiKey: string, options?: ClientOptions);
  /** Checks and queues the record; resolves with its external_call_id once queued (and spooled). */
  capture(record: CallRecord): Promise<string>;
  /** Posts one record, retried; resolves with its call_history_id. */
  send(record: CallRecord): Promise<string>;
  /** true once every captured record is stored or refused; false after timeout ms. */
  flush(timeout?: number): Promise<boolean>;
  /** Flushes within timeout ms and stops; how many records were not stored. */
  close(timeout?: number): Promise<number>;
  readonly stats: ClientStats;
}

export class RecordError extends Error { field: string | null; }
export class QueueFull extends Error {}
export class Rejected extends Error { status: number; error: string | undefined; detail: string | undefined; }
export class Unavailable extends Error {}
export class SpoolLocked extends Error {}
