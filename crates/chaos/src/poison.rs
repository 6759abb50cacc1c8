//! The poison-message fault: a third topic whose `max.message.bytes` is far below what a
//! poison message weighs, so Kafka refuses every such message for good, and the relay's
//! failure policy for that topic, drawn from the seed. The Rust writers rarely write one
//! poison message for one entity (the entity's other messages go to the normal topics, before
//! and after it). A share of the Rust writers' other messages go to the poison topic too,
//! *bystanders*: the broker refuses their record batch along with a poison message's, and
//! the relay must isolate the poison message and apply the policy to it alone
//! (docs/guarantees.md, section 6), publishing the bystanders. The padding is random
//! text from a 64-character alphabet (as incompressible as base64 of random bytes), so the
//! relay's lz4 compression cannot bring a record under the limit.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// `max.message.bytes` of the poison topic: every poison message is far above it, every
/// normal message far below.
pub const TOPIC_MAX_BYTES: usize = 20_000;

/// Characters of padding in a poison message's payload (about 50 KB). Random text over 64
/// characters carries 6 bits per byte and has almost no repeated 4-byte sequences, which is
/// all lz4 can exploit: compressed, it stays near 50 KB, 2.5 times the topic's limit. It
/// stays far below the database's record limit (`settings.max_record_bytes`, 1,000,000).
pub const PAD_CHARS: usize = 50_000;

/// The share of Rust writer transactions that carry a poison message. Under faults the six
/// writers manage about 16 transactions a second (PostgreSQL is down for much of the fault
/// phase): 0.5 % gave one poison message in a minute, so 1 %, about ten a minute.
pub const RATE: f64 = 0.01;

/// The share of the Rust writers' other messages that go to the poison topic as bystanders
/// (about 10 a second): enough that a poison message's record batch usually holds some,
/// including later messages of its own entity on the same Kafka partition.
pub const BYSTANDER_RATE: f64 = 0.1;

/// The base64 alphabet: the padding looks like base64 of random bytes.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Padding for one poison message: [`PAD_CHARS`] random characters.
pub fn pad(rng: &mut StdRng) -> String {
    (0..PAD_CHARS)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The relay's failure policy for the poison topic (`[topics.NAME] on_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The partition stops at the poison message until the operator skips it.
    Block,
    /// The poison message moves to `dead_letter`; its entity goes on without it.
    DeadLetter,
    /// The poison message moves to `dead_letter` and its entity waits until the operator
    /// unparks it.
    ParkEntity,
}

impl Policy {
    /// Every policy, in the order the seed picks from.
    pub const ALL: [Policy; 3] = [Policy::Block, Policy::DeadLetter, Policy::ParkEntity];

    /// The name `outboxd` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Block => "block",
            Policy::DeadLetter => "dead_letter",
            Policy::ParkEntity => "park_entity",
        }
    }

    /// The policy seed `seed` tests: its own random stream, so that drawing it shifts
    /// neither the fault schedule nor the writers.
    pub fn for_seed(seed: u64) -> Policy {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0909_5013_7e11);
        Policy::ALL[rng.random_range(0..Policy::ALL.len())]
    }

    /// The `dead_letter.policy` a committed poison message moved aside under this policy
    /// carries: under `block` only the operator's `outboxd skip` moves it.
    pub fn dead_letter_policy(self) -> &'static str {
        match self {
            Policy::Block => "skip",
            Policy::DeadLetter => "dead_letter",
            Policy::ParkEntity => "park_entity",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown policy {s:?}: block, dead_letter or park_entity"))
    }
}

/// The relays' configuration file: the poison topic's policy. Everything else stays on the
/// relays' command line; the normal topics keep the default, `block`, since Kafka must never
/// refuse one of their messages (if it does, the run does not drain).
pub fn relay_config(poison_topic: &str, policy: Policy) -> String {
    format!(
        "# Written by outbox-chaos for this run: the poison topic's failure policy.\n\
         [topics.\"{poison_topic}\"]\n\
         on_error = \"{policy}\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_picks_every_policy_and_always_the_same_one() {
        let picked: std::collections::BTreeSet<&str> =
            (0..30).map(|s| Policy::for_seed(s).as_str()).collect();
        assert_eq!(picked.len(), 3, "{picked:?}");
        assert_eq!(Policy::for_seed(7), Policy::for_seed(7));
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
        }
        assert!("skip".parse::<Policy>().is_err());
    }

    #[test]
    fn padding_is_far_above_the_topic_limit_and_looks_random() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = pad(&mut rng);
        let b = pad(&mut rng);
        assert_eq!(a.len(), PAD_CHARS);
        assert!(a.len() > 2 * TOPIC_MAX_BYTES);
        assert_ne!(a, b);
        // Every character of the alphabet occurs about equally often.
        let distinct: std::collections::HashSet<char> = a.chars().collect();
        assert_eq!(distinct.len(), 64);
        // Almost no 4-byte sequence repeats within the text (lz4's minimum match is 4 bytes):
        // there are 16.7 million of them and only 50,000 positions.
        let mut seen = std::collections::HashSet::new();
        let repeats = a.as_bytes().windows(4).filter(|w| !seen.insert(*w)).count();
        assert!(repeats < PAD_CHARS / 100, "{repeats} repeated 4-grams");
    }

    #[test]
    fn the_relay_configuration_names_the_poison_topic_only() {
        assert_eq!(
            relay_config("chaos-7-1-poison", Policy::ParkEntity),
            "# Written by outbox-chaos for this run: the poison topic's failure policy.\n\
             [topics.\"chaos-7-1-poison\"]\non_error = \"park_entity\"\n"
        );
    }
}
