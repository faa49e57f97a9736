//! `cmg bulk-token`: the bulk registration token tool (DESIGN §8), in both our syntax and the
//! documented one (`/new`, `/lifetime MIN`, `/?`).

use std::ffi::OsString;

use cmg_site::{AdminService, DataDir, unix_now};
use serde_json::json;

use crate::cli::BulkTokenCommand;
use crate::rfc3339;
use crate::site::with_admin;
use cmg_site::format_utc as format_time;

/// Rewrites the documented tool syntax after `bulk-token` into ordinary subcommands:
/// `/new` → `new`, `/lifetime N` (or `/lifetime:N`) → `--lifetime N`, `/?` → `--help`.
/// Option names are case-insensitive, as on Windows.
pub fn translate_tool_syntax(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(at) = args.iter().position(|a| a == "bulk-token") else {
        return Ok(args);
    };
    let rest: Vec<String> = args[at + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if !rest.first().is_some_and(|a| a.starts_with('/')) {
        return Ok(args);
    }
    let mut new = false;
    let mut help = false;
    let mut lifetime: Option<String> = None;
    let mut words = rest.into_iter();
    while let Some(word) = words.next() {
        let lower = word.to_ascii_lowercase();
        match lower.as_str() {
            "/new" => new = true,
            "/?" | "/help" => help = true,
            "/lifetime" => {
                lifetime = Some(
                    words
                        .next()
                        .ok_or("/lifetime needs a value: /lifetime MINUTES")?,
                )
            }
            _ if lower.starts_with("/lifetime:") => {
                lifetime = Some(word["/lifetime:".len()..].to_owned())
            }
            _ => {
                return Err(format!(
                    "unknown bulk token tool parameter '{word}'; the tool takes /new, /lifetime MINUTES and /?"
                ));
            }
        }
    }
    let mut out: Vec<OsString> = args[..=at].to_vec();
    if help {
        out.push("--help".into());
    } else if new {
        out.push("new".into());
        if let Some(minutes) = lifetime {
            out.push(format!("--lifetime={minutes}").into());
        }
    } else {
        return Err("/lifetime goes with /new: cmg bulk-token /new /lifetime MINUTES".into());
    }
    Ok(out)
}

pub async fn run(cmd: BulkTokenCommand, data: DataDir) -> anyhow::Result<()> {
    with_admin(data, async |admin| run_with(admin, cmd).await).await
}

async fn run_with(admin: &AdminService, cmd: BulkTokenCommand) -> anyhow::Result<()> {
    match cmd {
        BulkTokenCommand::New { lifetime } => {
            let created = admin.new_bulk_token(lifetime).await?;
            // Three lines that scripts parse: GUID, expiry, token. Advice goes to stderr.
            println!("{}", created.record.id);
            println!(
                "Token is valid until {}.",
                format_time(created.record.valid_until)
            );
            println!("{}", created.token.expose());
            eprintln!(
                "Copy the token now and keep it somewhere safe: the site does not store it. \
                 Block it with `cmg bulk-token block {}`.",
                created.record.id
            );
        }
        BulkTokenCommand::List { json, kind } => {
            let items: Vec<_> = admin
                .inventory(unix_now())
                .await?
                .into_iter()
                .filter(|i| kind.is_none_or(|k| i.kind == k))
                .collect();
            if json {
                let rows: Vec<_> = items
                    .iter()
                    .map(|i| {
                        json!({
                            "type": i.kind.as_str(), "id": i.id,
                            "valid_from": rfc3339(i.valid_from), "valid_until": rfc3339(i.valid_until),
                            "status": i.status.as_str(), "detail": i.detail,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:<43} {:<23} {:<23} {:<8} CREATED BY / SUBJECT",
                    "TYPE", "GUID / THUMBPRINT", "VALID FROM", "VALID UNTIL", "STATUS"
                );
                for i in &items {
                    println!(
                        "{:<24} {:<43} {:<23} {:<23} {:<8} {}",
                        i.kind.as_str(),
                        i.id,
                        format_time(i.valid_from),
                        format_time(i.valid_until),
                        i.status.as_str(),
                        i.detail
                    );
                }
            }
        }
        BulkTokenCommand::Block { guid } => {
            let record = admin.block_bulk_token(&guid).await?;
            println!("Bulk registration token {} is blocked.", record.id);
        }
        BulkTokenCommand::Unblock { guid } => {
            let record = admin.unblock_bulk_token(&guid).await?;
            println!("Bulk registration token {} is unblocked.", record.id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::translate_tool_syntax;

    fn tr(args: &[&str]) -> Result<Vec<String>, String> {
        translate_tool_syntax(args.iter().map(Into::into).collect()).map(|v| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn documented_syntax_becomes_subcommands() {
        assert_eq!(
            tr(&["cmg", "bulk-token", "/new"]).unwrap(),
            ["cmg", "bulk-token", "new"]
        );
        assert_eq!(
            tr(&[
                "cmg",
                "--data",
                "d",
                "bulk-token",
                "/NEW",
                "/Lifetime",
                "60"
            ])
            .unwrap(),
            ["cmg", "--data", "d", "bulk-token", "new", "--lifetime=60"]
        );
        assert_eq!(
            tr(&["cmg", "bulk-token", "/lifetime", "-5", "/new"]).unwrap(),
            ["cmg", "bulk-token", "new", "--lifetime=-5"]
        );
        assert_eq!(
            tr(&["cmg", "bulk-token", "/lifetime:10080", "/new"]).unwrap()[3],
            "--lifetime=10080"
        );
        assert_eq!(
            tr(&["cmg", "bulk-token", "/?"]).unwrap(),
            ["cmg", "bulk-token", "--help"]
        );
        assert_eq!(
            tr(&["cmg", "bulk-token", "list"]).unwrap(),
            ["cmg", "bulk-token", "list"]
        );
    }

    #[test]
    fn documented_syntax_refuses_what_the_tool_does_not_take() {
        assert!(
            tr(&["cmg", "bulk-token", "/lifetime", "60"])
                .unwrap_err()
                .contains("/new")
        );
        assert!(
            tr(&["cmg", "bulk-token", "/new", "/lifetime"])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            tr(&["cmg", "bulk-token", "/new", "/bogus"])
                .unwrap_err()
                .contains("/bogus")
        );
    }
}
