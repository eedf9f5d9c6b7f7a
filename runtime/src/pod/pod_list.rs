//! status and list (PodSandboxStatus, ListPodSandbox): the state is the recorded one,
//! downgraded to NotReady when what a Ready pod needs is gone (its keeper died, its pins
//! vanished with a reboot's /run), so pods are reported as they are, also after a restart.

use std::collections::BTreeMap;

use super::state::{PodRecord, PodState};
use super::{PodError, PodRuntime, exists};

/// A pod as it is now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PodInfo {
    pub record: PodRecord,
    pub state: PodState,
}

/// Which pods `list` returns; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct PodFilter {
    pub id_prefix: Option<String>,
    pub state: Option<PodState>,
    /// Every label here must be present with this value.
    pub labels: BTreeMap<String, String>,
}

impl PodFilter {
    pub fn matches(&self, p: &PodInfo) -> bool {
        self.id_prefix
            .as_ref()
            .is_none_or(|pre| p.record.id.starts_with(pre.as_str()))
            && self.state.is_none_or(|s| s == p.state)
            && self
                .labels
                .iter()
                .all(|(k, v)| p.record.config.labels.get(k) == Some(v))
    }
}

/// The live state of a recorded pod.
pub fn live_state(rec: &PodRecord) -> PodState {
    if rec.state != PodState::Ready {
        return rec.state;
    }
    let keeper_gone = rec.keeper.is_some_and(|k| !k.is_alive());
    let ns = &rec.namespaces;
    let pin_gone = [&ns.network, &ns.ipc, &ns.uts, &ns.pid]
        .into_iter()
        .flatten()
        .any(|p| !exists(p));
    if keeper_gone || pin_gone {
        PodState::NotReady
    } else {
        PodState::Ready
    }
}

impl PodRuntime {
    /// The pod's current state.
    pub fn status(&self, id: &str) -> Result<PodInfo, PodError> {
        let record = self.record(id)?;
        let state = live_state(&record);
        Ok(PodInfo { record, state })
    }

    /// Every pod matching `filter`, oldest first.
    pub fn list(&self, filter: &PodFilter) -> Result<Vec<PodInfo>, PodError> {
        let mut out = Vec::new();
        for id in self.ids()? {
            if filter
                .id_prefix
                .as_ref()
                .is_some_and(|p| !id.starts_with(p.as_str()))
            {
                continue;
            }
            match self.status(&id) {
                Ok(info) if filter.matches(&info) => out.push(info),
                Ok(_) => {}
                // Removed meanwhile, or a directory without a record (interrupted run).
                Err(PodError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|p| p.record.created_at);
        Ok(out)
    }
}
