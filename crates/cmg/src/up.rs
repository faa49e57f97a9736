//! `cmg up`.

use cmg_site::{DataDir, format_utc};
use cmg_up::{Up, UpOptions};

use crate::cli::UpArgs;

pub async fn run(args: UpArgs, data: DataDir) -> anyhow::Result<()> {
    let root = data.root().display().to_string();
    let up = Up::start(UpOptions {
        data,
        site_code: args.site_code,
        gateway_port: args.gateway_port,
        mp_port: args.mp_port,
        tunnel_port: args.tunnel_port,
        instances: args.instances,
        actor: crate::actor(),
    })
    .await?;
    println!(
        "Site {} (hierarchy {}) in {root}",
        up.site_code, up.hierarchy_id
    );
    println!(
        "Management point {}: https://localhost:{}",
        up.site.mp_role_id(),
        up.site.mp_addr().port()
    );
    for (n, gateway) in up.gateways.iter().enumerate() {
        println!(
            "Gateway {} instance {}: https://{}:{} (tunnel {})",
            cmg_up::CMG_NAME,
            n + 1,
            cmg_up::CMG_HOST,
            gateway.device_addr().port(),
            gateway.tunnel_addr()
        );
    }
    println!(
        "Connection point: tunnels up to {} instance(s)",
        up.gateways.len()
    );
    let token = up.bulk_token(&crate::actor()).await?;
    println!(
        "Bulk registration token {} is valid until {}.",
        token.record.id,
        format_utc(token.record.valid_until)
    );
    println!("Install a client through the gateway with:");
    println!("{}", up.install_command(&token, "./cmg-client"));
    println!("ready");
    crate::shutdown_signal().await;
    crate::stop_gracefully("every role", up.shutdown()).await;
    Ok(())
}
