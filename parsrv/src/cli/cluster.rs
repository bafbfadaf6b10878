//! `parsrv cluster`: run this host's cluster agent, show its status, drain it, make its
//! certificates.

use super::ClusterCommand;
use crate::{
    config_file::ConfigFile,
    error::{Error, Result},
};

pub(super) fn cluster(command: ClusterCommand) -> Result<()> {
    use crate::cluster;
    match command {
        ClusterCommand::Run { config } => {
            let file = ConfigFile::load(&config)?;
            let spec = file.cluster.ok_or_else(|| {
                Error::Rejected(format!(
                    "{} has no [cluster] section: add one (see docs/cluster.md)",
                    config.display()
                ))
            })?;
            cluster::run(spec)
        }
        ClusterCommand::Status { name, json } => {
            let status = cluster::status(&name)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("serializable")
                );
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        ClusterCommand::Drain { name } => {
            cluster::drain(&name)?;
            println!("cluster {name}: this host takes no new clients");
            Ok(())
        }
        ClusterCommand::Certs { name, hosts, dir } => {
            for file in cluster::certs::make(&name, &hosts, &dir)? {
                println!("{}", file.display());
            }
            Ok(())
        }
    }
}
