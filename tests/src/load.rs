//! A load of single POSTs through a gateway for fault tests: concurrent clients post
//! unique records (Example 2, one `external_call_id` each) until told to stop, and count
//! what they saw — which ids got a 201, which were posted at all, the 503s, and the longest
//! stretch without any 201.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use uuid::Uuid;

use crate::payloads;
use crate::pipeline::TestGateway;

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Ids answered 201.
    pub accepted: BTreeSet<Uuid>,
    /// Every id posted (201 or not: a record whose ack was lost may still be stored).
    pub attempted: BTreeSet<Uuid>,
    /// Answers of 503.
    pub unavailable: u64,
    /// The longest time between two 201s (from the start).
    pub longest_gap: Duration,
}

impl Seen {
    /// What two loads saw together.
    pub fn merge(mut self, other: Seen) -> Seen {
        self.accepted.extend(other.accepted);
        self.attempted.extend(other.attempted);
        self.unavailable += other.unavailable;
        self.longest_gap = self.longest_gap.max(other.longest_gap);
        self
    }
}

/// A running load; [`Load::finish`] stops it and returns what was seen.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seen: Arc<Mutex<(Seen, Instant)>>,
}

impl Load {
    /// Starts `clients` clients posting records of `company` with `key`; `tag` makes the
    /// external ids unique to the test.
    pub fn start(
        gw: Arc<TestGateway>,
        key: &str,
        company: Uuid,
        clients: usize,
        tag: &str,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((Seen::default(), Instant::now())));
        let tasks = (0..clients)
            .map(|c| {
                let (gw, key, stop, seen) =
                    (gw.clone(), key.to_owned(), stop.clone(), seen.clone());
                let tag = tag.to_owned();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let body = payloads::complete(company, &format!("{tag}-{c}-{i}"));
                        let id = callcap::identity::call_history_id(
                            &callcap::validate(&body).expect("Example 2 is valid"),
                            None,
                        )
                        .id;
                        seen.lock().unwrap().0.attempted.insert(id);
                        let sent = gw
                            .http
                            .post(format!("{}/v1/calls", gw.base()))
                            .header("x-api-key", &key)
                            .json(&body)
                            .timeout(Duration::from_secs(30))
                            .send()
                            .await;
                        let Ok(resp) = sent else { continue };
                        match resp.status() {
                            StatusCode::CREATED => {
                                let v: serde_json::Value = resp.json().await.expect("201 body");
                                let got = v["data"]["call_history_id"].as_str().unwrap_or_default();
                                assert_eq!(got, id.to_string(), "the 201 names the record's id");
                                let now = Instant::now();
                                let mut guard = seen.lock().unwrap();
                                let (s, last) = &mut *guard;
                                s.longest_gap = s.longest_gap.max(now - *last);
                                *last = now;
                                s.accepted.insert(id);
                            }
                            StatusCode::SERVICE_UNAVAILABLE => {
                                seen.lock().unwrap().0.unavailable += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            other => panic!("unexpected status {other} under load"),
                        }
                    }
                })
            })
            .collect();
        Load { stop, tasks, seen }
    }

    /// How many 201s the clients have had so far.
    pub fn accepted_so_far(&self) -> usize {
        self.seen.lock().unwrap().0.accepted.len()
    }

    /// Stops the clients (each finishes the request it is in) and returns what they saw.
    pub async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load client");
        }
        let seen = self.seen.lock().unwrap().0.clone();
        seen
    }
}
