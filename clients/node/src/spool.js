// The disk spool, the same files the Python client keeps: `spool.log`, lines
// {"add": n, "record": {...}} and {"done": n}; `spool.lock` (the owner's pid, created
// exclusively; a lock whose process is gone is taken over); `rejected.jsonl`. A record is
// appended (and by default fsynced) before `capture` resolves; its `done` line after its
// 201 or its refusal. A client started on the directory sends every `add` without its
// `done`. A line cut short by a crash is the last one and is skipped (its `capture` had
// not resolved). With nothing pending, the log starts afresh.
import fs from 'node:fs';
import path from 'node:path';

const LOG = 'spool.log';
const LOCK = 'spool.lock';
const REJECTED = 'rejected.jsonl';

/** Another living process holds the spool. */
export class SpoolLocked extends Error {
  constructor(message) {
    super(message);
    this.name = 'SpoolLocked';
  }
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === 'EPERM';
  }
}

export class Spool {
  /** `fsync`: 'append' (each record durable before capture resolves) or 'batch'. */
  constructor(directory, fsync = 'append') {
    if (fsync !== 'append' && fsync !== 'batch') throw new Error("fsync is 'append' or 'batch'");
    this.directory = directory;
    this.fsyncEach = fsync === 'append';
    fs.mkdirSync(directory, { recursive: true });
    this.lockPath = path.join(directory, LOCK);
    this.takeLock();
    this.next = 0;
    this.pending = new Map();
    this.read();
    this.fd = fs.openSync(path.join(directory, LOG), 'a');
    this.size = fs.fstatSync(this.fd).size;
    this.dirty = false;
    // Group commit of the appends: lines written, lines known durable, the fsync under way.
    // One fsync covers every line written before it began, so concurrent captures share it.
    this.written = 0;
    this.synced = 0;
    this.syncing = null;
  }

  takeLock() {
    for (let i = 0; i < 3; i += 1) {
      let fd;
      try {
        fd = fs.openSync(this.lockPath, 'wx', 0o600);
      } catch (e) {
        if (e.code !== 'EEXIST') throw e;
        let pid = 0;
        try {
          pid = parseInt(fs.readFileSync(this.lockPath, 'utf8').trim(), 10) || 0;
        } catch { /* unreadable: taken over */ }
        if (pid && pid !== process.pid && alive(pid)) {
          throw new SpoolLocked(`the spool ${this.directory} is in use by process ${pid}`);
        }
        fs.rmSync(this.lockPath, { force: true });
        continue;
      }
      fs.writeSync(fd, String(process.pid));
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      return;
    }
    throw new SpoolLocked(`could not take the lock of the spool ${this.directory}`);
  }

  read() {
    let text;
    try {
      text = fs.readFileSync(path.join(this.directory, LOG), 'utf8');
    } catch (e) {
      if (e.code === 'ENOENT') return;
      throw e;
    }
    for (const line of text.split('\n')) {
      if (!line) continue;
      let entry;
      try {
        entry = JSON.parse(line);
      } catch {
        continue; // the last line, cut short by a crash before capture resolved
      }
      if ('add' in entry) {
        this.pending.set(entry.add, entry.record);
        this.next = Math.max(this.next, entry.add + 1);
      } else if ('done' in entry) {
        this.pending.delete(entry.done);
      }
    }
  }

  /** What a previous client left: [[n, record]] in capture order. */
  left() {
    return [...this.pending.entries()].sort((a, b) => a[0] - b[0]);
  }

  write(line) {
    const buf = Buffer.from(line);
    fs.writeSync(this.fd, buf);
    this.size += buf.length;
  }

  /**
   * Appends `record`; resolves with its number, once durable unless fsync is 'batch'.
   * Concurrent callers share fsyncs (each waits for one that began after its line).
   */
  async add(record) {
    const n = this.next;
    this.next += 1;
    this.pending.set(n, record);
    this.write(`${JSON.stringify({ add: n, record })}\n`);
    this.written += 1;
    if (!this.fsyncEach) {
      this.dirty = true;
      return n;
    }
    const mine = this.written;
    while (this.synced < mine) {
      if (!this.syncing) {
        const target = this.written;
        const { fd } = this;
        this.syncing = new Promise((resolve, reject) => {
          fs.fsync(fd, (err) => (err ? reject(err) : resolve()));
        }).then(() => { this.synced = Math.max(this.synced, target); }).finally(() => { this.syncing = null; });
      }
      await this.syncing;
    }
    return n;
  }

  /** Makes every appended line durable (fsync 'batch': once per batch). */
  sync() {
    if (this.dirty) {
      fs.fsyncSync(this.fd);
      this.dirty = false;
    }
  }

  /** Marks records as handled (stored, or refused and kept in rejected.jsonl). */
  done(numbers) {
    if (numbers.length === 0) return;
    let lines = '';
    for (const n of numbers) {
      this.pending.delete(n);
      lines += `{"done":${n}}\n`;
    }
    this.write(lines);
    fs.fsyncSync(this.fd);
    if (this.pending.size === 0 && this.size > (1 << 20)) this.restart();
  }

  restart() {
    const file = path.join(this.directory, LOG);
    const tmp = `${file}.new`;
    const fd = fs.openSync(tmp, 'w');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.closeSync(this.fd);
    fs.renameSync(tmp, file);
    const dir = fs.openSync(this.directory, 'r');
    fs.fsyncSync(dir);
    fs.closeSync(dir);
    this.fd = fs.openSync(file, 'a');
    this.size = 0;
  }

  /** Keeps a refused record in rejected.jsonl (never retried). */
  reject(record, status, error) {
    const fd = fs.openSync(path.join(this.directory, REJECTED), 'a');
    try {
      fs.writeSync(fd, `${JSON.stringify({ status, error, record })}\n`);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }

  close() {
    if (this.fd === null) return;
    fs.fsyncSync(this.fd);
    fs.closeSync(this.fd);
    this.fd = null;
    fs.rmSync(this.lockPath, { force: true });
  }
}
