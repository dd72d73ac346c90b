//! Plan assembly, in one place: a definition, the daemon's directories and
//! network, and the ids and address the registries hand out → the
//! [`MachinePlan`] a supervisor runs. And the way back: what a forgotten
//! machine held in the registries is given back ([`release`]).

use crate::definition::Definition;
use crate::image::{self, ImageError};
use crate::network::{self, NetworkError};
use crate::runtime::idrange::{self, HostIdFiles, IdRangeError};
use crate::runtime::{self, cgroup, MachinePlan, RuntimeError};

use super::ManagerConfig;

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Layer(#[from] ImageError),
    #[error(transparent)]
    Ids(#[from] IdRangeError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Cgroup(#[from] RuntimeError),
}

/// The plan machine `name` starts with: its writable layer (a persistent
/// machine made from an image), its id range, its network, its cgroup.
/// Blocking (registry files, the file system).
pub(crate) fn assemble(
    config: &ManagerConfig,
    name: &str,
    definition: Definition,
) -> Result<MachinePlan, PlanError> {
    let layer =
        match &definition.image {
            Some(_) if !definition.ephemeral && !definition.read_only => Some(
                image::prepare_layer(&config.storage_dir, name, &definition.root)?,
            ),
            _ => None,
        };
    let ids = idrange::assign_range(
        &config.storage_dir,
        name,
        &definition.users,
        &HostIdFiles::default(),
    )?;
    let network = network::plan_network(&definition, &config.network, &config.storage_dir)?;
    Ok(MachinePlan {
        ids,
        machine_dir: runtime::machine_dir(&config.state_dir, name),
        cgroup: cgroup::machine_cgroup_path(name)?,
        layer,
        definition,
        network,
    })
}

/// Gives back what machine `name` held in the registries (its id range,
/// its address) once its definition is gone and it is stopped. Failures
/// are logged: the registries only grow by what could not be released.
/// Blocking.
pub(crate) fn release(config: &ManagerConfig, name: &str) {
    if let Err(err) = idrange::release_range(&config.storage_dir, name) {
        tracing::warn!(machine = name, %err, "giving back the id range");
    }
    if let Err(err) = network::address::release(&config.storage_dir, name) {
        tracing::warn!(machine = name, %err, "giving back the address");
    }
}
