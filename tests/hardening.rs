//! What a hostile or careless client meets: slow headers are cut off, idle connections
//! closed, connections capped before accept, stalled readers dropped without pinning
//! threads, upstream downloads bounded, and the admin surface kept off the data port.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::fake::{BlobMode, Fake};
use common::image::{noise, sha256};
use common::{wait_until, Wharf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn fake_config(fake: &Fake, extra: &str) -> String {
    format!("{extra}\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n", fake.url())
}

/// Reads until the server closes the connection (or `limit` passes); true when it closed.
async fn closed_by_server(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads line")
}

#[tokio::test]
async fn slow_header_clients_are_cut_off_while_a_normal_client_is_served() {
    let fake = Fake::start().await;
    let w = Wharf::with_config(&fake_config(&fake, "[server]\nheader_read_timeout = \"2s\"\n"));
    let addr = w.addr;
    // 300 clients that each start a request and then send one header byte every 300 ms.
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await.expect("start");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if tokio::time::Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                if s.write_all(b"X").await.is_err() {
                    return true;
                }
                let mut b = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    // A 408 or similar before the close is fine: the server ended it.
                    Ok(Ok(_)) => return true,
                    Err(_) => {}
                }
            }
        }));
    }
    wait_until(10, "the slow clients to connect", || async {
        (w.metric("wharf_connections", &[]).await >= 300.0).then_some(())
    })
    .await;
    // Meanwhile a normal client is served.
    let r = reqwest::Client::new()
        .get(w.url("/v2/"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("a normal client is served while slow clients hold connections");
    assert_eq!(r.status(), 200);
    let mut cut = 0;
    for t in slow {
        if t.await.expect("task") {
            cut += 1;
        }
    }
    assert_eq!(cut, 300, "every slow-header connection was closed by the server");
    assert_eq!(w.metric("wharf_connections_closed_total", &[("reason", "header_timeout")]).await, 300.0);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_at_the_idle_timeout() {
    let fake = Fake::start().await;
    let w = Wharf::with_config(&fake_config(
        &fake,
        "[server]\nidle_timeout = \"2s\"\nheader_read_timeout = \"60s\"\n",
    ));
    let before = w.metric("wharf_connections_closed_total", &[("reason", "idle")]).await;
    let mut conns = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(w.addr).await.expect("connect");
        s.write_all(b"GET /_wharf/health HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("request");
        let mut head = vec![0u8; 12];
        s.read_exact(&mut head).await.expect("response");
        assert_eq!(&head, b"HTTP/1.1 200");
        conns.push(s);
    }
    let mut closed = 0;
    for s in &mut conns {
        if closed_by_server(s, Duration::from_secs(20)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 200, "every idle keep-alive connection was closed");
    let after = w.metric("wharf_connections_closed_total", &[("reason", "idle")]).await;
    assert!(after - before >= 200.0, "counted as idle closes: {before} -> {after}");

    // A connection that never sends a request is idle too.
    let mut silent = TcpStream::connect(w.addr).await.expect("connect");
    assert!(closed_by_server(&mut silent, Duration::from_secs(20)).await, "a silent connection is closed");
}

#[tokio::test]
async fn a_quiet_keep_alive_connection_hibernates_and_serves_its_next_requests() {
    let fake = Fake::start().await;
    let w = Wharf::with_config(&fake_config(&fake, "[admin]\nlisten = \"127.0.0.1:0\"\n"));
    let mut s = TcpStream::connect(w.addr).await.expect("connect");
    let get = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";
    async fn response(s: &mut TcpStream) -> Vec<u8> {
        // Heads only: /v2/ answers with a small JSON body sized by Content-Length.
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.expect("response head");
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().expect("length")))
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.expect("response body");
        got
    }
    s.write_all(get).await.expect("request");
    assert!(response(&mut s).await.starts_with(b"HTTP/1.1 200"));
    wait_until(10, "the connection to hibernate", || async {
        (w.metric("wharf_connections_hibernated_total", &[]).await >= 1.0).then_some(())
    })
    .await;
    // Two pipelined requests on the resumed connection, the second split across writes.
    s.write_all(get).await.expect("request");
    s.write_all(&get[..10]).await.expect("request");
    let first = response(&mut s).await;
    assert!(first.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first));
    assert!(!String::from_utf8_lossy(&first).to_ascii_lowercase().contains("connection: close"));
    s.write_all(&get[10..]).await.expect("request");
    assert!(response(&mut s).await.starts_with(b"HTTP/1.1 200"));
    assert_eq!(w.metric("wharf_connections", &[]).await, 1.0, "still one connection");
}

#[tokio::test]
async fn the_connection_cap_holds_excess_clients_in_the_backlog_until_a_slot_frees() {
    let fake = Fake::start().await;
    let w = Wharf::with_config(&fake_config(
        &fake,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[server]\nmax_connections = 20\nidle_timeout = \"5m\"\n",
    ));
    assert_eq!(w.metric("wharf_connection_limit", &[]).await, 20.0);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(w.addr).await.expect("connect"));
    }
    wait_until(10, "20 connections to be served", || async {
        (w.metric("wharf_connections", &[]).await == 20.0).then_some(())
    })
    .await;
    let url = w.url("/_wharf/health");
    let mut waiting = tokio::spawn(async move {
        let r = reqwest::Client::new().get(url).timeout(Duration::from_secs(60)).send().await;
        r.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
    });
    // The 21st client is accepted by the kernel but not served while every slot is held.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut waiting).await.is_err(),
        "a client beyond the cap waits"
    );
    assert_eq!(w.metric("wharf_connections", &[]).await, 20.0, "no more than the cap is served");
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("served once a slot frees")
        .expect("task");
    assert_eq!(status, Ok(200));
    assert!(w.metric("wharf_connections", &[]).await <= 20.0);
}

#[tokio::test]
async fn stalled_http2_readers_hold_no_threads_and_are_dropped_while_cold_pulls_go_on() {
    let fake = Fake::start().await;
    let cached = fake.blob(noise("h2-cached", 1 << 20));
    let cold = noise("h2-cold", 4 << 20);
    let cold_digest = fake.blob(cold.clone());
    let w = Wharf::with_config(&fake_config(
        &fake,
        "[server]\nwrite_timeout = \"20s\"\nhttp2_keepalive_interval = \"5s\"\n",
    ));
    let blob_url = |d: &str| w.url(&format!("/v2/app/blobs/{d}"));
    let warm = reqwest::get(blob_url(&cached)).await.expect("warm").bytes().await.expect("body");
    assert_eq!(sha256(&warm), cached);
    w.settled().await;
    let baseline = threads_of(w.pid());

    // Two HTTP/2 connections with 120 streams each, whose client never reads a body byte.
    let mut stalled = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .http2_initial_stream_window_size(65_535)
            .http2_initial_connection_window_size(65_535)
            .http2_adaptive_window(false)
            .build()
            .expect("client");
        let sends = (0..120).map(|_| c.get(blob_url(&cached)).send());
        for r in futures_util::future::join_all(sends).await {
            let r = r.expect("response head");
            assert_eq!(r.status(), 200);
            stalled.push(r);
        }
        clients.push(c);
    }
    // Reading the first chunks takes blocking threads for a moment; the pool lets idle
    // ones go after 10 s. A response pinning its thread would keep it.
    let pid = w.pid();
    wait_until(18, "the blocking pool to shrink back while 240 responses are stalled", || async move {
        (threads_of(pid) < baseline + 20).then_some(())
    })
    .await;

    // Cold pulls and a tag-less blob fetch still run for everyone else.
    let got = reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client")
        .get(blob_url(&cold_digest))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("cold pull")
        .bytes()
        .await
        .expect("cold body");
    assert_eq!(sha256(&got), cold_digest, "the cold blob arrived whole");

    // Nobody reads (the client's HTTP/2 layer still answers pings, every 5 s): both
    // connections are dropped at the write timeout.
    wait_until(30, "stalled connections to be dropped", || async {
        (w.metric("wharf_connections_closed_total", &[("reason", "write_timeout")]).await >= 2.0)
            .then_some(())
    })
    .await;
    assert_eq!(w.metric("wharf_connections_closed_total", &[("reason", "write_timeout")]).await, 2.0);
    let mut cut = 0;
    for r in stalled {
        if r.bytes().await.is_err() {
            cut += 1;
        }
    }
    assert_eq!(cut, 240, "every stalled response was cut, none completed");
}

#[tokio::test]
async fn cold_downloads_beyond_the_limit_wait_then_get_503_and_in_flight_stays_bounded() {
    let fake = Fake::start().await;
    let digests: Vec<String> = (0..30)
        .map(|i| {
            let d = fake.blob(noise(&format!("cold-{i}"), 256 * 1024));
            fake.set_blob_mode(&d, BlobMode::GatedAfter(1024));
            d
        })
        .collect();
    let w = Wharf::with_config(&fake_config(
        &fake,
        "[server]\nmax_inflight_downloads = 8\ndownload_wait = \"1s\"\n",
    ));
    let client = reqwest::Client::new();
    let sends = digests.iter().map(|d| {
        let c = client.clone();
        let url = w.url(&format!("/v2/app/blobs/{d}"));
        async move { c.get(url).timeout(Duration::from_secs(60)).send().await.expect("answer") }
    });
    let answers = futures_util::future::join_all(sends).await;
    let mut started = Vec::new();
    let mut refused = 0;
    for (d, r) in digests.iter().zip(answers) {
        match r.status().as_u16() {
            200 => started.push((d.clone(), r)),
            503 => {
                assert_eq!(r.headers()["retry-after"], "5");
                let body: serde_json::Value = r.json().await.expect("OCI error JSON");
                assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(started.len(), 8, "exactly max_inflight_downloads downloads started");
    assert_eq!(refused, 22);
    assert_eq!(w.metric("wharf_inflight_downloads", &[]).await, 8.0);
    assert_eq!(w.metric("wharf_downloads_refused_total", &[("limit", "downloads")]).await, 22.0);
    let blob_gets = fake.seen().iter().filter(|s| s.method == "GET" && s.path.contains("/blobs/")).count();
    assert_eq!(blob_gets, 8, "no upstream GET for a refused request");

    // The clients hang up mid-transfer; the downloads carry on for the cache and end.
    drop(started);
    fake.open_gate();
    w.settled().await;
    assert_eq!(w.metric("wharf_inflight_downloads", &[]).await, 0.0);
    // A refused blob is fetched once there is room.
    let last = digests.last().expect("digest");
    fake.set_blob_mode(last, BlobMode::Normal);
    let got = client.get(w.url(&format!("/v2/app/blobs/{last}"))).send().await.expect("retry");
    assert_eq!(got.status(), 200);
    assert_eq!(&sha256(&got.bytes().await.expect("body")), last);
}

#[tokio::test]
async fn admin_routes_are_served_only_on_the_admin_listener_when_it_is_set() {
    let fake = Fake::start().await;
    let w = Wharf::with_config(&fake_config(&fake, "[admin]\nlisten = \"127.0.0.1:0\"\n"));
    let admin: SocketAddr = w.metrics_addr().expect("admin listener bound");
    let status = |url: String| async move { reqwest::get(url).await.expect("answer").status().as_u16() };
    for path in ["/metrics", "/_wharf/stats", "/_wharf/gc", "/_wharf/history/app/tags/latest"] {
        assert_eq!(status(w.url(path)).await, 404, "{path} is not on the data port");
    }
    assert_eq!(status(w.url("/_wharf/health")).await, 200, "health is on both");
    assert_eq!(status(w.url("/v2/")).await, 200);
    assert_eq!(status(format!("http://{admin}/metrics")).await, 200);
    assert_eq!(status(format!("http://{admin}/_wharf/stats")).await, 200);
    assert_eq!(status(format!("http://{admin}/_wharf/health")).await, 200);
    assert_eq!(status(format!("http://{admin}/v2/")).await, 404, "no registry API on the admin port");
    // The CLI finds the admin listener.
    let out = w.cli(&["stats", "--json"]);
    assert!(out.status.success(), "wharf stats: {}", String::from_utf8_lossy(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert!(stats.is_object());
}

#[tokio::test]
async fn a_request_head_over_the_size_cap_gets_431_and_normal_ones_pass() {
    let fake = Fake::start().await;
    let w = Wharf::with_config(&fake_config(&fake, "[server]\nmax_header_bytes = \"16KiB\"\n"));
    let send = |extra: usize| {
        let addr = w.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let head = format!(
                "GET /_wharf/health HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
                "a".repeat(extra)
            );
            let _ = s.write_all(head.as_bytes()).await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).split(' ').nth(1).unwrap_or("").to_owned()
        }
    };
    assert_eq!(send(8 * 1024).await, "200");
    assert_eq!(send(64 * 1024).await, "431");
    assert_eq!(send(100).await, "200", "the server goes on");
}
