//! The conversation table: the last turn of every conversation, keyed by a 64-bit hash and
//! bounded (least recently updated first out). Its memory budget is in the module above.

use std::collections::{HashMap, VecDeque};

use crate::model::UnixNanos;
use crate::privacy::siphash24;

/// The 64-bit key of a conversation: SipHash-2-4 of `tenant \0 conversation` under a fixed key.
/// Ids of different tenants never share a record; two conversations collide with probability
/// about n^2 / 2^65 (3e-8 at a million).
pub fn conversation_key(tenant: &str, conversation: &str) -> u64 {
    let mut bytes = Vec::with_capacity(tenant.len() + conversation.len() + 1);
    bytes.extend_from_slice(tenant.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(conversation.as_bytes());
    siphash24(0x696e_6665_7277_6174, 0x6368_2d63_6f6e_7673, &bytes)
}

/// The last turn of one conversation: 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationRecord {
    /// End of the last turn.
    pub end: UnixNanos,
    /// Its prompt tokens (saturated at `u32::MAX`).
    pub prompt_tokens: u32,
    /// Its output tokens (saturated).
    pub output_tokens: u32,
    /// Its tenant, interned.
    pub tenant: u32,
    /// Its runtime instance, interned.
    pub instance: u16,
}

/// Conversations by 64-bit key, bounded: the least recently updated is dropped first.
///
/// The eviction order is a queue of `(key, end)` written at every update; an entry is live when
/// the record still has that `end` (older entries are skipped, and the queue is compacted when
/// it holds more than twice the records).
#[derive(Debug)]
pub struct ConversationTable {
    map: HashMap<u64, ConversationRecord>,
    order: VecDeque<(u64, UnixNanos)>,
    cap: usize,
    dropped: u64,
    expired: u64,
}

impl ConversationTable {
    /// An empty table holding at most `cap` conversations.
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
            dropped: 0,
            expired: 0,
        }
    }

    /// The record of `key`.
    pub fn get(&self, key: u64) -> Option<&ConversationRecord> {
        self.map.get(&key)
    }

    /// Conversations tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Conversations dropped because the table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Conversations forgotten by [`ConversationTable::expire`].
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Bytes held by the table's allocations now (capacity, not length).
    pub fn allocated_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket plus the entries; buckets = capacity * 8 / 7
        // rounded up to a power of two.
        let buckets = (self.map.capacity() * 8 / 7).next_power_of_two();
        buckets * (size_of::<(u64, ConversationRecord)>() + 1)
            + self.order.capacity() * size_of::<(u64, UnixNanos)>()
    }

    /// Inserts or replaces the record of `key`; drops the oldest when full.
    pub fn upsert(&mut self, key: u64, record: ConversationRecord) {
        if !self.map.contains_key(&key) {
            while self.map.len() >= self.cap {
                let Some((old, end)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|r| r.end == end) {
                    self.map.remove(&old);
                    self.dropped += 1;
                }
            }
        }
        self.map.insert(key, record);
        // Compacted before the push that would grow it past twice the records: the deque
        // doubles its allocation when full, and compacting after that push kept an allocation
        // of four times the records (8 MiB at the default cap) for one entry too many.
        if self.order.len() >= 2 * self.cap.max(16) {
            let map = &self.map;
            self.order
                .retain(|(k, end)| map.get(k).is_some_and(|r| r.end == *end));
        }
        self.order.push_back((key, record.end));
    }

    /// Forgets the conversations whose last turn ended before `before`, in update order (a
    /// record updated out of time order may linger until the ones before it go).
    pub fn expire(&mut self, before: UnixNanos) -> u64 {
        let mut n = 0;
        while let Some(&(key, end)) = self.order.front() {
            if end >= before {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|r| r.end == end) {
                self.map.remove(&key);
                n += 1;
            }
        }
        self.expired += n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlator::KvEvictionConfig;

    #[test]
    fn table_drops_the_oldest_and_counts() {
        let mut t = ConversationTable::new(3);
        let rec = |end| ConversationRecord {
            end,
            prompt_tokens: 1,
            output_tokens: 1,
            tenant: 0,
            instance: 0,
        };
        for k in 1..=3 {
            t.upsert(k, rec(k * 10));
        }
        t.upsert(1, rec(40));
        t.upsert(4, rec(50));
        assert_eq!(t.len(), 3);
        assert_eq!(t.dropped(), 1);
        assert!(t.get(2).is_none(), "2 was the least recently updated");
        assert!(t.get(1).is_some());
        assert_eq!(t.expire(45), 2);
        assert_eq!(t.len(), 1);
        assert!(t.get(4).is_some());
    }

    #[test]
    fn the_update_queue_stays_within_twice_the_records() {
        let cap = 64;
        let mut t = ConversationTable::new(cap);
        // Updates of the same few conversations leave stale queue entries behind; the queue is
        // compacted before it would grow its allocation past 2 * cap.
        for end in 0..10_000u64 {
            t.upsert(
                end % 8,
                ConversationRecord {
                    end,
                    prompt_tokens: 1,
                    output_tokens: 1,
                    tenant: 0,
                    instance: 0,
                },
            );
            assert!(t.order.len() <= 2 * cap);
        }
        assert!(t.order.capacity() <= 2 * cap, "{}", t.order.capacity());
        assert_eq!(t.len(), 8);
    }

    /// The default cap is 7/16 of a power of two, and a table at such a cap keeps its bucket
    /// count under churn (rehashed in place, never doubled); 2M upserts of new keys took a
    /// table capped at 2^17 to 2^19 buckets.
    #[test]
    fn a_full_table_under_churn_keeps_its_buckets() {
        let default = KvEvictionConfig::default().max_conversations;
        assert!((default * 16 / 7).is_power_of_two() && default * 16 % 7 == 0);
        let cap = 7 * 4096 / 16;
        let mut t = ConversationTable::new(cap);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for end in 0..50 * cap as u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let record = ConversationRecord {
                end,
                prompt_tokens: 1,
                output_tokens: 1,
                tenant: 0,
                instance: 0,
            };
            t.upsert(x, record);
            assert!(t.map.capacity() <= 4096 * 7 / 8, "{}", t.map.capacity());
        }
        assert_eq!(t.len(), cap);
    }
}
