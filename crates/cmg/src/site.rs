//! `cmg site …` and `cmg admin …`.

use cmg_site::{AdminService, DataDir, InitOptions, init_site};
use serde_json::json;

use crate::cli::{AdminCommand, SiteCommand, TokenKeyCommand};
use crate::{actor, rfc3339};
use cmg_site::format_utc as format_time;

pub async fn run(cmd: SiteCommand, data: DataDir) -> anyhow::Result<()> {
    match cmd {
        SiteCommand::Init(args) => {
            let root = data.root().display().to_string();
            let config = init_site(InitOptions {
                data,
                site_code: args.site_code,
                token_key: args.token_key,
                db: args.db,
                actor: actor(),
            })
            .await?;
            println!("Site {} created in {root}.", config.site_code);
            println!(
                "Hierarchy ID: {}",
                config.hierarchy_id.to_string().to_uppercase()
            );
            println!("Token signing key: {}", args.token_key);
            println!(
                "Next: create a bulk registration token with `cmg --data {root} bulk-token new`."
            );
            Ok(())
        }
        SiteCommand::Jwks => {
            with_admin(data, async |admin| {
                println!("{}", serde_json::to_string_pretty(&admin.jwks().await?)?);
                Ok(())
            })
            .await
        }
        SiteCommand::TokenKey(TokenKeyCommand::Rotate { token_key }) => {
            with_admin(data, async |admin| {
                let cert = admin.rotate_token_signing_key(token_key).await?;
                println!(
                    "New token signing certificate {} signs from now on.",
                    cert.thumbprint_sha256
                );
                println!(
                    "The previous one keeps verifying the tokens it signed until they expire."
                );
                Ok(())
            })
            .await
        }
        SiteCommand::TokenKey(TokenKeyCommand::Retire { kid }) => {
            with_admin(data, async |admin| {
                admin.retire_token_signing_key(&kid).await?;
                println!(
                    "Token signing certificate {kid} is retired; tokens it signed no longer verify."
                );
                Ok(())
            })
            .await
        }
    }
}

pub async fn run_admin(cmd: AdminCommand, data: DataDir) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Audit { limit, json } => {
            with_admin(data, async |admin| {
                let entries = admin.audit_log(limit).await?;
                if json {
                    let rows: Vec<_> = entries
                        .iter()
                        .map(|e| {
                            json!({"at": rfc3339(e.at), "actor": e.actor, "action": e.action,
                               "target": e.target, "detail": e.detail})
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!(
                        "{:<23} {:<16} {:<22} {:<43} DETAIL",
                        "WHEN", "WHO", "ACTION", "TARGET"
                    );
                    for e in &entries {
                        println!(
                            "{:<23} {:<16} {:<22} {:<43} {}",
                            format_time(e.at),
                            e.actor,
                            e.action,
                            e.target,
                            e.detail
                        );
                    }
                }
                Ok(())
            })
            .await
        }
    }
}

/// Opens the admin service, runs `f`, and closes the site database cleanly either way.
pub(crate) async fn with_admin(
    data: DataDir,
    f: impl AsyncFnOnce(&AdminService) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let admin = AdminService::open(data, actor()).await?;
    let result = f(&admin).await;
    admin.site().close().await;
    result
}
