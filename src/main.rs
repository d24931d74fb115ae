//! The `wharf` binary: parses the command line, loads the configuration, dispatches.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;

use wharf::cli::{Cli, Command};
use wharf::config::Config;
use wharf::oci::{RepoName, Tag};
use wharf::store::{self, Store};
use wharf::AppState;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wharf: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wharf: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = match cli.command {
        Command::Serve { .. } => rt.block_on(serve(config)),
        Command::History { image, json } => rt.block_on(history(config, &image, json)),
        Command::Stats { top, since, json } => rt.block_on(stats(config, top, since.as_deref(), json)),
        Command::Reindex => reindex(&config),
        Command::Gc { dry_run, json } => rt.block_on(gc(config, dry_run, json)),
        Command::DumpIndex => dump_index(&config),
        Command::Export { images, output, list, all, platform, since, zstd, json } => {
            export(config, &images, &output, list.as_deref(), all, &platform, since.as_deref(), zstd, json)
        }
        Command::Import { bundle, json } => import(config, &bundle, json),
        Command::Prefetch { images, list, platform, concurrency, no_extras, pin, json } => {
            let what = (!no_extras, pin);
            rt.block_on(prefetch(config, &images, list.as_deref(), &platform, concurrency, what, json))
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::ConfigureContainerd { mirror, registries, from_config, dir, restore, hold } => {
            let res =
                configure_containerd(mirror.as_ref(), &registries, from_config.as_deref(), &dir, restore);
            match (res, hold) {
                (Ok(()), true) => rt.block_on(wait_for_stop()).and_then(|()| {
                    eprintln!("wharf: stopping; restoring containerd's hosts");
                    configure_containerd(None, &[], None, &dir, true)
                }),
                (res, _) => res,
            }
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wharf: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

async fn serve(config: Config) -> Res {
    let listen = config.listen;
    wharf::server::raise_open_file_limit();
    let state = AppState::open(config)?;
    let listener = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let admin = match state.config.admin.listen {
        Some(l) => Some(
            TcpListener::bind(l).await.map_err(|e| format!("cannot listen on {l} (admin.listen): {e}"))?,
        ),
        None => None,
    };
    let metrics_addr = admin.as_ref().and_then(|a| a.local_addr().ok()).map(|a| a.to_string());
    let scheme = if admin.is_none() && state.config.tls.is_some() { "https" } else { "http" };
    let mut own = admin.as_ref().and_then(|a| a.local_addr().ok()).unwrap_or(addr);
    if own.ip().is_unspecified() {
        own.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    spawn_prefetch_refresh(&state, format!("{scheme}://{own}"))?;
    let info_path = state.config.data_dir.join("wharf/server.json");
    // `metrics_addr` is the admin listener's address (its old name, kept for scripts).
    let info = serde_json::json!({ "addr": addr.to_string(), "admin_addr": metrics_addr, "metrics_addr": metrics_addr, "pid": std::process::id() });
    std::fs::write(&info_path, info.to_string())?;
    tracing::info!(%addr, data_dir = %state.config.data_dir.display(), upstream = %state.config.upstreams[0].url, "wharf listening");
    let res = wharf::serve_with_admin(listener, admin, state, shutdown_signal()).await;
    let _ = std::fs::remove_file(&info_path);
    Ok(res?)
}

/// The `[[prefetch]]` entries with a `refresh`: fetched at start and again every `refresh`,
/// through this server's own prefetch endpoints, as the user `wharf-prefetch` (a token the
/// server issues itself, for a server that protects its admin surface).
fn spawn_prefetch_refresh(state: &AppState, base: String) -> Res {
    use std::sync::Arc;
    use wharf::prefetch::{self, Credentials};
    for entry in state.config.prefetch.iter().filter(|e| e.refresh.is_some()) {
        let targets = prefetch::configured(std::slice::from_ref(entry), true)?;
        let every = entry.refresh.unwrap_or_default();
        let (state, base) = (state.clone(), base.clone());
        tokio::spawn(async move {
            loop {
                let token = state.auth.issue_token(&wharf::auth::Identity::User("wharf-prefetch".into()));
                match prefetch::Client::new(&base, Some(Credentials::Bearer(token))) {
                    Ok(client) => {
                        let outcomes =
                            prefetch::run(Arc::new(client), &targets, 4, Arc::new(prefetch::Quiet)).await;
                        for o in &outcomes {
                            match o.ok() {
                                true => {
                                    tracing::info!(image = %o.image, digest = %o.digest, fetched_bytes = o.fetched_bytes, "prefetch refresh")
                                }
                                false => {
                                    tracing::warn!(image = %o.image, error = %o.result, "prefetch refresh failed")
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "prefetch refresh: no client"),
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// GETs `path` from the server that holds the data dir (its address is in server.json).
async fn ask_server(config: &Config, path: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    call_server(config, reqwest::Method::GET, path).await
}

/// Where the server that holds the data dir answers `/_wharf/*`: `scheme://addr`.
fn server_base(config: &Config) -> Result<String, Box<dyn std::error::Error>> {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config.data_dir.join("wharf/server.json"))?)?;
    // With an admin listener, `/_wharf/*` is served there only, over plain HTTP.
    let (addr, scheme) = match info["admin_addr"].as_str() {
        Some(a) => (a, "http"),
        None => (
            info["addr"].as_str().ok_or("server.json has no addr")?,
            if config.tls.is_some() { "https" } else { "http" },
        ),
    };
    let mut addr: SocketAddr = addr.parse()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(format!("{scheme}://{addr}"))
}

/// For a server with auth.protect_admin: `user:password` of an htpasswd user, from
/// WHARF_CREDENTIALS.
fn admin_credentials() -> Result<Option<(String, String)>, Box<dyn std::error::Error>> {
    match std::env::var("WHARF_CREDENTIALS") {
        Ok(creds) => {
            let (user, password) = creds.split_once(':').ok_or("WHARF_CREDENTIALS is not user:password")?;
            Ok(Some((user.to_owned(), password.to_owned())))
        }
        Err(_) => Ok(None),
    }
}

/// Sends `method path` to the server that holds the data dir.
async fn call_server(
    config: &Config,
    method: reqwest::Method,
    path: &str,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let base = server_base(config)?;
    // The server is on this machine and named in our own data dir; its certificate may be
    // for another name than the address we reach it by.
    let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;
    let mut req = client.request(method, format!("{base}{path}"));
    if let Some((user, password)) = admin_credentials()? {
        req = req.basic_auth(user, Some(password));
    }
    let resp = req.send().await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        return Err(body["errors"][0]["message"].as_str().unwrap_or("request failed").into());
    }
    Ok(body)
}

/// `wharf stats`: asks the running server when one holds the data dir, else reads it.
async fn stats(config: Config, top: usize, since: Option<&str>, json: bool) -> Res {
    if let Some(s) = since {
        if s.len() != 10 || humantime::parse_rfc3339(&format!("{s}T00:00:00Z")).is_err() {
            return Err(format!("--since {s:?}: expected a date YYYY-MM-DD").into());
        }
    }
    let value = if store::is_locked(&config.data_dir) {
        let since_q = since.map(|s| format!("&since={s}")).unwrap_or_default();
        ask_server(&config, &format!("/_wharf/stats?top={top}{since_q}")).await?
    } else {
        let state = AppState::open(config)?;
        let report = serde_json::to_value(wharf::analytics::report(state.store(), top, since)?)?;
        state.store().close()?;
        report
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mb = |v: &serde_json::Value| n(v) as f64 / 1e6;
    println!("pulls: {}{}", n(&value["pulls"]), since.map(|s| format!(" (since {s})")).unwrap_or_default());
    match value["cache_hit_ratio"].as_f64() {
        Some(r) => println!("cache hit ratio: {:.1}%", r * 100.0),
        None => println!("cache hit ratio: -"),
    }
    println!(
        "bytes from cache: {:.1} MB, from upstream: {:.1} MB, saved: {:.1} MB",
        mb(&value["bytes_from_cache"]),
        mb(&value["bytes_from_upstream"]),
        mb(&value["bytes_saved"])
    );
    for (title, key) in [("TOP IMAGES", "top_images"), ("TOP TAGS", "top_tags"), ("PLATFORMS", "platforms")] {
        println!("\n{title:<64} {:>8}", "PULLS");
        for row in value[key].as_array().into_iter().flatten() {
            println!("{:<64} {:>8}", row["name"].as_str().unwrap_or_default(), n(&row["pulls"]));
        }
    }
    println!("\n{:<64} {:>8}", "PULLS PER DAY", "PULLS");
    for (day, count) in value["pulls_per_day"].as_object().into_iter().flatten() {
        println!("{day:<64} {:>8}", n(count));
    }
    Ok(())
}

/// `wharf history`: asks the running server when one holds the data dir, else reads it.
async fn history(config: Config, image: &str, json: bool) -> Res {
    let (name, tag) = image.rsplit_once(':').ok_or("expected NAME:TAG")?;
    let name = RepoName::parse(name).ok_or_else(|| format!("invalid repository name {name:?}"))?;
    let tag = Tag::parse(tag).ok_or_else(|| format!("invalid tag {tag:?}"))?;
    let value: serde_json::Value = if store::is_locked(&config.data_dir) {
        ask_server(&config, &format!("/_wharf/history/{}/tags/{}", name.as_str(), tag.as_str())).await?
    } else {
        let state = AppState::open(config)?;
        let key = state.repo_key(&name).map_err(|e| e.to_string())?;
        state.analytics.flush()?;
        let entries = state.store().history(&key, &tag)?;
        state.store().close()?;
        if entries.is_empty() {
            return Err(format!("no history for {}:{tag}", key.as_str()).into());
        }
        serde_json::json!({ "repository": key.as_str(), "tag": tag.as_str(), "history": entries })
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "{}:{}",
        value["repository"].as_str().unwrap_or_default(),
        value["tag"].as_str().unwrap_or_default()
    );
    println!("{:<72}  {:<24}  {:<24}", "DIGEST", "FIRST SEEN", "LAST SEEN");
    for e in value["history"].as_array().into_iter().flatten() {
        println!(
            "{:<72}  {:<24}  {:<24}{}",
            e["digest"].as_str().unwrap_or_default(),
            e["first_seen"].as_str().unwrap_or_default(),
            e["last_seen"].as_str().unwrap_or_default(),
            if e["current"].as_bool() == Some(true) { "  (current)" } else { "" }
        );
    }
    Ok(())
}

/// The data dir's store, for a command that needs it to itself.
fn open_alone(config: Config, what: &str) -> Result<AppState, Box<dyn std::error::Error>> {
    if store::is_locked(&config.data_dir) {
        return Err(format!(
            "a wharf server holds {}; stop it before `wharf {what}`",
            config.data_dir.display()
        )
        .into());
    }
    Ok(AppState::open(config)?)
}

/// An image as users write it, resolved as a pull is: its repository, tag and digest.
fn select(state: &AppState, image: &str) -> Result<wharf::bundle::Selection, Box<dyn std::error::Error>> {
    let (name, reference) = wharf::oci::split_reference(image);
    let repo = RepoName::parse(name).ok_or_else(|| format!("{image}: invalid repository name {name:?}"))?;
    let key = state.repo_key(&repo).map_err(|e| format!("{image}: {e}"))?;
    if let Some(d) = reference.and_then(wharf::oci::Digest::parse) {
        return Ok(wharf::bundle::Selection { key, tag: None, digest: d });
    }
    let tag = reference.unwrap_or("latest");
    let tag = Tag::parse(tag).ok_or_else(|| format!("{image}: invalid tag or digest {tag:?}"))?;
    let meta = state
        .store()
        .tag(&key, &tag)?
        .ok_or_else(|| format!("{image}: {}:{} is not in the cache", key.as_str(), tag.as_str()))?;
    let digest = wharf::oci::Digest::parse(&meta.digest).ok_or("the index holds an invalid digest")?;
    Ok(wharf::bundle::Selection { key, tag: Some(tag), digest })
}

#[allow(clippy::too_many_arguments)]
fn export(
    config: Config,
    images: &[String],
    output: &Path,
    list: Option<&Path>,
    all: bool,
    platforms: &[String],
    since: Option<&Path>,
    zstd: bool,
    json: bool,
) -> Res {
    use wharf::bundle::{self, ExportOptions};
    use wharf::oci::Platform;
    let state = open_alone(config, "export")?;
    let mut wanted: Vec<String> = images.to_vec();
    if let Some(l) = list {
        wanted.extend(read_list(l)?);
    }
    let mut selection = Vec::new();
    for w in &wanted {
        selection.push(select(&state, w)?);
    }
    if all {
        for (key, tag, digest) in state.store().tag_entries()? {
            selection.push(bundle::Selection { key, tag: Some(tag), digest });
        }
    }
    if selection.is_empty() {
        return Err("nothing to export: name images, give -f LIST, or --all".into());
    }
    let mut seen = std::collections::HashSet::new();
    selection.retain(|s| seen.insert(s.reference()));
    let platforms = platforms
        .iter()
        .map(|p| Platform::parse(p).ok_or_else(|| format!("--platform {p:?}: expected os/arch[/variant]")))
        .collect::<Result<Vec<_>, _>>()?;
    let skip = match since {
        Some(b) => bundle::bundle_blobs(b)?,
        None => Default::default(),
    };
    let mut history = Vec::new();
    for s in &selection {
        if let Some(t) = &s.tag {
            let entries = state.store().history(&s.key, t)?;
            let seen = entries
                .iter()
                .filter_map(|e| {
                    Some((wharf::oci::Digest::parse(&e.digest)?, e.first_seen_ms, e.last_seen_ms))
                })
                .collect();
            history.push((s.key.clone(), t.clone(), seen));
        }
    }
    // Written beside the target and renamed at the end: a failed export leaves no bundle.
    let partial = output.with_extension("partial");
    let file = std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let out = std::io::BufWriter::with_capacity(1 << 20, file);
    let opts = ExportOptions { platforms, skip };
    let written = match zstd {
        false => bundle::export(state.store(), &selection, &history, &opts, out).map(|(r, _)| r),
        true => zstd::stream::write::Encoder::new(out, 3)
            .map_err(|e| bundle::BundleError::Io { context: "zstd".into(), source: e })
            .and_then(|enc| bundle::export(state.store(), &selection, &history, &opts, enc))
            .and_then(|(r, enc)| {
                enc.finish()
                    .and_then(|mut w| std::io::Write::flush(&mut w))
                    .map(|()| r)
                    .map_err(|e| bundle::BundleError::Io { context: "finishing zstd".into(), source: e })
            }),
    };
    let report = match written {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
    };
    std::fs::rename(&partial, output)?;
    state.store().close()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{:<56}  {:<71}  PLATFORMS", "IMAGE", "DIGEST");
    for i in &report.images {
        let missing = match i.missing_platforms.is_empty() {
            true => String::new(),
            false => format!("  (not whole in the cache, left out: {})", i.missing_platforms.join(",")),
        };
        println!("{:<56}  {:<71}  {}{missing}", i.reference, i.digest, i.platforms.join(","));
    }
    println!(
        "{}: {} images, {} blobs, {:.1} MB{}",
        output.display(),
        report.images.len(),
        report.blobs,
        report.bytes as f64 / 1e6,
        match report.skipped {
            0 => String::new(),
            n => format!(", {n} blobs left out (in the --since bundle)"),
        }
    );
    Ok(())
}

/// An image list: one per line, `#` comments and blank lines skipped.
fn read_list(path: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn bar_style(tail: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(&format!(
        "{{prefix:<40!}} {{bar:24}} {{bytes:>10}}/{{total_bytes:<10}} {{bytes_per_sec:>12}} {tail}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

/// Bars on a terminal: one per image (bytes and rate), and a total with an ETA.
struct Bars {
    _multi: indicatif::MultiProgress,
    total: indicatif::ProgressBar,
    images: Vec<indicatif::ProgressBar>,
}

impl Bars {
    fn new(names: &[String]) -> Bars {
        let multi = indicatif::MultiProgress::new();
        let images = names
            .iter()
            .map(|n| {
                let b = multi.add(indicatif::ProgressBar::new(0).with_style(bar_style("{msg}")));
                b.set_prefix(n.clone());
                b
            })
            .collect();
        let total = multi.add(indicatif::ProgressBar::new(0).with_style(bar_style("ETA {eta}")));
        total.set_prefix("total");
        Bars { _multi: multi, total, images }
    }
}

impl wharf::prefetch::Progress for Bars {
    fn sized(&self, i: usize, _image: &str, bytes: u64) {
        self.images[i].set_length(bytes);
        self.total.inc_length(bytes);
    }
    fn blob(&self, i: usize, bytes: u64, _fetched: bool) {
        self.images[i].inc(bytes);
        self.total.inc(bytes);
    }
    fn done(&self, i: usize, o: &wharf::prefetch::Outcome) {
        let msg = if o.ok() { "done".to_owned() } else { format!("FAILED: {}", o.result) };
        self.images[i].finish_with_message(msg);
        if self.images.iter().all(|b| b.is_finished()) {
            self.total.finish();
        }
    }
}

/// A line per image when stderr is not a terminal.
struct Lines;

impl wharf::prefetch::Progress for Lines {
    fn sized(&self, _i: usize, _image: &str, _bytes: u64) {}
    fn blob(&self, _i: usize, _bytes: u64, _fetched: bool) {}
    fn done(&self, _i: usize, o: &wharf::prefetch::Outcome) {
        match o.ok() {
            true => eprintln!(
                "prefetched {} {} {} ({:.1} MB fetched, {:.1} MB cached)",
                o.image,
                o.digest,
                o.platforms.join(","),
                o.fetched_bytes as f64 / 1e6,
                o.cached_bytes as f64 / 1e6
            ),
            false => eprintln!("FAILED {}: {}", o.image, o.result),
        }
    }
}

/// `wharf prefetch`: through the running server, or one started on the data dir for the run.
async fn prefetch(
    config: Config,
    images: &[String],
    list: Option<&Path>,
    platforms: &[String],
    concurrency: usize,
    (extras, pin): (bool, bool),
    json: bool,
) -> Res {
    use std::sync::Arc;
    use wharf::oci::Platform;
    use wharf::prefetch::{self, Target};
    let parse_platforms = |ps: &[String]| {
        ps.iter()
            .map(|p| Platform::parse(p).ok_or_else(|| format!("platform {p:?}: expected os/arch[/variant]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let asked = parse_platforms(platforms)?;
    let target = |image: &str, platforms: &[Platform], extras: bool| Target {
        image: image.to_owned(),
        platforms: platforms.to_vec(),
        extras,
        pin,
    };
    let mut targets: Vec<Target> = images.iter().map(|i| target(i, &asked, extras)).collect();
    if let Some(l) = list {
        targets.extend(read_list(l)?.iter().map(|i| target(i, &asked, extras)));
    }
    if targets.is_empty() {
        for mut t in prefetch::configured(&config.prefetch, false)? {
            if !asked.is_empty() {
                t.platforms = asked.clone();
            }
            t.extras &= extras;
            t.pin |= pin;
            targets.push(t);
        }
    }
    if targets.is_empty() {
        return Err(
            "nothing to prefetch: name images, give -f LIST, or add [[prefetch]] to the configuration".into(),
        );
    }
    // The running server's cache, or a server of our own on the data dir for the run.
    let (base, credentials, own) = if store::is_locked(&config.data_dir) {
        (server_base(&config)?, admin_credentials()?.map(|(u, p)| prefetch::Credentials::Basic(u, p)), None)
    } else {
        let mut c = config.clone();
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.admin.listen = None;
        c.metrics.listen = None;
        c.tls = None;
        c.auth = Default::default();
        let state = AppState::open(c)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(wharf::serve(listener, state, async {
            let _ = stopped.await;
        }));
        (format!("http://{addr}"), None, Some((stop, server)))
    };
    let client = Arc::new(prefetch::Client::new(&base, credentials)?);
    let progress: Arc<dyn prefetch::Progress> = match std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        true => Arc::new(Bars::new(&targets.iter().map(|t| t.image.clone()).collect::<Vec<_>>())),
        false => Arc::new(Lines),
    };
    let outcomes = prefetch::run(client, &targets, concurrency, progress.clone()).await;
    drop(progress);
    if let Some((stop, server)) = own {
        // A graceful stop: downloads under way are stored before it returns.
        let _ = stop.send(());
        server.await??;
    }
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        println!(
            "{:<48}  {:<71}  {:<24}  {:>10}  {:>10}  RESULT",
            "IMAGE", "DIGEST", "PLATFORMS", "FETCHED", "CACHED"
        );
        for o in &outcomes {
            println!(
                "{:<48}  {:<71}  {:<24}  {:>10}  {:>10}  {}",
                o.image,
                o.digest,
                o.platforms.join(","),
                mb(o.fetched_bytes),
                mb(o.cached_bytes),
                o.result
            );
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(format!("{n} of {} images failed", outcomes.len()).into()),
    }
}

fn import(config: Config, bundle_path: &Path, json: bool) -> Res {
    let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    let state = open_alone(config, "import")?;
    let known = |u: &str| names.iter().any(|n| n == u);
    let report = wharf::bundle::import(state.store(), bundle_path, &known)?;
    state.store().close()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for i in &report.images {
        println!("{:<56}  {}", i.reference, i.digest);
    }
    println!(
        "{}: {} images; {} blobs new ({:.1} MB), {} already in the cache",
        bundle_path.display(),
        report.images.len(),
        report.new_blobs,
        report.new_bytes as f64 / 1e6,
        report.present_blobs
    );
    Ok(())
}

fn reindex(config: &Config) -> Res {
    let path: &Path = &config.data_dir;
    let store = Store::open_with(path, &config.storage)?;
    let stats = store.reindex()?;
    store.close()?;
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

/// `wharf configure-containerd`: writes (or with `restore`, undoes) hosts.toml files.
fn configure_containerd(
    mirror: Option<&url::Url>,
    registries: &[String],
    from_config: Option<&Path>,
    dir: &Path,
    restore: bool,
) -> Res {
    use wharf::containerd::{self, Change, Registry};
    if restore {
        let hosts = match registries.is_empty() {
            true => containerd::configured(dir)?,
            false => registries.to_vec(),
        };
        for h in hosts {
            let what = match containerd::restore(dir, &h)? {
                Change::NotOurs => "nothing of wharf's there; left alone",
                _ => "restored",
            };
            println!("{h}: {what}");
        }
        return Ok(());
    }
    let mirror = mirror.ok_or("--mirror is required")?;
    let regs: Vec<Registry> = match (from_config, registries.is_empty()) {
        (Some(file), _) => Config::load(Some(file), &wharf::config::Overrides::default())?
            .upstreams
            .iter()
            .map(|u| Registry::from_upstream(&u.name, &u.url))
            .collect::<Result<_, _>>()?,
        (None, true) => vec![Registry::from_host("docker.io")?],
        (None, false) => registries.iter().map(|h| Registry::from_host(h)).collect::<Result<_, _>>()?,
    };
    for r in regs {
        let what = match containerd::configure(dir, &r, mirror)? {
            Change::Written { backed_up: true } => {
                "written (the previous hosts.toml is kept as hosts.toml.wharf-backup)"
            }
            Change::Written { backed_up: false } => "written",
            _ => "already configured",
        };
        println!("{}: {what}", r.host);
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_stop() -> Res {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// `wharf check-config FILE`: the effective configuration, or why the file is refused.
fn check_config(file: &Path) -> Res {
    let config = Config::load(Some(file), &wharf::config::Overrides::default())?;
    let mut v = serde_json::to_value(&config)?;
    redact(&mut v);
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Replaces every credential (`password`, `secret_access_key`) with a placeholder.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if (k == "password" || k == "secret_access_key") && !x.is_null() {
                    *x = "<redacted>".into();
                } else {
                    redact(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

fn dump_index(config: &Config) -> Res {
    let store = Store::open_with(&config.data_dir, &config.storage)?;
    let dump = store.dump()?;
    store.close()?;
    println!("{}", serde_json::to_string_pretty(&dump)?);
    Ok(())
}

/// `wharf gc`: asks the running server when one holds the data dir, else works on it.
async fn gc(config: Config, dry_run: bool, json: bool) -> Res {
    let value = if store::is_locked(&config.data_dir) {
        let method = if dry_run { reqwest::Method::GET } else { reqwest::Method::POST };
        call_server(&config, method, "/_wharf/gc").await?
    } else {
        let state = AppState::open(config)?;
        let report = state.cache.collect(dry_run).await.map_err(|e| e.to_string())?;
        state.store().close()?;
        serde_json::to_value(report)?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mb = |v: &serde_json::Value| n(v) as f64 / 1e6;
    let verb = if dry_run { "would remove" } else { "removed" };
    for (reason, t) in value["by_reason"].as_object().into_iter().flatten() {
        println!("{verb} {:>6} blobs {:>10.1} MB  ({reason})", n(&t["blobs"]), mb(&t["bytes"]));
    }
    println!("{verb} {:>6} temp files {:>6.1} MB", n(&value["spool_files"]), mb(&value["spool_bytes"]));
    let limit = match n(&value["limit_bytes"]) {
        0 => "unbounded".to_owned(),
        l => format!("{:.1} MB", l as f64 / 1e6),
    };
    println!(
        "cache: {:.1} MB -> {:.1} MB (limit {limit})",
        mb(&value["cache_bytes_before"]),
        mb(&value["cache_bytes_after"])
    );
    Ok(())
}
