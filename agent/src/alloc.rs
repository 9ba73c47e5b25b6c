//! Allocator settings for the agent's steady work.
//!
//! The OTLP path allocates and frees buffers of a few hundred KB per request (decoded span
//! vectors, export encodings). With glibc's defaults those sizes sit around the dynamic mmap
//! threshold and the heap top is trimmed after each free, so every request faults the same
//! memory back in: the bench counted ~186 page faults per 512-span request. Keeping freed
//! memory up to a small bound removes that cost; the bound keeps RSS predictable.

/// Freed memory glibc may keep at the heap top before returning it to the kernel.
pub const TRIM_THRESHOLD_BYTES: i32 = 16 * 1024 * 1024;
/// Allocations above this come from mmap (and go back to the kernel when freed).
pub const MMAP_THRESHOLD_BYTES: i32 = 4 * 1024 * 1024;
/// malloc arenas. glibc's default (8 per core) lets every tokio worker and blocking thread
/// grow an arena of its own, each keeping up to the trim threshold of freed memory.
pub const ARENA_MAX: i32 = 2;

/// Applies the settings (glibc only; a no-op elsewhere). Call once at start-up, before the
/// threads that allocate start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}
