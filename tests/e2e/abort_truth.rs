//! What the testbed's truth says about a request whose client may have left before the
//! runtime stopped, and the bounds an abort finding's token count must fall in. Every e2e test
//! that scores abort findings uses this one reading of the truth.

use inferwatch_testbed::truth::RequestTruth;

/// One request's abort, as the testbed saw it.
#[derive(Debug, Clone, Copy)]
pub struct AbortTruth {
    /// The client left (FIN or RST) before the runtime stopped.
    pub left_early: bool,
    /// Tokens generated after the server noticed the client leave.
    pub after_noticed: u64,
    /// Tokens generated after the client's close call. The agent places the abort at the
    /// FIN / RST the kernel saw, which lies between the close call and the server noticing.
    pub after_close: u64,
    /// Writes of the streamed body not finished when the client closed: the most the kernel
    /// can count after the FIN (a token generated before the close may be written after it).
    pub writes_after_close: u64,
    /// The runtime's stop minus the client's close, ms.
    pub lag_ms: f64,
}

impl AbortTruth {
    /// `left` says whether the client closed the connection itself (not a completed
    /// response); `close_ns` is stamped just before its close call.
    pub fn of(r: &RequestTruth, left: bool, close_ns: u64) -> Self {
        let after_close = if r.token_times_ns.is_empty() {
            r.tokens_after_abort
        } else {
            r.token_times_ns.iter().filter(|&&t| t > close_ns).count() as u64
        };
        let writes_after_close = if r.body_writes_ns.is_empty() {
            after_close
        } else {
            r.body_writes_ns
                .iter()
                .filter(|&&(_, returned)| returned > close_ns)
                .count() as u64
        };
        Self {
            left_early: left && close_ns < r.stop_ns,
            after_noticed: r.tokens_after_abort,
            after_close,
            writes_after_close,
            lag_ms: (r.stop_ns as f64 - close_ns as f64) / 1e6,
        }
    }

    /// Contract §3.1: a finding when tokens came after the close or the runtime took over
    /// `abort_lag_finding_ms` (1 s) to stop. A count by interpolation is within 2 tokens of
    /// the truth, so one or two tokens after may round to none: those need not make one.
    pub fn must_find(&self) -> bool {
        self.left_early && (self.after_noticed > 2 || self.lag_ms > 1000.0)
    }

    /// Whether a finding is allowed: those that must be found, and those with a token
    /// generated or written after the close. A runtime that stopped within a few ms of the
    /// close, or close to the 1 s threshold, may make one through the two clocks.
    pub fn may_find(&self) -> bool {
        self.left_early
            && (self.must_find()
                || self.after_close >= 1
                || self.writes_after_close >= 1
                || !(5.0..=900.0).contains(&self.lag_ms))
    }

    /// Checks a finding's `tokens_after` by its counting method.
    pub fn check_tokens_after(&self, method: &str, agent: u64) -> Result<(), String> {
        let within = match method {
            // Exact: between the count after the client's close call and the count after the
            // server noticed (tokens generated in between are after the FIN or not depending
            // on microseconds; on a quiet machine the two counts are equal). Plus one when
            // the runtime stopped within a few ms of the close: the kernel's FIN time and
            // the runtime's token times come from two clocks.
            "events" => (self.after_noticed..=self.after_close + u64::from(self.lag_ms < 5.0))
                .contains(&agent),
            // The kernel counts writes, not generations: at least the tokens generated after
            // the server noticed, at most the body writes still running when the client
            // closed (under load a token generated before the close is written after it).
            "kernel_writes" => (self.after_noticed..=self.writes_after_close.max(self.after_close))
                .contains(&agent),
            "interpolated" => {
                let truth = self.after_noticed as f64;
                (agent as f64 - truth).abs() <= (truth * 0.05).max(2.0)
            }
            other => return Err(format!("unknown method {other}")),
        };
        if within {
            Ok(())
        } else {
            Err(format!(
                "tokens after ({method}) {agent}, truth {} (after close {}, body writes after \
                 close {})",
                self.after_noticed, self.after_close, self.writes_after_close
            ))
        }
    }
}
