"""Sends spans shaped exactly like vLLM's `llm_request` through the OpenTelemetry SDK's OTLP
exporter, the way vLLM does (`vllm/tracing.py`: TracerProvider + BatchSpanProcessor +
OTLPSpanExporter, grpc or http/protobuf).

A client span (the caller, as if it had propagated `traceparent`) is the parent of the
`llm_request` SERVER span, which carries vLLM's attribute keys with vLLM's types (ints for
token counts, doubles in seconds for latencies). Prints one JSON line with the ids to expect.

Usage: otlp_vllm_sender.py --protocol grpc|http --endpoint URL [--count N]
"""

import argparse
import json
import os
import sys
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, set_span_in_context


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["grpc", "http"], required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()

    if args.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=args.endpoint, insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=args.endpoint)

    resource = Resource.create(
        {"service.name": "vllm", "process.pid": os.getpid(), "host.name": "gpu-node-1"}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    client_tracer = provider.get_tracer("test.client")
    tracer = provider.get_tracer("vllm.entrypoints.openai.api_server")

    out = []
    for i in range(args.count):
        with client_tracer.start_as_current_span("POST /v1/chat/completions", kind=SpanKind.CLIENT) as parent:
            arrival = time.time_ns()
            span = tracer.start_span(
                "llm_request",
                kind=SpanKind.SERVER,
                context=set_span_in_context(parent),
                start_time=arrival,
            )
            span.set_attribute("gen_ai.response.model", "meta-llama/Llama-3.1-8B-Instruct")
            span.set_attribute("gen_ai.request.id", f"chatcmpl-test-{i}")
            span.set_attribute("gen_ai.request.temperature", 0.7)
            span.set_attribute("gen_ai.request.top_p", 1.0)
            span.set_attribute("gen_ai.request.max_tokens", 256)
            span.set_attribute("gen_ai.request.n", 1)
            span.set_attribute("gen_ai.usage.prompt_tokens", 1200)
            span.set_attribute("gen_ai.usage.completion_tokens", 87)
            span.set_attribute("gen_ai.latency.time_in_queue", 0.012)
            span.set_attribute("gen_ai.latency.time_to_first_token", 0.145)
            span.set_attribute("gen_ai.latency.e2e", 2.5)
            span.set_attribute("gen_ai.latency.time_in_model_prefill", 0.13)
            span.set_attribute("gen_ai.latency.time_in_model_decode", 2.3)
            span.set_attribute("gen_ai.latency.time_in_model_inference", 2.43)
            span.set_attribute("gen_ai.response.finish_reasons", ["stop"])
            span.set_attribute("tenant.id", "acme")
            span.end(end_time=arrival + 2_500_000_000)
            ctx = span.get_span_context()
            out.append(
                {
                    "trace_id": format(ctx.trace_id, "032x"),
                    "span_id": format(ctx.span_id, "016x"),
                    "parent_span_id": format(parent.get_span_context().span_id, "016x"),
                    "pid": os.getpid(),
                }
            )
    provider.force_flush()
    provider.shutdown()
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
