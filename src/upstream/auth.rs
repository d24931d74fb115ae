//! Upstream authentication: `WWW-Authenticate` challenges, Bearer tokens cached per
//! repository until they expire, and Basic auth with configured credentials.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Secret;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Basic,
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| params.iter().find(|(pk, _)| pk.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
    Some(Challenge::Bearer { realm: get("realm")?, service: get("service"), scope: get("scope") })
}

/// `k=v` and `k="v, with commas"` pairs separated by commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                val.push(*c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), val.trim().to_owned()));
    }
}

/// How one request authenticates.
#[derive(Debug, Clone)]
pub enum Credential {
    Bearer(Secret),
    /// The configured username and password.
    Basic,
}

/// A token and when to stop using it.
struct Cached {
    value: Secret,
    until: Instant,
}

/// Credentials and the tokens they earned.
pub struct Auth {
    username: Option<String>,
    password: Option<Secret>,
    /// Bearer tokens by repository (a token's scope is one repository's pull).
    tokens: Mutex<HashMap<String, Cached>>,
    /// Set once the upstream asked for Basic auth: send it up front from then on.
    basic: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// What a token endpoint answers.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl Auth {
    pub fn new(username: Option<String>, password: Option<Secret>) -> Auth {
        Auth { username, password, tokens: Mutex::new(HashMap::new()), basic: false.into() }
    }

    pub fn credentials(&self) -> Option<(&str, &str)> {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some((u.as_str(), p.0.as_str())),
            _ => None,
        }
    }

    /// What to authenticate a request for `repo` with, if anything is known.
    pub fn credential_for(&self, repo: &str) -> Option<Credential> {
        if let Ok(tokens) = self.tokens.lock() {
            if let Some(t) = tokens.get(repo) {
                if Instant::now() < t.until {
                    return Some(Credential::Bearer(t.value.clone()));
                }
            }
        }
        if self.basic.load(std::sync::atomic::Ordering::Relaxed) && self.credentials().is_some() {
            return Some(Credential::Basic);
        }
        None
    }

    /// The upstream asked for Basic auth: send it from now on (when credentials exist).
    pub fn use_basic(&self) -> Option<Credential> {
        self.credentials()?;
        self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
        Some(Credential::Basic)
    }

    /// Keeps a token for `repo`; tokens are retired a little before they expire.
    pub fn store_token(&self, repo: &str, t: TokenResponse) -> Option<Credential> {
        let value = t.token.or(t.access_token)?;
        // Held to a day: an upstream's `expires_in` is not trusted to be sane.
        let ttl = Duration::from_secs(t.expires_in.unwrap_or(60).clamp(1, 86_400));
        let until = Instant::now() + ttl.mul_f64(0.9);
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.retain(|_, c| Instant::now() < c.until);
            tokens.insert(repo.to_owned(), Cached { value: Secret(value.clone()), until });
        }
        Some(Credential::Bearer(Secret(value)))
    }

    /// Forgets `repo`'s token (the upstream refused it).
    pub fn forget(&self, repo: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.remove(repo);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge_parses() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn credentials_never_print() {
        let a = Auth::new(Some("Aladdin".into()), Some(Secret("open sesame".into())));
        assert!(matches!(a.use_basic(), Some(Credential::Basic)));
        assert!(!format!("{a:?}").contains("sesame"));
        let t = a.store_token(
            "r",
            TokenResponse { token: Some("tok-123".into()), access_token: None, expires_in: None },
        );
        assert!(!format!("{t:?}").contains("tok-123"));
    }

    proptest::proptest! {
        #![proptest_config(crate::parse_props::config())]

        #[test]
        fn any_challenge_header_parses_or_is_none(h in proptest::prop_oneof![
            proptest::prelude::any::<String>(),
            proptest::string::string_regex("(Bearer|Basic|bearer|Digest) ?([a-z]{1,8}=(\"[^\"]{0,20}\"?|[a-z:/.,]{0,20}),?){0,4}").expect("regex"),
        ]) {
            if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(&h) {
                proptest::prop_assert!(h.to_ascii_lowercase().contains("realm"), "{h:?} -> {realm:?}");
            }
        }

        #[test]
        fn a_quoted_realm_comes_back_whole(realm in "[a-zA-Z0-9:/._, =-]{1,40}", service in "[a-z.]{1,20}") {
            let h = format!("Bearer realm=\"{realm}\",service=\"{service}\",scope=\"repository:a/b:pull\"");
            proptest::prop_assert_eq!(
                parse_challenge(&h),
                Some(Challenge::Bearer { realm: realm.trim().to_owned(), service: Some(service), scope: Some("repository:a/b:pull".into()) })
            );
        }

        #[test]
        fn any_token_response_is_taken_or_refused_without_panicking(
            body in proptest::prop_oneof![
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                proptest::strategy::Strategy::prop_map((proptest::option::of("[ -~]{0,40}"), proptest::prelude::any::<Option<u64>>()),
                    |(t, e)| serde_json::json!({"token": t, "expires_in": e}).to_string().into_bytes()),
            ]
        ) {
            if let Ok(t) = serde_json::from_slice::<TokenResponse>(&body) {
                let a = Auth::new(None, None);
                let _ = a.store_token("r", t);
            }
        }
    }
}
