//! Small ordered collections for the correlator's per-connection and per-key state.
//!
//! Nearly every index entry names one thing (a trace id one head, a client address one
//! connection) and nearly every connection carries one request. `BTreeSet` / `BTreeMap` would
//! allocate a whole node (eleven slots) for that one element, per request: at 10k requests/s
//! that was a visible share of the agent's allocations and of its memory. These keep the one
//! element inline, and stay logarithmic (`KeySet`) or bounded (`SortedVecMap`, whose length the
//! correlator caps) when there are more.

use std::collections::BTreeSet;

/// A set that is usually one element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeySet<T> {
    One(T),
    Many(BTreeSet<T>),
}

impl<T: Ord + Copy> KeySet<T> {
    pub(super) fn insert(&mut self, value: T) {
        match self {
            KeySet::One(only) if *only == value => {}
            KeySet::One(only) => *self = KeySet::Many(BTreeSet::from([*only, value])),
            KeySet::Many(set) => {
                set.insert(value);
            }
        }
    }

    /// Removes `value`; true when the set is empty afterwards (the caller drops it).
    pub(super) fn remove(&mut self, value: &T) -> bool {
        match self {
            KeySet::One(only) => only == value,
            KeySet::Many(set) => {
                set.remove(value);
                set.is_empty()
            }
        }
    }

    /// The elements, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = T> + '_ {
        let (one, many) = match self {
            KeySet::One(only) => (Some(*only), None),
            KeySet::Many(set) => (None, Some(set.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// A map kept as a vector sorted by key: for a handful of entries (the requests of one
/// connection, capped by `max_heads_per_connection`), with no allocation until the first
/// insert, room for exactly one entry then, and the usual doubling after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SortedVecMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for SortedVecMap<K, V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<K: Ord + Copy, V> SortedVecMap<K, V> {
    fn find(&self, key: &K) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }

    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self.find(key) {
            Ok(i) => Some(&mut self.entries[i].1),
            Err(_) => None,
        }
    }

    /// Inserts or replaces the value at `key`.
    pub(super) fn insert(&mut self, key: K, value: V) {
        match self.find(&key) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => {
                // Vec's first push reserves four entries; most connections carry one request,
                // and an entry holds a parsed head (~200 bytes), so at 10k requests/s the
                // three unused slots per connection were ~6 MiB.
                if self.entries.capacity() == 0 {
                    self.entries.reserve_exact(1);
                }
                self.entries.insert(i, (key, value));
            }
        }
    }

    pub(super) fn pop_first(&mut self) -> Option<(K, V)> {
        (!self.entries.is_empty()).then(|| self.entries.remove(0))
    }

    /// The first key after `key`.
    pub(super) fn next_key_after(&self, key: &K) -> Option<K> {
        let i = match self.find(key) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        self.entries.get(i).map(|(k, _)| *k)
    }

    /// Removes the leading entries for which `remove` holds.
    pub(super) fn remove_leading(&mut self, remove: impl Fn(&V) -> bool) {
        let n = self.entries.iter().take_while(|(_, v)| remove(v)).count();
        self.entries.drain(..n);
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

impl<K, V> IntoIterator for SortedVecMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_set_grows_and_empties() {
        let mut set = KeySet::One(3);
        set.insert(3);
        assert_eq!(set, KeySet::One(3));
        set.insert(1);
        set.insert(2);
        assert_eq!(set.iter().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!set.remove(&2));
        assert!(!set.remove(&9));
        assert!(!set.remove(&1));
        assert!(set.remove(&3));
        let mut one = KeySet::One(5);
        assert!(!one.remove(&4));
        assert!(one.remove(&5));
    }

    #[test]
    fn sorted_vec_map_behaves_like_a_btree_map() {
        // The same operations on both, in an order that exercises every method.
        let mut ours = SortedVecMap::default();
        let mut btree = std::collections::BTreeMap::new();
        let mut state = 0x2545_f491_u64;
        for step in 0..2_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = state % 32;
            match step % 5 {
                0 | 1 => {
                    ours.insert(key, Some(step));
                    btree.insert(key, Some(step));
                }
                2 => {
                    if let Some(v) = ours.get_mut(&key) {
                        *v = None;
                    }
                    if let Some(v) = btree.get_mut(&key) {
                        *v = None;
                    }
                }
                3 => assert_eq!(ours.pop_first(), btree.pop_first()),
                _ => {
                    ours.remove_leading(Option::is_none);
                    while btree.first_key_value().is_some_and(|(_, v)| v.is_none()) {
                        btree.pop_first();
                    }
                }
            }
            assert_eq!(ours.len(), btree.len());
            assert_eq!(ours.contains_key(&key), btree.contains_key(&key));
            assert_eq!(ours.get(&key), btree.get(&key));
            assert_eq!(
                ours.next_key_after(&key),
                btree
                    .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
                    .next()
                    .map(|(k, _)| *k)
            );
            assert!(ours.iter().eq(btree.iter()));
        }
        assert!(ours.into_iter().eq(btree));
    }
}
