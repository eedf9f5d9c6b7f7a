//! `keel cni ...`: install the `keel-cni` plugin for any CNI runtime. Parses flags into a
//! `keel_cni::install::InstallSpec`; the work is in the library.

use std::path::PathBuf;

use anyhow::Context;

/// CNI plugin management.
#[derive(clap::Args, Debug)]
pub struct CniArgs {
    #[command(subcommand)]
    pub command: CniCommand,
}

/// `keel cni` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum CniCommand {
    /// Copy `keel-cni` into the CNI bin dir and write a conflist into the CNI conf dir.
    Install(InstallArgs),
}

/// `keel cni install` flags.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// CNI bin dir the runtime searches for plugins.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// CNI conf dir the runtime reads conflists from.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The plugin binary to install (default: `keel-cni` next to this `keel` binary).
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
    /// Network name.
    #[arg(long, default_value = "keel")]
    pub network: String,
    /// Bridge name.
    #[arg(long, default_value = "keel0")]
    pub bridge: String,
    /// Pod subnet; repeat for dual stack (one IPv4 and one IPv6).
    #[arg(long = "subnet", default_value = "10.88.0.0/16")]
    pub subnets: Vec<ipnet_arg::Net>,
    /// MTU of the bridge and pod interfaces.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Do not masquerade pod egress leaving the pod subnets.
    #[arg(long)]
    pub no_masquerade: bool,
    /// Chain the reference `portmap` plugin after keel-cni (hostPort support).
    #[arg(long)]
    pub portmap: bool,
    /// File name of the conflist.
    #[arg(long, default_value = "10-keel.conflist")]
    pub conflist_name: String,
    /// Where IPAM keeps its allocations (default: /var/lib/cni/networks, as host-local).
    #[arg(long, value_name = "DIR")]
    pub ipam_data_dir: Option<PathBuf>,
}

/// Subnet flag parsing without depending on `ipnet` in the `keel` package.
pub mod ipnet_arg {
    /// A pod subnet as given on the command line.
    #[derive(Debug, Clone)]
    pub struct Net(pub String);

    impl std::str::FromStr for Net {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, Self::Err> {
            let (addr, len) = s
                .split_once('/')
                .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
            addr.parse::<std::net::IpAddr>()
                .map_err(|e| format!("{s:?}: {e}"))?;
            len.parse::<u8>().map_err(|e| format!("{s:?}: {e}"))?;
            Ok(Net(s.to_string()))
        }
    }
}

/// Runs `keel cni ...`.
pub fn run(args: CniArgs) -> anyhow::Result<()> {
    match args.command {
        CniCommand::Install(a) => install(a),
    }
}

fn install(a: InstallArgs) -> anyhow::Result<()> {
    let binary = match a.plugin_binary {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locate the keel binary")?
            .with_file_name("keel-cni"),
    };
    let subnets = a
        .subnets
        .iter()
        .map(|n| n.0.parse().with_context(|| format!("subnet {}", n.0)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = keel_cni::install::InstallSpec {
        binary,
        bin_dir: a.bin_dir,
        conf_dir: a.conf_dir,
        network: a.network,
        bridge: a.bridge,
        subnets,
        mtu: a.mtu,
        ip_masq: !a.no_masquerade,
        portmap: a.portmap,
        conflist_name: a.conflist_name,
        ipam_data_dir: a.ipam_data_dir,
    };
    let (bin, conf) = keel_cni::install::install(&spec)?;
    println!("installed {} and {}", bin.display(), conf.display());
    Ok(())
}
