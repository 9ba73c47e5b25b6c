//! The exporter's encoding of a [`SpanBatch`] as an export request, byte for byte what
//! `prost`'s `encode_to_vec` writes for `batch.into_request(..)`, at about half the cost: the
//! lengths and writers of [`crate::otlp_wire::write`] for the decoded groups, and a batch's
//! [`EncodedGroup`]s (request spans held as bytes while they waited for their join) written
//! around their spans' bytes, which are copied as they are.

use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::encoding::message;

use crate::otlp_wire::batch::{EncodedGroup, SpanBatch, count_spans, findings_resource_spans};
use crate::otlp_wire::write::{
    REQUEST_RESOURCE_SPANS, RS_RESOURCE, RS_SCHEMA_URL, RS_SCOPE_SPANS, SS_SCHEMA_URL, SS_SCOPE,
    SS_SPANS, field_len, put_len_key, resource_spans_len, string_len, write_resource_spans,
    write_string,
};

/// `batch.into_request(agent_resource)` encoded, without decoding its encoded spans: the
/// received groups, then the encoded groups, then the findings.
pub fn encode_batch(batch: SpanBatch, agent_resource: &Resource) -> Vec<u8> {
    let SpanBatch {
        resource_spans,
        encoded,
        findings,
    } = batch;
    let findings_group =
        (!findings.is_empty()).then(|| findings_resource_spans(agent_resource, findings));
    encode_groups(&resource_spans, &encoded, findings_group.as_ref())
}

/// An export request of `received`, then `encoded`, then `findings`.
fn encode_groups(
    received: &[ResourceSpans],
    encoded: &[EncodedGroup],
    findings: Option<&ResourceSpans>,
) -> Vec<u8> {
    let decoded = || received.iter().chain(findings);
    // Pass 1: the length of every resource group, scope group and span, in the order pass 2
    // writes them (an encoded group's two lengths are kept apart: its spans' are known).
    let mut lens = Vec::with_capacity(count_spans(received) + 2 * received.len() + 3);
    let mut total: usize = decoded()
        .map(|rs| field_len(REQUEST_RESOURCE_SPANS, resource_spans_len(rs, &mut lens)))
        .sum();
    let group_lens: Vec<(usize, usize)> = encoded.iter().map(encoded_group_len).collect();
    total += group_lens
        .iter()
        .map(|&(rs, _)| field_len(REQUEST_RESOURCE_SPANS, rs))
        .sum::<usize>();
    // Pass 2: write, taking the lengths back in the same order.
    let mut buf = Vec::with_capacity(total);
    let mut lens = lens.into_iter();
    for rs in received {
        write_resource_spans(rs, &mut lens, &mut buf);
    }
    for (group, (rs_len, ss_len)) in encoded.iter().zip(group_lens) {
        write_encoded_group(group, rs_len, ss_len, &mut buf);
    }
    if let Some(rs) = findings {
        write_resource_spans(rs, &mut lens, &mut buf);
    }
    debug_assert_eq!(buf.len(), total);
    buf
}

/// The `ResourceSpans` and `ScopeSpans` body lengths of an encoded group.
fn encoded_group_len(g: &EncodedGroup) -> (usize, usize) {
    let group = &*g.group;
    let ss_len = group
        .scope
        .as_ref()
        .map_or(0, |s| message::encoded_len(SS_SCOPE, s))
        + g.spans
            .iter()
            .map(|s| field_len(SS_SPANS, s.len()))
            .sum::<usize>()
        + string_len(SS_SCHEMA_URL, &group.scope_schema_url);
    let rs_len = group
        .resource
        .as_ref()
        .map_or(0, |r| message::encoded_len(RS_RESOURCE, r))
        + field_len(RS_SCOPE_SPANS, ss_len)
        + string_len(RS_SCHEMA_URL, &group.resource_schema_url);
    (rs_len, ss_len)
}

fn write_encoded_group(g: &EncodedGroup, rs_len: usize, ss_len: usize, buf: &mut Vec<u8>) {
    let group = &*g.group;
    put_len_key(REQUEST_RESOURCE_SPANS, rs_len, buf);
    if let Some(r) = &group.resource {
        message::encode(RS_RESOURCE, r, buf);
    }
    put_len_key(RS_SCOPE_SPANS, ss_len, buf);
    if let Some(s) = &group.scope {
        message::encode(SS_SCOPE, s, buf);
    }
    for span in &g.spans {
        put_len_key(SS_SPANS, span.len(), buf);
        span.write_to(buf);
    }
    write_string(SS_SCHEMA_URL, &group.scope_schema_url, buf);
    write_string(RS_SCHEMA_URL, &group.resource_schema_url, buf);
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span, Status};
    use prost::Message;

    use super::*;
    use crate::otlp_wire::batch::{agent_resource, finding_span, kv_str};
    use crate::sources::otlp::sample::{vllm_request, vllm_span};

    /// A plain request through the exporter's encoder.
    fn encode_trace_request(request: &ExportTraceServiceRequest) -> Vec<u8> {
        encode_groups(&request.resource_spans, &[], None)
    }

    fn same_as_prost(request: &ExportTraceServiceRequest) {
        assert_eq!(encode_trace_request(request), request.encode_to_vec());
    }

    #[test]
    fn matches_prost_byte_for_byte() {
        same_as_prost(&ExportTraceServiceRequest::default());
        same_as_prost(&vllm_request(0, 3));
        same_as_prost(&vllm_request(7, 512));

        let mut big = vllm_span(1);
        big.attributes.push(kv_str("big", &"x".repeat(20_000)));
        big.attributes.push(KeyValue {
            key_strindex: 3,
            ..kv_str("", "indexed")
        });
        big.attributes.push(KeyValue::default());
        big.flags = 0x301;
        big.dropped_attributes_count = 4;
        big.dropped_events_count = 300;
        big.dropped_links_count = 1;
        big.trace_state = "vendor=1".into();
        big.events.push(Event {
            name: "token".into(),
            time_unix_nano: 5,
            attributes: vec![kv_str("k", "v")],
            dropped_attributes_count: 2,
        });
        big.links.push(Link {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            trace_state: "a=b".into(),
            attributes: vec![kv_str("l", "m")],
            dropped_attributes_count: 1,
            flags: 0x100,
        });
        big.status = Some(Status {
            message: "oops".into(),
            code: 2,
        });
        let request = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: None,
                    scope_spans: vec![
                        ScopeSpans::default(),
                        ScopeSpans {
                            scope: Some(InstrumentationScope::default()),
                            spans: vec![Span::default(), big],
                            schema_url: "https://opentelemetry.io/schemas/1.27.0".into(),
                        },
                    ],
                    schema_url: "s".into(),
                },
                ResourceSpans::default(),
                ResourceSpans {
                    resource: Some(Resource::default()),
                    ..Default::default()
                },
            ],
        };
        same_as_prost(&request);

        // What the exporter sends: received groups plus the findings under the agent's resource.
        let mut batch = SpanBatch::from(vllm_request(0, 200));
        batch.push_finding(finding_span(
            "inferwatch.abort",
            [1; 16],
            [2; 8],
            1,
            2,
            vec![],
        ));
        same_as_prost(&batch.into_request(&agent_resource(Some("node"))));
    }

    /// A batch with spans held encoded: written byte for byte as prost writes the decoded
    /// request, and with appended attributes, decoded to the same request.
    #[test]
    fn encoded_groups_are_written_as_their_decoded_request() {
        use std::sync::Arc;

        use crate::otlp_wire::batch::{EncodedGroup, EncodedSpan, SpanGroup, kv_i64};

        let received = vllm_request(0, 2);
        let rs = &received.resource_spans[0];
        let group = Arc::new(SpanGroup {
            resource: rs.resource.clone(),
            resource_schema_url: "r".into(),
            scope: rs.scope_spans[0].scope.clone(),
            scope_schema_url: String::new(),
        });
        let mut batch = SpanBatch::from(vllm_request(10, 3));
        batch.encoded.push(EncodedGroup {
            group: Arc::clone(&group),
            spans: rs.scope_spans[0]
                .spans
                .iter()
                .map(EncodedSpan::new)
                .collect(),
        });
        batch.encoded.push(EncodedGroup {
            group: Arc::new(SpanGroup::default()),
            spans: vec![EncodedSpan::new(&Span::default())],
        });
        batch.push_finding(finding_span(
            "inferwatch.abort",
            [1; 16],
            [2; 8],
            1,
            2,
            vec![],
        ));
        let resource = agent_resource(Some("node"));
        assert_eq!(batch.span_count(), 3 + 2 + 1 + 1);
        assert_eq!(
            encode_batch(batch.clone(), &resource),
            batch.to_request(&resource).encode_to_vec()
        );

        // Appended attributes come after the span's own, whatever fields follow them.
        let mut span = rs.scope_spans[0].spans[0].clone();
        span.flags = 0x301;
        span.status = Some(Status {
            message: "m".into(),
            code: 1,
        });
        let mut encoded = EncodedSpan::new(&span);
        encoded.add_attributes([kv_str("inferwatch.join", "traceparent"), kv_i64("n", 3)]);
        let decoded = encoded.decode().expect("decodes");
        span.attributes
            .extend([kv_str("inferwatch.join", "traceparent"), kv_i64("n", 3)]);
        assert_eq!(decoded, span);
        let mut batch = SpanBatch::default();
        batch.encoded.push(EncodedGroup {
            group,
            spans: vec![encoded],
        });
        let wire = encode_batch(batch.clone(), &resource);
        let back = ExportTraceServiceRequest::decode(wire.as_slice()).expect("decodes");
        assert_eq!(back, batch.into_request(&resource));
        assert_eq!(back.resource_spans[0].scope_spans[0].spans[0], span);
    }
}
