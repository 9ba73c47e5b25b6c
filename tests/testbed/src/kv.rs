//! Paged KV cache with prefix caching, modelled on vLLM's block manager: blocks of
//! [`BLOCK_SIZE`] tokens, a hash chain over full blocks (optionally salted per tenant), a
//! hash table of cached blocks, and LRU eviction of unreferenced cached blocks when a new
//! allocation finds no never-used block.

use std::collections::{BTreeMap, HashMap};

use crate::tokens::{fnv1a, mix};

/// Tokens per block (vLLM's default).
pub const BLOCK_SIZE: usize = 16;

/// Who filled a block (for eviction accounting).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Tenant.
    pub tenant: String,
    /// Conversation.
    pub conversation: String,
}

#[derive(Debug, Clone, Default)]
struct Block {
    hash: Option<u64>,
    refs: u32,
    owner: Owner,
    /// Key in the LRU map while unreferenced and cached.
    lru_tick: Option<u64>,
}

/// One evicted block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    /// Content hash of the block.
    pub hash: u64,
    /// Who had filled it.
    pub owner: Owner,
}

/// Not enough free blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache full: need {need} blocks, {available} available")]
pub struct NoSpace {
    /// Blocks needed.
    pub need: usize,
    /// Blocks available.
    pub available: usize,
}

/// Blocks held by one sequence.
#[derive(Debug, Clone, Default)]
pub struct Allocation {
    /// Block indices in sequence order (prefix hits first).
    pub blocks: Vec<usize>,
    /// Number of leading blocks that were prefix-cache hits.
    pub hit_blocks: usize,
}

/// The cache.
#[derive(Debug)]
pub struct KvCache {
    blocks: Vec<Block>,
    /// Never-used (or hash-less) free blocks: taken before any eviction.
    free: Vec<usize>,
    /// Unreferenced cached blocks by age: the smallest tick is evicted first.
    lru: BTreeMap<u64, usize>,
    cached: HashMap<u64, usize>,
    tick: u64,
}

/// Hash chain over the full blocks of `tokens`, seeded by `salt` (0 = shared across tenants).
pub fn block_hashes(tokens: &[u32], salt: u64) -> Vec<u64> {
    let mut parent = mix(salt);
    tokens
        .chunks_exact(BLOCK_SIZE)
        .map(|chunk| {
            let mut bytes = [0u8; BLOCK_SIZE * 4];
            for (i, t) in chunk.iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
            }
            parent = fnv1a(parent, &bytes);
            parent
        })
        .collect()
}

/// Salt for a tenant when per-tenant salting is on.
pub fn tenant_salt(tenant: &str) -> u64 {
    fnv1a(7, tenant.as_bytes())
}

impl KvCache {
    /// A cache of `num_blocks` blocks.
    pub fn new(num_blocks: usize) -> Self {
        Self {
            blocks: vec![Block::default(); num_blocks],
            free: (0..num_blocks).rev().collect(),
            lru: BTreeMap::new(),
            cached: HashMap::new(),
            tick: 0,
        }
    }

    /// Total blocks.
    pub fn capacity(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that an allocation could take now (never-used + evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Whether a block with this content hash is resident.
    pub fn is_cached(&self, hash: u64) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Number of leading `hashes` resident in the cache.
    pub fn lookup(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Take references on the first `hits` blocks of `hashes` (which must be resident: see
    /// [`lookup`](Self::lookup)) and `new_blocks` fresh blocks, evicting LRU blocks when
    /// needed. Nothing changes on `Err`.
    pub fn allocate(
        &mut self,
        hashes: &[u64],
        hits: usize,
        new_blocks: usize,
    ) -> Result<(Allocation, Vec<Evicted>), NoSpace> {
        let hit_idx: Vec<usize> = hashes
            .iter()
            .take(hits)
            .filter_map(|h| self.cached.get(h).copied())
            .collect();
        let hits = hit_idx.len();
        let hits_in_lru = hit_idx
            .iter()
            .filter(|&&b| self.blocks[b].refs == 0)
            .count();
        let available = self.available() - hits_in_lru;
        if new_blocks > available {
            return Err(NoSpace {
                need: new_blocks,
                available,
            });
        }
        for &b in &hit_idx {
            let blk = &mut self.blocks[b];
            if let Some(t) = blk.lru_tick.take() {
                self.lru.remove(&t);
            }
            blk.refs += 1;
        }
        let mut blocks = hit_idx;
        let mut evicted = Vec::new();
        for _ in 0..new_blocks {
            let b = if let Some(b) = self.free.pop() {
                b
            } else {
                // Checked above: enough evictable blocks remain.
                let Some((_, b)) = self.lru.pop_first() else {
                    break;
                };
                let blk = &mut self.blocks[b];
                blk.lru_tick = None;
                if let Some(h) = blk.hash.take() {
                    self.cached.remove(&h);
                    evicted.push(Evicted {
                        hash: h,
                        owner: std::mem::take(&mut blk.owner),
                    });
                }
                b
            };
            self.blocks[b].refs = 1;
            blocks.push(b);
        }
        Ok((
            Allocation {
                blocks,
                hit_blocks: hits,
            },
            evicted,
        ))
    }

    /// Release a sequence's blocks. `content_hashes` are the hashes of the sequence's full
    /// blocks (prompt + output); fresh blocks covered by them become cached (prefix hits for
    /// later requests). Returns the hashes newly stored. Freed blocks enter the LRU tail
    /// first, so a sequence's last blocks are evicted before its first ones (as in vLLM).
    pub fn free(&mut self, alloc: &Allocation, content_hashes: &[u64], owner: &Owner) -> Vec<u64> {
        let mut stored = Vec::new();
        for (i, &b) in alloc.blocks.iter().enumerate() {
            if i >= alloc.hit_blocks
                && let Some(&h) = content_hashes.get(i)
                && !self.cached.contains_key(&h)
            {
                self.blocks[b].hash = Some(h);
                self.blocks[b].owner = owner.clone();
                self.cached.insert(h, b);
                stored.push(h);
            }
        }
        for &b in alloc.blocks.iter().rev() {
            let blk = &mut self.blocks[b];
            blk.refs = blk.refs.saturating_sub(1);
            if blk.refs == 0 {
                if blk.hash.is_some() {
                    self.tick += 1;
                    blk.lru_tick = Some(self.tick);
                    self.lru.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(c: &str) -> Owner {
        Owner {
            tenant: "t".into(),
            conversation: c.into(),
        }
    }

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 100_000 + i).collect()
    }

    #[test]
    fn prefix_hit_after_free() {
        let mut kv = KvCache::new(16);
        let p = toks(1, 64);
        let h = block_hashes(&p, 0);
        assert_eq!(h.len(), 4);
        assert_eq!(kv.lookup(&h), 0);
        let (a, ev) = kv.allocate(&h, 0, 5).unwrap();
        assert!(ev.is_empty());
        let stored = kv.free(&a, &h, &owner("a"));
        assert_eq!(stored, h);
        // A longer prompt sharing the 64-token prefix hits 4 blocks.
        let mut p2 = p.clone();
        p2.extend(toks(2, 40));
        let h2 = block_hashes(&p2, 0);
        assert_eq!(kv.lookup(&h2), 4);
        let (a2, _) = kv.allocate(&h2, 4, 3).unwrap();
        assert_eq!(a2.hit_blocks, 4);
        assert_eq!(&a2.blocks[..4], &a.blocks[..4]);
        // Salted hashes do not hit.
        assert_eq!(kv.lookup(&block_hashes(&p2, tenant_salt("other"))), 0);
    }

    #[test]
    fn lru_evicts_oldest_unreferenced_and_accounts() {
        let mut kv = KvCache::new(4);
        let pa = toks(1, 32);
        let ha = block_hashes(&pa, 0);
        let (a, _) = kv.allocate(&ha, 0, 2).unwrap();
        kv.free(&a, &ha, &owner("a"));
        let pb = toks(2, 32);
        let hb = block_hashes(&pb, 0);
        let (b, _) = kv.allocate(&hb, 0, 2).unwrap();
        kv.free(&b, &hb, &owner("b"));
        assert_eq!(kv.available(), 4);
        // Needs 1 block: evicts a's last block (freed first into the LRU tail order).
        let (c, ev) = kv.allocate(&[], 0, 1).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].owner, owner("a"));
        assert_eq!(ev[0].hash, ha[1]);
        assert!(!kv.is_cached(ha[1]));
        assert!(kv.is_cached(ha[0]));
        // Only the prefix before the hole is a hit now.
        assert_eq!(kv.lookup(&ha), 1);
        // Touching b keeps it; the next eviction takes a's first block.
        let (b2, _) = kv.allocate(&hb, 2, 0).unwrap();
        let (_d, ev) = kv.allocate(&[], 0, 1).unwrap();
        assert_eq!(ev[0].hash, ha[0]);
        // Referenced blocks are never evicted: nothing left.
        assert!(kv.allocate(&[], 0, 1).is_err());
        kv.free(&b2, &hb, &owner("b"));
        kv.free(&c, &[], &owner("c"));
        assert_eq!(kv.available(), 3);
    }

    #[test]
    fn no_space_changes_nothing() {
        let mut kv = KvCache::new(3);
        let h = block_hashes(&toks(1, 32), 0);
        let (a, _) = kv.allocate(&h, 0, 2).unwrap();
        kv.free(&a, &h, &owner("a"));
        // Hits on 2 resident blocks + 2 fresh > 1 remaining.
        let err = kv.allocate(&h, 2, 2).unwrap_err();
        assert_eq!(err.available, 1);
        assert_eq!(kv.lookup(&h), 2);
        assert_eq!(kv.available(), 3);
    }
}
