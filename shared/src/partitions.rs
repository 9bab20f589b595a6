//! Partitions: more than one stream, so more than one stream leader.
//!
//! A layout is `count` partition streams of one `epoch`. A company's records always go to
//! the same partition: FNV-1a (32-bit) of its id's text, modulo `count` — what
//! nats-server's `partition(count, …)` subject mapping computes over the same token, so
//! the server could route the same way. Every call of a company, hence every submission
//! of a call, is in one stream, and the merge's order (stream sequence) holds.
//!
//! Layout 0 with one partition is the `CALLS` stream with subjects `calls.<lane>.<company>`
//! (what a deployment has from its first day). Any other partition is the stream
//! `CALLS_E<epoch>_P<index>` with subjects `calls.e<epoch>.p<index>.<lane>.<company>`,
//! and carries its place in its metadata (`callcap.epoch`, `callcap.partition`,
//! `callcap.partitions`).
//!
//! The current layout is the newest epoch among the streams on the server; gateways and
//! workers read it from there, so changing it is one command (`ingest-gateway partitions
//! set`): the old layout's streams are sealed (a publish to them is refused, so no record
//! can enter the old layout after the switch), the new layout's streams are created with
//! their first sequence past every old one (so across the switch a later submission still
//! has the higher sequence), and the workers drain the sealed streams while serving the
//! new ones. Nothing is lost (a refused publish is sent again to the new layout or
//! answered 503) and nothing is reordered.

use std::collections::HashMap;

use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;
use uuid::Uuid;

use crate::subjects::Lane;

/// Metadata keys of a partition stream.
const EPOCH_KEY: &str = "callcap.epoch";
const INDEX_KEY: &str = "callcap.partition";
const COUNT_KEY: &str = "callcap.partitions";

/// Most partitions a layout may have.
pub const MAX_PARTITIONS: u32 = 64;

/// One partition stream of a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub epoch: u32,
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// The `CALLS` stream: layout 0, one partition.
    pub const LEGACY: Partition = Partition {
        epoch: 0,
        index: 0,
        count: 1,
    };

    fn is_legacy(self) -> bool {
        self == Self::LEGACY
    }

    /// The stream's name.
    pub fn stream_name(self) -> String {
        if self.is_legacy() {
            crate::subjects::STREAM_NAME.to_owned()
        } else {
            format!("CALLS_E{}_P{}", self.epoch, self.index)
        }
    }

    fn prefix(self) -> String {
        if self.is_legacy() {
            "calls".to_owned()
        } else {
            format!("calls.e{}.p{}", self.epoch, self.index)
        }
    }

    /// The subject of `company`'s records in `lane` of this partition.
    pub fn subject(self, lane: Lane, company: Uuid) -> String {
        format!("{}.{}.{company}", self.prefix(), lane.token())
    }

    /// The subject filter of `lane` in this partition.
    pub fn filter(self, lane: Lane) -> String {
        format!("{}.{}.*", self.prefix(), lane.token())
    }

    /// Both lanes' subjects of `company` in this partition (replaying one company).
    pub fn company_filter(self, company: Uuid) -> String {
        format!("{}.*.{company}", self.prefix())
    }

    /// The stream's metadata naming its place.
    pub fn metadata(self) -> HashMap<String, String> {
        HashMap::from([
            (EPOCH_KEY.to_owned(), self.epoch.to_string()),
            (INDEX_KEY.to_owned(), self.index.to_string()),
            (COUNT_KEY.to_owned(), self.count.to_string()),
        ])
    }

    /// The partition a stream is, from its name and metadata; `None` for other streams.
    pub fn of_stream(name: &str, metadata: &HashMap<String, String>) -> Option<Partition> {
        if name == crate::subjects::STREAM_NAME {
            return Some(Self::LEGACY);
        }
        if !name.starts_with("CALLS_E") {
            return None;
        }
        let read = |k: &str| metadata.get(k)?.parse::<u32>().ok();
        let p = Partition {
            epoch: read(EPOCH_KEY)?,
            index: read(INDEX_KEY)?,
            count: read(COUNT_KEY)?,
        };
        (p.stream_name() == name && p.index < p.count).then_some(p)
    }

    /// A short label for metrics and pages: the stream's name.
    pub fn label(self) -> String {
        self.stream_name()
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (layout {}, partition {} of {})",
            self.stream_name(),
            self.epoch,
            self.index + 1,
            self.count
        )
    }
}

/// FNV-1a, 32 bits.
fn fnv1a_32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition index of `company` among `count`.
pub fn partition_index(company: Uuid, count: u32) -> u32 {
    fnv1a_32(company.hyphenated().to_string().as_bytes()) % count.max(1)
}

/// A layout: `count` partition streams of one `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub epoch: u32,
    pub count: u32,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { epoch: 0, count: 1 }
    }
}

impl Layout {
    /// The partition `company`'s records go to.
    pub fn partition_of(&self, company: Uuid) -> Partition {
        Partition {
            epoch: self.epoch,
            index: partition_index(company, self.count),
            count: self.count,
        }
    }

    /// Every partition of the layout.
    pub fn partitions(&self) -> Vec<Partition> {
        (0..self.count)
            .map(|index| Partition {
                epoch: self.epoch,
                index,
                count: self.count,
            })
            .collect()
    }
}

/// A partition stream as found on the server.
#[derive(Debug, Clone)]
pub struct Found {
    pub partition: Partition,
    pub sealed: bool,
    pub last_sequence: u64,
    pub subjects: Vec<String>,
}

/// Every partition stream on the server (sealed ones too), in (epoch, index) order.
///
/// # Errors
/// When JetStream does not answer.
pub async fn list(js: &jetstream::Context) -> Result<Vec<Found>, async_nats::Error> {
    let names: Vec<String> = js.stream_names().try_collect().await?;
    let mut out = Vec::new();
    for name in names.into_iter().filter(|n| n.starts_with("CALLS")) {
        let mut stream = match js.get_stream(&name).await {
            Ok(s) => s,
            // Deleted between the listing and now.
            Err(_) => continue,
        };
        let info = stream.info().await?;
        if let Some(partition) = Partition::of_stream(&name, &info.config.metadata) {
            out.push(Found {
                partition,
                sealed: info.config.sealed,
                last_sequence: info.state.last_sequence,
                subjects: info.config.subjects.clone(),
            });
        }
    }
    out.sort_by_key(|f| (f.partition.epoch, f.partition.index));
    Ok(out)
}

/// The current layout: the newest epoch among the streams, when every one of its
/// partitions exists; `None` when there is no partition stream at all.
///
/// # Errors
/// When JetStream does not answer, or the newest layout is incomplete (a `partitions
/// set` that did not finish: run it again).
pub async fn current(js: &jetstream::Context) -> Result<Option<Layout>, async_nats::Error> {
    Ok(current_of(&list(js).await?)?)
}

/// [`current`] of a listing.
///
/// # Errors
/// When the newest layout is incomplete.
pub fn current_of(found: &[Found]) -> Result<Option<Layout>, String> {
    let Some(newest) = found.iter().map(|f| f.partition.epoch).max() else {
        return Ok(None);
    };
    let of_newest: Vec<&Found> = found
        .iter()
        .filter(|f| f.partition.epoch == newest)
        .collect();
    let count = of_newest[0].partition.count;
    if of_newest.len() as u32 != count || of_newest.iter().any(|f| f.sealed) {
        return Err(format!(
            "layout {newest} is incomplete ({} of {count} partition streams, some sealed: {}); \
             run `ingest-gateway partitions set {count}` again",
            of_newest.len(),
            of_newest.iter().any(|f| f.sealed)
        ));
    }
    Ok(Some(Layout {
        epoch: newest,
        count,
    }))
}

/// The stream definition of `partition`.
pub fn stream_config(
    args: &crate::config::StreamArgs,
    replicas: usize,
    partition: Partition,
) -> stream::Config {
    let mut config = crate::subjects::stream_config(args, replicas);
    // STREAM_MAX_BYTES is the layout's: each of its partitions holds a share (a
    // company's records are all in one partition, so a company may fill its share).
    config.max_bytes = (args.stream_max_bytes / i64::from(partition.count.max(1)))
        .max(i64::from(crate::subjects::MAX_MESSAGE_BYTES) * 16);
    if partition != Partition::LEGACY {
        config.name = partition.stream_name();
        config.subjects = Lane::ALL.iter().map(|l| partition.filter(*l)).collect();
        config.metadata = partition.metadata();
        config.description = Some(format!("Call Capture: accepted call records, {partition}"));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        // The published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn a_company_always_lands_in_the_same_partition_and_companies_spread() {
        let layout = Layout { epoch: 2, count: 3 };
        let mut seen = [0u32; 3];
        for i in 0..3000u128 {
            let c = Uuid::from_u128(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
            let p = layout.partition_of(c);
            assert_eq!(p, layout.partition_of(c));
            assert_eq!(p.index, partition_index(c, 3));
            seen[p.index as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 800), "{seen:?}");
    }

    #[test]
    fn names_subjects_and_metadata_read_back() {
        let c = Uuid::from_u128(0xabcd_ef01_2345_6789_abcd_ef01_2345_6789);
        let p = Partition {
            epoch: 1,
            index: 2,
            count: 3,
        };
        assert_eq!(p.stream_name(), "CALLS_E1_P2");
        assert_eq!(
            p.subject(Lane::Overflow, c),
            format!("calls.e1.p2.overflow.{c}")
        );
        assert_eq!(
            Partition::of_stream(&p.stream_name(), &p.metadata()),
            Some(p)
        );
        assert_eq!(
            Partition::of_stream("CALLS", &HashMap::new()),
            Some(Partition::LEGACY)
        );
        assert_eq!(Partition::of_stream("CALLS_E1_P2", &HashMap::new()), None);
        assert_eq!(Partition::of_stream("KV_x", &p.metadata()), None);
        for lane in Lane::ALL {
            assert_eq!(Lane::of_subject(&p.subject(lane, c)), Some((lane, c)));
            assert_eq!(
                Lane::of_subject(&Partition::LEGACY.subject(lane, c)),
                Some((lane, c))
            );
        }
        assert_eq!(
            Partition::LEGACY.subject(Lane::Main, c),
            Lane::Main.subject(c)
        );
        assert_eq!(Lane::of_subject(&format!("calls.x1.p2.ingest.{c}")), None);
        assert_eq!(Lane::of_subject(&format!("calls.e1.ingest.{c}")), None);
        let config = stream_config(&Default::default(), 1, p);
        assert_eq!(
            config.subjects,
            vec!["calls.e1.p2.ingest.*", "calls.e1.p2.overflow.*"]
        );
    }

    #[test]
    fn the_current_layout_is_the_newest_complete_one() {
        let found = |epoch, index, count, sealed| Found {
            partition: Partition {
                epoch,
                index,
                count,
            },
            sealed,
            last_sequence: 0,
            subjects: Vec::new(),
        };
        assert_eq!(current_of(&[]), Ok(None));
        assert_eq!(
            current_of(&[
                found(0, 0, 1, true),
                found(1, 0, 2, false),
                found(1, 1, 2, false)
            ]),
            Ok(Some(Layout { epoch: 1, count: 2 }))
        );
        assert!(current_of(&[found(0, 0, 1, true), found(1, 0, 2, false)]).is_err());
    }
}
