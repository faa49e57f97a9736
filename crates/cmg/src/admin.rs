//! `cmg admin …`: devices, settings, management points, connection points and the audit log.

use cmg_site::{AdminService, DataDir, DeviceRecord, format_utc};
use serde_json::json;

use crate::cli::{AdminCommand, ConnectorAdminCommand, DeviceCommand, MpCommand, SettingsCommand};
use crate::rfc3339;
use crate::site::with_admin;

pub async fn run(cmd: AdminCommand, data: DataDir) -> anyhow::Result<()> {
    with_admin(data, async |admin| match cmd {
        AdminCommand::Device(cmd) => device(admin, cmd).await,
        AdminCommand::Settings(cmd) => settings(admin, cmd).await,
        AdminCommand::Mp(cmd) => mp(admin, cmd).await,
        AdminCommand::Cmg(cmd) => crate::cmg_admin::run(admin, cmd).await,
        AdminCommand::Connector(cmd) => connector(admin, cmd).await,
        AdminCommand::Audit { limit, json } => audit(admin, limit, json).await,
    })
    .await
}

fn device_json(d: &DeviceRecord) -> serde_json::Value {
    json!({
        "client_id": d.client_id, "hostname": d.hostname, "os": d.os,
        "agent_version": d.agent_version, "hardware_id": d.hardware_id,
        "certificate_thumbprint": d.cert_thumbprint, "registered_via": d.registered_via,
        "bulk_token_id": d.bulk_token_id.map(|id| id.to_string()),
        "approved": d.approved, "blocked": d.blocked, "registered_at": rfc3339(d.registered_at),
        "last_seen_at": d.last_seen_at.map(rfc3339), "last_seen_via": d.last_seen_via,
    })
}

fn status(d: &DeviceRecord) -> &'static str {
    if d.blocked {
        "Blocked"
    } else if !d.approved {
        "Pending"
    } else {
        "Active"
    }
}

async fn device(admin: &AdminService, cmd: DeviceCommand) -> anyhow::Result<()> {
    match cmd {
        DeviceCommand::List { json } => {
            let devices = admin.devices().await?;
            if json {
                let rows: Vec<_> = devices.iter().map(device_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<42} {:<20} {:<8} {:<17} {:<23} LAST SEEN VIA",
                    "CLIENT ID", "HOSTNAME", "STATUS", "REGISTERED VIA", "LAST SEEN"
                );
                for d in &devices {
                    println!(
                        "{:<42} {:<20} {:<8} {:<17} {:<23} {}",
                        d.client_id,
                        d.hostname,
                        status(d),
                        d.registered_via,
                        d.last_seen_at.map(format_utc).unwrap_or_default(),
                        d.last_seen_via.as_deref().unwrap_or("")
                    );
                }
            }
        }
        DeviceCommand::Show { client_id } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&device_json(&admin.device(&client_id).await?))?
            );
        }
        DeviceCommand::Block { client_id } => {
            let d = admin.block_device(&client_id).await?;
            println!(
                "Device {} is blocked; its token is refused from now on.",
                d.client_id
            );
        }
        DeviceCommand::Unblock { client_id } => {
            let d = admin.unblock_device(&client_id).await?;
            println!("Device {} is unblocked.", d.client_id);
        }
        DeviceCommand::Approve { client_id } => {
            let d = admin.approve_device(&client_id).await?;
            println!(
                "Device {} is approved; it gets its token when it next registers.",
                d.client_id
            );
        }
        DeviceCommand::Conflicts { all } => {
            println!(
                "{:<42} {:<42} {:<23} RESOLUTION",
                "NEW RECORD", "CONFLICTS WITH", "DETECTED"
            );
            for c in admin.device_conflicts(all).await? {
                println!(
                    "{:<42} {:<42} {:<23} {}",
                    c.new_client_id,
                    c.existing_client_id,
                    format_utc(c.detected_at),
                    c.resolution.as_deref().unwrap_or("open")
                );
            }
        }
        DeviceCommand::Merge { client_id } => {
            let d = admin.merge_conflict(&client_id).await?;
            println!(
                "Merged {client_id} into {}, which now uses the new certificate.",
                d.client_id
            );
        }
    }
    Ok(())
}

async fn settings(admin: &AdminService, cmd: SettingsCommand) -> anyhow::Result<()> {
    match cmd {
        SettingsCommand::Show => {
            for (name, value, help) in admin.settings().await? {
                println!("{name:<20} {value:<12} {help}");
            }
        }
        SettingsCommand::Set { name, value } => {
            let value = admin.set_setting(&name, &value).await?;
            println!("{name} = {value}");
        }
    }
    Ok(())
}

async fn mp(admin: &AdminService, cmd: MpCommand) -> anyhow::Result<()> {
    let print = |m: &cmg_site::MpRecord| {
        println!(
            "{:<18} {:<10} {:<40} {}",
            m.role_id,
            m.name,
            m.url,
            if m.allow_cmg_traffic { "yes" } else { "no" }
        );
    };
    match cmd {
        MpCommand::List => {
            println!("{:<18} {:<10} {:<40} CMG TRAFFIC", "ROLE ID", "NAME", "URL");
            admin.management_points().await?.iter().for_each(print);
        }
        MpCommand::Add {
            name,
            url,
            allow_cmg,
            role_id,
        } => {
            print(
                &admin
                    .add_management_point(&name, &url, allow_cmg, role_id)
                    .await?,
            );
        }
        MpCommand::Set {
            role_id,
            url,
            allow_cmg,
        } => {
            print(
                &admin
                    .set_management_point(role_id, url.as_deref(), allow_cmg)
                    .await?,
            );
        }
    }
    Ok(())
}

async fn connector(admin: &AdminService, cmd: ConnectorAdminCommand) -> anyhow::Result<()> {
    match cmd {
        ConnectorAdminCommand::Add {
            name,
            out,
            same_host,
        } => {
            let added = admin.add_connection_point(&name, &out, same_host).await?;
            let dir = added.dir.display();
            println!(
                "Connection point {} added: certificate {}, valid until {}.",
                added.record.name,
                added.record.thumbprint_sha256,
                format_utc(added.certificate.not_after)
            );
            println!("Wrote {dir} (no private key of the site is in it):");
            for file in &added.files {
                let shown = file.strip_prefix(&added.dir).unwrap_or(file);
                println!("  {}", shown.display());
            }
            println!("  logs/");
            println!(
                "Copy {dir} to the connection point's host, keeping its modes (the key is 0600), and run there:"
            );
            println!("  cmg connector run --data {dir}");
            println!(
                "That host must reach the site database, the gateways' tunnel ports (10140 + instance − 1) and the management points; nothing needs to reach it."
            );
        }
        ConnectorAdminCommand::List { json } => {
            let points = admin.connection_points(cmg_site::unix_now()).await?;
            let name = |c: &cmg_site::ConnectionPointInfo| {
                c.name.clone().unwrap_or_else(|| "(site server)".into())
            };
            if json {
                let rows: Vec<_> = points
                    .iter()
                    .map(|c| {
                        json!({
                            "name": c.name, "thumbprint_sha256": c.thumbprint_sha256,
                            "valid_until": rfc3339(c.valid_until), "status": c.status.as_str(),
                            "created_at": rfc3339(c.created_at), "created_by": c.created_by,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:<44} {:<23} STATUS",
                    "NAME", "THUMBPRINT (SHA-256)", "VALID UNTIL"
                );
                for c in &points {
                    println!(
                        "{:<24} {:<44} {:<23} {}",
                        name(c),
                        c.thumbprint_sha256,
                        format_utc(c.valid_until),
                        c.status.as_str()
                    );
                }
            }
        }
        ConnectorAdminCommand::Remove { name } => {
            let removed = admin.remove_connection_point(&name).await?;
            println!(
                "Connection point {} removed: its certificate {} is retired. Management points stop believing what it relays within seconds, and it closes its tunnels.",
                removed.name, removed.thumbprint_sha256
            );
        }
    }
    Ok(())
}

async fn audit(admin: &AdminService, limit: u32, json: bool) -> anyhow::Result<()> {
    let entries = admin.audit_log(limit).await?;
    if json {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| json!({"at": rfc3339(e.at), "actor": e.actor, "action": e.action, "target": e.target, "detail": e.detail}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<23} {:<16} {:<26} {:<43} DETAIL",
            "WHEN", "WHO", "ACTION", "TARGET"
        );
        for e in &entries {
            println!(
                "{:<23} {:<16} {:<26} {:<43} {}",
                format_utc(e.at),
                e.actor,
                e.action,
                e.target,
                e.detail
            );
        }
    }
    Ok(())
}
