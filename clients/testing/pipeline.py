#!/usr/bin/env python3
"""The real pipeline for the clients' tests: a nats-server (the project's config and
identities, a temp store), a fresh Postgres database, the worker and the gateway as
processes, and an API key of a fresh company. The Python tests import :class:`Pipeline`;
the Node tests run this file, which prints the pipeline as one JSON line and then answers
one JSON line per command read from stdin:

    stop-gateway | start-gateway | stop-nats | start-nats | ids | quit

Environment: CALLCAP_BIN_DIR (the directory of ``ingest-gateway`` and ``persist-worker``;
default ``target/debug`` of this repository), NATS_SERVER_BIN (default ``nats-server``),
DATABASE_URL (a server the tests may create databases on; default the local one as
``postgres``).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("%s did not happen within %s s" % (what, timeout))


def _with_database(url, name):
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


class Pipeline:
    """One pipeline; ``close()`` stops every process and drops the database."""

    def __init__(self):
        self.bin = os.environ.get("CALLCAP_BIN_DIR", os.path.join(REPO, "target", "debug"))
        self.nats_bin = os.environ.get("NATS_SERVER_BIN", "nats-server")
        base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        self.dir = tempfile.mkdtemp(prefix="callcap-client-test-")
        self.procs = {}
        self.db_name = "callcap_client_" + uuid.uuid4().hex
        self.admin_db = _with_database(base, "postgres")
        self.db_url = _with_database(base, self.db_name)
        self.gateway_port = free_port()
        self.url = "http://127.0.0.1:%d" % self.gateway_port
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _gateway_cli(self, *args):
        out = subprocess.run([os.path.join(self.bin, "ingest-gateway"), *args], env=self._admin_env(),
                             check=True, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]

    def _admin_env(self):
        return dict(os.environ, NATS_URL=self.nats_url, NATS_NKEY_FILE=os.path.join(self.dir, "admin.nk"),
                    RUST_LOG="warn")

    def _spawn(self, name, argv, env):
        log = open(os.path.join(self.dir, name + ".log"), "ab")
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def _start(self):
        keys = {}
        for role in ("gateway", "worker", "admin"):
            path = os.path.join(self.dir, role + ".nk")
            subprocess.run([os.path.join(self.bin, "ingest-gateway"), "nkey", "create", "--out", path],
                           check=True, capture_output=True)
            keys[role] = subprocess.run([os.path.join(self.bin, "ingest-gateway"), "nkey", "public", path],
                                        check=True, capture_output=True, text=True).stdout.strip()
        self.nats_port = free_port()
        self.nats_url = "nats://127.0.0.1:%d" % self.nats_port
        self._nats_env = dict(os.environ, CALLCAP_GATEWAY_NKEY=keys["gateway"], CALLCAP_WORKER_NKEY=keys["worker"],
                              CALLCAP_ADMIN_NKEY=keys["admin"], CALLCAP_ROUTE_PASSWORD=uuid.uuid4().hex)
        self.start_nats()
        subprocess.run(["psql", self.admin_db, "-qc", 'CREATE DATABASE "%s"' % self.db_name],
                       check=True, capture_output=True)
        self.start_worker()
        self.start_gateway()
        self.company = str(uuid.uuid4())
        self.key = self._gateway_cli("keys", "create", "--company", self.company, "--name", "client tests")
        self.wait_key(self.key)

    def start_nats(self):
        self._spawn("nats", [self.nats_bin, "-c", os.path.join(REPO, "deploy", "nats", "single.conf"),
                             "-a", "127.0.0.1", "-p", str(self.nats_port), "-m", "0",
                             "-sd", os.path.join(self.dir, "js")], self._nats_env)
        _wait("nats-server", lambda: socket.create_connection(("127.0.0.1", self.nats_port), 1).close() or True)

    def stop_nats(self):
        """The broker gone (the gateway answers 503 with Retry-After until it is back)."""
        proc = self.procs.pop("nats")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    def start_worker(self):
        port = free_port()
        env = dict(os.environ, NATS_URL=self.nats_url, NATS_NKEY_FILE=os.path.join(self.dir, "worker.nk"),
                   DATABASE_URL=self.db_url, METRICS_ADDR="127.0.0.1:%d" % port, RUST_LOG="warn")
        self._spawn("worker", [os.path.join(self.bin, "persist-worker")], env)
        _wait("the worker", lambda: urllib.request.urlopen("http://127.0.0.1:%d/readyz" % port, timeout=2).status == 200)

    def start_gateway(self):
        env = dict(os.environ, NATS_URL=self.nats_url, NATS_NKEY_FILE=os.path.join(self.dir, "gateway.nk"),
                   LISTEN_ADDR="127.0.0.1:%d" % self.gateway_port, RUST_LOG="warn", SHUTDOWN_GRACE_SECS="2")
        self._spawn("gateway", [os.path.join(self.bin, "ingest-gateway")], env)
        _wait("the gateway", lambda: urllib.request.urlopen(self.url + "/readyz", timeout=2).status == 200)

    def stop_gateway(self):
        proc = self.procs.pop("gateway")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    def wait_key(self, key):
        def known():
            req = urllib.request.Request(self.url + "/v1/calls", data=b"{}", method="POST",
                                         headers={"x-api-key": key, "Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=2)
            except urllib.error.HTTPError as e:
                return e.code == 400  # {} is refused for its content: the key was taken
            return False
        _wait("the key to reach the gateway", known)

    def _sql(self, query):
        out = subprocess.run(["psql", self.db_url, "-tAc", query], check=True, capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if line]

    def ids(self):
        """external_call_id → number of rows, for the pipeline's company."""
        rows = self._sql("SELECT external_call_id, count(*) FROM call_history WHERE company_id = '%s' "
                         "GROUP BY external_call_id" % self.company)
        return {ext: int(n) for ext, n in (r.split("|") for r in rows)}

    def wait_stored(self, expected, timeout=60.0):
        """Waits until every id of ``expected`` has a row; the rows by id."""
        seen = {}

        def check():
            seen.clear()
            seen.update(self.ids())
            return set(expected) <= set(seen)
        try:
            _wait("%d records to be stored" % len(expected), check, timeout)
        except TimeoutError:
            missing = set(expected) - set(seen)
            raise AssertionError("%d of %d records not stored, e.g. %s" % (
                len(missing), len(expected), sorted(missing)[:3])) from None
        return seen

    def close(self):
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        subprocess.run(["psql", self.admin_db, "-qc", 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.db_name],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    p = Pipeline()
    try:
        print(json.dumps({"url": p.url, "key": p.key, "company": p.company}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stop-gateway":
                p.stop_gateway()
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "start-gateway":
                p.start_gateway()
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "stop-nats":
                p.stop_nats()
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "start-nats":
                p.start_nats()
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "ids":
                print(json.dumps(p.ids()), flush=True)
            elif cmd == "quit":
                break
            else:
                print(json.dumps({"error": "unknown command " + cmd}), flush=True)
    finally:
        p.close()


if __name__ == "__main__":
    main()
