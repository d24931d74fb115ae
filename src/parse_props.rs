//! Property tests for every parser that sees client or upstream input: arbitrary bytes and
//! strings near the grammar. None may panic, and every rejection is the right OCI error.
//! `PROPTEST_CASES` sets the cases per property (default 1,000; a long run: 1000000).

use proptest::prelude::*;

use crate::api::{parse_route, ApiError, Route};
use crate::oci::{self, Digest, Reference, RepoName, Tag};

pub(crate) fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Strings from the characters the grammar cares about, with its separators.
fn near(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9._:/%@ -]{{0,{max}}}")).expect("regex")
}

fn valid_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9]{1,8}((\\.|_|__|-+)[a-z0-9]{1,8}){0,2}(/[a-z0-9]{1,8}){0,3}")
        .expect("regex")
}

fn hex64() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[0-9a-f]{64}").expect("regex")
}

/// Whether an API error is one the distribution spec allows for a bad path.
fn is_path_error(e: &ApiError) -> bool {
    let (status, code) = e.status_and_code();
    matches!(
        (status.as_u16(), code),
        (400, "NAME_INVALID" | "DIGEST_INVALID" | "TAG_INVALID")
            | (404, "UNSUPPORTED" | "MANIFEST_UNKNOWN")
            | (405, "UNSUPPORTED")
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_path_parses_or_is_refused_with_a_path_error(path in prop_oneof![
        any::<String>(),
        near(120).prop_map(|s| format!("/v2/{s}")),
        (near(40), prop_oneof![Just("manifests"), Just("blobs"), Just("tags")], near(80))
            .prop_map(|(n, k, r)| format!("/v2/{n}/{k}/{r}")),
    ]) {
        match parse_route(&path) {
            Ok(Route::Manifest { name, .. } | Route::Blob { name, .. } | Route::TagsList { name }) => {
                prop_assert_eq!(RepoName::parse(name.as_str()), Some(name.clone()));
                prop_assert!(!name.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
            }
            Ok(_) => {}
            Err(e) => prop_assert!(is_path_error(&e), "{path:?} -> {e:?}"),
        }
    }

    #[test]
    fn a_bad_digest_under_a_good_name_is_digest_invalid(name in valid_name(), d in prop_oneof![
        proptest::string::string_regex("[a-zA-Z0-9._:%@ -]{0,80}").expect("regex"),
        proptest::string::string_regex("sha(256|512|1):[0-9a-fA-Fg]{0,130}").expect("regex"),
    ]) {
        prop_assume!(d != "uploads");
        let r = parse_route(&format!("/v2/{name}/blobs/{d}"));
        match Digest::parse(&d) {
            Some(_) => prop_assert!(matches!(r, Ok(Route::Blob { .. })), "{r:?}"),
            None => prop_assert!(matches!(r, Err(ApiError::DigestInvalid(_))), "{d:?}: {r:?}"),
        }
    }

    #[test]
    fn a_bad_name_is_name_invalid(name in near(60), hex in hex64()) {
        prop_assume!(!name.ends_with("/blobs") && !name.contains("/blobs/") && !name.starts_with("blobs/"));
        let r = parse_route(&format!("/v2/{name}/manifests/sha256:{hex}"));
        match RepoName::parse(&name) {
            Some(_) => prop_assert!(matches!(r, Ok(Route::Manifest { .. })), "{name:?}: {r:?}"),
            None if name.is_empty() => prop_assert!(r.is_err()),
            None => prop_assert!(matches!(r, Err(ApiError::NameInvalid(_)) | Err(ApiError::NotFound(_))), "{name:?}: {r:?}"),
        }
    }

    #[test]
    fn digests_round_trip_and_only_lowercase_sha256_or_sha512_parses(s in prop_oneof![
        any::<String>(),
        hex64().prop_map(|h| format!("sha256:{h}")),
        near(80),
        proptest::string::string_regex("sha(256|384|512):[0-9a-fA-F]{60,130}").expect("regex"),
    ]) {
        if let Some(d) = Digest::parse(&s) {
            prop_assert_eq!(d.to_string(), s.clone());
            let want = if s.starts_with("sha256:") { 64 } else { 128 };
            prop_assert!(s.starts_with("sha256:") || s.starts_with("sha512:"));
            prop_assert!(d.hex().len() == want && d.hex().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            prop_assert_eq!(Digest::from_hex(d.hex()), Some(d.clone()));
        }
    }

    #[test]
    fn names_tags_and_references_hold_their_grammar(s in prop_oneof![any::<String>(), near(140), valid_name()]) {
        if let Some(n) = RepoName::parse(&s) {
            prop_assert!(n.as_str().len() <= 255 && n.as_str().split('/').all(oci::valid_component));
        }
        if let Some(t) = Tag::parse(&s) {
            let b = t.as_str().as_bytes();
            prop_assert!(!b.is_empty() && b.len() <= 128 && b[0] != b'.' && b[0] != b'-');
            prop_assert!(b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c)));
        }
        match Reference::parse(&s) {
            Some(Reference::Tag(t)) => prop_assert_eq!(Tag::parse(&s), Some(t)),
            Some(Reference::Digest(d)) => prop_assert_eq!(Digest::parse(&s), Some(d)),
            None => prop_assert!(Tag::parse(&s).is_none() && Digest::parse(&s).is_none()),
        }
    }

    #[test]
    fn manifest_readers_take_any_bytes(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        json_manifest().prop_map(|v| v.to_string().into_bytes()),
    ]) {
        let _ = oci::manifest_media_type(&bytes);
        let (configs, layers) = oci::references(&bytes);
        for d in configs.iter().chain(&layers) {
            prop_assert_eq!(Digest::parse(&d.to_string()), Some(d.clone()));
        }
        let _ = oci::default_platform_child(&bytes);
    }

    #[test]
    fn basic_credentials_and_htpasswd_take_any_input(h in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        (near(20), near(20)).prop_map(|(u, p)| {
            use base64::Engine as _;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))).into_bytes()
        }),
    ], text in any::<String>()) {
        if let Some((u, _)) = crate::auth::parse_basic(&h) {
            prop_assert!(!u.is_empty() && !u.contains(':'));
        }
        let _ = crate::auth::parse_htpasswd(&text);
    }

    #[test]
    fn sizes_parse_without_overflow(s in prop_oneof![any::<String>(), proptest::string::string_regex("[0-9.]{1,30} ?[kKmMgGtTiIbB]{0,3}").expect("regex")]) {
        let _ = crate::config::ByteSize::parse(&s);
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        near(30).prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("mediaType".to_owned()),
                    Just("manifests".to_owned()),
                    Just("layers".to_owned()),
                    Just("config".to_owned()),
                    Just("digest".to_owned()),
                    Just("platform".to_owned()),
                    near(10)
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Manifests and indexes whose fields hold the wrong types or odd values.
fn json_manifest() -> impl Strategy<Value = serde_json::Value> {
    let digest = prop_oneof![hex64().prop_map(|h| format!("sha256:{h}")), near(70)];
    let descriptor = (digest, json_value(), near(12), near(12)).prop_map(|(d, size, os, arch)| {
        serde_json::json!({"digest": d, "size": size, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "platform": {"os": os, "architecture": arch}})
    });
    (
        prop_oneof![
            Just(oci::OCI_INDEX),
            Just(oci::OCI_MANIFEST),
            Just(oci::DOCKER_LIST),
            Just(oci::DOCKER_MANIFEST),
            Just("text/html")
        ],
        proptest::collection::vec(descriptor, 0..5),
        json_value(),
    )
        .prop_map(|(mt, ds, extra)| {
            serde_json::json!({"schemaVersion": 2, "mediaType": mt, "manifests": ds.clone(), "layers": ds,
                "config": extra})
        })
}
