//! A fault-injecting upstream registry, for what a real one will not do on demand: wrong
//! bytes, 429/500, stalls, cut connections, token auth, redirects to another host.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use super::image::sha256;

use wharf::api::Body;

/// How manifest requests misbehave.
#[derive(Clone, Debug, PartialEq)]
pub enum ManifestFault {
    None,
    Status(u16),
    /// Accept the request and never answer.
    Stall,
    /// HEAD requests wait until the gate opens.
    GatedHead,
    /// GETs answer 200 with an HTML error page (a proxy or captive portal in the way).
    Html,
    /// HEADs answer this `Docker-Content-Digest`, whatever the bytes are.
    HeadDigest(String),
}

/// How one blob is served.
#[derive(Clone, Debug)]
pub enum BlobMode {
    Normal,
    /// Serve these bytes instead (same length or not).
    Wrong(Vec<u8>),
    /// Send the first `n` bytes of a full-length response, then cut the connection.
    CutAfter(usize),
    /// Send the first `n` bytes, then wait until the gate opens.
    GatedAfter(usize),
    /// Like `GatedAfter`, but serving these bytes instead of the blob's.
    WrongGatedAfter(Vec<u8>, usize),
    /// 307 to the same server under the host name `localhost` (another host to a client).
    RedirectToLocalhost,
    /// 307 to this location.
    RedirectTo(String),
    /// The right bytes, without a Content-Length (chunked).
    Chunked,
}

/// One request the fake saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub host: String,
    pub authorization: Option<String>,
}

#[derive(Default)]
pub struct State {
    /// `name:tag` and `name@digest` → (media type, bytes).
    pub manifests: Mutex<HashMap<String, (String, Vec<u8>)>>,
    pub blobs: Mutex<HashMap<String, Vec<u8>>>,
    pub blob_modes: Mutex<HashMap<String, BlobMode>>,
    pub manifest_fault: Mutex<Option<ManifestFault>>,
    pub seen: Mutex<Vec<Seen>>,
    /// When set, /v2/ requests need a Bearer token from /token, valid this many seconds.
    pub token_ttl: Mutex<Option<u64>>,
    pub tokens: Mutex<HashSet<String>>,
    pub tokens_issued: Mutex<u32>,
    /// When set, /v2/ requests need exactly this `Authorization` value (Basic auth).
    pub basic: Mutex<Option<String>>,
    /// When set, the token endpoint answers 200 with this body instead of a token.
    pub token_body: Mutex<Option<Vec<u8>>>,
    /// `name@digest` → descriptors the referrers API lists, in pages of two. Without any
    /// entry for a name the API answers an empty index; with `referrers_status` set, that.
    pub referrers: Mutex<HashMap<String, Vec<serde_json::Value>>>,
    pub referrers_status: Mutex<Option<u16>>,
    gate: Mutex<Option<watch::Sender<bool>>>,
}

pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let (gtx, _) = watch::channel(false);
        *state.gate.lock().expect("lock") = Some(gtx);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, addr, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake { addr, state, _stop: stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a blob; returns its digest.
    pub fn blob(&self, bytes: Vec<u8>) -> String {
        let d = sha256(&bytes);
        self.state.blobs.lock().expect("lock").insert(d.clone(), bytes);
        d
    }

    /// Adds a manifest under `name` by digest and, if given, by tag; returns its digest.
    pub fn manifest(&self, name: &str, tag: Option<&str>, media_type: &str, bytes: Vec<u8>) -> String {
        let d = sha256(&bytes);
        let mut m = self.state.manifests.lock().expect("lock");
        m.insert(format!("{name}@{d}"), (media_type.to_owned(), bytes.clone()));
        if let Some(t) = tag {
            m.insert(format!("{name}:{t}"), (media_type.to_owned(), bytes));
        }
        d
    }

    /// Adds bytes under a digest of the caller's choosing (sha512, or a wrong one).
    pub fn blob_as(&self, digest: &str, bytes: Vec<u8>) {
        self.state.blobs.lock().expect("lock").insert(digest.to_owned(), bytes);
    }

    /// Adds a manifest under a digest of the caller's choosing.
    pub fn manifest_as(&self, name: &str, digest: &str, media_type: &str, bytes: Vec<u8>) {
        self.state
            .manifests
            .lock()
            .expect("lock")
            .insert(format!("{name}@{digest}"), (media_type.to_owned(), bytes));
    }

    /// Sets what the referrers API lists for `name@digest`.
    pub fn set_referrers(&self, name: &str, digest: &str, list: Vec<serde_json::Value>) {
        self.state.referrers.lock().expect("lock").insert(format!("{name}@{digest}"), list);
    }

    /// Makes the referrers API answer `status` (404: no API; 503: down); `None` serves it.
    pub fn set_referrers_status(&self, status: Option<u16>) {
        *self.state.referrers_status.lock().expect("lock") = status;
    }

    pub fn set_blob_mode(&self, digest: &str, mode: BlobMode) {
        self.state.blob_modes.lock().expect("lock").insert(digest.to_owned(), mode);
    }

    pub fn set_manifest_fault(&self, f: ManifestFault) {
        *self.state.manifest_fault.lock().expect("lock") = Some(f);
    }

    pub fn open_gate(&self) {
        if let Some(g) = self.state.gate.lock().expect("lock").as_ref() {
            g.send_replace(true);
        }
    }

    pub fn require_tokens(&self, ttl_secs: u64) {
        *self.state.token_ttl.lock().expect("lock") = Some(ttl_secs);
    }

    /// Invalidates every issued token, as an expiry on the server side would.
    pub fn revoke_tokens(&self) {
        self.state.tokens.lock().expect("lock").clear();
    }

    pub fn require_basic(&self, expected_header: &str) {
        *self.state.basic.lock().expect("lock") = Some(expected_header.to_owned());
    }

    pub fn tokens_issued(&self) -> u32 {
        *self.state.tokens_issued.lock().expect("lock")
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    /// How many requests with `method` had a path ending in `suffix`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        self.seen().iter().filter(|s| s.method == method && s.path.ends_with(suffix)).count()
    }
}

fn full(status: u16, headers: &[(&str, String)], body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(wharf::api::body::full(body));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    for (k, v) in headers {
        r.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    r
}

async fn handle(st: Arc<State>, addr: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().as_str().to_owned();
    let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    let authorization = req.headers().get("authorization").and_then(|h| h.to_str().ok()).map(str::to_owned);
    st.seen.lock().expect("lock").push(Seen {
        method: method.clone(),
        path: path.clone(),
        host,
        authorization: authorization.clone(),
    });

    if path == "/token" {
        if let Some(b) = st.token_body.lock().expect("lock").clone() {
            return full(200, &[("content-type", "application/json".into())], b);
        }
        let ttl = st.token_ttl.lock().expect("lock").unwrap_or(60);
        let mut n = st.tokens_issued.lock().expect("lock");
        *n += 1;
        let tok = format!("tok-{}", *n);
        st.tokens.lock().expect("lock").insert(tok.clone());
        return full(
            200,
            &[("content-type", "application/json".into())],
            format!("{{\"token\":\"{tok}\",\"expires_in\":{ttl}}}").into_bytes(),
        );
    }
    if path == "/rate-limited" {
        return full(429, &[("retry-after", "60".into())], b"{}".to_vec());
    }
    if let Some(d) = path.strip_prefix("/cdn/") {
        let b = st.blobs.lock().expect("lock").get(d).cloned();
        return match b {
            Some(b) => full(200, &[("content-length", b.len().to_string())], b),
            None => full(404, &[], vec![]),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return full(404, &[], vec![]);
    };
    if st.token_ttl.lock().expect("lock").is_some() {
        let ok = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| st.tokens.lock().expect("lock").contains(t));
        if !ok {
            let repo = rest.rsplitn(3, '/').nth(2).unwrap_or("");
            let challenge = format!(
                "Bearer realm=\"http://{addr}/token\",service=\"fake\",scope=\"repository:{repo}:pull\""
            );
            return full(
                401,
                &[("www-authenticate", challenge), ("content-type", "application/json".into())],
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}".to_vec(),
            );
        }
    }
    let basic = st.basic.lock().expect("lock").clone();
    if let Some(expected) = basic {
        if authorization.as_deref() != Some(expected.as_str()) {
            return full(401, &[("www-authenticate", "Basic realm=\"fake\"".into())], b"{}".to_vec());
        }
    }
    if rest.is_empty() {
        return full(200, &[], b"{}".to_vec());
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n < 3 {
        return full(404, &[], vec![]);
    }
    let name = segs[..n - 2].join("/");
    let (kind, reference) = (segs[n - 2], segs[n - 1]);
    let head = method == "HEAD";
    match kind {
        "manifests" => {
            let fault = st.manifest_fault.lock().expect("lock").clone();
            match fault {
                Some(ManifestFault::Status(s)) => return full(s, &[], b"{}".to_vec()),
                Some(ManifestFault::Stall) => {
                    std::future::pending::<()>().await;
                }
                Some(ManifestFault::Html) if !head => {
                    return full(
                        200,
                        &[("content-type", "text/html".into())],
                        b"<html><body>Service temporarily unavailable</body></html>".to_vec(),
                    )
                }
                Some(ManifestFault::GatedHead) if head => {
                    let gate = st.gate.lock().expect("lock").as_ref().map(|g| g.subscribe());
                    if let Some(mut g) = gate {
                        let _ = g.wait_for(|open| *open).await;
                    }
                }
                _ => {}
            }
            let key = if reference.contains(':') {
                format!("{name}@{reference}")
            } else {
                format!("{name}:{reference}")
            };
            let m = st.manifests.lock().expect("lock").get(&key).cloned();
            match m {
                Some((mt, bytes)) => {
                    let digest = match (&fault, head) {
                        (Some(ManifestFault::HeadDigest(d)), true) => d.clone(),
                        _ if reference.contains(':') => reference.to_owned(),
                        _ => sha256(&bytes),
                    };
                    let h = [
                        ("content-type", mt),
                        ("docker-content-digest", digest),
                        ("content-length", bytes.len().to_string()),
                    ];
                    full(200, &h, if head { vec![] } else { bytes })
                }
                None => full(
                    404,
                    &[("content-type", "application/json".into())],
                    b"{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\"}]}".to_vec(),
                ),
            }
        }
        "blobs" => {
            let Some(bytes) = st.blobs.lock().expect("lock").get(reference).cloned() else {
                return full(404, &[], vec![]);
            };
            let mode =
                st.blob_modes.lock().expect("lock").get(reference).cloned().unwrap_or(BlobMode::Normal);
            let len_h = ("content-length", bytes.len().to_string());
            if head {
                return full(200, &[len_h], vec![]);
            }
            let (bytes, mode) = match mode {
                BlobMode::WrongGatedAfter(other, k) => (other, BlobMode::GatedAfter(k)),
                m => (bytes, m),
            };
            match mode {
                BlobMode::Normal => full(200, &[len_h], bytes),
                BlobMode::Wrong(other) => full(200, &[("content-length", other.len().to_string())], other),
                BlobMode::RedirectToLocalhost => full(
                    307,
                    &[("location", format!("http://localhost:{}/cdn/{reference}", addr.port()))],
                    vec![],
                ),
                BlobMode::RedirectTo(to) => full(307, &[("location", to)], vec![]),
                BlobMode::Chunked => {
                    let chunks: Vec<io::Result<Bytes>> =
                        bytes.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
                    Response::new(wharf::api::body::stream(futures_util::stream::iter(chunks)))
                }
                BlobMode::WrongGatedAfter(..) => unreachable!("mapped to GatedAfter above"),
                BlobMode::CutAfter(k) | BlobMode::GatedAfter(k) => {
                    let (tx, body) = wharf::api::body::channel(4);
                    let gate = st.gate.lock().expect("lock").as_ref().map(|g| g.subscribe());
                    let cut = matches!(mode, BlobMode::CutAfter(_));
                    let total = bytes.len();
                    tokio::spawn(async move {
                        let _ = tx.send(Ok(Bytes::copy_from_slice(&bytes[..k]))).await;
                        if cut {
                            // A failed body makes hyper cut the connection short of Content-Length.
                            let _ = tx.send(Err(io::Error::other("cut"))).await;
                            return;
                        }
                        if let Some(mut g) = gate {
                            let _ = g.wait_for(|open| *open).await;
                        }
                        for c in bytes[k..].chunks(64 * 1024) {
                            if tx.send(Ok(Bytes::copy_from_slice(c))).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut r = Response::new(body);
                    r.headers_mut().insert("content-length", total.to_string().parse().expect("len"));
                    r
                }
            }
        }
        "referrers" => {
            if let Some(s) = *st.referrers_status.lock().expect("lock") {
                if (300..400).contains(&s) {
                    // As GHCR does: off to a rate-limited web API on another host.
                    let to = format!("http://localhost:{}/rate-limited", addr.port());
                    return full(s, &[("location", to)], vec![]);
                }
                return full(s, &[], b"{}".to_vec());
            }
            let list = st.referrers.lock().expect("lock").get(&format!("{name}@{reference}")).cloned();
            let list = list.unwrap_or_default();
            let page: usize = query.strip_prefix("page=").and_then(|p| p.parse().ok()).unwrap_or(0);
            let items: Vec<serde_json::Value> = list.iter().skip(page * 2).take(2).cloned().collect();
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": items,
            });
            let mut h = vec![("content-type", "application/vnd.oci.image.index.v1+json".to_owned())];
            if (page + 1) * 2 < list.len() {
                h.push((
                    "link",
                    format!("</v2/{name}/referrers/{reference}?page={}>; rel=\"next\"", page + 1),
                ));
            }
            full(200, &h, index.to_string().into_bytes())
        }
        _ => full(404, &[], vec![]),
    }
}
