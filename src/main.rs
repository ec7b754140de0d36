//! The `star-ls` binary: parse the command line, set up logging, run the command (`cli`).

mod cli;

use clap::Parser;

fn main() {
    // tower-lsp logs every cancelled request at info: noise at the default level.
    let filter = std::env::var("STAR_LS_LOG")
        .unwrap_or_else(|_| "info,tower_lsp_server::service::pending=warn".into());
    // Logging never blocks the caller: an editor that stops reading stderr loses log lines, not the
    // LSP loop. The guard flushes what is queued when main returns.
    let (stderr, log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("star-ls-log")
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(stderr)
        // Editors show the log in a panel: colour codes only for a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .init();
    let result = cli::Cli::parse().run();
    drop(log_guard);
    if let Err(e) = result {
        eprintln!("star-ls: {e:#}");
        std::process::exit(1);
    }
}
