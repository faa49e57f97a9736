//! `cmg connector run` and `cmg gateway run`: the two halves of the tunnel.

use std::sync::Arc;

use anyhow::Context;
use cmg_connector::{Connector, ConnectorOptions};
use cmg_site::{AdminService, DataDir, Site, watch_state};

use crate::cli::{ConnectorCommand, GatewayCommand};

pub async fn run(cmd: ConnectorCommand, data: DataDir) -> anyhow::Result<()> {
    let ConnectorCommand::Run {
        cmg,
        gateway_roots,
        verbose,
        tunnels,
    } = cmd;
    let admin = AdminService::open(data.clone(), crate::actor()).await?;
    let def = match cmg {
        Some(name) => admin.cmg(&name).await?,
        None => {
            let mut all = admin.cmgs().await?;
            match all.len() {
                1 => all.remove(0),
                0 => anyhow::bail!("the site has no CMG; create one with `cmg admin cmg create`"),
                _ => anyhow::bail!("the site has several CMGs; choose one with --cmg NAME"),
            }
        }
    };
    admin.site().close().await;
    let roots = gateway_roots
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut options = ConnectorOptions::for_cmg(&def, roots)?;
    options.verbose = verbose;
    options.tunnels_per_instance = tunnels;
    let site = Arc::new(Site::open(data).await?);
    let (state, watcher) = watch_state(Arc::clone(&site), cmg_site::CHANGE_POLL).await?;
    let connector = Connector::start(Arc::clone(&site), state, options).await?;
    println!(
        "Connection point for CMG {} dialling {} instance(s), {tunnels} tunnel(s) each",
        def.name, def.instances
    );
    println!("ready");
    crate::shutdown_signal().await;
    connector.shutdown().await;
    watcher.abort();
    site.close().await;
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
