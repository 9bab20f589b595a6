// Call Capture client for Node: `capture` queues (and spools), a background sender posts
// batches and retries what was not stored; `send` posts one record and waits for its 201.
import { gzipSync } from 'node:zlib';
import { check, withIdentity, RecordError } from './record.js';
import { Spool, SpoolLocked } from './spool.js';

export { RecordError, SpoolLocked };

// Statuses a record is refused with for good: sending it again cannot help.
const REFUSED = new Set([400, 401, 403, 413, 415, 422]);
// The most of an answer read.
const MAX_ANSWER_BYTES = 4 << 20;

/** `capture` with `block: false` while the queue holds `maxQueue` records. */
export class QueueFull extends Error {
  constructor(message) { super(message); this.name = 'QueueFull'; }
}

/** The gateway refused the record: fix it before sending it again. */
export class Rejected extends Error {
  constructor(status, error, message) {
    super(`${status} ${error}: ${message}`);
    this.name = 'Rejected';
    this.status = status;
    this.error = error;
    this.detail = message;
  }
}

/** The record was not confirmed within the retry budget. */
export class Unavailable extends Error {
  constructor(message) { super(message); this.name = 'Unavailable'; }
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

function retryAfter(resp) {
  const v = resp ? Number(resp.headers.get('retry-after')) : 0;
  return Number.isFinite(v) && v > 0 ? v * 1000 : 0;
}

async function readAnswer(resp) {
  const buf = Buffer.from(await resp.arrayBuffer());
  if (buf.length === 0 || buf.length > MAX_ANSWER_BYTES) return null;
  try { return JSON.parse(buf.toString('utf8')); } catch { return null; }
}

/**
 * A Call Capture client for one API key. See index.d.ts (ClientOptions) for every setting.
 */
export class Client {
  constructor(url, apiKey, options = {}) {
    const o = {
      batchSize: 500, linger: 200, maxQueue: 10000, block: true, spoolDir: null, spoolFsync: 'append',
      timeout: 10000, retryBudget: 3600000, backoffBase: 200, backoffMax: 30000, onError: null,
      flushOnExit: true, exitTimeout: 10000, compress: true, logger: console, ...options,
    };
    if (!(o.batchSize >= 1 && o.batchSize <= 1000)) throw new Error('batchSize is 1 to 1000 (the gateway\'s MAX_BATCH_RECORDS)');
    const u = new URL(url);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error('url must be http:// or https://');
    this.base = url.replace(/\/+$/, '');
    this.apiKey = apiKey;
    this.o = o;
    this.queue = [];
    this.inFlight = 0;
    this.reserved = 0;
    this.closing = false;
    this.nextN = 0;
    this.counts = { captured: 0, sent: 0, retried: 0, rejected: 0, gave_up: 0, spooled: 0, blocked: 0 };
    this.waiters = []; // captures waiting for room
    this.idle = []; // flushes waiting for an empty queue
    this.wake = null; // the sender waiting for records
    this.stopBackoff = null;
    this.spool = o.spoolDir ? new Spool(o.spoolDir, o.spoolFsync) : null;
    if (this.spool) {
      const left = this.spool.left();
      for (const [n, record] of left) this.queue.push({ n, record, firstTry: null });
      if (left.length) o.logger.info?.(`callcap: ${left.length} record(s) left in the spool ${o.spoolDir} are sent again`);
    }
    this.sender = this.run();
    if (o.flushOnExit) this.installExit();
  }

  /**
   * Checks and queues `record` (spooled first, with a spool); resolves with its
   * external_call_id once queued. Throws RecordError at once for a record the gateway would
   * refuse by shape; rejects with QueueFull when full and `block` is false.
   */
  async capture(record) {
    check(record);
    const queued = withIdentity(record);
    if (this.closing) throw new Error('the client is closed');
    while (this.queue.length + this.inFlight + this.reserved >= this.o.maxQueue) {
      if (!this.o.block) throw new QueueFull(`${this.o.maxQueue} records are waiting to be stored`);
      this.counts.blocked += 1;
      await new Promise((resolve) => { this.waiters.push(resolve); });
      if (this.closing) throw new Error('the client is closed');
    }
    let n;
    if (this.spool) {
      // The place is kept while the record is made durable (other captures go on meanwhile).
      this.reserved += 1;
      try {
        n = await this.spool.add(queued);
      } finally {
        this.reserved -= 1;
      }
      this.counts.spooled += 1;
    } else {
      n = this.nextN;
      this.nextN += 1;
    }
    this.queue.push({ n, record: queued, firstTry: null });
    this.counts.captured += 1;
    this.notify();
    return queued.external_call_id;
  }

  /**
   * Posts `record` alone, retried as the sender retries; resolves with its
   * call_history_id. Rejects with Rejected (fix the record) or Unavailable.
   */
  async send(record) {
    check(record);
    const one = withIdentity(record);
    const started = Date.now();
    for (let attempt = 0; ; attempt += 1) {
      let resp = null;
      let body = null;
      try {
        resp = await this.post('/v1/calls', one);
        body = await readAnswer(resp);
      } catch (e) {
        this.o.logger.info?.(`callcap: no answer (${e.message}); retrying`);
      }
      if (resp && (resp.status === 200 || resp.status === 201)) {
        this.counts.sent += 1;
        return body.data.call_history_id;
      }
      if (resp && REFUSED.has(resp.status)) {
        this.counts.rejected += 1;
        throw new Rejected(resp.status, body?.error, body?.message);
      }
      const wait = this.backoff(attempt, retryAfter(resp));
      if (Date.now() - started + wait > this.o.retryBudget) {
        throw new Unavailable(`not confirmed within ${this.o.retryBudget} ms (last: ${resp?.status})`);
      }
      this.counts.retried += 1;
      await sleep(wait);
    }
  }

  /** Resolves true once every captured record is stored or refused; false after `timeout` ms. */
  flush(timeout) {
    if (this.queue.length === 0 && this.inFlight === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      let timer = null;
      const done = (ok) => { if (timer) clearTimeout(timer); resolve(ok); };
      this.idle.push(done);
      if (timeout !== undefined && timeout !== null) {
        timer = setTimeout(() => {
          this.idle = this.idle.filter((f) => f !== done);
          resolve(false);
        }, timeout);
      }
    });
  }

  /** Flushes within `timeout` ms and stops; resolves with how many records were not stored. */
  async close(timeout = 10000) {
    const done = await this.flush(timeout);
    this.closing = true;
    const left = this.queue.length + this.inFlight;
    this.notify();
    if (this.stopBackoff) this.stopBackoff();
    for (const w of this.waiters.splice(0)) w();
    await Promise.race([this.sender, sleep(this.o.timeout + 1000)]);
    if (this.spool) this.spool.close();
    this.removeExit?.();
    if (!done && left) {
      const where = this.spool
        ? `kept in the spool ${this.spool.directory}, sent by the next client started on it`
        : 'LOST: no spoolDir was given';
      this.o.logger.warn?.(`callcap: ${left} record(s) not stored at close (${where})`);
    }
    return left;
  }

  /** Counters: captured, sent, retried, rejected, gave_up, spooled, blocked, queued. */
  get stats() {
    return { ...this.counts, queued: this.queue.length + this.inFlight };
  }

  // ---- the sender

  installExit() {
    // beforeExit: the loop is empty, so nothing is being sent; signals: flush within the
    // deadline, then exit as the signal would have.
    const onBeforeExit = () => { if (!this.closing && this.stats.queued) this.close(this.o.exitTimeout); };
    const onSignal = (sig) => {
      this.close(this.o.exitTimeout).finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
    };
    process.on('beforeExit', onBeforeExit);
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
    this.removeExit = () => {
      process.off('beforeExit', onBeforeExit);
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
    };
  }

  notify() {
    if (this.wake) {
      const w = this.wake;
      this.wake = null;
      w();
    }
  }

  settle() {
    while (this.waiters.length && this.queue.length + this.inFlight + this.reserved < this.o.maxQueue) this.waiters.shift()();
    if (this.queue.length === 0 && this.inFlight === 0) for (const f of this.idle.splice(0)) f(true);
  }

  backoff(attempt, after) {
    const ceiling = Math.min(this.o.backoffMax, this.o.backoffBase * 2 ** Math.min(attempt, 30));
    return Math.max(Math.random() * ceiling, after);
  }

  async post(path, body) {
    let data = Buffer.from(JSON.stringify(body));
    const headers = { 'content-type': 'application/json', 'x-api-key': this.apiKey, 'user-agent': 'callcap-node/0.1' };
    if (this.o.compress && data.length > 1024) {
      data = gzipSync(data, { level: 5 });
      headers['content-encoding'] = 'gzip';
    }
    // redirect: 'manual': a redirect would carry the API key elsewhere.
    return fetch(this.base + path, {
      method: 'POST', headers, body: data, redirect: 'manual', signal: AbortSignal.timeout(this.o.timeout),
    });
  }

  async take() {
    // Once closed, nothing more is sent: what is left stays in the spool.
    while (this.queue.length === 0 || this.closing) {
      if (this.closing) return null;
      await new Promise((resolve) => { this.wake = resolve; });
    }
    if (this.queue.length < this.o.batchSize) {
      // Up to `linger` for more; the timer is what keeps the process up meanwhile.
      await new Promise((resolve) => {
        const t = setTimeout(resolve, this.o.linger);
        this.wake = () => { if (this.queue.length >= this.o.batchSize) { clearTimeout(t); resolve(); } else { this.wake = null; } };
      });
      this.wake = null;
    }
    const batch = this.queue.splice(0, this.o.batchSize);
    this.inFlight += batch.length;
    return batch;
  }

  async run() {
    let attempt = 0;
    for (;;) {
      const batch = await this.take();
      if (batch === null) return;
      if (this.spool) this.spool.sync();
      const now = Date.now();
      for (const item of batch) if (item.firstTry === null) item.firstTry = now;
      let retry;
      let after;
      try {
        [retry, after] = await this.postBatch(batch);
      } catch (e) {
        this.o.logger.error?.(`callcap: sender: ${e.stack}`);
        [retry, after] = [batch, 0];
      }
      // Back to the front, in order: a later record of a call stays later.
      this.queue.unshift(...retry);
      this.inFlight -= batch.length;
      this.settle();
      if (retry.length) {
        const wait = this.backoff(attempt, after);
        attempt += 1;
        await new Promise((resolve) => {
          const t = setTimeout(resolve, wait);
          this.stopBackoff = () => { clearTimeout(t); resolve(); };
        });
        this.stopBackoff = null;
      } else {
        attempt = 0;
      }
    }
  }

  async postBatch(batch) {
    let resp;
    let body;
    try {
      resp = await this.post('/v1/calls/batch', { calls: batch.map((i) => i.record) });
      body = await readAnswer(resp);
    } catch (e) {
      this.o.logger.info?.(`callcap: no answer for ${batch.length} record(s) (${e.message}); retrying`);
      return [this.retrying(batch), 0];
    }
    if (resp.status === 413 && batch.length > 1) {
      const half = Math.floor(batch.length / 2);
      const [a, afterA] = await this.postBatch(batch.slice(0, half));
      const [b, afterB] = await this.postBatch(batch.slice(half));
      return [[...a, ...b], Math.max(afterA, afterB)];
    }
    let results = (resp.status === 201 || resp.status === 207) ? body?.results : null;
    if (resp.status === 201 && !results) results = batch.map((_, index) => ({ index, status: 201 }));
    if (!results) {
      if (REFUSED.has(resp.status)) {
        for (const item of batch) this.refuse(item, resp.status, body?.error, body?.message);
        return [[], 0];
      }
      this.o.logger.info?.(`callcap: ${resp.status} for ${batch.length} record(s); retrying`);
      return [this.retrying(batch), retryAfter(resp)];
    }
    const stored = [];
    const retry = [];
    const answered = new Set();
    for (const r of results) {
      if (!Number.isInteger(r.index) || r.index < 0 || r.index >= batch.length || answered.has(r.index)) continue;
      answered.add(r.index);
      const item = batch[r.index];
      if (r.status === 200 || r.status === 201) stored.push(item);
      else if (REFUSED.has(r.status)) this.refuse(item, r.status, r.error, r.message);
      else retry.push(item);
    }
    // A record the answer does not account for is sent again (safe: same id).
    batch.forEach((item, i) => { if (!answered.has(i)) retry.push(item); });
    if (this.spool) this.spool.done(stored.map((i) => i.n));
    this.counts.sent += stored.length;
    return [this.retrying(retry), retryAfter(resp)];
  }

  retrying(items) {
    const keep = [];
    const now = Date.now();
    for (const item of items) {
      if (now - item.firstTry > this.o.retryBudget) {
        this.counts.gave_up += 1;
        this.o.logger.error?.(`callcap: record ${item.record.external_call_id} not confirmed within ${this.o.retryBudget} ms; ${this.spool ? 'kept in the spool' : 'given up'}`);
        this.tell(item.record, null, 'Unavailable', 'not confirmed within the retry budget');
      } else {
        keep.push(item);
      }
    }
    this.counts.retried += keep.length;
    return keep;
  }

  refuse(item, status, error, message) {
    this.counts.rejected += 1;
    this.o.logger.warn?.(`callcap: record ${item.record.external_call_id} refused: ${status} ${error}: ${message}`);
    if (this.spool) {
      this.spool.reject(item.record, status, message);
      this.spool.done([item.n]);
    }
    this.tell(item.record, status, error, message);
  }

  tell(record, status, error, message) {
    if (!this.o.onError) return;
    try {
      this.o.onError(record, status, error, message);
    } catch (e) {
      this.o.logger.error?.(`callcap: onError threw: ${e.stack}`);
    }
  }
}
