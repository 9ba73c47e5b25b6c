//! Bench of the KV-eviction conversation table: bytes per tracked conversation and lookups
//! per second at 1 million conversations (`cargo bench -p inferwatch --bench conversations`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use inferwatch::correlator::{ConversationRecord, ConversationTable, conversation_key};

/// Counts live heap bytes, to measure the table rather than estimate it.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: u64 = 1 << 20;

fn main() {
    let keys: Vec<u64> = (0..N)
        .map(|i| conversation_key("tenant", &format!("conversation-{i}")))
        .collect();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut table = ConversationTable::new(N as usize);
    let t0 = Instant::now();
    for (i, k) in keys.iter().enumerate() {
        table.upsert(
            *k,
            ConversationRecord {
                end: 1_700_000_000_000_000_000 + i as u64,
                prompt_tokens: 1500,
                output_tokens: 40,
                tenant: (i % 64) as u32,
                instance: 0,
            },
        );
    }
    let insert = t0.elapsed();
    let live = LIVE.load(Ordering::Relaxed) - base;
    let peak = PEAK.load(Ordering::Relaxed) - base;
    // Lookups in a scrambled order, as real turns come.
    let t1 = Instant::now();
    let mut hits = 0u64;
    let rounds = 4;
    for r in 0..rounds {
        for i in 0..N {
            let k = keys[((i.wrapping_mul(0x9e37_79b9) + r) % N) as usize];
            if let Some(rec) = table.get(k) {
                hits += u64::from(black_box(rec.prompt_tokens) > 0);
            }
        }
    }
    let lookups = t1.elapsed();
    // Updates past the cap: every insert drops the oldest.
    let t2 = Instant::now();
    for i in 0..N / 4 {
        table.upsert(
            conversation_key("other", &i.to_string()),
            ConversationRecord {
                end: 1_800_000_000_000_000_000 + i,
                prompt_tokens: 1,
                output_tokens: 1,
                tenant: 0,
                instance: 0,
            },
        );
    }
    let churn = t2.elapsed();
    let n = table.len() as f64;
    println!("conversations tracked: {}", table.len());
    println!(
        "bytes per conversation: {:.1} live, {:.1} peak (record {} B, total live {:.1} MiB, peak {:.1} MiB)",
        live as f64 / n,
        peak as f64 / n,
        size_of::<ConversationRecord>(),
        live as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    println!(
        "inserts: {:.2} M/s; lookups: {:.2} M/s ({} hits); inserts at the cap (drop oldest): {:.2} M/s, {} dropped",
        N as f64 / insert.as_secs_f64() / 1e6,
        (N * rounds) as f64 / lookups.as_secs_f64() / 1e6,
        hits,
        (N / 4) as f64 / churn.as_secs_f64() / 1e6,
        table.dropped()
    );
}
