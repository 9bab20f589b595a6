#!/usr/bin/env node
// Checks a Call Capture integration end to end: sends the API document's Example 1
// (minimal) and Example 2 (complete) with your key, and says in plain words what happened.
//
//   CALLCAP_URL=https://calls.example.com CALLCAP_API_KEY=cc_live_… CALLCAP_COMPANY_ID=<uuid> node test-webhook.js
//   node test-webhook.js --url https://calls.example.com --key cc_live_… --company <uuid>
//
// Node 18 or newer (built-in fetch), no dependencies. Exits 0 when both records were
// created, 1 when one was refused or the service could not be reached, 2 on bad usage.
// Example 2 is sent with a fresh external_call_id each run, so it never updates a real call.
'use strict';

const { randomUUID } = require('node:crypto');

function usage(problem) {
  if (problem) console.error(`test-webhook: ${problem}\n`);
  console.error(`Usage: node test-webhook.js [--url URL] [--key API_KEY] [--company COMPANY_UUID]

  --url      the service's base URL (or CALLCAP_URL); default http://127.0.0.1:8080
  --key      your API key (or CALLCAP_API_KEY)
  --company  the company id the key belongs to (or CALLCAP_COMPANY_ID)`);
  process.exit(2);
}

function options(argv) {
  const opts = {
    url: process.env.CALLCAP_URL || 'http://127.0.0.1:8080',
    key: process.env.CALLCAP_API_KEY,
    company: process.env.CALLCAP_COMPANY_ID,
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === '--help' || flag === '-h') usage();
    const name = { '--url': 'url', '--key': 'key', '--company': 'company' }[flag];
    if (!name) usage(`unknown argument ${flag}`);
    if (i + 1 >= argv.length) usage(`${flag} needs a value`);
    opts[name] = argv[++i];
  }
  if (!opts.key) usage('no API key: pass --key or set CALLCAP_API_KEY');
  if (!opts.company) usage('no company id: pass --company or set CALLCAP_COMPANY_ID');
  opts.url = opts.url.replace(/\/+$/, '');
  return opts;
}

// What to do about each refusal, in the API's own terms.
const ADVICE = {
  400: 'fix the field named above and send again',
  401: 'check the x-api-key value; a revoked or expired key must be replaced by a new one',
  403: 'company_id must be the company your API key was issued for',
  408: 'the body arrived too slowly; check the network between you and the service',
  413: 'the record is too large; shorten notes or call_details',
  415: 'send the header Content-Type: application/json',
  429: 'you are over your rate limit; wait for Retry-After and send again',
  503: 'the service could not confirm the record; send it again after Retry-After (a resend is safe)',
};
const REDIRECT_ADVICE = 'use the URL of the service itself: a redirect is not followed, since it would send your API key and the record to another address';
for (const s of [301, 302, 303, 307, 308]) ADVICE[s] = REDIRECT_ADVICE;

// The most of an answer read; the rest is not downloaded.
const MAX_ANSWER_BYTES = 64 * 1024;

// Server text made safe to print: control characters (ESC, BEL, CR, C1, ...) escaped, so
// no terminal escape sequence from the server reaches the screen; at most 500 characters.
function printable(value) {
  const text = String(value);
  const shown = text.slice(0, 500).replace(/[\u0000-\u001f\u007f-\u009f]/g,
    (c) => `\\u{${c.charCodeAt(0).toString(16)}}`);
  return text.length > 500 ? `${shown}…` : shown;
}

// Reads at most MAX_ANSWER_BYTES of the answer and parses it as JSON ({} when it is not).
async function boundedJson(response) {
  if (!response.body) return {};
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  while (size < MAX_ANSWER_BYTES) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value.subarray(0, MAX_ANSWER_BYTES - size));
    size += Math.min(value.length, MAX_ANSWER_BYTES - size);
  }
  reader.cancel().catch(() => {});
  try {
    const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    return body && typeof body === 'object' ? body : {};
  } catch {
    return {};
  }
}

async function send(opts, name, record) {
  const url = `${opts.url}/functions/v1/webhook-call-capture`;
  let response;
  try {
    response = await fetch(url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'x-api-key': opts.key },
      body: JSON.stringify(record),
      // Never follow a redirect: it would carry the API key (and the body) elsewhere.
      redirect: 'manual',
      signal: AbortSignal.timeout(15000),
    });
  } catch (e) {
    const cause = e.cause ? ` (${e.cause.code || e.cause.message})` : '';
    console.log(`✗ ${name}: could not reach ${url}: ${e.message}${cause}`);
    console.log('  What to do: check the URL and that this machine can reach it.');
    return false;
  }
  const body = await boundedJson(response);
  if (response.status === 201 && body.success === true && body.data) {
    console.log(`✓ ${name}: created, call_history_id ${printable(body.data.call_history_id)} (accepted at ${printable(body.data.created_at)})`);
    return true;
  }
  console.log(`✗ ${name}: refused with ${response.status} ${printable(body.error || response.statusText)}: ${printable(body.message || '(no message)')}`);
  const location = response.headers.get('location');
  if (location && response.status >= 300 && response.status < 400) console.log(`  The server redirects to ${printable(location)}`);
  for (const d of (Array.isArray(body.details) ? body.details : []).slice(0, 20)) console.log(`  field ${printable(d.field)}: ${printable(d.message)}`);
  const retry = response.headers.get('retry-after');
  if (retry) console.log(`  Retry-After: ${printable(retry)}`);
  console.log(`  What to do: ${ADVICE[response.status] || 'see the API document for this status'}.`);
  return false;
}

async function main() {
  const opts = options(process.argv.slice(2));
  const run = Date.now();
  // Example 1 of the API document: the minimal record.
  const example1 = {
    company_id: opts.company,
    caller_number: '+919876543210',
    recipient_number: '+919123456789',
    duration_seconds: 180,
    outcome: 'completed',
  };
  // Example 2: the complete record (lead and employee ids are the document's placeholders,
  // so fresh UUIDs stand in for them; the external id is unique to this run).
  const example2 = {
    company_id: opts.company,
    lead_id: randomUUID(),
    employee_id: randomUUID(),
    outcome: 'follow_up',
    notes: 'Customer interested in premium package. Needs time to discuss with spouse.',
    call_date: '2025-11-25T10:30:00Z',
    caller_number: '+919876543210',
    recipient_number: '+919123456789',
    duration_seconds: 320,
    recording_url: 'https://your-system.com/recordings/12345.mp3',
    call_status: 'completed',
    start_time: '2025-11-25T10:30:00Z',
    end_time: '2025-11-25T10:35:20Z',
    external_call_id: `TEST-WEBHOOK-${run}`,
    external_system: 'test-webhook.js',
    next_follow_up: '2025-11-27',
    next_follow_up_time: '14:00:00',
    auto_call_followup: true,
    call_details: {
      campaign_id: 'CAMP-001',
      agent_name: 'John Doe',
      disposition: 'interested',
      tags: ['premium', 'follow-up-needed'],
    },
  };
  console.log(`Testing ${opts.url} for company ${opts.company}`);
  const ok1 = await send(opts, 'Example 1 (minimal record)', example1);
  const ok2 = await send(opts, 'Example 2 (complete record)', example2);
  if (ok1 && ok2) {
    console.log('Your integration works: both records were accepted and will be stored.');
    process.exit(0);
  }
  console.log('Your integration is not working yet: see the lines marked ✗ above.');
  process.exit(1);
}

main();
