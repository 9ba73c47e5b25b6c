//! Synthetic tokenisation: one whitespace-separated word = one token, id from a hash of the
//! word. Chat messages are framed by role tokens so that turn n+1's prompt starts with turn
//! n's prompt followed by turn n's output, as with a real chat template, and the prefix cache
//! sees real shared prefixes.

/// Token id of the system role header.
pub const SYSTEM: u32 = 1;
/// Token id of the user role header.
pub const USER: u32 = 2;
/// Token id of the assistant role header (also the generation prompt).
pub const ASSISTANT: u32 = 3;
/// Token id closing a message.
pub const END: u32 = 4;

/// FNV-1a 64 over bytes, chained from `seed`.
pub fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A 64-bit mix (splitmix64 finaliser), for hash chains over integers.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Token id of one word (ids 100..50_100; below 100 are specials).
pub fn word_token(word: &str) -> u32 {
    100 + (fnv1a(0, word.as_bytes()) % 50_000) as u32
}

/// Tokenise plain text.
pub fn tokenize(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_whitespace().map(word_token)
}

/// Role header token for a chat role.
pub fn role_token(role: &str) -> u32 {
    match role {
        "system" | "developer" => SYSTEM,
        "assistant" => ASSISTANT,
        _ => USER,
    }
}

/// Tokenise a chat prompt: per message `[role] words.. [END]`, then the generation prompt
/// `[ASSISTANT]`. Returns the tokens and the number of user messages (the turn).
pub fn chat_prompt<'a>(messages: impl Iterator<Item = (&'a str, &'a str)>) -> (Vec<u32>, u32) {
    let mut out = Vec::new();
    let mut turn = 0;
    for (role, content) in messages {
        let r = role_token(role);
        if r == USER {
            turn += 1;
        }
        out.push(r);
        out.extend(tokenize(content));
        out.push(END);
    }
    out.push(ASSISTANT);
    (out, turn)
}

/// The `i`-th output word of a sequence whose prompt hashes to `seed`: deterministic, so
/// the same conversation replays to the same text.
pub fn output_word(seed: u64, i: u32) -> String {
    format!(
        "o{:06x}",
        mix(seed ^ u64::from(i).wrapping_mul(0x1000_0000_01b3)) & 0xff_ffff
    )
}

/// Hash of a token sequence (seeds the output words).
pub fn seq_hash(tokens: &[u32]) -> u64 {
    tokens
        .iter()
        .fold(0x51_7cc1_b727_220a, |h, t| mix(h ^ u64::from(*t)))
}

/// Deterministic filler text of `n` words for synthetic prompts, from `seed`.
pub fn filler_words(seed: u64, n: usize) -> String {
    let mut s = String::with_capacity(n * 8);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!(
            "w{:06x}",
            mix(seed.wrapping_add(i as u64)) & 0xff_ffff
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_turn_prompt_extends_previous_prompt_and_output() {
        let sys = filler_words(1, 40);
        let u1 = filler_words(2, 10);
        let (p1, t1) = chat_prompt([("system", sys.as_str()), ("user", u1.as_str())].into_iter());
        assert_eq!(t1, 1);
        let seed = seq_hash(&p1);
        let out: Vec<String> = (0..7).map(|i| output_word(seed, i)).collect();
        let out_text = out.join(" ");
        let u2 = filler_words(3, 5);
        let (p2, t2) = chat_prompt(
            [
                ("system", sys.as_str()),
                ("user", u1.as_str()),
                ("assistant", out_text.as_str()),
                ("user", u2.as_str()),
            ]
            .into_iter(),
        );
        assert_eq!(t2, 2);
        let mut expect: Vec<u32> = p1.clone();
        expect.extend(out.iter().map(|w| word_token(w)));
        assert_eq!(&p2[..expect.len()], &expect[..]);
    }
}
