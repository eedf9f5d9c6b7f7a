//! Incremental sync: the difference between the desired service maps and what the maps hold
//! becomes the minimal list of map writes, in an order that never lets a program read a slot
//! that points nowhere or a count larger than the slots written.
//!
//! The applied state is rebuilt from the (pinned) maps at start, so a restarted proxy's full
//! resync writes nothing when nothing changed. Service ids index the per-CPU stats array and are
//! reused; backend ids are per service and only grow within a run, so a ClientIP affinity entry
//! can never lead to another service's backend (stale entries are dropped at start, see
//! `proxy::gc_affinity`).

use std::collections::{BTreeMap, BTreeSet};

use keel_ebpf::{
    KEEL_MAGLEV_M, KEEL_MAX_SERVICES, L4Addr, SVC_F_EXTERNAL_IP, SVC_F_NODEPORT, SlotKey, SvcKey,
    SvcVal,
};

/// Frontends reached from outside the node, which the tc program balances with Maglev.
const EXTERNAL_FLAGS: u32 = SVC_F_NODEPORT | SVC_F_EXTERNAL_IP;

use crate::model::Desired;

/// The only door from the sync logic to the maps (aya in production, a recorder in tests).
pub trait MapOps {
    type Error;
    fn put_service(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), Self::Error>;
    fn del_service(&mut self, key: &SvcKey) -> Result<(), Self::Error>;
    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<(), Self::Error>;
    fn del_slot(&mut self, key: &SlotKey) -> Result<(), Self::Error>;
    fn put_backend(&mut self, id: u32, be: &L4Addr) -> Result<(), Self::Error>;
    fn del_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Zeroes the counters of a newly allocated service id.
    fn reset_stats(&mut self, svc_id: u32) -> Result<(), Self::Error>;
    /// Writes the Maglev table (backend id per entry) of an externally reachable frontend.
    fn put_maglev(&mut self, svc_id: u32, table: &[u32]) -> Result<(), Self::Error>;
    /// Removes a Maglev table.
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), Self::Error>;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedService {
    pub val: SvcVal,
    /// Backend id per slot.
    pub slots: Vec<u32>,
    pub backends: BTreeMap<u32, L4Addr>,
}

/// What the maps hold, as far as this proxy wrote them.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub services: BTreeMap<SvcKey, AppliedService>,
    next_backend_id: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError<E: std::fmt::Display> {
    /// The stats array (and so the number of frontends) is full.
    #[error("too many service frontends: the maps hold at most {KEEL_MAX_SERVICES}")]
    TooManyServices,
    #[error("too many backends for service {0}: at most 65535 per state")]
    TooManyBackends(String),
    #[error("map update: {0}")]
    Map(E),
}

/// Counts of one sync, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub services_added: usize,
    pub services_removed: usize,
    pub services_changed: usize,
    pub writes: usize,
}

impl Applied {
    /// Rebuilds the applied state from map dumps. Slots and backends of unknown services (left
    /// by a crash in the middle of a sync) are returned as garbage to delete.
    pub fn from_dump(
        services: impl IntoIterator<Item = (SvcKey, SvcVal)>,
        slots: impl IntoIterator<Item = (SlotKey, u32)>,
        backends: impl IntoIterator<Item = (u32, L4Addr)>,
    ) -> (Applied, Garbage) {
        let mut by_id: BTreeMap<u32, SvcKey> = BTreeMap::new();
        let mut applied = Applied::default();
        for (k, v) in services {
            by_id.insert(v.svc_id, k);
            applied.services.insert(
                k,
                AppliedService {
                    val: v,
                    ..Default::default()
                },
            );
        }
        let mut garbage = Garbage::default();
        let mut slot_map: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for (k, id) in slots {
            slot_map.entry(k.svc_id).or_default().insert(k.slot, id);
        }
        let backends: BTreeMap<u32, L4Addr> = backends.into_iter().collect();
        let mut used_backends = BTreeSet::new();
        for (svc_id, slots) in slot_map {
            let Some(key) = by_id.get(&svc_id) else {
                garbage
                    .slots
                    .extend(slots.keys().map(|&slot| SlotKey { svc_id, slot }));
                continue;
            };
            let Some(svc) = applied.services.get_mut(key) else {
                continue;
            };
            let n = usize::from(svc.val.ready) + usize::from(svc.val.terminating);
            for (slot, id) in slots {
                if (slot as usize) < n && slot as usize == svc.slots.len() {
                    svc.slots.push(id);
                    if let Some(be) = backends.get(&id) {
                        svc.backends.insert(id, *be);
                        used_backends.insert(id);
                    }
                } else {
                    garbage.slots.push(SlotKey { svc_id, slot });
                }
            }
        }
        garbage.backends = backends
            .keys()
            .filter(|id| !used_backends.contains(id))
            .copied()
            .collect();
        applied.next_backend_id = backends
            .keys()
            .next_back()
            .map_or(1, |m| m.wrapping_add(1).max(1));
        (applied, garbage)
    }

    pub fn backend_count(&self) -> usize {
        self.services.values().map(|s| s.backends.len()).sum()
    }

    /// Backend ids in use (for the affinity GC).
    pub fn backend_ids(&self) -> BTreeSet<u32> {
        self.services
            .values()
            .flat_map(|s| s.backends.keys().copied())
            .collect()
    }

    fn alloc_svc_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.services.values().map(|s| s.val.svc_id).collect();
        (1..KEEL_MAX_SERVICES).find(|id| !used.contains(id))
    }

    fn alloc_backend_id(&mut self) -> u32 {
        let id = self.next_backend_id.max(1);
        self.next_backend_id = id.wrapping_add(1).max(1);
        id
    }

    /// Brings the maps from `self` to `desired`, writing only differences.
    pub fn apply<M: MapOps>(
        &mut self,
        desired: &Desired,
        maps: &mut M,
    ) -> Result<SyncStats, SyncError<M::Error>>
    where
        M::Error: std::fmt::Display,
    {
        let mut stats = SyncStats::default();
        // Removals first: they free service ids.
        let gone: Vec<SvcKey> = self
            .services
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let Some(svc) = self.services.remove(&key) else {
                continue;
            };
            // The frontend goes first: after that no program reads its slots.
            maps.del_service(&key).map_err(SyncError::Map)?;
            if svc.val.flags & EXTERNAL_FLAGS != 0 {
                maps.del_maglev(svc.val.svc_id).map_err(SyncError::Map)?;
            }
            for slot in 0..svc.slots.len() as u32 {
                maps.del_slot(&SlotKey {
                    svc_id: svc.val.svc_id,
                    slot,
                })
                .map_err(SyncError::Map)?;
            }
            for id in svc.backends.keys() {
                maps.del_backend(*id).map_err(SyncError::Map)?;
            }
            stats.services_removed += 1;
            stats.writes += 1 + svc.slots.len() + svc.backends.len();
        }
        for (key, want) in desired {
            if self
                .services
                .get(key)
                .is_some_and(|cur| unchanged(cur, want))
            {
                continue; // the common case of a full diff: no allocation, no write
            }
            let existed = self.services.contains_key(key);
            let mut cur = match self.services.get(key) {
                Some(c) => c.clone(),
                None => {
                    let svc_id = self.alloc_svc_id().ok_or(SyncError::TooManyServices)?;
                    maps.reset_stats(svc_id).map_err(SyncError::Map)?;
                    AppliedService {
                        val: SvcVal {
                            svc_id,
                            ..Default::default()
                        },
                        ..Default::default()
                    }
                }
            };
            let writes = self.reconcile_one(key, !existed, &mut cur, want, maps)?;
            if writes > 0 {
                if existed {
                    stats.services_changed += 1;
                } else {
                    stats.services_added += 1;
                }
            }
            stats.writes += writes;
            self.services.insert(*key, cur);
        }
        Ok(stats)
    }

    /// Applies the change of one frontend (`None`: it is gone), as a watch event delivers it:
    /// O(backends of that service), whatever the number of services.
    pub fn apply_one<M: MapOps>(
        &mut self,
        key: &SvcKey,
        want: Option<&crate::model::DesiredService>,
        maps: &mut M,
    ) -> Result<usize, SyncError<M::Error>>
    where
        M::Error: std::fmt::Display,
    {
        let Some(want) = want else {
            let Some(svc) = self.services.remove(key) else {
                return Ok(0);
            };
            maps.del_service(key).map_err(SyncError::Map)?;
            if svc.val.flags & EXTERNAL_FLAGS != 0 {
                maps.del_maglev(svc.val.svc_id).map_err(SyncError::Map)?;
            }
            for slot in 0..svc.slots.len() as u32 {
                maps.del_slot(&SlotKey {
                    svc_id: svc.val.svc_id,
                    slot,
                })
                .map_err(SyncError::Map)?;
            }
            for id in svc.backends.keys() {
                maps.del_backend(*id).map_err(SyncError::Map)?;
            }
            return Ok(1 + svc.slots.len() + svc.backends.len());
        };
        if self
            .services
            .get(key)
            .is_some_and(|cur| unchanged(cur, want))
        {
            return Ok(0);
        }
        let existed = self.services.contains_key(key);
        let mut cur = match self.services.remove(key) {
            Some(c) => c,
            None => {
                let svc_id = self.alloc_svc_id().ok_or(SyncError::TooManyServices)?;
                maps.reset_stats(svc_id).map_err(SyncError::Map)?;
                AppliedService {
                    val: SvcVal {
                        svc_id,
                        ..Default::default()
                    },
                    ..Default::default()
                }
            }
        };
        let r = self.reconcile_one(key, !existed, &mut cur, want, maps);
        self.services.insert(*key, cur);
        r
    }

    /// Writes one frontend's backends, slots and entry; returns the number of map writes.
    fn reconcile_one<M: MapOps>(
        &mut self,
        key: &SvcKey,
        is_new: bool,
        cur: &mut AppliedService,
        want: &crate::model::DesiredService,
        maps: &mut M,
    ) -> Result<usize, SyncError<M::Error>>
    where
        M::Error: std::fmt::Display,
    {
        let mut writes = 0;
        let too_many = || SyncError::TooManyBackends(want.name.clone());
        let ready = u16::try_from(want.ready.len()).map_err(|_| too_many())?;
        let terminating = u16::try_from(want.terminating.len()).map_err(|_| too_many())?;
        // Backend identity is the address; flags (terminating) may change in place.
        let mut by_addr: BTreeMap<([u8; 16], u16, u8), u32> = cur
            .backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port, b.family), *id))
            .collect();
        let mut new_backends = BTreeMap::new();
        let mut new_slots = Vec::with_capacity(want.ready.len() + want.terminating.len());
        for be in want.ready.iter().chain(&want.terminating) {
            let id = match by_addr.remove(&(be.addr, be.port, be.family)) {
                Some(id) => {
                    if cur.backends.get(&id) != Some(be) {
                        maps.put_backend(id, be).map_err(SyncError::Map)?;
                        writes += 1;
                    }
                    id
                }
                None => {
                    let id = self.alloc_backend_id();
                    maps.put_backend(id, be).map_err(SyncError::Map)?;
                    writes += 1;
                    id
                }
            };
            new_backends.insert(id, *be);
            new_slots.push(id);
        }
        let svc_id = cur.val.svc_id;
        for (i, id) in new_slots.iter().enumerate() {
            if cur.slots.get(i) != Some(id) {
                maps.put_slot(
                    &SlotKey {
                        svc_id,
                        slot: i as u32,
                    },
                    *id,
                )
                .map_err(SyncError::Map)?;
                writes += 1;
            }
        }
        let val = SvcVal {
            svc_id,
            ready,
            terminating,
            affinity_timeout: want.affinity_timeout,
            flags: want.flags,
        };
        // External frontends pick by Maglev (tc path): rebuild the table when the set changes.
        if want.flags & EXTERNAL_FLAGS != 0 && (is_new || cur.slots != new_slots) {
            let pool: Vec<u32> = if ready > 0 {
                new_slots[..usize::from(ready)].to_vec()
            } else {
                new_slots.clone()
            };
            let addrs: Vec<L4Addr> = pool.iter().map(|id| new_backends[id]).collect();
            let table: Vec<u32> = crate::maglev::table(&addrs, KEEL_MAGLEV_M as usize)
                .into_iter()
                .map(|i| pool[i])
                .collect();
            maps.put_maglev(svc_id, &table).map_err(SyncError::Map)?;
            writes += 1;
        }
        // Written after the slots it counts (growth) and before the slots it no longer counts
        // are deleted (shrink), so every slot a program can pick exists. A service without
        // backends still gets its entry: it refuses connections.
        if is_new || val != cur.val {
            maps.put_service(key, &val).map_err(SyncError::Map)?;
            writes += 1;
        }
        for slot in new_slots.len()..cur.slots.len() {
            maps.del_slot(&SlotKey {
                svc_id,
                slot: slot as u32,
            })
            .map_err(SyncError::Map)?;
            writes += 1;
        }
        // Whatever is left in by_addr was removed from the service.
        for id in by_addr.into_values() {
            maps.del_backend(id).map_err(SyncError::Map)?;
            writes += 1;
        }
        cur.val = val;
        cur.slots = new_slots;
        cur.backends = new_backends;
        Ok(writes)
    }
}

/// Whether the maps already hold exactly `want` for this frontend.
fn unchanged(cur: &AppliedService, want: &crate::model::DesiredService) -> bool {
    cur.val.affinity_timeout == want.affinity_timeout
        && cur.val.flags == want.flags
        && usize::from(cur.val.ready) == want.ready.len()
        && usize::from(cur.val.terminating) == want.terminating.len()
        && cur.slots.len() == want.ready.len() + want.terminating.len()
        && cur
            .slots
            .iter()
            .zip(want.ready.iter().chain(&want.terminating))
            .all(|(id, w)| cur.backends.get(id) == Some(w))
}

/// Entries no service owns, left by an interrupted sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Garbage {
    pub slots: Vec<SlotKey>,
    pub backends: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesiredService;
    use keel_ebpf::IPPROTO_TCP;
    use std::convert::Infallible;

    /// Records every write and keeps the resulting map contents, like the kernel maps would.
    #[derive(Default)]
    struct Recorder {
        ops: Vec<String>,
        svc: BTreeMap<SvcKey, SvcVal>,
        slots: BTreeMap<SlotKey, u32>,
        backends: BTreeMap<u32, L4Addr>,
    }

    impl MapOps for Recorder {
        type Error = Infallible;
        fn put_service(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), Infallible> {
            self.ops.push(format!(
                "put_service {} r{} t{}",
                val.svc_id, val.ready, val.terminating
            ));
            self.svc.insert(*key, *val);
            Ok(())
        }
        fn del_service(&mut self, key: &SvcKey) -> Result<(), Infallible> {
            self.ops.push("del_service".into());
            self.svc.remove(key);
            Ok(())
        }
        fn put_slot(&mut self, key: &SlotKey, id: u32) -> Result<(), Infallible> {
            self.ops
                .push(format!("put_slot {} {} -> {id}", key.svc_id, key.slot));
            self.slots.insert(*key, id);
            Ok(())
        }
        fn del_slot(&mut self, key: &SlotKey) -> Result<(), Infallible> {
            self.ops
                .push(format!("del_slot {} {}", key.svc_id, key.slot));
            self.slots.remove(key);
            Ok(())
        }
        fn put_backend(&mut self, id: u32, be: &L4Addr) -> Result<(), Infallible> {
            self.ops.push(format!("put_backend {id}"));
            self.backends.insert(id, *be);
            Ok(())
        }
        fn del_backend(&mut self, id: u32) -> Result<(), Infallible> {
            self.ops.push(format!("del_backend {id}"));
            self.backends.remove(&id);
            Ok(())
        }
        fn reset_stats(&mut self, _: u32) -> Result<(), Infallible> {
            Ok(())
        }
        fn put_maglev(&mut self, svc_id: u32, t: &[u32]) -> Result<(), Infallible> {
            self.ops.push(format!("put_maglev {svc_id} {}", t.len()));
            Ok(())
        }
        fn del_maglev(&mut self, svc_id: u32) -> Result<(), Infallible> {
            self.ops.push(format!("del_maglev {svc_id}"));
            Ok(())
        }
    }

    fn be(last: u8) -> L4Addr {
        L4Addr::new(format!("10.0.0.{last}").parse().unwrap(), 8080, 0)
    }

    fn svc(port: u16, ready: &[u8]) -> (SvcKey, DesiredService) {
        (
            SvcKey::new("10.96.0.1".parse().unwrap(), port, IPPROTO_TCP),
            DesiredService {
                name: format!("ns/s{port}:"),
                affinity_timeout: 0,
                flags: 0,
                ready: ready.iter().map(|&l| be(l)).collect(),
                terminating: vec![],
            },
        )
    }

    #[test]
    fn first_sync_writes_everything_second_writes_nothing() {
        let desired: Desired = [svc(80, &[1, 2, 3]), svc(81, &[])].into_iter().collect();
        let mut rec = Recorder::default();
        let mut applied = Applied::default();
        let st = applied.apply(&desired, &mut rec).unwrap();
        assert_eq!(st.services_added, 2);
        assert_eq!(
            rec.svc.len(),
            2,
            "a service without backends still has its entry"
        );
        assert_eq!(rec.slots.len(), 3);
        assert_eq!(rec.backends.len(), 3);
        rec.ops.clear();
        let st = applied.apply(&desired, &mut rec).unwrap();
        assert_eq!(st, SyncStats::default());
        assert!(rec.ops.is_empty(), "{:?}", rec.ops);
    }

    #[test]
    fn removing_a_backend_shrinks_the_count_before_deleting_its_slot() {
        let mut rec = Recorder::default();
        let mut applied = Applied::default();
        applied
            .apply(&[svc(80, &[1, 2, 3])].into_iter().collect(), &mut rec)
            .unwrap();
        rec.ops.clear();
        let st = applied
            .apply(&[svc(80, &[1, 3])].into_iter().collect(), &mut rec)
            .unwrap();
        assert_eq!(st.services_changed, 1);
        // slot 1 now holds backend 3 (id 3), the count drops to 2, then slot 2 and backend 2 go.
        assert_eq!(
            rec.ops,
            [
                "put_slot 1 1 -> 3",
                "put_service 1 r2 t0",
                "del_slot 1 2",
                "del_backend 2"
            ]
        );
        assert_eq!(rec.backends.len(), 2);
    }

    #[test]
    fn removed_service_goes_first_then_its_slots_and_backends() {
        let mut rec = Recorder::default();
        let mut applied = Applied::default();
        applied
            .apply(&[svc(80, &[1])].into_iter().collect(), &mut rec)
            .unwrap();
        rec.ops.clear();
        applied.apply(&Desired::new(), &mut rec).unwrap();
        assert_eq!(rec.ops, ["del_service", "del_slot 1 0", "del_backend 1"]);
        assert!(rec.svc.is_empty() && rec.slots.is_empty() && rec.backends.is_empty());
    }

    #[test]
    fn state_rebuilt_from_maps_resyncs_without_writes_and_finds_garbage() {
        let desired: Desired = [svc(80, &[1, 2]), svc(81, &[4])].into_iter().collect();
        let mut rec = Recorder::default();
        Applied::default().apply(&desired, &mut rec).unwrap();
        // A crash mid-sync left a slot of an unknown service and an orphan backend.
        rec.slots.insert(
            SlotKey {
                svc_id: 99,
                slot: 0,
            },
            77,
        );
        rec.backends.insert(77, be(77));
        let (mut applied, garbage) =
            Applied::from_dump(rec.svc.clone(), rec.slots.clone(), rec.backends.clone());
        assert_eq!(
            garbage.slots,
            [SlotKey {
                svc_id: 99,
                slot: 0
            }]
        );
        assert_eq!(garbage.backends, [77]);
        rec.ops.clear();
        applied.apply(&desired, &mut rec).unwrap();
        assert!(rec.ops.is_empty(), "{:?}", rec.ops);
        // New backend ids never reuse one seen in the maps.
        applied
            .apply(&[svc(80, &[1, 2, 9])].into_iter().collect(), &mut rec)
            .unwrap();
        assert!(
            rec.ops.contains(&"put_backend 78".to_string()),
            "{:?}",
            rec.ops
        );
    }

    #[test]
    fn apply_one_matches_a_full_diff() {
        let mut full = Recorder::default();
        let mut one = Recorder::default();
        let mut a = Applied::default();
        let mut b = Applied::default();
        let start: Desired = [svc(80, &[1, 2]), svc(81, &[3])].into_iter().collect();
        a.apply(&start, &mut full).unwrap();
        b.apply(&start, &mut one).unwrap();
        let (k, d) = svc(80, &[2, 4]);
        let mut next = start.clone();
        next.insert(k, d.clone());
        full.ops.clear();
        one.ops.clear();
        a.apply(&next, &mut full).unwrap();
        b.apply_one(&k, Some(&d), &mut one).unwrap();
        assert_eq!(full.ops, one.ops);
        assert_eq!(
            (full.svc, full.slots, full.backends),
            (one.svc, one.slots, one.backends)
        );
    }

    #[test]
    fn terminating_backends_follow_ready_ones() {
        let (k, mut d) = svc(80, &[1]);
        d.terminating = vec![L4Addr::new(
            "10.0.0.2".parse().unwrap(),
            8080,
            keel_ebpf::BE_F_TERMINATING,
        )];
        let mut rec = Recorder::default();
        Applied::default()
            .apply(&[(k, d)].into_iter().collect(), &mut rec)
            .unwrap();
        assert_eq!(rec.svc[&k].ready, 1);
        assert_eq!(rec.svc[&k].terminating, 1);
        let term_id = rec.slots[&SlotKey { svc_id: 1, slot: 1 }];
        assert_eq!(rec.backends[&term_id].flags, keel_ebpf::BE_F_TERMINATING);
    }
}
