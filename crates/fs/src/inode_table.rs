//! The compact inode table behind [`crate::inode_store`]: fixed-size records in one slab, a key
//! index that stores slot numbers only, and the rare parts (file handles, fds) out of line.
//!
//! A guest that caches a large tree holds millions of inodes, so the per-inode cost is the
//! daemon's memory: one 48-byte `Record` in a `Vec`, plus a `u32` and a control byte per bucket
//! of the key index (6 to 11 bytes per inode at hashbrown's load). The key (st_dev, st_ino) is stored once, in the
//! record, with st_dev interned (a share spans few devices); the index hashes it from the record
//! when it grows. Directories and inodes of other mounts keep a rare part (a file handle or an
//! fd) in a side map keyed by slot; the common inode, held by a workdir link, has none.
//!
//! Node ids: `generation << 32 | (slot + 1)`, so node id 1 is slot 0 of generation 0 (the root,
//! inserted first) and 0 is never an id. A slot's generation moves on when it is freed, so an id
//! the guest still holds after the forget never reaches the slot's next inode: it is unknown, as
//! an id never handed out is. A slot whose generation would wrap is retired instead of reused,
//! so no id is ever handed out twice (the workdir link names, derived from the id, are unique
//! for the same reason).
//!
//! No system calls here: the store holds its key lock across those and takes this table's lock
//! only for memory work.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

/// (st_dev, st_ino).
pub type Key = (u64, u64);

/// A ctime as `stat` gives it: seconds and nanoseconds.
pub type Ctime = (i64, i64);

/// Why a record could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Every slot number (2^32 - 1) is taken or retired.
    #[error("inode table full")]
    Full,
    /// More distinct st_dev values than the interned index holds (2^16).
    #[error("too many devices in the inode table")]
    Devices,
}

const LIVE: u8 = 1;
/// The record has a rare part in the side map.
const RARE: u8 = 2;
/// The record carries ctimes. Only ctimes that fit the packed form exactly are kept (the
/// kernel's nanoseconds always do), so a value that did not fit is never compared or restored
/// wrongly: it is as if none were given.
const CTIMES: u8 = 4;

/// The end of the free list.
const NO_SLOT: u32 = u32::MAX;
/// Slot numbers are below this: `slot + 1` must fit the id's low 32 bits.
const MAX_SLOTS: u32 = u32::MAX - 1;

/// One inode, or a free slot. Fixed size (48 bytes), no pointers.
#[derive(Clone, Copy, Debug)]
struct Record {
    /// st_ino; in a free slot, the next free slot (or [`NO_SLOT`]).
    ino: u64,
    lookups: u64,
    /// Seconds of the ctime before and just after our link.
    ctime_sec: [i64; 2],
    ctime_nsec: [u32; 2],
    /// Moves on when the slot is freed.
    generation: u32,
    /// Index into [`Table::devs`].
    dev: u16,
    /// `S_IFMT` bits of st_mode, shifted down by 12.
    kind: u8,
    flags: u8,
}

const _: () = assert!(std::mem::size_of::<Record>() == 48);

impl Record {
    fn live(&self) -> bool {
        self.flags & LIVE != 0
    }

    /// Keeps `ctimes` if they fit the packed form (see [`CTIMES`]), else none.
    fn set_ctimes(&mut self, ctimes: Option<(Ctime, Ctime)>) {
        self.flags &= !CTIMES;
        (self.ctime_sec, self.ctime_nsec) = ([0; 2], [0; 2]);
        if let Some((Some(b), Some(a))) = ctimes.map(|(b, a)| (pack_ctime(b), pack_ctime(a))) {
            self.flags |= CTIMES;
            self.ctime_sec = [b.0, a.0];
            self.ctime_nsec = [b.1, a.1];
        }
    }
}

/// What a new record holds besides its key (given to [`Table::reserve`]).
#[derive(Debug)]
pub struct NewRecord<R> {
    /// The `S_IFMT` bits of st_mode.
    pub kind: libc::mode_t,
    /// The ctime before and just after our link, for linked inodes (kept when it fits).
    pub ctimes: Option<(Ctime, Ctime)>,
    /// The out-of-line part: a file handle or an fd.
    pub rare: Option<R>,
    /// The guest's references to start with.
    pub lookups: u64,
}

/// A copy of a record, with its rare part cloned (an `Arc` in the store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<R> {
    pub id: u64,
    pub key: Key,
    pub kind: libc::mode_t,
    pub ctimes: Option<(Ctime, Ctime)>,
    pub rare: Option<R>,
}

/// What a forget that dropped the last reference leaves to the caller, who undoes the rest
/// (unlink, close) outside the table's lock.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed<R> {
    pub key: Key,
    pub rare: Option<R>,
}

/// A slot taken off the free list for an inode about to be added: its id is known before the
/// record is (the workdir link is named after it). Give it back with [`Table::fill`] or
/// [`Table::release`]; dropped otherwise, the slot is lost (never reused, never reachable).
#[derive(Debug)]
#[must_use]
pub struct Reserved {
    slot: u32,
    id: u64,
    key: Key,
    /// `key.0` interned.
    dev: u16,
}

impl Reserved {
    pub fn id(&self) -> u64 {
        self.id
    }
}

fn node_id(slot: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(slot + 1)
}

/// The slot and generation an id names; `None` for 0 (never an id).
fn split_id(id: u64) -> Option<(u32, u32)> {
    let low = id as u32;
    let slot = low.checked_sub(1)?;
    Some((slot, (id >> 32) as u32))
}

fn pack_ctime((sec, nsec): Ctime) -> Option<(i64, u32)> {
    Some((sec, u32::try_from(nsec).ok()?))
}

pub struct Table<R> {
    records: Vec<Record>,
    /// Head of the free list threaded through free records' `ino`.
    free: u32,
    /// Slots of live records, hashed by their key: at most one slot per key (the newest inode
    /// under a number that was reused).
    index: HashTable<u32>,
    /// foldhash, seeded per process: keys are the host file system's inode numbers, which a
    /// guest cannot choose, and a lookup hashes one or two of them (SipHash was 8% of a
    /// lookup's instructions).
    hasher: DefaultHashBuilder,
    /// Interned st_dev values; never shrinks (a share spans few devices).
    devs: Vec<u64>,
    rare: HashMap<u32, R>,
    live: usize,
    /// Records filled so far: a caller that looked at the file system before taking its lock
    /// can tell whether an inode was added meanwhile.
    fills: u64,
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> Table<R> {
    pub fn new() -> Self {
        Table {
            records: Vec::new(),
            free: NO_SLOT,
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            devs: Vec::new(),
            rare: HashMap::new(),
            live: 0,
            fills: 0,
        }
    }

    fn hash(hasher: &DefaultHashBuilder, key: Key) -> u64 {
        hasher.hash_one(key)
    }

    fn key_of(&self, r: &Record) -> Key {
        (self.devs[usize::from(r.dev)], r.ino)
    }

    /// The live record `id` names, if any.
    fn record(&self, id: u64) -> Option<(u32, &Record)> {
        let (slot, generation) = split_id(id)?;
        let r = self.records.get(slot as usize)?;
        (r.live() && r.generation == generation).then_some((slot, r))
    }

    fn record_mut(&mut self, id: u64) -> Option<(u32, &mut Record)> {
        let (slot, generation) = split_id(id)?;
        let r = self.records.get_mut(slot as usize)?;
        (r.live() && r.generation == generation).then_some((slot, r))
    }

    /// How many live records.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The rare parts of live records.
    pub fn rare_parts(&self) -> impl Iterator<Item = &R> {
        self.rare.values()
    }

    /// Ids of every live record.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.live())
            .map(|(slot, r)| node_id(slot as u32, r.generation))
    }

    /// Id and key of every live record without a rare part.
    pub fn plain(&self) -> impl Iterator<Item = (u64, Key)> + '_ {
        self.records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.live() && r.flags & RARE == 0)
            .map(|(slot, r)| (node_id(slot as u32, r.generation), self.key_of(r)))
    }

    /// The guest's references to `id`; `None` if `id` is not live.
    pub fn lookups(&self, id: u64) -> Option<u64> {
        self.record(id).map(|(_, r)| r.lookups)
    }

    /// Adds `n` references to `id`; false if `id` is not live.
    pub fn add_lookups(&mut self, id: u64, n: u64) -> bool {
        match self.record_mut(id) {
            Some((_, r)) => {
                r.lookups = r.lookups.saturating_add(n);
                true
            }
            None => false,
        }
    }

    /// The id indexed under `key`.
    pub fn find(&self, key: Key) -> Option<u64> {
        let hash = Self::hash(&self.hasher, key);
        let (records, devs) = (&self.records, &self.devs);
        self.index
            .find(hash, |&s| {
                let r = &records[s as usize];
                (devs[usize::from(r.dev)], r.ino) == key
            })
            .map(|&s| node_id(s, records[s as usize].generation))
    }

    /// Takes a slot for the record of `key` to come. Fails only when no slot number or device
    /// index is left: nothing is taken then.
    pub fn reserve(&mut self, key: Key) -> Result<Reserved, TableError> {
        let dev = self.intern(key.0)?;
        let slot = if self.free != NO_SLOT {
            let slot = self.free;
            self.free = self.records[slot as usize].ino as u32;
            slot
        } else {
            let slot = u32::try_from(self.records.len())
                .ok()
                .filter(|&s| s < MAX_SLOTS)
                .ok_or(TableError::Full)?;
            self.records.push(Record {
                ino: u64::from(NO_SLOT),
                lookups: 0,
                ctime_sec: [0; 2],
                ctime_nsec: [0; 2],
                generation: 0,
                dev: 0,
                kind: 0,
                flags: 0,
            });
            slot
        };
        let generation = self.records[slot as usize].generation;
        Ok(Reserved {
            slot,
            id: node_id(slot, generation),
            key,
            dev,
        })
    }

    /// Gives a reserved slot back unused.
    pub fn release(&mut self, r: Reserved) {
        self.free_slot(r.slot, false);
    }

    fn intern(&mut self, dev: u64) -> Result<u16, TableError> {
        if let Some(i) = self.devs.iter().position(|&d| d == dev) {
            return Ok(i as u16);
        }
        let i = u16::try_from(self.devs.len()).map_err(|_| TableError::Devices)?;
        self.devs.push(dev);
        Ok(i)
    }

    /// Drops `n` references to `id`. When none is left the record goes: out of the index (if it
    /// is the one indexed under its key), its slot freed under the next generation, and what
    /// the caller must undo is returned. `None`: `id` is not live, or is still referenced.
    pub fn forget(&mut self, id: u64, n: u64) -> Option<Removed<R>> {
        let (slot, r) = self.record_mut(id)?;
        r.lookups = r.lookups.saturating_sub(n);
        if r.lookups > 0 {
            return None;
        }
        let r = *r;
        let key = self.key_of(&r);
        let hash = Self::hash(&self.hasher, key);
        if let Ok(e) = self.index.find_entry(hash, |&s| s == slot) {
            e.remove();
        }
        let rare = if r.flags & RARE != 0 {
            self.rare.remove(&slot)
        } else {
            None
        };
        self.live -= 1;
        self.free_slot(slot, true);
        Some(Removed { key, rare })
    }

    /// The live record `id` is held by a link from now on: its rare part (the fd that held it)
    /// leaves the side map and is returned, and it keeps the ctimes from around the link.
    /// `None`, and nothing changed: `id` is not live or has no rare part.
    pub fn settle(&mut self, id: u64, ctimes: Option<(Ctime, Ctime)>) -> Option<R> {
        let (slot, r) = self.record_mut(id)?;
        if r.flags & RARE == 0 {
            return None;
        }
        r.flags &= !RARE;
        r.set_ctimes(ctimes);
        self.rare.remove(&slot)
    }

    /// Clears the slot and moves its generation on, so no id handed out for it reaches it
    /// again; a slot at the last generation is retired (kept, never reused). `used`: the slot's
    /// current id was handed out (a released reservation's was not, and keeps its generation).
    fn free_slot(&mut self, slot: u32, used: bool) {
        let r = &mut self.records[slot as usize];
        r.flags = 0;
        r.lookups = 0;
        if used {
            match r.generation.checked_add(1) {
                Some(g) => r.generation = g,
                None => return,
            }
        }
        r.ino = u64::from(self.free);
        self.free = slot;
    }

    /// Bytes the table has allocated (records, index, devices; the side map estimated), for
    /// the memory figures.
    pub fn heap_bytes(&self) -> usize {
        let rare_entry = std::mem::size_of::<(u32, R)>() + 1;
        self.records.capacity() * std::mem::size_of::<Record>()
            + self.index.allocation_size()
            + self.devs.capacity() * std::mem::size_of::<u64>()
            + self.rare.capacity() * rare_entry
    }
}

impl<R: Clone> Table<R> {
    /// Makes `new` the reserved record and the one indexed under its key (an older record under
    /// the same key, whose number was reused, stays reachable by its id only). Returns a copy.
    /// How many records were ever filled (see [`Table::fill`]).
    pub fn fills(&self) -> u64 {
        self.fills
    }

    pub fn fill(&mut self, res: Reserved, new: NewRecord<R>) -> Entry<R> {
        let slot = res.slot;
        let r = &mut self.records[slot as usize];
        r.ino = res.key.1;
        r.lookups = new.lookups;
        r.dev = res.dev;
        r.kind = ((new.kind & libc::S_IFMT) >> 12) as u8;
        r.flags = LIVE;
        r.set_ctimes(new.ctimes);
        if let Some(rare) = new.rare {
            r.flags |= RARE;
            self.rare.insert(slot, rare);
        }
        self.live += 1;
        self.fills += 1;
        let key = res.key;
        let hash = Self::hash(&self.hasher, key);
        let (records, devs, hasher) = (&self.records, &self.devs, &self.hasher);
        let same_key = |&s: &u32| {
            let r = &records[s as usize];
            (devs[usize::from(r.dev)], r.ino) == key
        };
        let rehash = |&s: &u32| {
            let r = &records[s as usize];
            Self::hash(hasher, (devs[usize::from(r.dev)], r.ino))
        };
        match self.index.entry(hash, same_key, rehash) {
            hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = slot,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(slot);
            }
        }
        self.entry(slot, &self.records[slot as usize])
    }

    /// A copy of the live record `id`.
    pub fn get(&self, id: u64) -> Option<Entry<R>> {
        let (slot, r) = self.record(id)?;
        Some(self.entry(slot, r))
    }

    fn entry(&self, slot: u32, r: &Record) -> Entry<R> {
        let ctimes = (r.flags & CTIMES != 0).then(|| {
            (
                (r.ctime_sec[0], i64::from(r.ctime_nsec[0])),
                (r.ctime_sec[1], i64::from(r.ctime_nsec[1])),
            )
        });
        let rare = if r.flags & RARE != 0 {
            self.rare.get(&slot).cloned()
        } else {
            None
        };
        Entry {
            id: node_id(slot, r.generation),
            key: self.key_of(r),
            kind: libc::mode_t::from(r.kind) << 12,
            ctimes,
            rare,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(rare: Option<&'static str>) -> NewRecord<&'static str> {
        NewRecord {
            kind: libc::S_IFREG,
            ctimes: rare.is_none().then_some(((5, 6), (7, 8))),
            rare,
            lookups: 1,
        }
    }

    fn add(t: &mut Table<&'static str>, key: Key, rare: Option<&'static str>) -> u64 {
        let r = t.reserve(key).unwrap();
        let id = r.id();
        let e = t.fill(r, rec(rare));
        assert_eq!((e.id, e.key, e.rare), (id, key, rare));
        id
    }

    #[test]
    fn the_first_record_is_node_1_and_ids_are_not_0() {
        let mut t = Table::new();
        assert_eq!(add(&mut t, (1, 2), Some("root")), 1);
        assert_eq!(add(&mut t, (1, 3), None), 2);
        assert!(t.get(0).is_none());
        assert!(t.get(3).is_none(), "never handed out");
        assert!(t.get(1 << 32 | 1).is_none(), "another generation");
        let e = t.get(2).unwrap();
        assert_eq!((e.key, e.kind, e.rare), ((1, 3), libc::S_IFREG, None));
        assert_eq!(e.ctimes, Some(((5, 6), (7, 8))));
        assert_eq!(t.get(1).unwrap().ctimes, None);
    }

    #[test]
    fn a_reused_slot_is_not_reachable_by_the_old_id() {
        let mut t = Table::new();
        add(&mut t, (1, 1), Some("root"));
        let a = add(&mut t, (1, 10), None);
        assert!(t.add_lookups(a, 2));
        assert_eq!(t.forget(a, 1), None, "still held");
        let gone = t.forget(a, 2).expect("last reference");
        assert_eq!((gone.key, gone.rare), ((1, 10), None));
        assert!(t.get(a).is_none() && t.lookups(a).is_none());
        assert!(!t.add_lookups(a, 1));
        assert_eq!(t.find((1, 10)), None);
        let b = add(&mut t, (1, 11), Some("fd"));
        assert_eq!(b as u32, a as u32, "the slot was reused");
        assert_ne!(b, a);
        assert!(
            t.get(a).is_none(),
            "the old id does not reach the new inode"
        );
        assert_eq!(
            t.forget(a, u64::MAX),
            None,
            "a stale forget changes nothing"
        );
        assert_eq!(t.lookups(b), Some(1));
        assert_eq!(t.get(b).unwrap().rare, Some("fd"));
    }

    #[test]
    fn a_slot_at_the_last_generation_is_retired() {
        let mut t = Table::new();
        add(&mut t, (1, 1), Some("root"));
        let a = add(&mut t, (1, 10), None);
        let (slot, _) = split_id(a).unwrap();
        t.records[slot as usize].generation = u32::MAX - 1;
        let a = node_id(slot, u32::MAX - 1);
        t.forget(a, 1).unwrap();
        let b = add(&mut t, (1, 11), None);
        assert_eq!(b, node_id(slot, u32::MAX), "the last generation is used");
        t.forget(b, 1).unwrap();
        let c = add(&mut t, (1, 12), None);
        assert_ne!(
            c as u32, b as u32,
            "the slot is not reused after its last generation"
        );
        assert!(t.get(a).is_none() && t.get(b).is_none());
        assert_eq!(t.get(c).unwrap().key, (1, 12));
        // The generation of the next slot starts over at 0: ids stay unique per slot.
        assert_eq!(c >> 32, 0);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_settled_record_drops_its_rare_part_and_keeps_the_ctimes_of_its_link() {
        let mut t = Table::new();
        add(&mut t, (1, 1), Some("root"));
        let a = add(&mut t, (1, 10), Some("fd"));
        assert_eq!(t.rare_parts().count(), 2);
        assert_eq!(t.settle(a, Some(((1, 2), (3, 4)))), Some("fd"));
        let e = t.get(a).unwrap();
        assert_eq!((e.rare, e.ctimes), (None, Some(((1, 2), (3, 4)))));
        assert_eq!(t.rare_parts().count(), 1, "the side map lost the fd");
        assert_eq!(t.settle(a, None), None, "already settled: nothing changes");
        assert_eq!(t.get(a).unwrap().ctimes, Some(((1, 2), (3, 4))));
        // A forgotten record, or one never handed out, is not settled.
        assert_eq!(t.forget(a, 1).map(|r| r.rare), Some(None));
        assert_eq!(t.settle(a, None), None);
        assert_eq!(t.settle(12345, None), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_released_reservation_is_reused_under_the_same_id() {
        let mut t: Table<&str> = Table::new();
        let r = t.reserve((1, 1)).unwrap();
        let id = r.id();
        t.release(r);
        assert!(t.get(id).is_none(), "a reservation is not live");
        assert_eq!(add(&mut t, (1, 1), None), id);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_index_follows_the_newest_inode_under_a_reused_number() {
        let mut t = Table::new();
        add(&mut t, (1, 1), Some("root"));
        let old = add(&mut t, (1, 10), Some("dir handle"));
        assert_eq!(t.find((1, 10)), Some(old));
        assert_eq!(t.find((2, 10)), None, "another device");
        // The number was reused by a new inode: it takes over the key.
        let new = add(&mut t, (1, 10), None);
        assert_eq!(t.find((1, 10)), Some(new));
        // Forgetting the stale node leaves the new one indexed.
        let gone = t.forget(old, 1).unwrap();
        assert_eq!(gone.rare, Some("dir handle"));
        assert_eq!(t.find((1, 10)), Some(new));
        assert_eq!(t.forget(new, 1).map(|g| g.key), Some((1, 10)));
        assert_eq!(t.find((1, 10)), None);

        // The other order: the newest goes first, the stale one is not indexed again.
        let old = add(&mut t, (2, 20), None);
        let new = add(&mut t, (2, 20), None);
        t.forget(new, 1).unwrap();
        assert_eq!(t.find((2, 20)), None);
        assert!(t.get(old).is_some(), "still reachable by its id");
        t.forget(old, 1).unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn counts_and_rare_parts_follow_the_records() {
        let mut t = Table::new();
        add(&mut t, (1, 1), Some("root"));
        let ids: Vec<u64> = (0..100).map(|i| add(&mut t, (7, 100 + i), None)).collect();
        let d = add(&mut t, (9, 5), Some("handle"));
        assert_eq!(t.len(), 102);
        assert_eq!(t.plain().count(), 100);
        assert_eq!(t.rare_parts().count(), 2);
        assert_eq!(t.devs, vec![1, 7, 9], "st_dev is interned");
        for &id in &ids[..50] {
            t.forget(id, 1).unwrap();
        }
        t.forget(d, 1).unwrap();
        assert_eq!(
            (t.len(), t.plain().count(), t.rare_parts().count()),
            (51, 50, 1)
        );
        assert_eq!(t.ids().count(), 51);
        for (i, &id) in ids.iter().enumerate().skip(50) {
            assert_eq!(t.find((7, 100 + i as u64)), Some(id));
        }
        // Freed slots are filled before the slab grows.
        let before = t.records.len();
        for i in 0..51 {
            add(&mut t, (7, 1000 + i), None);
        }
        assert_eq!(t.records.len(), before);
    }

    #[test]
    fn a_ctime_that_does_not_fit_is_not_kept() {
        let mut t: Table<()> = Table::new();
        let r = t.reserve((1, 1)).unwrap();
        let id = t
            .fill(
                r,
                NewRecord {
                    kind: libc::S_IFLNK,
                    ctimes: Some(((1, -1), (2, 3))),
                    rare: None,
                    lookups: 1,
                },
            )
            .id;
        let e = t.get(id).unwrap();
        assert_eq!((e.kind, e.ctimes), (libc::S_IFLNK, None));
    }

    #[test]
    fn a_million_records_cost_about_60_bytes_each() {
        let n = 1_000_000u64;
        let mut t: Table<std::sync::Arc<u64>> = Table::new();
        for i in 0..n {
            let r = t.reserve((64769, 1000 + i)).unwrap();
            t.fill(
                r,
                NewRecord {
                    kind: libc::S_IFREG,
                    ctimes: Some(((i as i64, 1), (i as i64 + 1, 2))),
                    rare: None,
                    lookups: 1,
                },
            );
        }
        let per = t.heap_bytes() as f64 / n as f64;
        eprintln!("inode table: {per:.1} heap bytes per inode at {n}");
        // 48 per record (the Vec's capacity is a power of two) + ~10 for the index at its
        // load; the bound for the whole daemon is 160.
        assert!(per < 64.0, "{per} bytes per inode");
        assert_eq!(t.find((64769, 1000 + n / 2)), Some(n / 2 + 1));
    }
}
