//! Command-line interface: `serve`, `history`, `stats`, `reindex`, `gc`, `prefetch`,
//! `export`, `import`,
//! `check-config`, `configure-containerd`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use url::Url;

use crate::config::Overrides;

#[derive(Parser, Debug)]
#[command(name = "wharf", version, about = "A pull-through caching proxy for OCI / Docker registries")]
pub struct Cli {
    /// TOML configuration file (see config.example.toml).
    #[arg(long, global = true, env = "WHARF_CONFIG")]
    pub config: Option<PathBuf>,
    /// Storage directory (overrides `data_dir`).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the registry mirror.
    Serve {
        /// Address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// URL of the default upstream registry (overrides the first `[[upstreams]]` url).
        #[arg(long)]
        upstream: Option<Url>,
    },
    /// Every digest a tag has pointed at, newest first.
    History {
        /// `[upstream/]repository:tag`, e.g. `docker.io/library/alpine:latest`; without an
        /// upstream prefix, the default upstream.
        image: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pull analytics: top images, tags and platforms, pulls per day, cache hit ratio.
    Stats {
        /// Length of the top lists.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// First day counted, YYYY-MM-DD (UTC).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the index from the storage tree (the server must be stopped).
    Reindex,
    /// Remove what the cache no longer needs: blobs no cached manifest refers to, blobs
    /// the index does not know, stale temp files, and least-recently-used blobs beyond
    /// `cache.max_size`. Asks the running server when one holds the data dir.
    Gc {
        /// Report what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Point containerd on this node at a wharf mirror: one certs.d/<registry>/hosts.toml
    /// per registry, mirror first and the registry itself as fallback. What was there is
    /// kept and `--restore` puts it back. Idempotent.
    ConfigureContainerd {
        /// The mirror's URL as this node reaches it (no cluster DNS: an IP or node-resolvable
        /// name), e.g. http://10.96.0.50:5000.
        #[arg(long, required_unless_present = "restore")]
        mirror: Option<Url>,
        /// Registries to mirror, comma-separated (default: docker.io).
        #[arg(long, value_delimiter = ',', conflicts_with = "from_config")]
        registries: Vec<String>,
        /// Mirror every upstream of this wharf configuration file, at its configured URL.
        #[arg(long)]
        from_config: Option<PathBuf>,
        /// containerd's hosts directory (its `config_path`).
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        dir: PathBuf,
        /// Put back what was there before (for the registries given, or every one
        /// configured here).
        #[arg(long)]
        restore: bool,
        /// After configuring, keep running until SIGTERM or SIGINT, then restore: a
        /// DaemonSet pod's life is the node's configuration (uninstalling restores).
        #[arg(long, conflicts_with = "restore")]
        hold: bool,
    },
    /// Check a configuration file: parse and validate it as `serve` would, and print the
    /// effective configuration (defaults filled in, secrets redacted) as JSON. Exits
    /// non-zero with the key and the reason when it is not valid.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Fill the cache from a list of images, through the cache (verified, single-flight,
    /// counted apart from pulls): the running server's when one holds the data dir, else
    /// one started for the run. Without images or -f, the configuration's [[prefetch]]
    /// lists. Progress bars on a terminal, a line per image otherwise; a summary at the
    /// end; non-zero exit when an image failed. Re-running fetches nothing new.
    Prefetch {
        /// Images as users write them (`alpine:3.20`, `ghcr.io/org/app@sha256:…`).
        images: Vec<String>,
        /// A file with one image per line (`#` comments and blank lines skipped).
        #[arg(short = 'f', long = "file")]
        list: Option<PathBuf>,
        /// Only these platforms of multi-platform images (comma-separated); default all.
        #[arg(long, value_delimiter = ',')]
        platform: Vec<String>,
        /// Blobs fetched at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Leave out attestations, signatures and SBOMs.
        #[arg(long)]
        no_extras: bool,
        /// Pin what is fetched (by tag): eviction never takes those tags' current images.
        #[arg(long)]
        pin: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write cached images into one bundle file for an air gap: an OCI image layout in a
    /// tar (with a Docker manifest.json for single-platform images), which `wharf import`,
    /// `skopeo copy oci-archive:`, `ctr images import` and `docker load` read. Reads the
    /// data dir (the server must be stopped).
    Export {
        /// Images as users write them (`alpine:3.20`, `ghcr.io/org/app@sha256:…`),
        /// resolved as pulls are; the default tag is `latest`.
        images: Vec<String>,
        /// The bundle to write.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// A file with one image per line (`#` comments and blank lines skipped).
        #[arg(short = 'f', long = "file")]
        list: Option<PathBuf>,
        /// Every tag the cache holds.
        #[arg(long)]
        all: bool,
        /// Only these platforms of multi-platform images (comma-separated, e.g.
        /// linux/amd64,linux/arm64); default: every platform the cache holds whole.
        #[arg(long, value_delimiter = ',')]
        platform: Vec<String>,
        /// Leave out the blobs of this earlier bundle (the far side has them): a
        /// differential bundle.
        #[arg(long)]
        since: Option<PathBuf>,
        /// Compress the bundle with zstd (`wharf import` reads it as it is; other tools
        /// after `zstd -d`).
        #[arg(long)]
        zstd: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read a bundle (from `wharf export`, or any OCI image layout, as a tar or a
    /// directory) into the cache: every blob and manifest checked against its digest and
    /// the whole bundle checked before anything is written; a bad bundle is refused whole.
    /// Idempotent. The server must be stopped.
    Import {
        /// The bundle: a tar file or an OCI image layout directory.
        bundle: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print what the index holds, without times, as JSON (server stopped). For checking
    /// an index against one `reindex` rebuilt.
    #[command(hide = true)]
    DumpIndex,
}

impl Cli {
    /// The configuration layers given as flags.
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides { data_dir: self.data_dir.clone(), ..Default::default() };
        if let Command::Serve { listen, upstream } = &self.command {
            o.listen = *listen;
            o.upstream = upstream.clone();
        }
        o
    }
}
