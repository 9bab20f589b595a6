// The Node client against the real pipeline (nats-server, gateway, worker, Postgres, started
// by clients/testing/pipeline.py): every record `capture` resolved for is stored exactly
// once — across a gateway stopped mid-burst, a broker gone (a 503 storm), a full queue, a
// kill -9 of the client with a spool, and the process's exit; a refused record is
// reported and the others stored.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { Client, QueueFull, RecordError, SpoolLocked } from '../src/index.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const LAUNCHER = path.join(HERE, '..', '..', 'testing', 'pipeline.py');
const quiet = { info() {}, warn() {}, error: console.error };
const sleep = (ms) => new Promise((r) => { setTimeout(r, ms); });

/** The pipeline, driven through the launcher's line protocol. */
class Pipeline {
  static async start() {
    const p = new Pipeline();
    p.proc = spawn('python3', [LAUNCHER], { stdio: ['pipe', 'pipe', 'inherit'] });
    p.lines = createInterface({ input: p.proc.stdout })[Symbol.asyncIterator]();
    Object.assign(p, await p.answer());
    return p;
  }

  async answer() {
    const { value, done } = await this.lines.next();
    if (done) throw new Error('the pipeline launcher ended');
    return JSON.parse(value);
  }

  async command(cmd) {
    this.proc.stdin.write(`${cmd}\n`);
    return this.answer();
  }

  async ids() { return this.command('ids'); }

  /** Waits until every id is stored; fails on a missing, doubled or stray row. */
  async exactlyOnce(ids, timeout = 90000) {
    const deadline = Date.now() + timeout;
    let rows;
    for (;;) {
      rows = await this.ids();
      if (ids.every((id) => id in rows) || Date.now() > deadline) break;
      await sleep(250);
    }
    const missing = ids.filter((id) => !(id in rows));
    assert.equal(missing.length, 0, `${missing.length} of ${ids.length} not stored, e.g. ${missing.slice(0, 3)}`);
    const doubled = Object.entries(rows).filter(([, n]) => n !== 1);
    assert.deepEqual(doubled, [], 'stored more than once');
    const wanted = new Set(ids);
    assert.deepEqual(Object.keys(rows).filter((k) => !wanted.has(k)), [], 'rows nobody captured');
  }

  async close() {
    this.proc.stdin.end('quit\n');
    await new Promise((r) => { this.proc.on('exit', r); });
  }
}

const record = (company, ext, more = {}) => ({
  company_id: company, external_call_id: ext, external_system: 'node-test',
  caller_number: '+14155550100', call_status: 'completed', duration_seconds: 42, ...more,
});

test('capture stores every record once; send returns its id', async () => {
  const p = await Pipeline.start();
  try {
    const client = new Client(p.url, p.key, { flushOnExit: false, logger: quiet });
    const ids = [];
    for (let i = 0; i < 2000; i += 1) ids.push(await client.capture(record(p.company, `B-${i}`)));
    const anonymous = await client.capture({ company_id: p.company, notes: 'no id' });
    assert.match(anonymous, /^callcap-js-/);
    assert.equal(await client.flush(60000), true);
    const id = await client.send(record(p.company, 'ONE'));
    assert.equal(await client.send(record(p.company, 'ONE')), id, 'a resend is the same record');
    await p.exactlyOnce([...ids, anonymous, 'ONE']);
    assert.equal(client.stats.sent, 2003);
    await assert.rejects(client.capture({ notes: 'x' }), (e) => e instanceof RecordError && e.field === 'company_id');
    await assert.rejects(client.capture({ company_id: 'nope' }), (e) => e instanceof RecordError && e.field === 'company_id');
    await assert.rejects(client.capture({ company_id: p.company, duration_seconds: '60' }), RecordError);
    assert.equal(await client.close(), 0);
  } finally {
    await p.close();
  }
});

test('a refused record is reported and kept; the others are stored', async () => {
  const p = await Pipeline.start();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'callcap-node-'));
  try {
    const refused = [];
    const client = new Client(p.url, p.key, {
      spoolDir: dir, flushOnExit: false, logger: quiet,
      onError: (r, status) => refused.push([r.external_call_id, status]),
    });
    const good = [];
    for (let i = 0; i < 50; i += 1) good.push(await client.capture(record(p.company, `G-${i}`)));
    const other = await client.capture(record(randomUUID(), 'OTHER'));
    const long = await client.capture(record(p.company, 'LONG', { caller_number: `+1${'5'.repeat(80)}` }));
    assert.equal(await client.flush(60000), true);
    await p.exactlyOnce(good);
    assert.deepEqual(refused.sort(), [[long, 400], [other, 403]].sort());
    const kept = fs.readFileSync(path.join(dir, 'rejected.jsonl'), 'utf8').trim().split('\n').map(JSON.parse);
    assert.deepEqual(kept.map((k) => k.record.external_call_id).sort(), [long, other].sort());
    await client.close();
    const again = new Client(p.url, p.key, { spoolDir: dir, flushOnExit: false, logger: quiet });
    assert.equal(again.stats.queued, 0, 'nothing of them is sent again');
    await again.close();
  } finally {
    await p.close();
  }
});

test('a gateway stopped for 20 s mid-burst and a 503 storm lose nothing', async () => {
  const p = await Pipeline.start();
  try {
    // timeout above the gateway's publish deadline (10 s), so the broker's absence is a 503.
    const client = new Client(p.url, p.key, { timeout: 15000, backoffMax: 2000, flushOnExit: false, logger: quiet });
    const ids = [];
    let stop = false;
    const dialer = (async () => {
      for (let i = 0; !stop; i += 1) {
        ids.push(await client.capture(record(p.company, `GW-${i}`)));
        await sleep(2);
      }
    })();
    await sleep(2000);
    await p.command('stop-gateway');
    await sleep(20000);
    await p.command('start-gateway');
    await sleep(1000);
    // Then the broker gone: the gateway answers 503 with Retry-After.
    await p.command('stop-nats');
    await sleep(15000);
    await p.command('start-nats');
    await sleep(1000);
    stop = true;
    await dialer;
    assert.equal(await client.flush(120000), true, JSON.stringify(client.stats));
    assert.ok(client.stats.retried > 0, 'the outages were noticed');
    await p.exactlyOnce(ids, 120000);
    await client.close();
  } finally {
    await p.close();
  }
});

test('a full queue waits or refuses, and drops nothing', async () => {
  const p = await Pipeline.start();
  try {
    await p.command('stop-gateway');
    const client = new Client(p.url, p.key, { maxQueue: 50, block: false, backoffMax: 1000, flushOnExit: false, logger: quiet });
    const ids = [];
    for (let i = 0; i < 50; i += 1) ids.push(await client.capture(record(p.company, `Q-${i}`)));
    await assert.rejects(client.capture(record(p.company, 'Q-over')), QueueFull);
    client.o.block = true;
    const more = [];
    const waiting = (async () => {
      for (let i = 0; i < 100; i += 1) more.push(await client.capture(record(p.company, `QB-${i}`)));
    })();
    await sleep(2000);
    assert.equal(more.length, 0, 'capture waits while the queue is full');
    await p.command('start-gateway');
    await waiting;
    assert.equal(await client.flush(60000), true);
    await p.exactlyOnce([...ids, ...more]);
    assert.ok(client.stats.blocked > 0);
    await client.close();
  } finally {
    await p.close();
  }
});

const DIALER = `
import { Client } from ${JSON.stringify(path.join(HERE, '..', 'src', 'index.js'))};
const [url, key, company, spool, n, then] = process.argv.slice(1);
const client = new Client(url, key, { spoolDir: spool || null, linger: 50, batchSize: 50, logger: { info() {}, warn() {}, error: console.error } });
import { createInterface } from 'node:readline';
for (let i = 0; i < Number(n); i += 1) {
  if (then === 'hang' && i === Math.floor(Number(n) / 2)) {
    // Half captured (and sending): the test cuts the gateway off, then says go.
    console.log('half');
    await createInterface({ input: process.stdin })[Symbol.asyncIterator]().next();
  }
  await client.capture({ company_id: company, external_call_id: 'K-' + i, call_status: 'completed' });
}
console.log('captured');
if (then === 'hang') setInterval(() => {}, 1000);
`;

function dialer(p, spool, n, then) {
  const proc = spawn(process.execPath, ['--input-type=module', '-e', DIALER, p.url, p.key, p.company, spool, String(n), then], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: proc.stdout })[Symbol.asyncIterator]();
  return { proc, line: async () => (await lines.next()).value };
}

test('kill -9 mid-burst with a spool: another client sends the rest', async () => {
  const p = await Pipeline.start();
  const spool = fs.mkdtempSync(path.join(os.tmpdir(), 'callcap-node-spool-'));
  try {
    const d = dialer(p, spool, 3000, 'hang');
    // Mid-burst: the first half captured and on its way, then the gateway gone, so the
    // second half is captured but cannot be sent before the kill.
    assert.equal(await d.line(), 'half');
    await p.command('stop-gateway');
    d.proc.stdin.write('go\n');
    assert.equal(await d.line(), 'captured');
    assert.throws(() => new Client(p.url, p.key, { spoolDir: spool, flushOnExit: false, logger: quiet }), SpoolLocked);
    d.proc.kill('SIGKILL');
    await new Promise((r) => { d.proc.on('exit', r); });
    const part = Object.values(await p.ids()).reduce((a, b) => a + b, 0);
    assert.ok(part > 0 && part < 3000, `${part} stored before the kill`);
    await p.command('start-gateway');
    const second = new Client(p.url, p.key, { spoolDir: spool, flushOnExit: false, logger: quiet });
    assert.ok(second.stats.queued > 0);
    assert.equal(await second.flush(120000), true);
    await p.exactlyOnce(Array.from({ length: 3000 }, (_, i) => `K-${i}`));
    await second.close();
  } finally {
    await p.close();
  }
});

test('what is queued at exit is sent before the process ends', async () => {
  const p = await Pipeline.start();
  try {
    const d = dialer(p, '', 1500, 'exit');
    assert.equal(await d.line(), 'captured');
    const code = await new Promise((r) => { d.proc.on('exit', r); });
    assert.equal(code, 0);
    await p.exactlyOnce(Array.from({ length: 1500 }, (_, i) => `K-${i}`));
  } finally {
    await p.close();
  }
});
