//! The OCI distribution grammar: digests, repository names, tags and references.
//!
//! These newtypes are built only by their parsers, so a value that exists is valid,
//! and every path on disk is built from them alone (no traversal can reach a path).

use std::fmt;

use sha2::{Digest as _, Sha256, Sha512};

/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest (schema 2) media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 1 (signed) manifest media type, only recognised, never converted.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What wharf asks the upstream for, in order of preference.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.artifact.manifest.v1+json";

/// Manifests larger than this are refused (the limit distribution applies too).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Longest repository name accepted (with the upstream prefix, clients limit it to 255).
const MAX_NAME_LEN: usize = 255;

/// A digest algorithm the image-spec registers: sha256 (what everything uses) and sha512.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The name in a digest string and in the storage tree (`blobs/<name>/…`).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Hex characters of an encoded digest.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];
}

/// A validated `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>` digest. Other
/// algorithms are refused.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// A running hash in a digest's algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(a: Algorithm) -> Hasher {
        match a {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest { algorithm: Algorithm::Sha256, hex: hex::encode(h.finalize()) },
            Hasher::Sha512(h) => Digest { algorithm: Algorithm::Sha512, hex: hex::encode(h.finalize()) },
        }
    }
}

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Digest {
    /// Parses `sha256:<hex>` or `sha512:<hex>`.
    pub fn parse(s: &str) -> Option<Digest> {
        let (alg, hex) = s.split_once(':')?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return None,
        };
        (hex.len() == algorithm.hex_len() && lower_hex(hex))
            .then(|| Digest { algorithm, hex: hex.to_owned() })
    }

    /// A digest from its hex alone, as the index and the tree name them: the length tells
    /// the algorithm (64 for sha256, 128 for sha512).
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let algorithm = Algorithm::ALL.into_iter().find(|a| a.hex_len() == hex.len())?;
        lower_hex(hex).then(|| Digest { algorithm, hex: hex.to_owned() })
    }

    /// The sha256 digest of `bytes` (what a tag's manifest is named by).
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::of_with(Algorithm::Sha256, bytes)
    }

    /// The digest of `bytes` in algorithm `a`.
    pub fn of_with(a: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(a);
        h.update(bytes);
        h.finish()
    }

    /// Whether `bytes` are what this digest names.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        Digest::of_with(self.algorithm, bytes) == *self
    }

    /// A hasher in this digest's algorithm, to verify bytes as they stream.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex characters (64 or 128).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The referrers tag schema's tag for this digest: `<alg>-<hex>`, the hex cut to 64
    /// characters so a sha512 tag stays within the 128-character tag limit.
    pub fn fallback_tag(&self) -> Tag {
        Tag(format!("{}-{}", self.algorithm.as_str(), &self.hex[..64]))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A repository name as the OCI grammar defines it:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// Parses a repository name.
    pub fn parse(s: &str) -> Option<RepoName> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return None;
        }
        Some(RepoName(s.to_owned()))
    }

    /// The name as clients and the upstream spell it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One path component: alphanumeric runs joined by `.`, `_`, `__` or any number of `-`.
pub fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// Parses a tag.
    pub fn parse(s: &str) -> Option<Tag> {
        let b = s.as_bytes();
        let first = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        let rest = |x: u8| first(x) || x == b'.' || x == b'-';
        if b.is_empty() || b.len() > 128 || !first(b[0]) || !b[1..].iter().all(|&x| rest(x)) {
            return None;
        }
        Some(Tag(s.to_owned()))
    }

    /// The tag as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The `<reference>` of a manifest request: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// Parses a reference: anything with a `:` must be a digest, the rest a tag.
    pub fn parse(s: &str) -> Option<Reference> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// The media type a manifest declares, or the one its shape implies when it declares none
/// (OCI makes `mediaType` optional). Used when the upstream's `Content-Type` is missing or
/// generic, and by `reindex`, which has only the bytes.
pub fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return Some(mt.to_owned());
    }
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Some(DOCKER_SCHEMA1_SIGNED.to_owned());
    }
    if v.get("manifests").is_some() {
        return Some(OCI_INDEX.to_owned());
    }
    if v.get("config").is_some() || v.get("layers").is_some() {
        return Some(OCI_MANIFEST.to_owned());
    }
    None
}

/// The media type a manifest is stored and served with: the upstream's `Content-Type` when
/// it names a specific type (any, known to wharf or not: artifacts bring their own), else
/// the one the bytes declare or imply. `None` for a generic or missing type on bytes that
/// are no manifest (an HTML error page with 200, a proxy's JSON).
pub fn stored_media_type(content_type: Option<&str>, bytes: &[u8]) -> Option<String> {
    let specific = content_type.filter(|ct| {
        let generic = ct.starts_with("text/")
            || matches!(*ct, "application/json" | "application/octet-stream" | "binary/octet-stream" | "*/*");
        let well_formed = ct.split_once('/').is_some_and(|(t, s)| !t.is_empty() && !s.is_empty())
            && ct.bytes().all(|b| b.is_ascii_graphic() && b != b',' && b != b';');
        !generic && well_formed
    });
    match specific {
        Some(ct) => Some(ct.to_owned()),
        None => manifest_media_type(bytes),
    }
}

/// Whether a media type is an index (a list of per-platform manifests).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// What a manifest refers to: (child manifests of an index, blobs: config, layers and an
/// artifact's blobs). The `subject` is not among them: a referrer depends on its subject's
/// existence, not the other way round.
pub fn references(manifest: &[u8]) -> (Vec<Digest>, Vec<Digest>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(manifest) else {
        return (Vec::new(), Vec::new());
    };
    let digests = |field: &str| -> Vec<Digest> {
        v.get(field)
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter_map(|e| Digest::parse(e.get("digest")?.as_str()?))
            .collect()
    };
    let mut blobs = digests("layers");
    blobs.extend(digests("blobs"));
    blobs.extend(v.get("config").and_then(|c| Digest::parse(c.get("digest")?.as_str()?)));
    // Docker schema 1 names its layers in fsLayers[].blobSum.
    blobs.extend(
        v.get("fsLayers")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter_map(|e| Digest::parse(e.get("blobSum")?.as_str()?)),
    );
    (digests("manifests"), blobs)
}

/// Media type of the empty JSON object an artifact without a config names as its config.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// When a manifest refers to another (it has a `subject`): that subject's digest and the
/// descriptor a referrers list gives this manifest (its media type, digest and size, its
/// `artifactType`, or its config's media type when it declares none, as the
/// distribution-spec says, and its annotations).
pub fn referrer_of(bytes: &[u8], digest: &Digest, media_type: &str) -> Option<(Digest, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let subject = Digest::parse(v.get("subject")?.get("digest")?.as_str()?)?;
    let mut desc = serde_json::json!({
        "mediaType": media_type,
        "digest": digest.to_string(),
        "size": bytes.len(),
    });
    let artifact_type = v
        .get("artifactType")
        .and_then(|a| a.as_str())
        .or_else(|| v.get("config")?.get("mediaType")?.as_str());
    if let Some(a) = artifact_type {
        desc["artifactType"] = a.into();
    }
    if let Some(a) = v.get("annotations").filter(|a| a.as_object().is_some_and(|o| !o.is_empty())) {
        desc["annotations"] = a.clone();
    }
    Some((subject, desc))
}

/// Whether a JSON value is a descriptor a referrers list may carry: a media type, a digest
/// wharf accepts and a size.
pub fn valid_descriptor(v: &serde_json::Value) -> bool {
    v.get("mediaType").and_then(|m| m.as_str()).is_some()
        && v.get("digest").and_then(|d| d.as_str()).and_then(Digest::parse).is_some()
        && v.get("size").and_then(|s| s.as_u64()).is_some()
}

/// A platform as users write it: `linux/amd64`, `linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.trim().split('/');
        let os = parts.next().filter(|p| !p.is_empty())?.to_owned();
        let architecture = parts.next().filter(|p| !p.is_empty())?.to_owned();
        let variant = parts.next().map(str::to_owned);
        if parts.next().is_some() {
            return None;
        }
        Some(Platform { os, architecture, variant })
    }

    /// Whether an index entry's `platform` is this one (a variant asked for must match).
    pub fn matches(&self, p: &serde_json::Value) -> bool {
        p["os"].as_str() == Some(&self.os)
            && p["architecture"].as_str() == Some(&self.architecture)
            && self.variant.as_deref().is_none_or(|v| p["variant"].as_str() == Some(v))
    }
}

/// An index entry's `platform` as users write it.
pub fn platform_string(p: &serde_json::Value) -> String {
    let mut s = format!("{}/{}", p["os"].as_str().unwrap_or("?"), p["architecture"].as_str().unwrap_or("?"));
    if let Some(v) = p["variant"].as_str() {
        s.push('/');
        s.push_str(v);
    }
    s
}

/// Whether an index entry is a buildx attestation manifest (platform `unknown/unknown`,
/// or annotated as one) rather than an image for a platform.
pub fn is_attestation(entry: &serde_json::Value) -> bool {
    entry.pointer("/platform/os").and_then(|o| o.as_str()) == Some("unknown")
        || entry.pointer("/annotations/vnd.docker.reference.type").and_then(|a| a.as_str())
            == Some("attestation-manifest")
}

/// The children of an index that are images for a platform, not attestations.
pub fn platform_children(index: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(index) else { return Vec::new() };
    let Some(list) = v.get("manifests").and_then(|m| m.as_array()) else { return Vec::new() };
    list.iter()
        .filter(|m| !is_attestation(m))
        .filter_map(|m| Digest::parse(m.get("digest")?.as_str()?))
        .collect()
}

/// An image reference as users write it split into the name and what follows it:
/// `<name>:<tag>` or `<name>@<digest>` → (name, tag or digest); neither → (name, None).
/// A `:` followed by a `/` belongs to a host's port, not a tag.
pub fn split_reference(s: &str) -> (&str, Option<&str>) {
    if let Some((n, d)) = s.split_once('@') {
        return (n, Some(d));
    }
    match s.rfind(':') {
        Some(i) if !s[i + 1..].contains('/') => (&s[..i], Some(&s[i + 1..])),
        _ => (s, None),
    }
}

/// The child of an index that serves clients which cannot read indexes: linux/amd64,
/// as distribution picks it.
pub fn default_platform_child(index: &[u8]) -> Option<Digest> {
    let v: serde_json::Value = serde_json::from_slice(index).ok()?;
    v.get("manifests")?.as_array()?.iter().find_map(|m| {
        let p = m.get("platform")?;
        let amd64 = p.get("os")?.as_str()? == "linux" && p.get("architecture")?.as_str()? == "amd64";
        if amd64 {
            Digest::parse(m.get("digest")?.as_str()?)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_split_into_name_and_tag_or_digest() {
        assert_eq!(
            split_reference("docker.io/library/alpine:3.20"),
            ("docker.io/library/alpine", Some("3.20"))
        );
        assert_eq!(split_reference("localhost:5000/app"), ("localhost:5000/app", None));
        assert_eq!(split_reference("r.test/app@sha256:ab"), ("r.test/app", Some("sha256:ab")));
    }

    #[test]
    fn platforms_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").expect("parses");
        assert!(p.matches(&json!({"os": "linux", "architecture": "arm64", "variant": "v8"})));
        assert!(!p.matches(&json!({"os": "linux", "architecture": "arm64"})));
        let any = Platform::parse("linux/arm64").expect("parses");
        assert!(any.matches(&json!({"os": "linux", "architecture": "arm64", "variant": "v8"})));
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d"] {
            assert!(Platform::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn references_are_children_and_blobs_but_not_the_subject() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = serde_json::json!({"manifests": [{"digest": d('a')}, {"digest": d('b')}]});
        let (m, b) = references(index.to_string().as_bytes());
        assert_eq!((m.len(), b.len()), (2, 0));
        let image = serde_json::json!({
            "config": {"digest": d('c')}, "layers": [{"digest": d('d')}, {"digest": "junk"}],
            "subject": {"digest": d('e')}
        });
        let (m, b) = references(image.to_string().as_bytes());
        assert!(m.is_empty());
        let mut b: Vec<String> = b.iter().map(|x| x.to_string()).collect();
        b.sort();
        assert_eq!(b, vec![d('c'), d('d')]);
        assert_eq!(references(b"not json"), (Vec::new(), Vec::new()));
    }

    #[test]
    fn names_follow_the_oci_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a_b",
            "a__b",
            "0",
            "ghcr.io/org/x",
        ] {
            assert!(RepoName::parse(ok).is_some(), "{ok} should be valid");
        }
        for bad in [
            "", "Alpine", "a/../b", "..", "a//b", "/a", "a/", "a___b", "a..b", "-a", "a-", "a%2fb", "a b",
            "a:b", ".", "a/./b",
        ] {
            assert!(RepoName::parse(bad).is_none(), "{bad} should be invalid");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_none());
    }

    #[test]
    fn digests_and_tags_follow_the_grammar() {
        let hex = "a".repeat(64);
        assert!(Digest::parse(&format!("sha256:{hex}")).is_some());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(63))).is_none());
        assert!(Digest::parse(&format!("sha512:{hex}")).is_none(), "sha512 needs 128 hex");
        let hex128 = "b".repeat(128);
        let d512 = Digest::parse(&format!("sha512:{hex128}")).expect("sha512 parses");
        assert_eq!(d512.algorithm(), Algorithm::Sha512);
        assert_eq!(Digest::from_hex(&hex128), Some(d512.clone()));
        assert_eq!(d512.fallback_tag().as_str().len(), 7 + 64);
        assert!(Digest::parse(&format!("sha384:{}", "a".repeat(96))).is_none());
        assert!(Digest::parse(&format!("md5:{}", "a".repeat(32))).is_none());
        assert!(Digest::from_hex(&"a".repeat(63)).is_none());
        assert!(Digest::parse(&format!("sha256:../{}", "a".repeat(61))).is_none());
        assert!(Tag::parse("latest").is_some());
        assert!(Tag::parse("_x.Y-1").is_some());
        assert!(Tag::parse(".hidden").is_none());
        assert!(Tag::parse("a/b").is_none());
        assert!(Tag::parse(&"t".repeat(129)).is_none());
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let e512 = Digest::of_with(Algorithm::Sha512, b"");
        assert!(e512.to_string().starts_with("sha512:cf83e1357eefb8bdf1542850d66d8007"));
        assert!(e512.matches(b"") && !e512.matches(b"x"));
    }

    #[test]
    fn a_manifest_with_a_subject_is_described_as_its_referrer() {
        let subject = Digest::of(b"image");
        let with_type = serde_json::json!({"artifactType": "application/x.sig", "config": {"mediaType": OCI_EMPTY},
            "subject": {"digest": subject.to_string()}, "annotations": {"a": "b"}});
        let bytes = with_type.to_string().into_bytes();
        let d = Digest::of(&bytes);
        let (s, desc) = referrer_of(&bytes, &d, OCI_MANIFEST).expect("a referrer");
        assert_eq!(s, subject);
        assert_eq!(
            desc,
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": bytes.len(),
                "artifactType": "application/x.sig", "annotations": {"a": "b"}})
        );
        // No artifactType: the config's media type stands in, as the spec says.
        let config_typed = serde_json::json!({"config": {"mediaType": "application/x.cfg"},
            "subject": {"digest": subject.to_string()}});
        let (_, desc) =
            referrer_of(config_typed.to_string().as_bytes(), &d, OCI_MANIFEST).expect("a referrer");
        assert_eq!(desc["artifactType"], "application/x.cfg");
        assert!(desc.get("annotations").is_none());
        assert!(referrer_of(br#"{"config":{}}"#, &d, OCI_MANIFEST).is_none());
        assert!(referrer_of(br#"{"subject":{"digest":"sha256:zz"}}"#, &d, OCI_MANIFEST).is_none());
        assert!(valid_descriptor(&desc));
        assert!(!valid_descriptor(&serde_json::json!({"mediaType": "m", "digest": "md5:00", "size": 1})));
    }

    #[test]
    fn any_specific_media_type_is_kept_and_generic_ones_are_inferred() {
        let m = br#"{"schemaVersion":2,"config":{}}"#;
        for ct in ["application/vnd.example.thing.v1+json", "application/x-custom+json", OCI_INDEX] {
            assert_eq!(stored_media_type(Some(ct), m).as_deref(), Some(ct));
        }
        for ct in [None, Some("application/json"), Some("text/plain"), Some("application/octet-stream")] {
            assert_eq!(stored_media_type(ct, m).as_deref(), Some(OCI_MANIFEST), "{ct:?}");
        }
        assert_eq!(stored_media_type(Some("text/html"), b"<html></html>"), None);
        assert_eq!(stored_media_type(Some("a b/c"), b"<html></html>"), None);
    }

    #[test]
    fn media_type_is_inferred_when_absent() {
        assert_eq!(manifest_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(), Some(OCI_INDEX));
        assert_eq!(manifest_media_type(br#"{"schemaVersion":2,"config":{}}"#).as_deref(), Some(OCI_MANIFEST));
        assert_eq!(
            manifest_media_type(br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#)
                .as_deref(),
            Some(DOCKER_MANIFEST)
        );
    }
}
