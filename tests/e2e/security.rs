//! Security tests (issue 9): no header outside the allow-list and no body byte reaches any export
//! (spans at the collector, the file sink, the metrics text, the agent's log), and the
//! receiver's bearer token through the whole agent.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::{
    Agent, Collector, agent_bin, attr, free_port, kernel_tests_enabled, metric_sum, scratch, serial,
};
use crate::peers::{
    Runtime, abort_is_found, open_stream, rst_close, wait_listening, wait_until, write_config,
};

const SECRETS: [&str; 4] = [
    "sk-planted-secret-",
    "planted-cookie-",
    "planted-unknown-",
    "planted-body-",
];

/// Requests that carry a bearer token, a cookie, an unknown header and a secret in the JSON
/// body; half abort (so findings quote their heads), half run to the end. None of the planted
/// values may appear in anything the agent writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_reach_no_export() {
    if !kernel_tests_enabled("planted_secrets_reach_no_export") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("secrets");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let grpc = free_port();
    let metrics_port = free_port();
    let spans_file = dir.join("spans.jsonl");
    let config = write_config(
        &dir,
        &format!(
            "[kernel]\nwatch_ports = [{port}]\n[otlp]\ngrpc_port = {grpc}\nhttp_port = {}\n\
             [prometheus]\nport = {metrics_port}\n[export]\nendpoint = \"http://{backend}\"\n\
             [file]\nenabled = true\npath = \"{}\"\n",
            free_port(),
            spans_file.display()
        ),
    );
    let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
    let mut agent = tokio::process::Command::new(agent_bin())
        .arg("run")
        .arg("-c")
        .arg(&config)
        // The most verbose level: a secret that leaks into any log line shows here.
        .env("INFERWATCH_LOG", "trace")
        .stdout(std::fs::File::create(dir.join("agent.stdout")).expect("stdout file"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start inferwatch");
    wait_listening(grpc).await;
    let otlp: SocketAddr = format!("127.0.0.1:{grpc}").parse().expect("addr");
    let runtime = Runtime::serve(port, otlp, &dir).await;

    const N: usize = 10;
    for i in 0..N {
        let headers = format!(
            "authorization: Bearer sk-planted-secret-{i}\r\ncookie: session=planted-cookie-{i}\r\n\
             x-planted: planted-unknown-{i}\r\n"
        );
        let content = format!("tell me planted-body-{i} please");
        let chunks = if i % 2 == 0 { 2 } else { 1 };
        let stream = open_stream(port, &format!("sec-{i}"), &headers, &content, chunks).await;
        if i % 2 == 0 {
            let std = stream.into_std().expect("into std");
            rst_close(std::os::fd::AsRawFd::as_raw_fd(&std));
        } else {
            // Read to the end of the stream: a completed request.
            let mut stream = stream;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut buf),
            )
            .await;
        }
    }
    let findings = wait_until(Duration::from_secs(15), || {
        collector
            .spans()
            .iter()
            .filter(|s| s.span.name == "inferwatch.abort")
            .count()
            >= N / 2
    })
    .await;
    let scrape =
        crate::harness::scrape(std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port))).await;
    runtime.stop(libc::SIGTERM).await;
    if let Some(pid) = agent.id() {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;

    let received = collector.spans();
    let spans_text = format!("{:?}", received.iter().map(|r| &r.span).collect::<Vec<_>>());
    let exports = [
        ("collector spans", spans_text),
        (
            "file sink",
            std::fs::read_to_string(&spans_file).unwrap_or_default(),
        ),
        ("metrics", scrape.clone()),
        (
            "agent log",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default(),
        ),
        (
            "agent stdout",
            std::fs::read_to_string(dir.join("agent.stdout")).unwrap_or_default(),
        ),
    ];
    for (name, text) in &exports {
        eprintln!("planted_secrets: {name}: {} bytes", text.len());
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret}* leaked into the {name}");
        }
    }
    // The grep saw real output: the findings and the allow-listed ids are there.
    assert!(findings, "the aborted requests were found");
    assert!(
        received
            .iter()
            .any(|s| attr(&s.span, "gen_ai.request.id").is_some_and(|r| r.ends_with("sec-0"))),
        "the allow-listed request id is exported"
    );
    assert!(
        exports[1].1.contains("sec-0"),
        "the file sink has the spans"
    );
    assert!(
        scrape.contains("inferwatch_aborts"),
        "the metrics were scraped"
    );
}

/// The receiver's bearer token through the whole agent: a runtime without the token is refused
/// (counted as `unauthenticated`, nothing forwarded), one with it is served and joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_through_the_agent() {
    if !kernel_tests_enabled("bearer_token_through_the_agent") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("bearer");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start_with(port, backend, |config| {
        config.otlp.bearer_token = Some("tok-e2e".into());
    })
    .await;

    // Without the token.
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let stream = open_stream(port, "no-token", "", "hi", 1).await;
    drop(stream);
    // Let the runtime finish the request and export its span (refused) before it stops.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    runtime.stop(libc::SIGTERM).await;
    let metrics = agent.scrape().await;
    let unauthenticated = metric_sum(
        &metrics,
        "inferwatch_otlp_requests_rejected_total",
        "unauthenticated",
    );

    // With it (the OpenTelemetry SDK's standard header variable).
    let child = tokio::process::Command::new(crate::harness::testbed_bin())
        .args(["serve", "--port", &port.to_string(), "--policy", "never"])
        .args(["--otlp-endpoint", &format!("http://{}", agent.otlp_grpc)])
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20tok-e2e",
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start iw-testbed serve");
    wait_listening(port).await;
    let found = abort_is_found(&collector, port, "with-token").await;
    drop(child);
    agent.stop().await;
    let forwarded_without = collector.spans().iter().any(|s| {
        // Only the runtime's own span; a kernel-only abort finding may name the request.
        s.span.name == "llm_request"
            && attr(&s.span, "gen_ai.request.id").is_some_and(|r| r.ends_with("no-token"))
    });
    assert!(unauthenticated > 0.0, "refusals counted:\n{metrics}");
    assert!(
        !forwarded_without,
        "spans without the token are not forwarded"
    );
    assert!(found, "with the token the runtime's spans are joined");
}

/// `[privacy] hash_tenants`: the tenant read from the request head (`x-tenant-id: acme`) and
/// from the runtime's spans leaves the agent only as its keyed hash, in the collector's spans
/// (findings and forwarded runtime spans) and in the metrics; the hash is the documented
/// `t-<16 hex>` under the configured key, so it is stable and keyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_hashing_reaches_every_export() {
    if !kernel_tests_enabled("tenant_hashing_reaches_every_export") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("tenant-hash");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start_with(port, backend, |config| {
        config.privacy.hash_tenants = true;
        config.privacy.tenant_hash_key = "k-e2e".into();
    })
    .await;
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let found = abort_is_found(&collector, port, "hashed-0").await;
    // A completed request too, so the runtime's own span (with its tenant attribute) is
    // forwarded after its join.
    let mut stream = open_stream(port, "hashed-1", "", "hi", 1).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut buf),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = agent.scrape().await;
    runtime.stop(libc::SIGTERM).await;
    agent.stop().await;

    let expected = inferwatch::privacy::TenantHasher::new("k-e2e").hash("acme");
    let other_key = inferwatch::privacy::TenantHasher::new("another").hash("acme");
    assert_ne!(expected, other_key, "the hash is keyed");
    let received = collector.spans();
    let abort = received
        .iter()
        .find(|s| s.span.name == "inferwatch.abort")
        .expect("an abort finding");
    assert!(found, "the abort was found");
    assert_eq!(
        attr(&abort.span, "tenant.id").as_deref(),
        Some(expected.as_str()),
        "the finding carries the keyed hash"
    );
    let spans_text = format!("{:?}", received.iter().map(|r| &r.span).collect::<Vec<_>>());
    for (name, text) in [("collector spans", &spans_text), ("metrics", &metrics)] {
        // `acme` cannot occur inside a hash (`m` is not a hex digit).
        assert!(!text.contains("acme"), "raw tenant id in the {name}");
    }
    let forwarded_hashed = received.iter().any(|s| {
        s.span.name != "inferwatch.abort"
            && attr(&s.span, "tenant.id").as_deref() == Some(&expected)
    });
    assert!(
        forwarded_hashed,
        "the forwarded runtime span carries the hash"
    );
}

/// TLS on the OTLP receiver: a self-signed certificate made here; a tonic client and a rustls
/// HTTPS client that trust it are served; plaintext gRPC and HTTP clients are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_receiver_tls() {
    if !kernel_tests_enabled("otlp_receiver_tls") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("otlp-tls");
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("self-signed");
    let cert_pem = cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert_pem).expect("write cert");
    std::fs::write(dir.join("key.pem"), signing_key.serialize_pem()).expect("write key");
    let collector = Collector::default();
    let backend = collector.start().await;
    let http_port = free_port();
    let agent = Agent::start_with(free_port(), backend, |config| {
        config.kernel.enabled = false;
        config.otlp.http_port = http_port;
        config.otlp.tls_cert_path = Some(dir.join("cert.pem"));
        config.otlp.tls_key_path = Some(dir.join("key.pem"));
    })
    .await;
    let request = inferwatch::sources::otlp::sample::vllm_request(0, 1);

    // gRPC over TLS, trusting the certificate.
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", agent.otlp_grpc.port()))
        .expect("uri")
        .tls_config(tls)
        .expect("client tls")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("TLS connect");
    let grpc_tls = TraceServiceClient::new(channel)
        .export(request.clone())
        .await;
    // Plaintext gRPC to the same port.
    let plain = match Channel::from_shared(format!("http://{}", agent.otlp_grpc))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Ok(channel) => TraceServiceClient::new(channel)
            .export(request.clone())
            .await
            .is_ok(),
        Err(_) => false,
    };

    // HTTPS (rustls client trusting the certificate) and plaintext HTTP.
    let body = prost::Message::encode_to_vec(&request);
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-protobuf\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let https = {
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(cert.der().to_vec()))
            .expect("trust the certificate");
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", http_port))
            .await
            .expect("connect https");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
        exchange(&mut tls, head.as_bytes(), &body).await
    };
    let plain_http = {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", http_port))
            .await
            .expect("connect http");
        exchange(&mut tcp, head.as_bytes(), &body).await
    };
    agent.stop().await;

    assert!(grpc_tls.is_ok(), "gRPC over TLS is served: {grpc_tls:?}");
    assert!(!plain, "plaintext gRPC is refused");
    assert!(
        https.starts_with("HTTP/1.1 200"),
        "HTTPS is served: {https:?}"
    );
    assert!(
        !plain_http.starts_with("HTTP/1.1 200"),
        "plaintext HTTP is refused: {plain_http:?}"
    );
}

/// Writes a request, reads until close (at most 5 s); the response as text, lossily.
async fn exchange<S>(stream: &mut S, head: &[u8], body: &[u8]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(head).await;
    let _ = stream.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
