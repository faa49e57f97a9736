//! `cmg`, the one binary: parses the command line, calls the role or admin service it names,
//! and prints the result. Rules live in the library crates, not here.

mod admin;
mod bulk_token;
mod cli;
mod client;
mod cmg_admin;
mod connector;
mod site;
mod up;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

#[global_allocator]
static ALLOCATOR: cmg_alloc::Allocator = cmg_alloc::Allocator;

fn main() -> ExitCode {
    cmg_alloc::tune();
    let args = match bulk_token::translate_tool_syntax(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let data = cmg_site::DataDir::new(&cli.data);
    cmg_log::init_stderr_diagnostics();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, data)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once (library errors often already name their cause).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

async fn run(cli: Cli, data: cmg_site::DataDir) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up::run(args, data).await,
        Command::Site(cmd) => site::run(cmd, data).await,
        Command::BulkToken(cmd) => bulk_token::run(cmd, data).await,
        Command::Admin(cmd) => admin::run(cmd, data).await,
        Command::Connector(cmd) => connector::run(cmd, data).await,
        Command::Gateway(cmd) => connector::run_gateway(cmd).await,
        Command::Client(cmd) => client::run(cmd).await,
    }
}

/// The OS account running the command, recorded in the audit log as the admin who acted.
pub(crate) fn actor() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(account_from_uid)
}

/// The account name of this process's user from /etc/passwd, or `uid N` when it has none.
fn account_from_uid() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".into();
    };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Resolves on Ctrl-C or SIGTERM, so every role stops cleanly under a terminal or a service
/// manager alike.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs a graceful stop unless a second Ctrl-C or SIGTERM asks to stop at once; returning then
/// ends the process, which cuts whatever was still open.
pub(crate) async fn stop_gracefully(what: &str, stop: impl Future<Output = ()>) {
    eprintln!(
        "Stopping {what}: the connection point's tunnels close once the requests on them are \
         answered (at most {} s); Ctrl-C now stops at once",
        cmg_connector::DRAIN_TIMEOUT.as_secs()
    );
    tokio::select! {
        () = stop => {}
        () = shutdown_signal() => eprintln!("Stopped at once; requests still in flight were cut"),
    }
}

/// RFC 3339, for JSON output.
pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
