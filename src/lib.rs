//! # wharf: a pull-through caching proxy for OCI / Docker registries
//!
//! ## Layout
//! Data flows top to bottom:
//! - [`api`]: parses `/v2/…` paths into typed routes, negotiates, and builds every client
//!   response (errors become OCI error JSON in one place).
//! - [`cache`]: read-through decisions: hit or miss, single-flight fetches, streaming
//!   verification of blobs, tag revalidation with an upstream HEAD, stale-on-error,
//!   referrers lists (upstream API, tag schema, or the cache's own subjects), and the
//!   cache's lifecycle (size cap, LRU eviction, pins, garbage collection).
//! - [`store`]: blob bytes behind one [`store::BlobBackend`] (the storage tree in
//!   distribution's layout is the first), the sled index derived from the tree with per-tag
//!   history and which manifest refers to which, and the analytics counters that are not
//!   derivable.
//! - [`upstream`]: one HTTP client per configured registry, with auth and timeouts.
//! - [`auth`]: downstream access control: who a request is (htpasswd, client
//!   certificates) and which repositories that identity may pull.
//! - [`analytics`]: the one place requests are accounted: pulls by tag and platform,
//!   bounded label cardinality, per-day counts kept in the store's analytics db.
//!
//! Around them: [`prefetch`] (the client that fills a cache from a list through the
//! server's prefetch endpoints), [`bundle`] (air-gap bundles: the cache exported as an OCI layout tar, and
//! a bundle checked whole and filed into the cache), [`config`] (layered configuration), [`containerd`] (node configuration:
//! containerd's hosts.toml pointing at the mirror), [`server`] (accept loop, TLS with
//! certificate reload, graceful shutdown, and the limits a hostile client meets), [`metrics`] (every metric, defined once), [`oci`]
//! (the grammar's newtypes), [`zerocopy`] (stored blobs sent by `sendfile` on plain-TCP
//! HTTP/1 connections). [`api::resolve`] is where a request finds its upstream.

pub mod analytics;
pub mod api;
pub mod auth;
pub mod bundle;
pub mod cache;
pub mod cli;
pub mod config;
pub mod containerd;
pub mod metrics;
pub mod oci;
pub mod prefetch;
pub mod server;
pub mod store;
pub mod upstream;
pub mod zerocopy;

#[cfg(test)]
mod parse_props;

use std::sync::Arc;

pub use server::{serve, serve_with_admin};

use cache::Cache;
use config::{Config, ConfigError};
use metrics::Metrics;
use oci::RepoName;
use store::{RepoKey, Store, StoreError};
use upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    /// Configured upstreams; the first is the default.
    pub upstreams: Arc<Vec<Arc<Upstream>>>,
    /// Per-request accounting and pull analytics.
    pub analytics: Arc<analytics::Analytics>,
    /// Who may pull what.
    pub auth: Arc<auth::Auth>,
}

impl AppState {
    /// Opens the data dir and builds the upstream clients.
    pub fn open(config: Config) -> Result<AppState, Error> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Store::open_with(&config.data_dir, &config.storage)?);
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u, metrics.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let analytics =
            Arc::new(analytics::Analytics::new(metrics.clone(), store.clone(), config.analytics.max_series));
        let auth = Arc::new(auth::Auth::new(&config, metrics.clone()).map_err(ConfigError::Invalid)?);
        Ok(AppState {
            analytics,
            auth,
            cache: Arc::new(Cache::new(
                store,
                metrics.clone(),
                &config.effective_cache(),
                &config.server,
                &config.storage,
            )),
            config: Arc::new(config),
            metrics,
            upstreams: Arc::new(upstreams),
        })
    }

    pub fn default_upstream(&self) -> &Arc<Upstream> {
        &self.upstreams[0]
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.cache.store
    }

    /// The cached repository a user-facing name denotes, resolved as a pull would be
    /// (`alpine`, `library/alpine` and `docker.io/library/alpine` are the same).
    pub fn repo_key(&self, name: &RepoName) -> Result<RepoKey, api::ApiError> {
        let (up, repo) = api::resolve(&self.upstreams, name, None)?;
        Ok(RepoKey::new(&up.name, &repo))
    }
}
