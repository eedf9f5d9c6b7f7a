//! The pinned service maps, opened from bpffs with aya: the one door from keel-proxy to map
//! contents (sync writes, `ls` and metrics reads, the affinity GC).

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use keel_ebpf::{
    AffinityKey, AffinityVal, KEEL_MAGLEV_M, L4Addr, MaglevKey, RevnatKey, SlotKey, SvcKey,
    SvcStats, SvcVal, map_names,
};

use crate::sync::{Applied, Garbage, MapOps};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("open pinned map {path} (is the proxy installed? run `keel proxy` first)")]
    Open { path: PathBuf, source: MapError },
    #[error("{op} on map {map}")]
    Op {
        map: &'static str,
        op: &'static str,
        source: MapError,
    },
    #[error("count CPUs: {0}")]
    Cpus(String),
}

fn op_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { map, op, source }
}

fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => {
            s.io_error.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error())
        }
        _ => false,
    }
}

/// Ignores "no such key" on deletes: deleting what is already gone is success.
fn tolerate_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if not_found(&e) => Ok(()),
        other => other,
    }
}

pub struct PinnedMaps {
    svc: HashMap<MapData, SvcKey, SvcVal>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, L4Addr>,
    revnat: HashMap<MapData, RevnatKey, L4Addr>,
    affinity: HashMap<MapData, AffinityKey, AffinityVal>,
    stats: PerCpuArray<MapData, SvcStats>,
    /// Only when the tc program is installed.
    maglev: Option<HashMap<MapData, MaglevKey, u32>>,
    ncpus: usize,
}

fn open(dir: &Path, name: &str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| MapsError::Open { path, source })
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open($dir, $name)?
            .try_into()
            .map_err(|source| MapsError::Open {
                path: $dir.join($name),
                source,
            })?
    };
}

/// Number of entries and capacity of each map, for metrics and `ls`.
#[derive(Clone, Debug, Default)]
pub struct MapFill {
    pub entries: Vec<(&'static str, usize)>,
}

impl PinnedMaps {
    /// Opens every map pinned under `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let ncpus =
            aya::util::nr_cpus().map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))?;
        Ok(PinnedMaps {
            svc: typed!(dir, map_names::SERVICES),
            slots: typed!(dir, map_names::SLOTS),
            backends: typed!(dir, map_names::BACKENDS),
            revnat: typed!(dir, map_names::SOCK_REVNAT),
            affinity: typed!(dir, map_names::SOCK_AFFINITY),
            stats: typed!(dir, map_names::STATS),
            maglev: if dir.join(map_names::MAGLEV).exists() {
                Some(typed!(dir, map_names::MAGLEV))
            } else {
                None
            },
            ncpus,
        })
    }

    /// Reads the service maps back into the sync state (full resync at start).
    pub fn dump(&self) -> Result<(Applied, Garbage), MapsError> {
        let svcs = self
            .svc
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op_err(map_names::SERVICES, "iterate"))?;
        let slots = self
            .slots
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op_err(map_names::SLOTS, "iterate"))?;
        let backends = self
            .backends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op_err(map_names::BACKENDS, "iterate"))?;
        Ok(Applied::from_dump(svcs, slots, backends))
    }

    /// Deletes entries no service owns (left by an interrupted sync).
    pub fn collect_garbage(&mut self, g: &Garbage) -> Result<(), MapsError> {
        for k in &g.slots {
            self.del_slot(k)?;
        }
        for id in &g.backends {
            self.del_backend(*id)?;
        }
        Ok(())
    }

    /// Drops affinity entries whose backend is not in `live`: backend ids restart from the
    /// highest one in the maps after a restart, so a stale entry could otherwise point at a
    /// later backend that reuses its id.
    pub fn gc_affinity(
        &mut self,
        live: &std::collections::BTreeSet<u32>,
    ) -> Result<usize, MapsError> {
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| !live.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            tolerate_missing(self.affinity.remove(k))
                .map_err(op_err(map_names::SOCK_AFFINITY, "delete"))?;
        }
        Ok(stale.len())
    }

    /// The counters of one service, summed over CPUs.
    pub fn stats(&self, svc_id: u32) -> Result<SvcStats, MapsError> {
        let per_cpu = self
            .stats
            .get(&svc_id, 0)
            .map_err(op_err(map_names::STATS, "read"))?;
        Ok(per_cpu.iter().fold(SvcStats::default(), |a, s| SvcStats {
            connects: a.connects + s.connects,
            datagrams: a.datagrams + s.datagrams,
            refused: a.refused + s.refused,
        }))
    }

    /// Entry counts of every map (an O(entries) walk: only for scrapes and `ls`).
    pub fn fill(&self) -> MapFill {
        MapFill {
            entries: vec![
                (map_names::SERVICES, self.svc.keys().count()),
                (map_names::SLOTS, self.slots.keys().count()),
                (map_names::BACKENDS, self.backends.keys().count()),
                (map_names::SOCK_REVNAT, self.revnat.keys().count()),
                (map_names::SOCK_AFFINITY, self.affinity.keys().count()),
            ],
        }
    }
}

impl MapOps for PinnedMaps {
    type Error = MapsError;

    fn put_service(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), MapsError> {
        self.svc
            .insert(key, val, 0)
            .map_err(op_err(map_names::SERVICES, "update"))
    }
    fn del_service(&mut self, key: &SvcKey) -> Result<(), MapsError> {
        tolerate_missing(self.svc.remove(key)).map_err(op_err(map_names::SERVICES, "delete"))
    }
    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<(), MapsError> {
        self.slots
            .insert(key, backend_id, 0)
            .map_err(op_err(map_names::SLOTS, "update"))
    }
    fn del_slot(&mut self, key: &SlotKey) -> Result<(), MapsError> {
        tolerate_missing(self.slots.remove(key)).map_err(op_err(map_names::SLOTS, "delete"))
    }
    fn put_backend(&mut self, id: u32, be: &L4Addr) -> Result<(), MapsError> {
        self.backends
            .insert(id, be, 0)
            .map_err(op_err(map_names::BACKENDS, "update"))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapsError> {
        tolerate_missing(self.backends.remove(&id)).map_err(op_err(map_names::BACKENDS, "delete"))
    }
    fn reset_stats(&mut self, svc_id: u32) -> Result<(), MapsError> {
        let zero = PerCpuValues::try_from(vec![SvcStats::default(); self.ncpus])
            .map_err(|e| op_err(map_names::STATS, "update")(MapError::from(e)))?;
        self.stats
            .set(svc_id, zero, 0)
            .map_err(op_err(map_names::STATS, "update"))
    }

    fn put_maglev(&mut self, svc_id: u32, table: &[u32]) -> Result<(), MapsError> {
        let Some(m) = self.maglev.as_mut() else {
            return Ok(());
        };
        for (idx, id) in table.iter().enumerate() {
            m.insert(
                MaglevKey {
                    svc_id,
                    idx: idx as u32,
                },
                id,
                0,
            )
            .map_err(op_err(map_names::MAGLEV, "update"))?;
        }
        Ok(())
    }
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), MapsError> {
        let Some(m) = self.maglev.as_mut() else {
            return Ok(());
        };
        for idx in 0..KEEL_MAGLEV_M {
            tolerate_missing(m.remove(&MaglevKey { svc_id, idx }))
                .map_err(op_err(map_names::MAGLEV, "delete"))?;
        }
        Ok(())
    }
}
