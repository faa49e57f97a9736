//! `cmg connector run` and `cmg gateway run`: the two halves of the tunnel.

use std::sync::Arc;

use anyhow::Context;
use cmg_connector::{Connector, ConnectorOptions};
use cmg_site::{DataDir, Site, SiteConfig, watch_state};

use crate::cli::{ConnectorCommand, GatewayCommand};

pub async fn run(cmd: ConnectorCommand, data: DataDir) -> anyhow::Result<()> {
    let ConnectorCommand::Run {
        cmg,
        gateway_roots,
        verbose,
        tunnels,
    } = cmd;
    // A connection point needs none of the site's private keys: the site server's data
    // directory and one written by `cmg admin connector add` open the same way.
    let config = SiteConfig::load(&data)?;
    let site = Arc::new(Site::open_for_connection_point(data).await?);
    let result = serve(&site, config, cmg, gateway_roots, verbose, tunnels).await;
    site.close().await;
    result
}

async fn serve(
    site: &Arc<Site>,
    config: SiteConfig,
    cmg: Option<String>,
    gateway_roots: Vec<std::path::PathBuf>,
    verbose: bool,
    tunnels: usize,
) -> anyhow::Result<()> {
    let def = match cmg {
        Some(name) => site.cmg(&name).await?,
        None => {
            let mut all = site.cmgs().await?;
            match all.len() {
                1 => all.remove(0),
                0 => anyhow::bail!("the site has no CMG; create one with `cmg admin cmg create`"),
                _ => anyhow::bail!("the site has several CMGs; choose one with --cmg NAME"),
            }
        }
    };
    let roots = gateway_roots
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut options = ConnectorOptions::for_cmg(&def, roots)?;
    options.verbose = verbose;
    options.tunnels_per_instance = tunnels;
    if let Some(name) = &config.connection_point {
        // Traffic reports name the connection point as the admin added it.
        options.name = name.clone();
    }
    let (state, watcher) = watch_state(Arc::clone(site), cmg_site::CHANGE_POLL).await?;
    let connector = match Connector::start(Arc::clone(site), state, options).await {
        Ok(connector) => connector,
        Err(e) => {
            watcher.abort();
            return Err(e.into());
        }
    };
    println!(
        "Connection point {}for CMG {} dialling {} instance(s), {tunnels} tunnel(s) each",
        config
            .connection_point
            .as_deref()
            .map(|n| format!("{n} "))
            .unwrap_or_default(),
        def.name,
        def.instances
    );
    println!("ready");
    let removed = tokio::select! {
        _ = crate::shutdown_signal() => false,
        _ = connector.removed() => true,
    };
    crate::stop_gracefully("the connection point", connector.shutdown()).await;
    watcher.abort();
    if removed {
        anyhow::bail!(
            "this connection point was removed from the site (`cmg admin connector remove`); its tunnels are closed. Add a new one on the site server with `cmg admin connector add`"
        );
    }
    Ok(())
}

pub async fn run_gateway(cmd: GatewayCommand) -> anyhow::Result<()> {
    let GatewayCommand::Run { config } = cmd;
    let config = cmg_gateway::GatewayConfig::load(&config)?;
    let (name, instance) = (config.name.clone(), config.instance);
    let gateway = cmg_gateway::Gateway::start(config).await?;
    println!(
        "Gateway {name} instance {instance}: devices on https://{}, tunnels on {}",
        gateway.device_addr(),
        gateway.tunnel_addr()
    );
    if let Some(metrics) = gateway.metrics_addr() {
        println!("Metrics on http://{metrics}/metrics");
    }
    println!("ready");
    crate::shutdown_signal().await;
    gateway.shutdown().await;
    Ok(())
}
