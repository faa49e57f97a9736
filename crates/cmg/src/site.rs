//! `cmg site …` and `cmg admin …`.

use cmg_site::{AdminService, DataDir, InitOptions, SiteRunOptions, SiteServer, init_site};

use crate::actor;
use crate::cli::{RunArgs, SiteCommand, TokenKeyCommand};

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
        SiteCommand::Run(args) => run_site(data, args).await,
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

async fn run_site(data: DataDir, args: RunArgs) -> anyhow::Result<()> {
    let mut options = SiteRunOptions::new(args.mp_listen);
    options.mp.role_id = args.mp_role_id.unwrap_or(0);
    let server = SiteServer::start(data, options).await?;
    println!(
        "Management point {} listening on https://{}",
        server.mp_role_id(),
        server.mp_addr()
    );
    println!("ready");
    crate::shutdown_signal().await;
    eprintln!("Stopping: letting requests in flight finish…");
    server.shutdown().await;
    Ok(())
}
