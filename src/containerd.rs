//! Node configuration for containerd: one `hosts.toml` per registry under a certs.d
//! directory, naming wharf as the mirror to try first and the registry itself as the
//! fallback. What was there before is kept beside it and put back by `restore`.
//!
//! ```text
//! /etc/containerd/certs.d/docker.io/hosts.toml               written here
//!                                   hosts.toml.wharf-backup  the file that was there
//!                                   .wharf-created           the directory was not
//! ```
//! containerd reads only `hosts.toml` and certificate files (`*.crt`, `*.cert`, `*.key`)
//! in these directories, so the backup and the marker are invisible to it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use url::Url;

/// The first line of every file written here: how `restore` knows a file is ours.
const MARKER: &str = "# Written by `wharf configure-containerd`";
const BACKUP: &str = "hosts.toml.wharf-backup";
const CREATED: &str = ".wharf-created";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0:?} is not a registry host (host or host:port, or _default)")]
    BadRegistry(String),
    #[error("mirror {0}: must be an http(s) URL with a host and no path, query or credentials")]
    BadMirror(String),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |err| NodeError::Io { path: path.to_owned(), err }
}

/// One registry to mirror: the host containerd names it by, and where it really is.
#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    pub host: String,
    pub server: String,
}

impl Registry {
    /// A registry by its host: Docker Hub's API is at registry-1.docker.io, any other
    /// registry's at `https://<host>`.
    pub fn from_host(host: &str) -> Result<Registry, NodeError> {
        let host = checked_host(host)?;
        let server = match host.as_str() {
            "docker.io" => "https://registry-1.docker.io".to_owned(),
            "_default" => String::new(),
            h => format!("https://{h}"),
        };
        Ok(Registry { host, server })
    }

    /// A registry known by a configured upstream's name, at the upstream's URL.
    pub fn from_upstream(name: &str, url: &Url) -> Result<Registry, NodeError> {
        Ok(Registry { host: checked_host(name)?, server: url.as_str().trim_end_matches('/').to_owned() })
    }
}

/// A registry host as a directory name: letters, digits, `.`, `-`, an optional `:port`,
/// never `.`/`..` or anything with a separator; or containerd's `_default`.
fn checked_host(h: &str) -> Result<String, NodeError> {
    let bad = || NodeError::BadRegistry(h.to_owned());
    if h == "_default" {
        return Ok(h.to_owned());
    }
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    if name_ok && port_ok {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(bad())
    }
}

/// The mirror as containerd's `[host."…"]` key: `scheme://host[:port]`.
fn mirror_key(mirror: &Url) -> Result<String, NodeError> {
    let bad = || NodeError::BadMirror(mirror.to_string());
    let plain = matches!(mirror.scheme(), "http" | "https")
        && mirror.host_str().is_some()
        && matches!(mirror.path(), "" | "/")
        && mirror.query().is_none()
        && mirror.username().is_empty()
        && mirror.password().is_none();
    if !plain {
        return Err(bad());
    }
    Ok(mirror.as_str().trim_end_matches('/').to_owned())
}

/// The `hosts.toml` for `reg` with `mirror` first.
pub fn hosts_toml(reg: &Registry, mirror: &Url) -> Result<String, NodeError> {
    let key = mirror_key(mirror)?;
    let server = match reg.server.as_str() {
        "" => String::new(),
        s => format!("server = \"{s}\"\n\n"),
    };
    Ok(format!(
        "{MARKER}: pulls try the mirror first, then the registry\n\
         # itself. `wharf configure-containerd --restore` puts back what was here.\n\
         {server}[host.\"{key}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    ))
}

/// What `configure` or `restore` did to one registry's directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// hosts.toml written; what was there is kept as the backup.
    Written { backed_up: bool },
    /// Already as it should be.
    Unchanged,
    /// The backup put back (or our file removed when there was none).
    Restored,
    /// Nothing of ours was there.
    NotOurs,
}

fn is_ours(path: &Path) -> Result<bool, NodeError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s.starts_with(MARKER)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        // Not UTF-8: not ours either.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(false),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Writes a file atomically (a temp file beside it, renamed over it).
fn write_atomic(path: &Path, body: &str) -> Result<(), NodeError> {
    let tmp = path.with_extension("toml.wharf-tmp");
    fs::write(&tmp, body).map_err(io_at(&tmp))?;
    fs::rename(&tmp, path).map_err(io_at(path))
}

/// Points containerd's `reg` at `mirror` under `dir`. Idempotent: a second run changes
/// nothing, and the first backup is never overwritten.
pub fn configure(dir: &Path, reg: &Registry, mirror: &Url) -> Result<Change, NodeError> {
    let body = hosts_toml(reg, mirror)?;
    let rdir = dir.join(&reg.host);
    let hosts = rdir.join("hosts.toml");
    if !rdir.exists() {
        fs::create_dir_all(&rdir).map_err(io_at(&rdir))?;
        fs::write(rdir.join(CREATED), b"").map_err(io_at(&rdir))?;
    }
    match fs::read_to_string(&hosts) {
        Ok(s) if s == body => return Ok(Change::Unchanged),
        _ => {}
    }
    let mut backed_up = false;
    if hosts.exists() && !is_ours(&hosts)? {
        let backup = rdir.join(BACKUP);
        if !backup.exists() {
            fs::copy(&hosts, &backup).map_err(io_at(&backup))?;
            backed_up = true;
        }
    }
    write_atomic(&hosts, &body)?;
    Ok(Change::Written { backed_up })
}

/// Undoes [`configure`] for `host`: the backup goes back, or our file (and a directory we
/// created) goes away. A hosts.toml that is not ours is left alone.
pub fn restore(dir: &Path, host: &str) -> Result<Change, NodeError> {
    let rdir = dir.join(checked_host(host)?);
    let hosts = rdir.join("hosts.toml");
    let (backup, created) = (rdir.join(BACKUP), rdir.join(CREATED));
    if !is_ours(&hosts)? {
        return Ok(Change::NotOurs);
    }
    if backup.exists() {
        fs::rename(&backup, &hosts).map_err(io_at(&hosts))?;
    } else {
        fs::remove_file(&hosts).map_err(io_at(&hosts))?;
    }
    if created.exists() {
        fs::remove_file(&created).map_err(io_at(&created))?;
        // Only when nothing else was put there meanwhile.
        let _ = fs::remove_dir(&rdir);
    }
    Ok(Change::Restored)
}

/// The registries under `dir` whose hosts.toml is ours.
pub fn configured(dir: &Path) -> Result<Vec<String>, NodeError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_at(dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io_at(dir))?;
        let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
        if checked_host(&name).is_ok() && is_ours(&e.path().join("hosts.toml"))? {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror() -> Url {
        Url::parse("http://wharf.internal:5000").expect("url")
    }

    #[test]
    fn hosts_are_checked_before_they_name_a_directory() {
        for ok in ["docker.io", "ghcr.io", "registry.internal:5000", "localhost", "_default", "a-b.c"] {
            assert!(checked_host(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "..", ".", "a/b", "../etc", "a..b", "-a.io", "a.io:", "a.io:x", "a.io:123456", "a b", "a\\b"]
        {
            assert!(checked_host(bad).is_err(), "{bad}");
        }
        assert!(mirror_key(&Url::parse("http://m:5000/v2/x").expect("url")).is_err());
        assert!(mirror_key(&Url::parse("http://u:p@m:5000").expect("url")).is_err());
        assert!(mirror_key(&Url::parse("ftp://m").expect("url")).is_err());
    }

    #[test]
    fn configure_is_idempotent_and_restore_puts_back_what_was_there() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        fs::create_dir_all(d.join("docker.io")).expect("mkdir");
        let original = "server = \"https://registry-1.docker.io\"\n[host.\"https://other\"]\n";
        fs::write(d.join("docker.io/hosts.toml"), original).expect("write");
        let hub = Registry::from_host("docker.io").expect("hub");
        let ghcr = Registry::from_host("ghcr.io").expect("ghcr");
        assert_eq!(configure(d, &hub, &mirror()).expect("hub"), Change::Written { backed_up: true });
        assert_eq!(configure(d, &ghcr, &mirror()).expect("ghcr"), Change::Written { backed_up: false });
        assert_eq!(configure(d, &hub, &mirror()).expect("again"), Change::Unchanged);
        let written = fs::read_to_string(d.join("docker.io/hosts.toml")).expect("read");
        assert!(written.contains("server = \"https://registry-1.docker.io\""));
        assert!(written.contains("[host.\"http://wharf.internal:5000\"]"));
        assert_eq!(fs::read_to_string(d.join("docker.io").join(BACKUP)).expect("backup"), original);
        // Another mirror: rewritten, the original backup kept.
        let other = Url::parse("https://mirror2").expect("url");
        assert_eq!(configure(d, &hub, &other).expect("hub"), Change::Written { backed_up: false });
        assert_eq!(fs::read_to_string(d.join("docker.io").join(BACKUP)).expect("backup"), original);
        assert_eq!(configured(d).expect("list"), vec!["docker.io".to_owned(), "ghcr.io".to_owned()]);
        for h in ["docker.io", "ghcr.io"] {
            assert_eq!(restore(d, h).expect("restore"), Change::Restored);
            assert_eq!(restore(d, h).expect("again"), Change::NotOurs);
        }
        assert_eq!(fs::read_to_string(d.join("docker.io/hosts.toml")).expect("read"), original);
        assert!(!d.join("ghcr.io").exists(), "the directory configure made is gone");
        let left: Vec<_> =
            fs::read_dir(d.join("docker.io")).expect("ls").map(|e| e.expect("e").file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("hosts.toml")]);
    }
}
