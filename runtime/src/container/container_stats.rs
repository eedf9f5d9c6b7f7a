//! stats: CPU, memory working set and pids of a container, read from its cgroup (v1 or v2).

use chrono::{DateTime, Utc};

use super::cgroups::{self, CgroupStats};
use super::{ContainerError, ContainerRuntime};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ContainerStats {
    pub id: String,
    pub timestamp: DateTime<Utc>,
    #[serde(flatten)]
    pub usage: CgroupStats,
}

impl ContainerRuntime {
    pub fn stats(&self, id: &str) -> Result<ContainerStats, ContainerError> {
        let rec = self.record(id)?;
        Ok(ContainerStats {
            id: id.to_string(),
            timestamp: Utc::now(),
            usage: cgroups::stats(&rec.cgroups_path),
        })
    }
}
