//! Configuration: embedded defaults < `--config FILE` (TOML) < `WHARF_…` environment
//! (nested keys joined with `__`) < command-line flags. Validated once, at start-up.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::oci::valid_component;

/// Top-level keys, the only ones taken from `WHARF_…` environment variables.
const CONFIG_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "shutdown_grace",
    "upstreams",
    "tls",
    "analytics",
    "metrics",
    "admin",
    "cache",
    "server",
    "auth",
    "offline",
    "storage",
];

/// Everything wharf reads at start-up.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the registry API listens on.
    pub listen: SocketAddr,
    /// Root of the storage tree (distribution's filesystem layout) and wharf's index.
    pub data_dir: PathBuf,
    /// How long in-flight responses may run on after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Registries to pull through; the first is the default.
    pub upstreams: Vec<UpstreamConfig>,
    /// Serve HTTPS with this certificate (plain HTTP when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub analytics: AnalyticsConfig,
    /// Old name of `admin` (`metrics.listen` is `admin.listen`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Never contact any upstream (an air-gapped mirror serving what it holds); an
    /// upstream's own `offline` wins over this.
    #[serde(default)]
    pub offline: bool,
    /// Image lists `wharf prefetch` fetches (and the server again every `refresh`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<crate::prefetch::PrefetchConfig>,
    /// Where blob bytes and repository links live: the data dir, or a shared bucket.
    #[serde(default)]
    pub storage: StorageConfig,
}

/// Which store holds the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The data dir alone.
    #[default]
    Filesystem,
    /// An S3-compatible bucket shared by every replica, the data dir a bounded local tier.
    S3,
}

/// `[storage]`: with `backend = "s3"`, several replicas share one bucket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// The S3 endpoint (`https://s3.eu-west-1.amazonaws.com`, `http://seaweedfs:8333`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Url>,
    pub bucket: String,
    pub region: String,
    /// Key prefix inside the bucket; distribution's `rootdirectory`.
    pub prefix: String,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`.
    pub path_style: bool,
    /// Access key; `AWS_ACCESS_KEY_ID` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// File holding the secret key (a mounted Secret); `AWS_SECRET_ACCESS_KEY` when
    /// neither is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Skips certificate checks (and allows `http://`).
    pub insecure: bool,
    /// Extra CA certificates (PEM) to trust for the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Blob GETs answer 307 to a presigned URL of the object, so the store serves the bytes.
    pub redirect: bool,
    /// How long a presigned URL is valid.
    #[serde(with = "humantime_serde")]
    pub redirect_ttl: Duration,
    /// The endpoint clients reach the store at, named in presigned URLs, when it is not
    /// `endpoint` (an in-cluster service name the nodes' container runtimes cannot
    /// resolve); `endpoint` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_endpoint: Option<Url>,
    /// Bytes of blobs this replica keeps on its own disk, to serve them without the store
    /// (and with sendfile); 0 keeps none.
    pub local_max_size: ByteSize,
    /// A replica's claim on a download, in the bucket, lapses this long after its holder
    /// last renewed it (a killed replica's claim is taken over after this).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Longest a replica waits for another one's download before fetching itself.
    #[serde(with = "humantime_serde")]
    pub lease_wait: Duration,
    /// How often a replica reads tags, links and blobs other replicas wrote into its index.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Timeout of one request to the store.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Filesystem,
            endpoint: None,
            bucket: String::new(),
            region: "us-east-1".into(),
            prefix: String::new(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
            insecure: false,
            ca_file: None,
            redirect: false,
            redirect_ttl: Duration::from_secs(300),
            redirect_endpoint: None,
            local_max_size: ByteSize(10 << 30),
            lease_ttl: Duration::from_secs(30),
            lease_wait: Duration::from_secs(600),
            sync_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(300),
        }
    }
}

impl StorageConfig {
    /// The secret key: `secret_access_key`, the file, or `AWS_SECRET_ACCESS_KEY`.
    pub fn resolved_secret(&self) -> Result<Option<Secret>, ConfigError> {
        let given = inline_or_file(
            &self.secret_access_key,
            &self.secret_access_key_file,
            "storage.secret_access_key_file",
        )?;
        Ok(given.or_else(|| std::env::var("AWS_SECRET_ACCESS_KEY").ok().map(Secret)))
    }
}

/// A credential given inline or as a file holding it (a mounted secret; the file's
/// trailing newline is not part of it); `key` names the file's key in errors.
fn inline_or_file(
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
    key: &str,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(s) = inline {
        return Ok(Some(s.clone()));
    }
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| Some(Secret(s.trim_end_matches(['\n', '\r']).to_owned())))
            .map_err(|e| ConfigError::Invalid(format!("{key} {}: {e}", path.display()))),
        None => Ok(None),
    }
}

/// What one client, or all of them together, may hold of the server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// An HTTP/1 request's head must arrive whole within this of its first byte (the wait
    /// for that byte is `idle_timeout`'s).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and none started for this long is closed
    /// (HTTP/1 keep-alive, HTTP/2, and connections that never send a request).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection with a response in flight whose client has taken no byte for this
    /// long is dropped.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog. Also held
    /// under the open-file limit, so connections cannot take every descriptor.
    pub max_connections: usize,
    /// Most bytes of a request head (HTTP/1), or of its header list (HTTP/2).
    pub max_header_bytes: ByteSize,
    /// Concurrent streams one HTTP/2 connection may open.
    pub http2_max_concurrent_streams: u32,
    /// How often an idle HTTP/2 connection is pinged, and how long the answer may take.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// Blob downloads from upstreams at once (clients joining one do not count).
    pub max_inflight_downloads: usize,
    /// Bytes that downloads in flight may hold in spool files together (a single blob
    /// larger than this may still download when it is alone); 0 is unbounded.
    pub max_spool_bytes: ByteSize,
    /// How long a request beyond those two limits waits for room before it is answered
    /// 503 with `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub download_wait: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(60),
            max_connections: 16_384,
            max_header_bytes: ByteSize(64 << 10),
            http2_max_concurrent_streams: 128,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            max_inflight_downloads: 128,
            max_spool_bytes: ByteSize(20 << 30),
            download_wait: Duration::from_secs(10),
        }
    }
}

/// The admin listener: `/metrics` and `/_wharf/*`, apart from the registry API.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// When set, `/metrics` and `/_wharf/*` are served here (plain HTTP) and no longer on
    /// `listen` (except `/_wharf/health`, which both answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// Who may pull what (downstream clients; upstream credentials are apart).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An htpasswd file of bcrypt entries (`htpasswd -B`); reloaded when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub htpasswd_file: Option<PathBuf>,
    /// The realm named in `WWW-Authenticate: Basic realm=…`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Whether clients without credentials may pull (what `rules` allow anonymous).
    /// Defaults to true when neither `htpasswd_file` nor `tls.client_ca_file` is set,
    /// false otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<bool>,
    /// `/metrics` and `/_wharf/*` (but `/_wharf/health`) need an authenticated user.
    #[serde(default)]
    pub protect_admin: bool,
    /// The token endpoint's URL as clients reach it, for the `Bearer realm=…` challenge
    /// (behind a proxy that changes the scheme or host); by default it is built from the
    /// request's `Host` and wharf's own scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_realm: Option<String>,
    /// Named sets of users, for rules.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// Per-repository rules, first match wins. A repository no rule matches may be
    /// pulled by every authenticated user, and by anonymous clients when `anonymous`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthRule>,
    /// Longest a client address is made to wait after failed authentications (the wait
    /// doubles with each failure, from 100 ms).
    #[serde(with = "humantime_serde", default = "default_failure_delay")]
    pub max_failure_delay: Duration,
}

/// Who may pull the repositories matching `repositories`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// Globs on `<upstream>/<repository>` (`docker.io/library/*`, `ghcr.io/org/**`).
    pub repositories: Vec<String>,
    /// Users allowed; `"*"` is every authenticated user.
    #[serde(default)]
    pub users: Vec<String>,
    /// Groups (from `[auth.groups]`) allowed.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Whether clients without credentials may pull these.
    #[serde(default)]
    pub anonymous: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            htpasswd_file: None,
            realm: default_realm(),
            anonymous: None,
            protect_admin: false,
            token_realm: None,
            groups: Default::default(),
            rules: Vec::new(),
            max_failure_delay: default_failure_delay(),
        }
    }
}

fn default_realm() -> String {
    "wharf".into()
}
fn default_failure_delay() -> Duration {
    Duration::from_secs(5)
}

/// The cache's lifecycle: how big it may grow and what eviction may take.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of stored blobs and manifests; 0 is unbounded.
    pub max_size: ByteSize,
    /// Free space to keep on the data dir's file system; 0 is none.
    pub min_free: ByteSize,
    /// Eviction frees down to this fraction of `max_size`, so it does not run per commit.
    pub low_watermark: f64,
    /// Nothing stored or used more recently than this is evicted or collected.
    #[serde(with = "humantime_serde")]
    pub min_age: Duration,
    /// Globs on `<upstream>/<repository>:<tag>` whose images are never evicted.
    pub pins: Vec<String>,
    /// How often eviction and garbage collection run besides when a commit crosses the cap.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Whether eviction may remove what an offline upstream's tags hold. Off: evicting
    /// what cannot be fetched again is data loss, so with every upstream offline nothing
    /// is evicted, and an offline upstream's tagged images are pinned.
    pub evict_offline: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: ByteSize(0),
            min_free: ByteSize(0),
            low_watermark: 0.9,
            min_age: Duration::from_secs(3600),
            pins: Vec::new(),
            gc_interval: Duration::from_secs(3600),
            evict_offline: false,
        }
    }
}

/// A byte count, written as a number or with a unit: `"200GiB"`, `"5 GB"`, `"512MiB"`, `1024`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = (s[..split].trim(), s[split..].trim());
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "ki" | "kib" => 1 << 10,
            "mi" | "mib" => 1 << 20,
            "gi" | "gib" => 1 << 30,
            "ti" | "tib" => 1 << 40,
            _ => return None,
        };
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(mult).map(ByteSize);
        }
        let f: f64 = num.parse().ok()?;
        (f.is_finite() && f >= 0.0 && f * (mult as f64) < u64::MAX as f64)
            .then_some(ByteSize((f * mult as f64) as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not a size (e.g. \"200GiB\", \"5GB\", 1024)"))
            }),
        }
    }
}

/// Pull analytics.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// Cap on `wharf_pulls_total` repository × tag × platform series; pulls of further
    /// series are counted as repository="other", tag="other".
    pub max_series: usize,
    /// Per-day counts older than this many days are dropped.
    pub retention_days: u32,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig { max_series: 10_000, retention_days: 400 }
    }
}

/// Where `/metrics` is served besides the main port.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A separate address for `/metrics` and `/_wharf/health` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// The server certificate, reloaded on SIGHUP or when the files change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates are checked against (mutual TLS).
    /// A verified certificate's subject common name is the client's user name; clients
    /// without a certificate connect as before and are anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// One registry wharf pulls through from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry host clients use (`docker.io`); also the first path segment of its
    /// repositories in the storage tree.
    pub name: String,
    /// Where the registry's API is (`https://registry-1.docker.io`).
    pub url: Url,
    /// User for token or Basic auth; anonymous when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or access token for `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// File holding the password (a mounted secret), read at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// How long a revalidated tag is served without asking the upstream again.
    #[serde(with = "humantime_serde", default)]
    pub tag_ttl: Duration,
    /// How long a referrers list (`/v2/<name>/referrers/<digest>`) is served without
    /// asking the upstream again. Short: signatures and attestations are added after the
    /// image is pushed.
    #[serde(with = "humantime_serde", default = "default_referrers_ttl")]
    pub referrers_ttl: Duration,
    /// Most pages of one referrers list followed upstream (each at most 4 MiB).
    #[serde(default = "default_referrers_max_pages")]
    pub referrers_max_pages: usize,
    /// Limit on establishing a connection to the upstream.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Limit on waiting for response headers from the upstream.
    #[serde(with = "humantime_serde", default = "default_response_timeout")]
    pub response_timeout: Duration,
    /// Limit on a pause between two chunks of a response body.
    #[serde(with = "humantime_serde", default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// Other host names clients use for this registry in `?ns=` (e.g. `index.docker.io`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Allows an `http://` url, and skips certificate checks for an `https://` one.
    #[serde(default)]
    pub insecure: bool,
    /// Extra CA certificates (PEM) to trust for this upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Repository globs that may be pulled (`library/*`, `org/**`); empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Repository globs that may not be pulled; checked before `allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Never open a connection to this upstream: tags resolve from the cache and misses
    /// are 404. Unset: the top-level `offline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<bool>,
}

impl UpstreamConfig {
    /// Whether wharf may not contact this upstream (after `Config::load`, always set).
    pub fn is_offline(&self) -> bool {
        self.offline.unwrap_or(false)
    }
}

fn default_referrers_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_referrers_max_pages() -> usize {
    32
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

/// A credential: never printed.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data_dir: PathBuf::from("./wharf-data"),
            shutdown_grace: Duration::from_secs(30),
            upstreams: vec![UpstreamConfig::new("docker.io", docker_hub())],
            tls: None,
            analytics: AnalyticsConfig::default(),
            metrics: MetricsConfig::default(),
            admin: AdminConfig::default(),
            cache: CacheConfig::default(),
            server: ServerConfig::default(),
            auth: AuthConfig::default(),
            offline: false,
            prefetch: Vec::new(),
            storage: StorageConfig::default(),
        }
    }
}

fn docker_hub() -> Url {
    Url::parse("https://registry-1.docker.io").expect("constant URL parses")
}

impl UpstreamConfig {
    /// An anonymous upstream with default limits.
    pub fn new(name: &str, url: Url) -> Self {
        UpstreamConfig {
            name: name.to_owned(),
            username: None,
            password: None,
            password_file: None,
            tag_ttl: Duration::ZERO,
            referrers_ttl: default_referrers_ttl(),
            referrers_max_pages: default_referrers_max_pages(),
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            idle_timeout: default_idle_timeout(),
            aliases: Vec::new(),
            insecure: url.scheme() == "http",
            ca_file: None,
            allow: Vec::new(),
            deny: Vec::new(),
            offline: None,
            url,
        }
    }

    /// Whether clients address this upstream as `host` (its name or an alias).
    pub fn answers_to(&self, host: &str) -> bool {
        self.name == host || self.aliases.iter().any(|a| a == host)
    }

    /// The password, from `password` or `password_file`.
    pub fn resolved_password(&self) -> Result<Option<Secret>, ConfigError> {
        inline_or_file(&self.password, &self.password_file, "password_file")
    }
}

/// Flags given on the command line, the last layer.
#[derive(Default, Debug, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub upstream: Option<Url>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the layers in order and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!("config file {} not found", file.display())));
            }
            fig = fig.merge(Toml::file(file));
        }
        // Only configuration keys: other WHARF_* variables (WHARF_CONFIG, a script's
        // WHARF_BIN) are not configuration and must not trip deny_unknown_fields.
        let env = Env::prefixed("WHARF_").split("__").filter(|k| {
            // After `split`, nested keys arrive as `storage.secret_access_key`.
            let top = k.as_str().split("__").next().unwrap_or("").split('.').next().unwrap_or("");
            CONFIG_KEYS.iter().any(|c| top.eq_ignore_ascii_case(c))
        });
        fig = fig.merge(env);
        let mut cfg: Config = fig.extract().map_err(Box::new)?;
        if let Some(l) = overrides.listen {
            cfg.listen = l;
        }
        if let Some(d) = &overrides.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(u) = &overrides.upstream {
            match cfg.upstreams.first_mut() {
                // An http URL typed on the command line is consent enough for plain http.
                Some(first) => {
                    first.insecure |= u.scheme() == "http";
                    first.url = u.clone();
                }
                None => cfg.upstreams.push(UpstreamConfig::new("docker.io", u.clone())),
            }
        }
        // `metrics.listen` is the old name of `admin.listen`.
        match (cfg.metrics.listen.take(), cfg.admin.listen) {
            (Some(m), Some(a)) if m != a => {
                return Err(ConfigError::Invalid(format!(
                    "metrics.listen ({m}) and admin.listen ({a}) name one listener: set admin.listen only"
                )))
            }
            (Some(m), _) => cfg.admin.listen = Some(m),
            _ => {}
        }
        for u in &mut cfg.upstreams {
            u.offline = Some(u.offline.unwrap_or(cfg.offline));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The cache policy in force: unless `cache.evict_offline`, nothing is evicted when
    /// every upstream is offline, and an offline upstream's tagged images are pinned.
    pub fn effective_cache(&self) -> CacheConfig {
        let mut c = self.cache.clone();
        if c.evict_offline {
            return c;
        }
        let offline: Vec<&UpstreamConfig> = self.upstreams.iter().filter(|u| u.is_offline()).collect();
        if !offline.is_empty() && offline.len() == self.upstreams.len() {
            c.max_size = ByteSize(0);
            c.min_free = ByteSize(0);
        } else {
            c.pins.extend(offline.iter().map(|u| format!("{}/*", u.name)));
        }
        c
    }

    /// Whether clients without credentials may pull at all.
    pub fn anonymous_allowed(&self) -> bool {
        self.auth.anonymous.unwrap_or(
            self.auth.htpasswd_file.is_none()
                && self.tls.as_ref().and_then(|t| t.client_ca_file.as_ref()).is_none(),
        )
    }

    /// Checks what serde cannot: names usable as storage paths, URL schemes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, p) in self.prefetch.iter().enumerate() {
            for image in &p.images {
                crate::prefetch::split(image)
                    .map_err(|e| ConfigError::Invalid(format!("prefetch[{i}].images {image:?}: {e}")))?;
            }
            if let Some(r) = p.refresh.filter(|r| *r < Duration::from_secs(60)) {
                return Err(ConfigError::Invalid(format!("prefetch[{i}].refresh {r:?}: at least 1m")));
            }
        }
        crate::prefetch::configured(&self.prefetch, false).map_err(ConfigError::Invalid)?;
        let st = &self.storage;
        if st.backend == StorageBackend::S3 {
            let endpoint_ok = st.endpoint.as_ref().is_none_or(|u| match u.scheme() {
                "https" => true,
                "http" => st.insecure,
                _ => false,
            });
            if !endpoint_ok {
                return Err(ConfigError::Invalid(
                    "storage.endpoint: an https:// URL (http:// only with storage.insecure = true)".into(),
                ));
            }
            if st.redirect_endpoint.as_ref().is_some_and(|u| !matches!(u.scheme(), "https" | "http")) {
                return Err(ConfigError::Invalid("storage.redirect_endpoint: an http(s):// URL".into()));
            }
            if st.bucket.is_empty() {
                return Err(ConfigError::Invalid("storage.bucket: required with backend = \"s3\"".into()));
            }
            if st.prefix.split('/').any(|c| c == ".." || c == ".") || st.prefix.starts_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "storage.prefix {:?}: a relative key prefix",
                    st.prefix
                )));
            }
            for (key, d) in [
                ("redirect_ttl", st.redirect_ttl),
                ("lease_ttl", st.lease_ttl),
                ("sync_interval", st.sync_interval),
                ("timeout", st.timeout),
            ] {
                if d.is_zero() {
                    return Err(ConfigError::Invalid(format!("storage.{key}: must be more than 0")));
                }
            }
            if st.redirect_ttl > Duration::from_secs(7 * 24 * 3600) {
                return Err(ConfigError::Invalid("storage.redirect_ttl: at most 7 days (S3's limit)".into()));
            }
            st.resolved_secret()?;
        }
        let c = &self.cache;
        if !(c.low_watermark > 0.0 && c.low_watermark <= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "cache.low_watermark {}: must be a fraction in (0, 1]",
                c.low_watermark
            )));
        }
        if c.gc_interval.is_zero() {
            return Err(ConfigError::Invalid("cache.gc_interval: must be more than 0".into()));
        }
        for g in &c.pins {
            globset::Glob::new(g)
                .map_err(|e| ConfigError::Invalid(format!("cache.pins: bad pattern {g:?}: {e}")))?;
        }
        let sv = &self.server;
        for (key, d) in [
            ("header_read_timeout", sv.header_read_timeout),
            ("idle_timeout", sv.idle_timeout),
            ("write_timeout", sv.write_timeout),
            ("http2_keepalive_interval", sv.http2_keepalive_interval),
            ("http2_keepalive_timeout", sv.http2_keepalive_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!("server.{key}: must be more than 0")));
            }
        }
        if sv.max_connections == 0 || sv.max_inflight_downloads == 0 || sv.http2_max_concurrent_streams == 0 {
            return Err(ConfigError::Invalid(
                "server.max_connections, max_inflight_downloads and http2_max_concurrent_streams must be more than 0"
                    .into(),
            ));
        }
        if sv.max_header_bytes.0 < 4096 || sv.max_header_bytes.0 > (16 << 20) {
            return Err(ConfigError::Invalid("server.max_header_bytes: must be in 4KiB..16MiB".into()));
        }
        for (i, r) in self.auth.rules.iter().enumerate() {
            if r.repositories.is_empty() {
                return Err(ConfigError::Invalid(format!("auth.rules[{i}]: repositories is empty")));
            }
            for g in &r.repositories {
                globset::Glob::new(g)
                    .map_err(|e| ConfigError::Invalid(format!("auth.rules[{i}]: bad pattern {g:?}: {e}")))?;
            }
            if let Some(g) = r.groups.iter().find(|g| !self.auth.groups.contains_key(*g)) {
                return Err(ConfigError::Invalid(format!(
                    "auth.rules[{i}]: no group {g:?} in [auth.groups]"
                )));
            }
        }
        if self.auth.protect_admin
            && self.auth.htpasswd_file.is_none()
            && self.tls.as_ref().and_then(|t| t.client_ca_file.as_ref()).is_none()
        {
            return Err(ConfigError::Invalid(
                "auth.protect_admin needs auth.htpasswd_file or tls.client_ca_file: nobody could read the metrics".into(),
            ));
        }
        if self.upstreams.is_empty() {
            return Err(ConfigError::Invalid("at least one [[upstreams]] entry is needed".into()));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if !valid_component(&u.name) {
                return Err(ConfigError::Invalid(format!(
                    "upstreams[{i}].name {:?}: must be a lowercase registry host name without a port",
                    u.name
                )));
            }
            if !matches!(u.url.scheme(), "http" | "https") || u.url.host().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "upstreams[{i}].url {}: must be http(s)://host",
                    u.url
                )));
            }
            if u.url.scheme() == "http" && !u.insecure {
                return Err(ConfigError::Invalid(format!(
                    "upstreams[{i}].url {} is plain http: set insecure = true to allow it",
                    u.url
                )));
            }
            let names = std::iter::once(&u.name).chain(&u.aliases);
            for (j, o) in self.upstreams[..i].iter().enumerate() {
                if let Some(n) = names.clone().find(|n| o.answers_to(n)) {
                    return Err(ConfigError::Invalid(format!(
                        "upstreams[{i}]: name {n:?} is already used by upstreams[{j}]"
                    )));
                }
            }
            for g in u.allow.iter().chain(&u.deny) {
                globset::Glob::new(g)
                    .map_err(|e| ConfigError::Invalid(format!("upstreams[{i}]: bad pattern {g:?}: {e}")))?;
            }
            if u.password.is_some() && u.password_file.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "upstreams[{i}]: set password or password_file, not both"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_proxy_docker_hub() {
        // Every test that loads configuration runs in a Jail: the environment is shared.
        figment::Jail::expect_with(|_| {
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.listen.port(), 5000);
            assert_eq!(c.upstreams[0].name, "docker.io");
            assert_eq!(c.upstreams[0].url.as_str(), "https://registry-1.docker.io/");
            assert_eq!(c.upstreams[0].tag_ttl, Duration::ZERO);
            Ok(())
        });
    }

    #[test]
    fn file_then_flags_layer_over_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "w.toml",
                "data_dir = \"/srv/w\"\n[[upstreams]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\ntag_ttl = \"5m\"\npassword = \"hunter2\"\n",
            )?;
            let o = Overrides { listen: Some("127.0.0.1:7000".parse().expect("addr")), ..Default::default() };
            let c = Config::load(Some(Path::new("w.toml")), &o).map_err(|e| e.to_string())?;
            assert_eq!(c.data_dir, PathBuf::from("/srv/w"));
            assert_eq!(c.listen.port(), 7000);
            assert_eq!(c.upstreams.len(), 1);
            assert_eq!(c.upstreams[0].tag_ttl, Duration::from_secs(300));
            assert!(!format!("{c:?}").contains("hunter2"), "secrets never print");
            Ok(())
        });
    }

    #[test]
    fn environment_layers_over_the_file_and_ignores_other_wharf_variables() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("w.toml", "data_dir = \"/from/file\"\nshutdown_grace = \"9s\"\n")?;
            jail.set_env("WHARF_DATA_DIR", "/from/env");
            jail.set_env("WHARF_BIN", "/usr/local/bin/wharf");
            jail.set_env("WHARF_CONFIG", "w.toml");
            let c =
                Config::load(Some(Path::new("w.toml")), &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.data_dir, PathBuf::from("/from/env"));
            assert_eq!(c.shutdown_grace, Duration::from_secs(9));
            Ok(())
        });
    }

    #[test]
    fn the_example_config_documents_the_defaults() {
        figment::Jail::expect_with(|_| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
            let example = Config::load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())?;
            let as_json = |c: &Config| serde_json::to_value(c).map_err(|e| e.to_string());
            // The defaults as loaded: each upstream's `offline` resolved from the top level.
            let defaults = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(as_json(&example)?, as_json(&defaults)?);
            Ok(())
        });
    }

    #[test]
    fn the_s3_backend_needs_a_bucket_and_an_https_endpoint_unless_insecure() {
        figment::Jail::expect_with(|jail| {
            let load = |toml: &str| -> Result<Config, String> {
                std::fs::write("s.toml", toml).map_err(|e| e.to_string())?;
                Config::load(Some(Path::new("s.toml")), &Overrides::default()).map_err(|e| e.to_string())
            };
            let _ = jail;
            let ok =
                load("[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"https://s3.example\"\n")?;
            assert_eq!(ok.storage.backend, StorageBackend::S3);
            assert_eq!(ok.storage.lease_ttl, Duration::from_secs(30));
            for (toml, says) in [
                ("[storage]\nbackend = \"s3\"\n", "storage.bucket"),
                (
                    "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://s3:8333\"\n",
                    "storage.endpoint",
                ),
                ("[storage]\nbackend = \"s3\"\nbucket = \"b\"\nprefix = \"../x\"\n", "storage.prefix"),
                ("[storage]\nbackend = \"s3\"\nbucket = \"b\"\nlease_ttl = \"0s\"\n", "storage.lease_ttl"),
                (
                    "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nredirect_endpoint = \"ftp://s3\"\n",
                    "storage.redirect_endpoint",
                ),
                ("[storage]\nbackend = \"s4\"\n", "backend"),
            ] {
                let err = load(toml).expect_err(toml);
                assert!(err.contains(says), "{toml}: {err}");
            }
            let insecure = "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://s3:8333\"\ninsecure = true\n";
            assert!(load(insecure).is_ok());
            // From the environment too, and the secret never in Debug output.
            jail.set_env("WHARF_STORAGE__SECRET_ACCESS_KEY", "hunter2");
            let c = load(insecure)?;
            assert_eq!(c.storage.secret_access_key, Some(Secret("hunter2".into())));
            assert!(!format!("{c:?}").contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(ByteSize::parse("0"), Some(ByteSize(0)));
        assert_eq!(ByteSize::parse("1024"), Some(ByteSize(1024)));
        assert_eq!(ByteSize::parse("200GiB"), Some(ByteSize(200 << 30)));
        assert_eq!(ByteSize::parse("5 GB"), Some(ByteSize(5_000_000_000)));
        assert_eq!(ByteSize::parse("1.5MiB"), Some(ByteSize(3 << 19)));
        assert_eq!(ByteSize::parse("100mib"), Some(ByteSize(100 << 20)));
        assert_eq!(ByteSize::parse("12 parsecs"), None);
        assert_eq!(ByteSize::parse("-1"), None);
        assert_eq!(ByteSize::parse("99999999999TiB"), None);
    }

    #[test]
    fn cache_keys_load_from_a_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "w.toml",
                "[cache]\nmax_size = \"100MiB\"\nmin_free = 4096\nmin_age = \"0s\"\npins = [\"docker.io/library/*:*\"]\n",
            )?;
            let c =
                Config::load(Some(Path::new("w.toml")), &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.cache.max_size, ByteSize(100 << 20));
            assert_eq!(c.cache.min_free, ByteSize(4096));
            assert_eq!(c.cache.min_age, Duration::ZERO);
            assert_eq!(c.cache.low_watermark, 0.9);
            jail.create_file("bad.toml", "[cache]\nmax_size = \"lots\"\n")?;
            assert!(Config::load(Some(Path::new("bad.toml")), &Overrides::default()).is_err());
            jail.create_file("bad2.toml", "[cache]\nlow_watermark = 1.5\n")?;
            assert!(Config::load(Some(Path::new("bad2.toml")), &Overrides::default()).is_err());
            Ok(())
        });
    }

    #[test]
    fn offline_is_inherited_and_turns_eviction_off_unless_asked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "w.toml",
                "offline = true\n[cache]\nmax_size = \"1GiB\"\n\
                 [[upstreams]]\nname = \"a.test\"\nurl = \"https://a.test\"\n\
                 [[upstreams]]\nname = \"b.test\"\nurl = \"https://b.test\"\noffline = false\n",
            )?;
            let c =
                Config::load(Some(Path::new("w.toml")), &Overrides::default()).map_err(|e| e.to_string())?;
            assert!(c.upstreams[0].is_offline() && !c.upstreams[1].is_offline());
            // One upstream offline: its tagged images are pinned, eviction stays.
            let e = c.effective_cache();
            assert_eq!((e.max_size, e.pins.clone()), (ByteSize(1 << 30), vec!["a.test/*".to_owned()]));
            // Every upstream offline: nothing is evicted, unless evict_offline.
            jail.set_env("WHARF_OFFLINE", "true");
            jail.create_file(
                "all.toml",
                "offline = true\n[cache]\nmax_size = \"1GiB\"\nmin_free = \"1GiB\"\n",
            )?;
            let mut c = Config::load(Some(Path::new("all.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let e = c.effective_cache();
            assert_eq!((e.max_size, e.min_free), (ByteSize(0), ByteSize(0)));
            c.cache.evict_offline = true;
            assert_eq!(c.effective_cache().max_size, ByteSize(1 << 30));
            Ok(())
        });
    }

    #[test]
    fn bad_upstream_names_are_refused() {
        let mut c = Config::default();
        c.upstreams[0].name = "../etc".into();
        assert!(c.validate().is_err());
    }
}
