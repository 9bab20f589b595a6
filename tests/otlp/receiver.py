"""An OTLP/HTTP trace receiver for the trace tests: what a collector would see.

Listens on 127.0.0.1 (port 0: the kernel picks), prints the port on its first stdout
line, and appends every span it receives on POST /v1/traces (protobuf, gzip or not) to
the file named by its first argument (with --count, only their number), one JSON object
per line:
  {"service", "name", "trace_id", "span_id", "parent_span_id", "kind",
   "links": [{"trace_id", "span_id"}], "attributes": {key: value}}
Decoded with the OpenTelemetry project's own protobuf types (PyPI opentelemetry-proto),
so what the test checks is what any OTLP receiver would read.
"""

import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OUT = sys.argv[1]
# With --count, only the number of spans received so far is kept in OUT (benchmarks).
COUNT_ONLY = "--count" in sys.argv[2:]
received = 0


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as collectors do: an exporter reusing its connection must not lose
    # a batch to a connection the receiver closed.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_response(415 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        lines = []
        for rs in request.resource_spans:
            attrs = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({
                        "service": attrs.get("service.name"),
                        "name": s.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "kind": s.kind,
                        "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()} for l in s.links],
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                    }))
        global received
        if COUNT_ONLY:
            received += len(lines)
            with open(OUT, "w") as f:
                f.write(f"{received}\n")
        else:
            with open(OUT, "a") as f:
                for line in lines:
                    f.write(line + "\n")
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
