//! update: new resource limits for a running container, applied to its cgroup and kept in its
//! record so a later inspect shows them.

use super::spec::{SpecContext, linux_resources};
use super::state::write_json;
use super::{ContainerError, ContainerRuntime, Resources, cgroups, sys};

impl ContainerRuntime {
    pub fn update(&self, id: &str, resources: &Resources) -> Result<(), ContainerError> {
        let mut rec = self.record(id)?;
        let ctx = SpecContext {
            hugepage_sizes: sys::hugepage_sizes(),
            ..Default::default()
        };
        let mut linux = linux_resources(resources, rec.config.security.privileged, &ctx)?;
        // Device rules do not change after create.
        linux.set_devices(None);
        cgroups::update(&rec.cgroups_path, &linux)?;
        rec.config.resources = resources.clone();
        write_json(&self.paths.record(id), &rec)?;
        Ok(())
    }
}
