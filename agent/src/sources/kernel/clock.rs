//! Conversion of the kernel's monotonic timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to
//! wall-clock unix nanoseconds, done once per event with an offset sampled at start-up.

use crate::model::UnixNanos;

/// Offset between CLOCK_REALTIME and CLOCK_MONOTONIC, sampled once.
///
/// A wall-clock step (NTP) after start-up shifts kernel times against span times by the step;
/// the agent re-samples on every `KernelSource::build`, and the correlator's join windows
/// tolerate small skews.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicToWall {
    offset_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; clock_gettime only writes to it. CLOCK_REALTIME and
    // CLOCK_MONOTONIC cannot fail on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl MonotonicToWall {
    /// Samples the offset: the realtime reading bracketed by two monotonic readings, best of
    /// five by the bracket's width.
    pub fn sample() -> Self {
        let mut best: Option<(i128, i128)> = None;
        for _ in 0..5 {
            let m1 = clock_ns(libc::CLOCK_MONOTONIC);
            let r = clock_ns(libc::CLOCK_REALTIME);
            let m2 = clock_ns(libc::CLOCK_MONOTONIC);
            let width = m2 - m1;
            let offset = r - (m1 + m2) / 2;
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        Self {
            offset_ns: best.map_or(0, |(_, o)| o),
        }
    }

    /// A fixed offset (tests and replays).
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// The wall-clock time of a monotonic timestamp.
    pub fn to_unix(&self, mono_ns: u64) -> UnixNanos {
        let t = i128::from(mono_ns) + self.offset_ns;
        u64::try_from(t.max(0)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_now_to_now() {
        let clock = MonotonicToWall::sample();
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        let wall = clock_ns(libc::CLOCK_REALTIME) as u64;
        let converted = clock.to_unix(mono);
        assert!(
            converted.abs_diff(wall) < 5_000_000,
            "{converted} vs {wall}"
        );
    }
}
