//! The memory budget of request bodies: what every request being read, parsed and
//! published holds, counted in bytes, bounded for the gateway as a whole and for each key.
//!
//! Text bytes are not the cost: a compressed body decodes to up to its size limit, and
//! parsing JSON into values costs many times its text (`[0,0,…]`: 2 text bytes become a
//! 32-byte value in a growing vector). So a request reserves, before it allocates, the
//! decoded buffer as it grows and then what parsing it will cost ([`parse_cost`], counted
//! by a pass over the text that allocates nothing), and keeps the reservation until its
//! answer is written. Past the gateway's budget or its key's share the answer is 503 with
//! Retry-After (other requests are using the memory now); a single body that alone costs
//! more than a key's share is 413 (it would never fit). Reservations are plain counters:
//! no waiting, no allocation, released on drop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Why a reservation could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    /// Other requests hold the gateway's budget: retry later.
    #[error("the gateway's memory budget for request bodies is in use")]
    Gateway,
    /// Other requests of the same key hold its share: retry later.
    #[error("this key's share of the memory budget for request bodies is in use")]
    Key,
    /// This one request needs more than a key may ever hold.
    #[error("the body needs {needed} bytes of memory to read; one request may use {limit}")]
    TooLarge { needed: usize, limit: usize },
}

/// The gateway's budget; one per process, shared by every request.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    per_key: usize,
    used: AtomicUsize,
    by_key: Mutex<HashMap<Arc<str>, usize>>,
}

impl MemoryBudget {
    /// A budget of `limit` bytes, of which one key may hold `per_key`.
    pub fn new(limit: usize, per_key: usize) -> Arc<Self> {
        Arc::new(MemoryBudget {
            limit,
            per_key: per_key.min(limit),
            used: AtomicUsize::new(0),
            by_key: Mutex::new(HashMap::new()),
        })
    }

    /// Bytes held by all requests now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The whole budget, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The most one key (and so one request) may hold, in bytes.
    pub fn per_key(&self) -> usize {
        self.per_key
    }

    /// An empty reservation for a request of `key`.
    pub fn reserve(self: &Arc<Self>, key: &str) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            key: Arc::from(key),
            bytes: 0,
        }
    }

    fn take(&self, key: &Arc<str>, held: usize, more: usize) -> Result<(), Exhausted> {
        let needed = held.saturating_add(more);
        if needed > self.per_key {
            return Err(Exhausted::TooLarge {
                needed,
                limit: self.per_key,
            });
        }
        {
            let mut by_key = self
                .by_key
                .lock()
                .expect("the budget's map is never poisoned: no code panics while holding it");
            let of_key = by_key.entry(Arc::clone(key)).or_insert(0);
            if *of_key + more > self.per_key {
                if *of_key == 0 {
                    by_key.remove(key);
                }
                return Err(Exhausted::Key);
            }
            *of_key += more;
        }
        let granted = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + more <= self.limit).then_some(used + more)
            })
            .is_ok();
        if granted {
            Ok(())
        } else {
            self.give_back_key(key, more);
            Err(Exhausted::Gateway)
        }
    }

    fn give_back_key(&self, key: &Arc<str>, bytes: usize) {
        let mut by_key = self
            .by_key
            .lock()
            .expect("the budget's map is never poisoned: no code panics while holding it");
        if let Some(of_key) = by_key.get_mut(key) {
            *of_key = of_key.saturating_sub(bytes);
            if *of_key == 0 {
                by_key.remove(key);
            }
        }
    }
}

/// What one request holds; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    key: Arc<str>,
    bytes: usize,
}

impl Reservation {
    /// Holds `more` bytes besides what is held already.
    ///
    /// # Errors
    /// [`Exhausted`]: nothing more is held then.
    pub fn grow(&mut self, more: usize) -> Result<(), Exhausted> {
        if more == 0 {
            return Ok(());
        }
        self.budget.take(&self.key, self.bytes, more)?;
        self.bytes += more;
        Ok(())
    }

    /// Gives back `less` of the bytes held (memory freed before the request ends).
    pub fn shrink(&mut self, less: usize) {
        let less = less.min(self.bytes);
        if less > 0 {
            self.budget.used.fetch_sub(less, Ordering::AcqRel);
            self.budget.give_back_key(&self.key, less);
            self.bytes -= less;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.budget.give_back_key(&self.key, self.bytes);
        }
    }
}

/// A JSON value as parsed (`serde_json::Value`): the unit of [`parse_cost`].
const VALUE: usize = std::mem::size_of::<serde_json::Value>();
/// A vector of values grows by doubling: up to one more value's room per element.
const ELEMENT_SLACK: usize = VALUE;
/// One entry of an object's B-tree map: key and value inline in a node that may be half
/// empty, plus the node's own links (about 630 bytes a node of 5 to 11 entries).
const MAP_ENTRY: usize = 128;
/// A form parameter as the callbacks hold it: two strings in a map entry, then a JSON
/// value, each with the allocator's overhead.
pub const FORM_PAIR_BYTES: usize = MAP_ENTRY + VALUE + 4 * ALLOCATION;
/// What the allocator adds to each string it holds.
const ALLOCATION: usize = 16;

/// An upper bound of the memory that parsing `text` into JSON values takes, in bytes,
/// without allocating any of it. The typed parse the handlers make holds less (unknown
/// fields are skipped), and the fallback parse that names what is wrong holds exactly
/// this shape; both are covered.
///
/// # Errors
/// The text is not JSON (the same error, at the same place, that parsing it reports).
pub fn parse_cost(text: &[u8]) -> Result<usize, serde_json::Error> {
    serde_json::from_slice::<Cost>(text).map(|c| c.0)
}

/// The cost of one JSON value and everything inside it.
struct Cost(usize);

impl<'de> Deserialize<'de> for Cost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CostVisitor)
    }
}

struct CostVisitor;

fn string_cost(len: usize) -> usize {
    VALUE + len + len / 8 + ALLOCATION
}

impl<'de> Visitor<'de> for CostVisitor {
    type Value = Cost;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Cost, E> {
        Ok(Cost(VALUE))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Cost, E> {
        Ok(Cost(VALUE))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Cost, E> {
        Ok(Cost(VALUE))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Cost, E> {
        Ok(Cost(VALUE))
    }
    fn visit_unit<E>(self) -> Result<Cost, E> {
        Ok(Cost(VALUE))
    }
    fn visit_none<E>(self) -> Result<Cost, E> {
        Ok(Cost(VALUE))
    }
    fn visit_str<E>(self, s: &str) -> Result<Cost, E> {
        Ok(Cost(string_cost(s.len())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Cost, A::Error> {
        let mut total = VALUE;
        while let Some(Cost(c)) = seq.next_element()? {
            total = total.saturating_add(c + ELEMENT_SLACK);
        }
        Ok(Cost(total))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cost, A::Error> {
        let mut total = VALUE;
        while let Some(Cost(k)) = map.next_key()? {
            let Cost(v) = map.next_value()?;
            total = total.saturating_add(k + v + MAP_ENTRY);
        }
        Ok(Cost(total))
    }
}

/// The default budget: a quarter of the memory this process may use (its cgroup's limit,
/// else the machine's), between 64 MiB and 1 GiB.
pub fn default_limit_bytes() -> usize {
    const MIB: u64 = 1024 * 1024;
    let available = cgroup_limit()
        .or_else(physical_memory)
        .unwrap_or(1024 * MIB);
    usize::try_from((available / 4).clamp(64 * MIB, 1024 * MIB)).unwrap_or(usize::MAX)
}

fn cgroup_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    // cgroup v1 writes "no limit" as a huge number.
    .find(|&n| n < (1 << 50))
}

fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_is_bounded_by_the_gateway_and_the_key_and_released_on_drop() {
        let budget = MemoryBudget::new(1000, 600);
        let mut a = budget.reserve("a");
        a.grow(500).unwrap();
        // The key's share: 600.
        assert_eq!(
            a.grow(200),
            Err(Exhausted::TooLarge {
                needed: 700,
                limit: 600
            })
        );
        let mut a2 = budget.reserve("a");
        assert_eq!(a2.grow(200), Err(Exhausted::Key));
        // Another key has its own share, within what is left of the whole.
        let mut b = budget.reserve("b");
        b.grow(450).unwrap();
        assert_eq!(budget.reserve("c").grow(100), Err(Exhausted::Gateway));
        assert_eq!(budget.used(), 950);
        drop(a);
        assert_eq!(budget.used(), 450);
        a2.grow(500).unwrap();
        drop((a2, b));
        assert_eq!(budget.used(), 0);
        assert!(
            budget.by_key.lock().unwrap().is_empty(),
            "no entry is kept for an idle key"
        );
    }

    #[test]
    fn parse_cost_bounds_what_parsing_allocates_and_refuses_what_parsing_refuses() {
        // The probe's shape: two text bytes per value.
        let zeros = format!("{{\"a\":[{}0]}}", "0,".repeat(16_000));
        let cost = parse_cost(zeros.as_bytes()).unwrap();
        assert!(cost >= 16_000 * VALUE, "{cost}");
        assert!(
            cost > 30 * zeros.len(),
            "the cost is counted in values, not text: {cost}"
        );
        // Ordinary text costs a small multiple of itself.
        let record = callcap::examples::complete(uuid::Uuid::nil(), "call-1").to_string();
        let c = parse_cost(record.as_bytes()).unwrap();
        assert!(c < 12 * record.len(), "{c} for {} bytes", record.len());
        for bad in ["{", "[1,]", "{\"a\" 1}", "1e400", ""] {
            let expected = serde_json::from_str::<serde_json::Value>(bad).unwrap_err();
            let got = parse_cost(bad.as_bytes()).unwrap_err();
            assert_eq!(got.to_string(), expected.to_string(), "{bad}");
        }
    }
}
