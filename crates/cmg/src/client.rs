//! `cmg client …`: the client's install, agent, status and uninstall.

use crate::cli::ClientCommand;

pub async fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Install { args } => {
            let options = cmg_client::InstallOptions::parse(&args)?;
            let report = cmg_client::install(&options).await?;
            println!("{}", report.summary());
        }
        ClientCommand::Run { state_dir } => {
            cmg_client::Agent::run(&state_dir, crate::shutdown_signal()).await?;
        }
        ClientCommand::Status { state_dir, json } => {
            let status = cmg_client::status(&state_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("{status}");
            }
        }
        ClientCommand::Uninstall { state_dir } => {
            cmg_client::uninstall(&state_dir)?;
            println!("The client in {} is uninstalled.", state_dir.display());
        }
    }
    Ok(())
}
