//! HTTPS: rustls with ALPN (h2, http/1.1) and a certificate that can be replaced while
//! connections run. SIGHUP, or a change of either file, reloads it; a pair that does not
//! load (a key that does not match, a file half written) is refused and the old one stays.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The current certificate, swapped whole on reload.
pub struct Certificates {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Client certificates are verified against these when set (mutual TLS).
    client_ca_file: Option<PathBuf>,
    /// Modification times of the files last loaded, to notice changes.
    loaded: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates").field("cert_file", &self.cert_file).finish()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Certificates {
    pub fn load(cfg: &TlsConfig) -> Result<Arc<Certificates>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = (mtime(&cfg.cert_file), mtime(&cfg.key_file));
        let key = read(&cfg.cert_file, &cfg.key_file, &provider)?;
        Ok(Arc::new(Certificates {
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            provider,
            current: RwLock::new(Arc::new(key)),
            client_ca_file: cfg.client_ca_file.clone(),
            loaded: Mutex::new(stamps),
        }))
    }

    /// Loads the files again and, if they load, serves them to new connections.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = (mtime(&self.cert_file), mtime(&self.key_file));
        let key = read(&self.cert_file, &self.key_file, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        Ok(())
    }

    fn changed(&self) -> bool {
        let now = (mtime(&self.cert_file), mtime(&self.key_file));
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) != now
    }

    /// The acceptor for this certificate: h2 and http/1.1 by ALPN.
    /// With `client_ca_file`, a client certificate is asked for and, when presented,
    /// must chain to one of those CAs; a client without one connects as anonymous.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let err = |msg: String| TlsError::Load { path: path.clone(), msg };
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
                    roots.add(c.map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(err("no CA certificate in the file".into()));
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| err(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }

    /// Reloads on SIGHUP and when either file changes, until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            let why = tokio::select! {
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => "SIGHUP",
                _ = tick.tick() => if self.changed() { "file change" } else { continue },
            };
            match self.reload() {
                Ok(()) => {
                    tracing::info!(trigger = why, cert = %self.cert_file.display(), "certificate reloaded")
                }
                Err(e) => {
                    tracing::error!(trigger = why, error = %e, "certificate not reloaded; keeping the current one")
                }
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn read(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let err = |path: &Path, msg: String| TlsError::Load { path: path.to_path_buf(), msg };
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| err(cert_file, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(cert_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(err(cert_file, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| err(key_file, e.to_string()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| err(key_file, format!("does not fit the certificate: {e}")))
}

/// The user a verified client certificate names: its subject's common name, else the
/// whole subject. `None` without a client certificate.
pub fn client_user(conn: &rustls::ServerConnection) -> Option<Arc<str>> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_owned);
    Some(Arc::from(cn.unwrap_or_else(|| subject.to_string())))
}
