//! Downstream access control: who a request is (HTTP Basic against an htpasswd file of
//! bcrypt entries, a bearer token this module issued, or a verified client certificate),
//! and what that identity may pull (per-repository rules). Upstream credentials live in
//! [`crate::upstream`] and never meet these.
//!
//! Why a token endpoint: registry clients send credentials only after a challenge, and
//! a Basic challenge on `/v2/` shuts out every client without credentials (the docker
//! daemon never has any for a mirror), so anonymous rules could not be used. A Bearer
//! challenge lets each client fetch a token from `/_wharf/token`, with its credentials
//! when it has them and anonymously when it does not, as with Docker Hub or Harbor. The
//! token only names the identity (HMAC-signed, short-lived); what it may pull is decided
//! per request by the rules. Basic credentials are accepted directly on every request
//! too (containerd's static `hosts.toml` header, curl).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use globset::{Glob, GlobSet, GlobSetBuilder};
use http::{header, HeaderMap};
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::metrics::Metrics;

/// Verified credentials remembered, so a hit costs a hash lookup instead of a bcrypt.
const VERIFIED_MAX: usize = 10_000;
/// Client addresses whose failures are remembered for the slowdown.
const FAILURES_MAX: usize = 10_000;
/// A client's failures are forgotten after this long without one.
const FAILURES_FORGET: Duration = Duration::from_secs(600);
/// How often the htpasswd file is checked for changes (on use, at most this often).
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// How long an issued token is good for.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);
/// The first failure's delay; each further one doubles it up to `auth.max_failure_delay`.
const FIRST_DELAY: Duration = Duration::from_millis(100);

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(Arc<str>),
}

impl Identity {
    pub fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "anonymous",
            Identity::User(u) => u,
        }
    }
}

/// Why a request's credentials were not accepted (never holds the secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed Authorization header (HTTP Basic is accepted)")]
    Malformed,
    #[error("unknown user or wrong password")]
    UnknownUser,
    #[error("unknown user or wrong password")]
    BadPassword,
    #[error("invalid or expired token")]
    BadToken,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed",
            AuthError::UnknownUser => "unknown_user",
            AuthError::BadPassword => "bad_password",
            AuthError::BadToken => "bad_token",
        }
    }
}

/// What a rule check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// Anonymous and not allowed: the client should authenticate (401).
    NeedsCredentials,
    /// Authenticated and not allowed (403).
    Forbidden,
}

struct Rule {
    repositories: GlobSet,
    users: HashSet<String>,
    any_user: bool,
    anonymous: bool,
}

/// The htpasswd file as last loaded.
struct Htpasswd {
    users: HashMap<String, String>,
    /// Compared against when the user is unknown, at the file's own cost, so an unknown
    /// user takes as long as a wrong password (no user enumeration by timing).
    dummy: String,
    stamp: Option<(SystemTime, u64)>,
}

pub struct Auth {
    htpasswd_file: Option<PathBuf>,
    pub realm: String,
    anonymous: bool,
    /// Whether `/v2/` answers anonymous clients (some rule lets them pull something).
    anonymous_probe: bool,
    pub protect_admin: bool,
    rules: Vec<Rule>,
    max_delay: Duration,
    htpasswd: RwLock<Arc<Htpasswd>>,
    /// When the htpasswd file is next checked for a change, in ms since `epoch`: a
    /// request reads an atomic, and only one a second looks at the file.
    next_check: AtomicU64,
    epoch: Instant,
    /// sha256(user, password) of credentials bcrypt accepted, with the user; emptied
    /// when the file changes.
    verified: RwLock<HashMap<[u8; 32], Arc<str>>>,
    /// bcrypt checks in flight, by the same key: a herd presenting one credential costs
    /// one bcrypt, not one each.
    checking: Mutex<HashMap<[u8; 32], Arc<tokio::sync::OnceCell<bool>>>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Entries in `failures`, so a success skips its lock when nobody is failing.
    failing: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Signs tokens; random per process, so a restart invalidates them (clients fetch a
    /// new one on the 401).
    token_key: [u8; 32],
    /// Whether requests are challenged at all (some identity is not let in).
    pub enforced: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("htpasswd_file", &self.htpasswd_file).finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Auth, String> {
        let a = &config.auth;
        let mut rules = Vec::new();
        for r in &a.rules {
            let mut set = GlobSetBuilder::new();
            for g in &r.repositories {
                set.add(Glob::new(g).map_err(|e| format!("auth.rules: {g:?}: {e}"))?);
            }
            let mut users: HashSet<String> = r.users.iter().filter(|u| *u != "*").cloned().collect();
            for g in &r.groups {
                users.extend(a.groups.get(g).into_iter().flatten().cloned());
            }
            rules.push(Rule {
                repositories: set.build().map_err(|e| format!("auth.rules: {e}"))?,
                users,
                any_user: r.users.iter().any(|u| u == "*"),
                anonymous: r.anonymous,
            });
        }
        let anonymous = config.anonymous_allowed();
        let htpasswd = match &a.htpasswd_file {
            Some(p) => load(p)?,
            None => Htpasswd { users: HashMap::new(), dummy: String::new(), stamp: None },
        };
        let mut token_key = [0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(|e| e.to_string())?,
            &mut token_key,
        )
        .map_err(|e| format!("reading a token key from /dev/urandom: {e}"))?;
        let enforced = !anonymous || rules.iter().any(|r| !r.anonymous);
        Ok(Auth {
            token_key,
            enforced,
            htpasswd_file: a.htpasswd_file.clone(),
            realm: a.realm.clone(),
            anonymous_probe: anonymous || rules.iter().any(|r| r.anonymous),
            anonymous,
            protect_admin: a.protect_admin,
            rules,
            max_delay: a.max_failure_delay,
            htpasswd: RwLock::new(Arc::new(htpasswd)),
            next_check: AtomicU64::new(RELOAD_CHECK.as_millis() as u64),
            epoch: Instant::now(),
            verified: RwLock::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            failing: AtomicUsize::new(0),
            metrics,
        })
    }

    /// Who sent `headers`: a bearer token's identity, or the Basic credentials when
    /// htpasswd is configured, else the client certificate's user, else anonymous.
    /// Basic credentials sent to a mirror without htpasswd are ignored (clients send what
    /// `docker login` saved). An anonymous token on a connection with a client
    /// certificate is the certificate's user.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        cert_user: Option<&Arc<str>>,
    ) -> Result<Identity, AuthError> {
        let by_cert = || cert_user.map_or(Identity::Anonymous, |u| Identity::User(u.clone()));
        let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(by_cert()) };
        let value = value.as_bytes();
        if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
            return match self.verify_token(&value[7..]) {
                Ok(Identity::Anonymous) => Ok(by_cert()),
                Ok(user) => Ok(user),
                // A mirror that lets everyone in ignores tokens it did not issue, as it
                // ignores Basic credentials (a node may send a header meant for another).
                Err(_) if !self.enforced => Ok(by_cert()),
                Err(e) => Err(e),
            };
        }
        if self.htpasswd_file.is_none() {
            return Ok(by_cert());
        }
        let (user, password) = parse_basic(value).ok_or(AuthError::Malformed)?;
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(user.as_bytes());
            h.update([0]);
            h.update(password.as_bytes());
            h.finalize().into()
        };
        let file = self.current();
        if let Some(u) = read(&self.verified).get(&key) {
            return Ok(Identity::User(u.clone()));
        }
        let (hash, known) = match file.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => (file.dummy.clone(), false),
        };
        let cell = lock(&self.checking).entry(key).or_default().clone();
        let ok = *cell
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                    .await
                    .unwrap_or(false)
            })
            .await;
        {
            let mut c = lock(&self.checking);
            if c.get(&key).is_some_and(|x| Arc::ptr_eq(x, &cell)) {
                c.remove(&key);
            }
        }
        match (known, ok) {
            (true, true) => {
                let user: Arc<str> = Arc::from(user);
                let mut v = write(&self.verified);
                // Only verified credentials of the file in force are remembered.
                if Arc::ptr_eq(&file, &read(&self.htpasswd)) {
                    if v.len() >= VERIFIED_MAX {
                        v.clear();
                    }
                    v.insert(key, user.clone());
                }
                Ok(Identity::User(user))
            }
            (false, _) => Err(AuthError::UnknownUser),
            (true, false) => Err(AuthError::BadPassword),
        }
    }

    /// A token naming `id`, good for [`TOKEN_TTL`]:
    /// `base64url(user-or-empty \n expiry-unix-seconds) . base64url(hmac-sha256)`.
    pub fn issue_token(&self, id: &Identity) -> String {
        let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default() + TOKEN_TTL;
        let user = match id {
            Identity::Anonymous => "",
            Identity::User(u) => u,
        };
        let payload = format!("{user}\n{}", exp.as_secs());
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}", b64.encode(&payload), b64.encode(self.sign(payload.as_bytes())))
    }

    fn sign(&self, payload: &[u8]) -> [u8; 32] {
        use hmac::Mac as _;
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(&self.token_key).expect("HMAC takes any key length");
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    fn verify_token(&self, token: &[u8]) -> Result<Identity, AuthError> {
        use hmac::Mac as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = std::str::from_utf8(token).map_err(|_| AuthError::BadToken)?.trim();
        let (payload, sig) = token.split_once('.').ok_or(AuthError::BadToken)?;
        let payload = b64.decode(payload).map_err(|_| AuthError::BadToken)?;
        let sig = b64.decode(sig).map_err(|_| AuthError::BadToken)?;
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(&self.token_key).expect("HMAC takes any key length");
        mac.update(&payload);
        mac.verify_slice(&sig).map_err(|_| AuthError::BadToken)?;
        let text = String::from_utf8(payload).map_err(|_| AuthError::BadToken)?;
        let (user, exp) = text.rsplit_once('\n').ok_or(AuthError::BadToken)?;
        let exp: u64 = exp.parse().map_err(|_| AuthError::BadToken)?;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        if now >= exp {
            return Err(AuthError::BadToken);
        }
        Ok(if user.is_empty() { Identity::Anonymous } else { Identity::User(Arc::from(user)) })
    }

    /// Whether `id` may pull `<upstream>/<repository>`: the first rule that matches
    /// decides; without one, users may and anonymous clients may when `anonymous`.
    pub fn may_pull(&self, id: &Identity, upstream: &str, repository: &str) -> Access {
        let path = format!("{upstream}/{repository}");
        let rule = self.rules.iter().find(|r| r.repositories.is_match(&path));
        let allowed = match (rule, id) {
            (None, Identity::Anonymous) => self.anonymous,
            (None, Identity::User(_)) => true,
            (Some(r), Identity::Anonymous) => r.anonymous,
            (Some(r), Identity::User(u)) => r.any_user || r.anonymous || r.users.contains(&**u),
        };
        match (allowed, id) {
            (true, _) => Access::Allowed,
            (false, Identity::Anonymous) => Access::NeedsCredentials,
            (false, Identity::User(_)) => Access::Forbidden,
        }
    }

    /// Whether `/v2/` answers `id` (clients probe it before anything else).
    pub fn may_probe(&self, id: &Identity) -> bool {
        matches!(id, Identity::User(_)) || self.anonymous_probe
    }

    /// Whether `id` may read `/metrics` and `/_wharf/*`.
    pub fn may_admin(&self, id: &Identity) -> bool {
        !self.protect_admin || matches!(id, Identity::User(_))
    }

    /// Counts a refusal; failed credentials (not a rule's refusal) also slow the client
    /// address down: each failure doubles its wait, up to `auth.max_failure_delay`.
    pub async fn failed(&self, client: IpAddr, reason: &'static str, credentials: bool) {
        self.metrics.auth_failures.with_label_values(&[reason]).inc();
        tracing::info!(%client, reason, "authentication failed");
        if !credentials {
            return;
        }
        let delay = {
            let mut f = lock(&self.failures);
            if f.len() >= FAILURES_MAX {
                f.retain(|_, (_, at)| at.elapsed() < FAILURES_FORGET);
                if f.len() >= FAILURES_MAX {
                    f.clear();
                }
            }
            let len = f.len() + usize::from(!f.contains_key(&client));
            self.failing.store(len, Ordering::Relaxed);
            let e = f.entry(client).or_insert((0, Instant::now()));
            if e.1.elapsed() >= FAILURES_FORGET {
                e.0 = 0;
            }
            e.0 = e.0.saturating_add(1);
            e.1 = Instant::now();
            FIRST_DELAY.saturating_mul(1 << (e.0 - 1).min(16)).min(self.max_delay)
        };
        tokio::time::sleep(delay).await;
    }

    /// Counts a refusal that is not a failed authentication (a rule said no).
    pub fn refused(&self, reason: &'static str) {
        self.metrics.auth_failures.with_label_values(&[reason]).inc();
    }

    /// A client that authenticated is no longer slowed down.
    pub fn succeeded(&self, client: IpAddr) {
        if self.failing.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut f = lock(&self.failures);
        f.remove(&client);
        self.failing.store(f.len(), Ordering::Relaxed);
    }

    /// The htpasswd file in force, reloaded when it changed (looked at at most once a
    /// second). A file that no longer loads leaves the previous one in force.
    fn current(&self) -> Arc<Htpasswd> {
        let cur = read(&self.htpasswd).clone();
        let Some(path) = &self.htpasswd_file else { return cur };
        let now = self.epoch.elapsed().as_millis() as u64;
        let due = self.next_check.load(Ordering::Relaxed);
        // One request a second wins the check; the others use the file in force.
        if now < due
            || self
                .next_check
                .compare_exchange(
                    due,
                    now + RELOAD_CHECK.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return cur;
        }
        let stamp_now = stamp(path);
        if stamp_now == cur.stamp {
            return cur;
        }
        match load(path) {
            Ok(h) => {
                tracing::info!(file = %path.display(), users = h.users.len(), "htpasswd reloaded");
                let h = Arc::new(h);
                *write(&self.htpasswd) = h.clone();
                write(&self.verified).clear();
                h
            }
            Err(e) => {
                tracing::error!(error = %e, "htpasswd not reloaded; keeping the previous one");
                // Not tried again until the file changes again.
                let kept = Arc::new(Htpasswd { stamp: stamp_now, ..clone_of(&cur) });
                *write(&self.htpasswd) = kept.clone();
                kept
            }
        }
    }
}

fn clone_of(h: &Htpasswd) -> Htpasswd {
    Htpasswd { users: h.users.clone(), dummy: h.dummy.clone(), stamp: h.stamp }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reads an htpasswd file: `user:hash` lines, bcrypt hashes only (`$2a$`, `$2b$`, `$2y$`).
/// Other hash kinds (MD5 `$apr1$`, SHA1, crypt) are refused with the line number.
fn load(path: &std::path::Path) -> Result<Htpasswd, String> {
    let st = stamp(path);
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("auth.htpasswd_file {}: {e}", path.display()))?;
    let users = parse_htpasswd(&text).map_err(|e| format!("auth.htpasswd_file {}: {e}", path.display()))?;
    let cost = users.values().next().and_then(|h| h.get(4..6)).and_then(|c| c.parse().ok()).unwrap_or(10);
    let dummy = bcrypt::hash("not a password", cost).map_err(|e| e.to_string())?;
    Ok(Htpasswd { users, dummy, stamp: st })
}

pub fn parse_htpasswd(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("line {}: not user:hash", i + 1));
        };
        if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            return Err(format!("line {} ({user}): only bcrypt hashes are accepted (htpasswd -B)", i + 1));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

/// `Basic base64(user:password)`, the scheme case-insensitive.
pub fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthRule;

    fn auth_with(rules: Vec<AuthRule>, anonymous: Option<bool>) -> Auth {
        let mut c = Config::default();
        c.auth.rules = rules;
        c.auth.anonymous = anonymous;
        c.auth.groups.insert("ops".into(), vec!["carol".into()]);
        Auth::new(&c, Arc::new(Metrics::new())).expect("auth")
    }

    fn rule(glob: &str, users: &[&str], groups: &[&str], anonymous: bool) -> AuthRule {
        AuthRule {
            repositories: vec![glob.into()],
            users: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            anonymous,
        }
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let a = auth_with(
            vec![
                rule("ghcr.io/org/**", &["alice"], &["ops"], false),
                rule("docker.io/library/*", &[], &[], true),
            ],
            Some(false),
        );
        let alice = Identity::User("alice".into());
        let (bob, carol) = (Identity::User("bob".into()), Identity::User("carol".into()));
        assert_eq!(a.may_pull(&alice, "ghcr.io", "org/app"), Access::Allowed);
        assert_eq!(a.may_pull(&carol, "ghcr.io", "org/team/app"), Access::Allowed, "by group");
        assert_eq!(a.may_pull(&bob, "ghcr.io", "org/app"), Access::Forbidden);
        assert_eq!(a.may_pull(&Identity::Anonymous, "ghcr.io", "org/app"), Access::NeedsCredentials);
        assert_eq!(a.may_pull(&Identity::Anonymous, "docker.io", "library/alpine"), Access::Allowed);
        assert_eq!(a.may_pull(&Identity::Anonymous, "docker.io", "other/x"), Access::NeedsCredentials);
        assert_eq!(a.may_pull(&bob, "docker.io", "other/x"), Access::Allowed, "no rule: users may");
        assert!(a.may_probe(&Identity::Anonymous), "a rule lets anonymous clients pull something");
        let closed = auth_with(vec![], Some(false));
        assert!(!closed.may_probe(&Identity::Anonymous));
        assert!(closed.may_probe(&bob));
    }

    #[test]
    fn basic_credentials_parse_and_junk_does_not() {
        assert_eq!(parse_basic(b"Basic YWxpY2U6czNjcjN0"), Some(("alice".into(), "s3cr3t".into())));
        assert_eq!(parse_basic(b"basic YWxpY2U6OmE="), Some(("alice".into(), ":a".into())));
        for junk in [&b"Bearer abc"[..], b"Basic", b"Basic !!!", b"Basic OnBhc3M=", b"\xff\xfe", b""] {
            assert_eq!(parse_basic(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn only_bcrypt_entries_are_accepted() {
        assert!(parse_htpasswd(
            "alice:$2y$05$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234\n# c\n\n"
        )
        .is_ok());
        assert!(parse_htpasswd("bob:$apr1$xyz$abc").is_err());
        assert!(parse_htpasswd("carol:{SHA}abc").is_err());
        assert!(parse_htpasswd("no colon").is_err());
    }

    #[test]
    fn tokens_carry_their_identity_and_nothing_else_verifies() {
        let a = auth_with(vec![], None);
        let alice = Identity::User("alice".into());
        let t = a.issue_token(&alice);
        assert_eq!(a.verify_token(t.as_bytes()), Ok(alice));
        assert_eq!(a.verify_token(a.issue_token(&Identity::Anonymous).as_bytes()), Ok(Identity::Anonymous));
        let (payload, sig) = t.split_once('.').expect("two parts");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = format!("{}.{sig}", b64.encode("mallory\n99999999999"));
        assert_eq!(a.verify_token(forged.as_bytes()), Err(AuthError::BadToken));
        let other = auth_with(vec![], None);
        assert_eq!(other.verify_token(t.as_bytes()), Err(AuthError::BadToken), "another key");
        for junk in ["", ".", "abc", &format!("{payload}."), &format!("{payload}.{payload}")] {
            assert_eq!(a.verify_token(junk.as_bytes()), Err(AuthError::BadToken), "{junk:?}");
        }
        let expired = "\n1";
        let t = format!("{}.{}", b64.encode(expired), b64.encode(a.sign(expired.as_bytes())));
        assert_eq!(a.verify_token(t.as_bytes()), Err(AuthError::BadToken), "expired");
    }

    #[tokio::test]
    async fn verified_credentials_are_remembered_until_the_file_changes() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("s3cr3t", 4).expect("hash");
        std::fs::write(&path, format!("alice:{hash}\n")).expect("write");
        let mut c = Config::default();
        c.auth.htpasswd_file = Some(path.clone());
        let a = Auth::new(&c, Arc::new(Metrics::new())).expect("auth");
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, http::HeaderValue::from_static("Basic YWxpY2U6czNjcjN0"));
        assert_eq!(a.identify(&h, None).await, Ok(Identity::User("alice".into())));
        assert_eq!(read(&a.verified).len(), 1);
        h.insert(header::AUTHORIZATION, http::HeaderValue::from_static("Basic YWxpY2U6d3Jvbmc="));
        assert_eq!(a.identify(&h, None).await, Err(AuthError::BadPassword));
        h.insert(header::AUTHORIZATION, http::HeaderValue::from_static("Basic Ym9iOnM="));
        assert_eq!(a.identify(&h, None).await, Err(AuthError::UnknownUser));
        assert_eq!(a.identify(&HeaderMap::new(), None).await, Ok(Identity::Anonymous));
        assert!(!Config::default().anonymous_allowed() || c.auth.htpasswd_file.is_some());
        assert!(!c.anonymous_allowed(), "htpasswd turns anonymous pulls off by default");
    }
}
