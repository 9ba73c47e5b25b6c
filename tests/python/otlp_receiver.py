"""A small OTLP/gRPC trace receiver built on the OpenTelemetry SDK's own protobuf types.

Plays the backend (Jaeger / Tempo / a Collector) in inferwatch's tests. Prints `PORT <n>` once
listening, then one JSON line per received span with hex ids, its resource attributes and its
attributes, flushing each line so the Rust test can read them as they come.

Usage: otlp_receiver.py [--port N]
"""

import argparse
import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attrs(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for rs in request.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    line = {
                        "resource": resource,
                        "scope": ss.scope.name,
                        "name": span.name,
                        "kind": span.kind,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "attributes": attrs(span.attributes),
                        "events": [e.name for e in span.events],
                    }
                    sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    # Exit when the test closes our stdin (or kills us).
    try:
        sys.stdin.read()
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
