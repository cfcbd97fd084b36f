//! The `wsgate` binary: process lifecycle only.
//!
//! Parse the command line → load and validate the configuration (exit 2 on
//! any bad value, before binding anything) → set up logging → raise the
//! descriptor limit → bind both listeners (exit 1 naming the address if one
//! is taken) → `wsgate::run` until shutdown → exit 0.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use wsgate::config::{Config, ConfigSource, LogFormat, RawConfig};

/// A reverse-proxy sidecar that enforces WebSocket admission.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML configuration file (keys as in the README; environment variables override it).
    #[arg(long, global = true, env = "WSGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a built-in echo upstream on loopback with the proxy in front of it (cap 2).
    Demo,
    /// Load and validate the configuration, print the effective values, exit 0 or 2.
    CheckConfig,
    /// Pod-deletion hook (the native-sidecar layout): wait for SIGTERM, then have the wsgate
    /// of this pod drain (POST /shutdown on its admin port) and exit when it is done.
    Prestop {
        /// wsgate's admin address, reached over the pod's loopback.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Prestop { admin }) = cli.command {
        return prestop(admin);
    }
    let demo = matches!(cli.command, Some(Command::Demo));
    let base = if demo {
        wsgate::demo::defaults()
    } else {
        RawConfig::default()
    };
    let source = ConfigSource {
        base,
        file: cli.config.clone(),
    };
    // Taken before the file is read, so the watch (see `os_signals`) also
    // sees a change made while it was being read.
    let loaded_version = source.file.as_deref().and_then(wsgate::FileVersion::of);
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        for w in &config.warnings {
            eprintln!("wsgate: warning: {w}");
        }
        #[allow(
            clippy::print_stdout,
            reason = "check-config's output is the effective configuration"
        )]
        {
            print!("{}", config.to_toml());
        }
        return ExitCode::SUCCESS;
    }
    if let Some(ignored) = init_tracing(config.log_format, &config.log_level) {
        tracing::warn!("{ignored}");
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match runtime(config.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let threads = runtime.metrics().num_workers();
    let kind = if config.workers == 1 {
        "single-threaded"
    } else {
        "multi-threaded"
    };
    tracing::info!(runtime = %kind, threads, "runtime started");
    let result = runtime.block_on(serve(config, source, loaded_version, demo));
    // DNS lookups run on the blocking pool and cannot be cancelled: do not
    // let one stuck in a resolver outage hold the exit past the grace.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("wsgate: {e}");
            ExitCode::from(1)
        }
    }
}

/// `wsgate prestop`: no configuration is read; the log is plain text at
/// `info` (`RUST_LOG` still wins).
fn prestop(admin: std::net::SocketAddr) -> ExitCode {
    if let Some(ignored) = init_tracing(LogFormat::Text, "info") {
        tracing::warn!("{ignored}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(wsgate::prestop(admin)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("prestop: {e}");
            ExitCode::from(1)
        }
    }
}

/// The runtime that runs every connection. One thread by default: a
/// sidecar usually gets a core or less, and a single-threaded runtime
/// never parks one worker to wake another, never steals and keeps no
/// per-batch scheduler statistics — that costs less CPU per message and
/// per upgrade than two workers sharing the same cores (see README,
/// "CPU and worker threads"). `workers = 0` takes one per available CPU
/// (CPU quota and affinity), like tokio's default.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 1 {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()
}

/// Sets logging up: `format`, and the filter of `RUST_LOG` when it is set
/// and valid, else `log_level`. Returns the warning to log when `RUST_LOG`
/// was set but refused: a typo there must not silence every line
/// (docs/configuration.md).
fn init_tracing(format: LogFormat, log_level: &str) -> Option<String> {
    let (filter, ignored) = match std::env::var_os("RUST_LOG") {
        Some(v) if !v.to_string_lossy().trim().is_empty() => {
            let text = v.to_string_lossy();
            match wsgate::config::log_filter(&text) {
                Ok(f) => (f, None),
                Err(why) => (
                    configured_filter(log_level),
                    Some(format!(
                        "RUST_LOG={text:?} is ignored ({why}); logging with log_level = {log_level:?}"
                    )),
                ),
            }
        }
        _ => (configured_filter(log_level), None),
    };
    let terminal = std::io::stderr().is_terminal();
    wsgate::log_format::dispatch(format, filter, terminal, std::io::stderr).init();
    ignored
}

/// `log_level`'s filter; it was checked when the configuration was loaded.
fn configured_filter(log_level: &str) -> EnvFilter {
    wsgate::config::log_filter(log_level).unwrap_or_else(|_| EnvFilter::new("info"))
}

async fn bind(what: &str, addr: std::net::SocketAddr) -> Result<TcpListener, wsgate::Error> {
    let listener =
        wsgate::listen(addr).map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "{what} listening");
    Ok(listener)
}

async fn serve(
    mut config: Config,
    mut source: ConfigSource,
    loaded_version: Option<wsgate::FileVersion>,
    demo: bool,
) -> Result<(), wsgate::Error> {
    raise_descriptor_limit(config.max_clients);
    let echo = if demo {
        let echo = bind("demo upstream", "127.0.0.1:0".parse()?).await?;
        let addr = echo.local_addr()?;
        config.upstream = wsgate::config::Upstream::parse(&addr.to_string())?;
        // A reload keeps the upstream anyway; this keeps it from warning.
        source.base.upstream = Some(addr.to_string());
        Some((tokio::spawn(wsgate::demo::echo_upstream(echo)), addr))
    } else {
        None
    };
    // Signal handlers go in before the listeners are bound (and logged), so
    // a SIGTERM that arrives during start-up is a clean shutdown, not the
    // default disposition killing the process.
    let control = wsgate::os_signals(source, loaded_version)?;
    let proxy = bind("proxy", config.listen).await?;
    let admin = bind("admin", config.admin_listen).await?;
    if let Some((_, echo_addr)) = &echo {
        print_demo_banner(
            *echo_addr,
            proxy.local_addr()?,
            admin.local_addr()?,
            config.max_clients,
        );
    }
    tracing::info!(
        upstream = %config.upstream.shown(),
        max_clients = config.max_clients,
        "wsgate {} running",
        env!("CARGO_PKG_VERSION")
    );
    wsgate::run(config, proxy, admin, control).await?;
    if let Some((task, _)) = echo {
        task.abort();
    }
    tracing::info!("shutdown complete");
    Ok(())
}

#[allow(
    clippy::print_stdout,
    reason = "the demo talks to a person at a terminal"
)]
fn print_demo_banner(
    echo: std::net::SocketAddr,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    max_clients: usize,
) {
    use std::io::Write as _;
    let cap = if max_clients == 0 {
        "max_clients = 0: unlimited".to_owned()
    } else {
        format!(
            "max_clients = {max_clients}: client number {} gets 503",
            max_clients + 1
        )
    };
    println!("wsgate demo");
    println!("  upstream  ws://{echo}/  (built-in echo, and a page at /)");
    println!("  proxy     ws://{proxy}/  ({cap})");
    println!("  metrics   http://{admin}/metrics");
    println!();
    println!("open http://{proxy}/ in a browser: its buttons open WebSockets through wsgate");
    println!(
        "or try, in {} terminals:  websocat ws://{proxy}/",
        max_clients.max(1) + 1
    );
    println!("watch:   curl -s http://{admin}/metrics | grep ^wsgate_connections");
    println!("stop:    Ctrl-C");
    let _ = std::io::stdout().flush();
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every spliced
/// connection costs two descriptors (client + upstream), and the default
/// soft limit (often 1024) would cap wsgate far below `max_clients`.
fn raise_descriptor_limit(max_clients: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let needed = (max_clients as u64).saturating_mul(2).saturating_add(64);
            if max_clients > 0 && needed > limit {
                tracing::warn!(
                    max_clients,
                    descriptor_limit = limit,
                    "max_clients cannot be reached: each connection needs 2 descriptors; raise the hard RLIMIT_NOFILE"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE"),
    }
}
