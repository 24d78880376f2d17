//! `skiff template`: the booted template VMs containers are restored from
//! (see `runtime::template`): list them, build one ahead of the first
//! container that needs it, remove them.

use anyhow::bail;
use clap::{Args, Subcommand};

use super::lifecycle::{format_table, Format};
use super::signals::ForwardSignals;
use super::vm_args::{TemplateDirArg, VmArgs};
use super::Globals;
use crate::runtime::sandbox::{Cancel, VmResources};
use crate::runtime::sizing::DEFAULT_VCPUS;
use crate::runtime::template::Template;
use crate::vmm::config::DEFAULT_MEMORY;
use crate::vmm::MemorySize;

#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// List the templates built so far.
    #[command(alias = "ls")]
    List {
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
        #[command(flatten)]
        dir: TemplateDirArg,
    },
    /// Build the template for a VM size now (if it is not built yet), so
    /// that the first container of that size does not wait for it.
    Prebuild(PrebuildArgs),
    /// Remove templates; VMs restored from them go on.
    #[command(alias = "rm")]
    Remove {
        /// Keys, as `skiff template list` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        keys: Vec<String>,
        /// Remove every template.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        dir: TemplateDirArg,
    },
}

#[derive(Debug, Args)]
pub struct PrebuildArgs {
    /// vCPUs of the VMs it serves (a container's come from its config.json).
    #[arg(long, default_value_t = DEFAULT_VCPUS)]
    pub vcpus: u8,
    /// Memory of the VMs it serves, e.g. 256M.
    #[arg(long, default_value_t = MemorySize(DEFAULT_MEMORY))]
    pub memory: MemorySize,
    #[command(flatten)]
    pub vm: VmArgs,
}

pub fn run(globals: &Globals, args: TemplateArgs) -> anyhow::Result<i32> {
    match args.command {
        TemplateCommand::List { format, dir } => list(&dir.store(&globals.root).list()?, format),
        TemplateCommand::Prebuild(args) => prebuild(globals, args),
        TemplateCommand::Remove { keys, all, dir } => {
            let store = dir.store(&globals.root);
            if all {
                store.remove_all()?;
                return Ok(0);
            }
            let mut missing = Vec::new();
            for key in keys {
                if !store.remove(&key)? {
                    missing.push(key);
                }
            }
            if !missing.is_empty() {
                bail!("no such template: {}", missing.join(", "));
            }
            Ok(0)
        }
    }
}

fn list(templates: &[Template], format: Format) -> anyhow::Result<i32> {
    match format {
        Format::Json => {
            let rows: Vec<_> = templates
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "info": t.info,
                        "path": t.dir,
                        "disk_bytes": t.disk_bytes(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string(&rows)?);
        }
        Format::Table => {
            let mut table = vec![[
                "KEY", "VCPUS", "MEMORY", "PROFILE", "DISK", "BOOT", "CREATED", "KERNEL",
            ]
            .map(String::from)];
            for t in templates {
                let i = &t.info;
                table.push([
                    i.key.clone(),
                    i.inputs.vcpus.to_string(),
                    MemorySize(i.inputs.memory_bytes).to_string(),
                    i.inputs.cpu_profile.clone(),
                    format!("{} MiB", t.disk_bytes() >> 20),
                    format!("{:.1} s", i.boot_ms as f64 / 1000.0),
                    i.created.clone(),
                    i.inputs.kernel.display().to_string(),
                ]);
            }
            print!("{}", format_table(&table));
        }
    }
    Ok(0)
}

fn prebuild(globals: &Globals, args: PrebuildArgs) -> anyhow::Result<i32> {
    args.vm.check()?;
    let store = args.vm.templates.store(&globals.root);
    let resources = VmResources {
        kernel: args.vm.kernel(),
        initrd: args.vm.initrd(),
        vcpus: args.vcpus,
        memory: args.memory,
        cpu_profile: args.vm.cpu_profile.profile(),
        kvm_device: args.vm.kvm_device.clone(),
    };
    let cancel = Cancel::default();
    // A signal cancels the build; its leftovers are removed.
    let _signals = ForwardSignals::start(cancel.clone())?;
    let inputs = store.inputs(&resources, globals.debug)?;
    let template = store.ensure(&inputs, &resources, globals.debug, &cancel)?;
    println!("{}", template.info.key);
    Ok(0)
}
