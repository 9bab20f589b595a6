// Records/s through the Node client against single POSTs by as many concurrent senders,
// and the spool's cost, as clients/testing/bench.py does for Python (same pipeline, same
// records; timed from the first record to the last 201). BENCH_RECORDS (20000),
// BENCH_SENDERS (8).
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Client } from '../node/src/index.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const RECORDS = Number(process.env.BENCH_RECORDS || 20000);
const SENDERS = Number(process.env.BENCH_SENDERS || 8);
const quiet = { info() {}, warn() {}, error: console.error };

const proc = spawn('python3', [path.join(HERE, 'pipeline.py')], { stdio: ['pipe', 'pipe', 'inherit'] });
const lines = createInterface({ input: proc.stdout })[Symbol.asyncIterator]();
const p = JSON.parse((await lines.next()).value);
const record = (tag, i) => ({
  company_id: p.company, external_call_id: `${tag}-${i}`, external_system: 'bench',
  caller_number: '+14155550100', recipient_number: '+919876543210', call_status: 'completed',
  duration_seconds: 42, outcome: 'follow_up', notes: 'Customer interested in service',
});
const per = Math.floor(RECORDS / SENDERS);
const senders = (work) => Promise.all(Array.from({ length: SENDERS }, (_, s) => work(s)));

async function single() {
  const client = new Client(p.url, p.key, { flushOnExit: false, logger: quiet });
  const started = performance.now();
  await senders(async (s) => { for (let i = 0; i < per; i += 1) await client.send(record('single', s * per + i)); });
  const took = (performance.now() - started) / 1000;
  await client.close();
  return (per * SENDERS) / took;
}

async function viaClient(tag, spoolFsync) {
  const dir = spoolFsync ? fs.mkdtempSync(path.join(os.tmpdir(), 'callcap-bench-')) : null;
  const client = new Client(p.url, p.key, { flushOnExit: false, logger: quiet, spoolDir: dir, spoolFsync: spoolFsync || 'append', maxQueue: RECORDS + 1 });
  const started = performance.now();
  await senders(async (s) => { for (let i = 0; i < per; i += 1) await client.capture(record(tag, s * per + i)); });
  if (!(await client.flush(600000))) throw new Error(JSON.stringify(client.stats));
  const took = (performance.now() - started) / 1000;
  const { sent, rejected } = client.stats;
  await client.close();
  if (dir) fs.rmSync(dir, { recursive: true });
  if (sent !== per * SENDERS || rejected) throw new Error(`sent ${sent}, rejected ${rejected}`);
  return (per * SENDERS) / took;
}

const rows = [
  ['single POSTs (send)', await single()],
  ['client, memory queue', await viaClient('memory', null)],
  ['client, spool fsync per append', await viaClient('append', 'append')],
  ['client, spool fsync per batch', await viaClient('batch', 'batch')],
];
proc.stdin.write('ids\n');
const stored = Object.values(JSON.parse((await lines.next()).value)).reduce((a, b) => a + b, 0);
proc.stdin.end('quit\n');
console.log(`| node client: ${per * SENDERS} records, ${SENDERS} senders | records/s |`);
console.log('|---|---|');
for (const [name, rate] of rows) console.log(`| ${name} | ${Math.round(rate).toLocaleString('en')} |`);
const [s, m, a, b] = rows.map((r) => r[1]);
console.log(`client / single POSTs: ${(m / s).toFixed(2)}; spool (append) / memory: ${(a / m).toFixed(2)}; spool (batch) / memory: ${(b / m).toFixed(2)}; ${stored} rows stored`);
