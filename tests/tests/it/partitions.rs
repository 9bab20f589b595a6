//! Partitions: changing the number of partition streams while dialers post, with one
//! command (`ingest-gateway partitions set`), loses nothing, stores nothing twice and
//! reorders nothing; afterwards each company's records go to its one partition, and
//! replay reads every stream, sealed ones included.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callcap::partitions::{self, Layout};
use callcap::subjects::Lane;
use callcap_tests::db::TestDb;
use callcap_tests::eventually;
use callcap_tests::pipeline::{test_run_args, TestGateway};
use callcap_tests::stack::{Backend, Pipeline, Stack};
use persist_worker::config::RunArgs;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

/// `ingest-gateway partitions <args>` with the admin identity; its output. Awaited, not
/// blocking: the gateway and worker under test run on this test's runtime.
pub async fn partitions_command(nats_url: &str, args: &[&str]) -> String {
    let full = [&["partitions"][..], args].concat();
    let out = callcap_tests::pipeline::admin_command(crate::GATEWAY_BIN, nats_url, &full).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "partitions {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// What the dialers got: per call, the last status answered 201.
type Acked = Arc<Mutex<BTreeMap<(Uuid, String), &'static str>>>;

/// Each company's dialer: calls one after another, each `ringing` then `completed`,
/// each submission sent again on a 503 until it is taken (as a dialer does).
fn dialers(
    gw: &TestGateway,
    companies: &[(Uuid, String)],
    stop: callcap::shutdown::Shutdown,
    acked: Acked,
) -> Vec<tokio::task::JoinHandle<u64>> {
    companies
        .iter()
        .cloned()
        .map(|(company, key)| {
            let (url, stop, acked) = (gw.base(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut retries = 0u64;
                let mut k = 0;
                while !stop.is_triggered() {
                    k += 1;
                    let ext = format!("CALL-{k}");
                    for status in ["ringing", "completed"] {
                        loop {
                            let r = http
                                .post(format!("{url}/v1/calls"))
                                .header("x-api-key", &key)
                                .json(&json!({
                                    "company_id": company,
                                    "external_call_id": ext,
                                    "external_system": "Dialer",
                                    "call_status": status,
                                    "notes": status,
                                }))
                                .send()
                                .await
                                .unwrap();
                            if r.status() == StatusCode::CREATED {
                                acked.lock().unwrap().insert((company, ext.clone()), status);
                                break;
                            }
                            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                retries
            })
        })
        .collect()
}

/// Per stored call, its notes: the status of the submission that won the merge (the
/// status itself could not show a reordering: a terminal status is never replaced).
/// `persist-worker replay` of the whole retention (of one company's records).
async fn replay(
    js: &async_nats::jetstream::Context,
    db: &TestDb,
    company: Option<Uuid>,
) -> persist_worker::cli::replay::ReplaySummary {
    persist_worker::cli::replay::run(
        js,
        None,
        &db.pool,
        &Default::default(),
        &persist_worker::config::ReplayArgs {
            from_seq: None,
            from_archive: false,
            since: None,
            until: None,
            company,
            batch_size: 500,
            quiet: true,
        },
        Duration::from_millis(500),
        &callcap::shutdown::Shutdown::new(),
    )
    .await
    .unwrap()
}

async fn stored(db: &TestDb) -> BTreeMap<(Uuid, String), String> {
    let rows: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT company_id, external_call_id, notes FROM call_history")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    rows.into_iter().map(|(c, e, s)| ((c, e), s)).collect()
}

/// Every call answered 201 is stored once, with its last acknowledged status.
async fn assert_exactly_what_was_acked(db: &TestDb, acked: &Acked) {
    let want: BTreeMap<(Uuid, String), String> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), (*v).to_owned()))
        .collect();
    eventually(Duration::from_secs(60), "every 201 stored", || async {
        (stored(db).await == want).then_some(())
    })
    .await;
    assert_eq!(db.count_dead_letters().await, 0);
}

#[tokio::test]
async fn changing_the_number_of_partitions_while_dialers_post_loses_doubles_and_reorders_nothing() {
    let Pipeline {
        nats,
        db,
        gw,
        worker,
        company,
        key,
        others,
        ..
    } = Stack::new()
        .run(RunArgs {
            consumer_check_secs: 1,
            ..test_run_args()
        })
        .companies(6)
        .pipeline()
        .await;
    let companies: Vec<(Uuid, String)> = std::iter::once((company, key))
        .chain(others.iter().map(|t| t.pair()))
        .collect();
    let acked: Acked = Arc::default();
    let stop = callcap::shutdown::Shutdown::new();
    let posting = dialers(&gw, &companies, stop.clone(), acked.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1 → 3 while they post; the command returns once the sealed stream is drained.
    let out = partitions_command(&nats.url(), &["set", "3"]).await;
    assert!(out.contains("sealed CALLS"), "{out}");
    assert!(out.contains("every record they hold is stored"), "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 3 → 1 (a new single stream, not CALLS again).
    let out = partitions_command(&nats.url(), &["set", "1"]).await;
    assert!(out.contains("created CALLS_E2_P0"), "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.trigger();
    let mut retries = 0;
    for p in posting {
        retries += p.await.unwrap();
    }
    let calls = acked.lock().unwrap().len();
    assert!(
        calls > 60,
        "the dialers kept posting through both changes ({calls} calls)"
    );
    println!(
        "{calls} calls, {retries} submissions answered 503 during the switches and sent again"
    );
    assert_exactly_what_was_acked(&db, &acked).await;

    // The streams as left: older layouts sealed, each numbered past the one before.
    let admin = async_nats::jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let found = partitions::list(&admin).await.unwrap();
    let names: Vec<String> = found.iter().map(|f| f.partition.stream_name()).collect();
    assert_eq!(
        names,
        [
            "CALLS",
            "CALLS_E1_P0",
            "CALLS_E1_P1",
            "CALLS_E1_P2",
            "CALLS_E2_P0"
        ]
    );
    assert_eq!(
        partitions::current_of(&found),
        Ok(Some(Layout { epoch: 2, count: 1 }))
    );
    assert!(found[..4].iter().all(|f| f.sealed));
    let first_of = |name: &str| {
        let admin = admin.clone();
        let name = name.to_owned();
        async move {
            let mut s = admin.get_stream(name).await.unwrap();
            s.info().await.unwrap().state.first_sequence
        }
    };
    let last_of = |epoch: u32| {
        found
            .iter()
            .filter(|f| f.partition.epoch == epoch)
            .map(|f| f.last_sequence)
            .max()
            .unwrap()
    };
    for name in ["CALLS_E1_P0", "CALLS_E1_P1", "CALLS_E1_P2"] {
        assert!(first_of(name).await > last_of(0), "{name}");
    }
    assert!(first_of("CALLS_E2_P0").await > last_of(1));

    // In the 3-partition layout each company's records are in its one partition.
    let three = Layout { epoch: 1, count: 3 };
    let mut seen: BTreeMap<Uuid, BTreeSet<u32>> = BTreeMap::new();
    for p in three.partitions() {
        for (_, subject, env) in
            callcap_tests::nats::stream_messages_of(&nats.url(), &p.stream_name()).await
        {
            let (lane, company) = Lane::of_subject(&subject).unwrap();
            assert_eq!(subject, p.subject(lane, company));
            assert_eq!(env.record.company_id, company);
            seen.entry(company).or_default().insert(p.index);
        }
    }
    for (company, parts) in &seen {
        assert_eq!(
            parts,
            &BTreeSet::from([three.partition_of(*company).index]),
            "{company}"
        );
    }
    assert!(
        seen.len() >= 5,
        "the companies were spread over the partitions"
    );

    // `setup` applies the settings to the current layout's stream, and leaves the
    // sealed ones alone.
    let out =
        callcap_tests::pipeline::admin_command(crate::GATEWAY_BIN, &nats.url(), &["setup"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stream CALLS_E2_P0 ready"), "{text}");
    assert!(!text.contains("stream CALLS ready"), "{text}");

    // KEDA for what is on the server: per lane, a trigger on every stream, the shipped
    // ScaledObjects' shape otherwise.
    let keda = partitions_command(&nats.url(), &["keda"]).await;
    let objects: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&keda)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(objects.len(), 2, "{keda}");
    for (so, lane) in objects.iter().zip(Lane::ALL) {
        assert_eq!(so["kind"], "ScaledObject");
        assert_eq!(so["metadata"]["name"], lane.consumer_name());
        let triggers = so["spec"]["triggers"].as_sequence().unwrap();
        let streams: Vec<&str> = triggers
            .iter()
            .map(|t| t["metadata"]["stream"].as_str().unwrap())
            .collect();
        assert_eq!(streams, names, "{keda}");
        assert!(triggers
            .iter()
            .all(|t| t["metadata"]["consumer"] == lane.consumer_name()));
    }

    // `partitions show` tells the operator the same.
    let show = partitions_command(&nats.url(), &["show"]).await;
    assert!(show.starts_with("layout 2: 1 partition(s)"), "{show}");
    assert!(show.contains("CALLS_E1_P2"), "{show}");

    // Replay reads every stream, sealed ones included, and changes nothing.
    let total: u64 = {
        let mut n = 0;
        for f in &found {
            let mut s = admin.get_stream(f.partition.stream_name()).await.unwrap();
            n += s.info().await.unwrap().state.messages;
        }
        n
    };
    let summary = replay(&admin, &db, None).await;
    assert!(summary.completed);
    assert_eq!(summary.messages, total);
    assert_eq!(
        summary.rows_changed, 0,
        "replaying what is stored changes nothing"
    );
    // One company's replay reads only its partition in each layout.
    let one = companies[0].0;
    let summary = replay(&admin, &db, Some(one)).await;
    let of_one = acked
        .lock()
        .unwrap()
        .keys()
        .filter(|(c, _)| *c == one)
        .count() as u64;
    assert!(
        summary.messages >= 2 * of_one - 1 && summary.messages <= 2 * of_one + 2 * 3,
        "{summary:?} for {of_one} calls"
    );
    worker.stop().await;
}

/// On the three-node cluster with three partitions: the leaders are spread over the
/// nodes, and `kill -9` of one leader's node stops 201s only for the companies of its
/// partition; everyone else keeps posting. Every 201 is stored exactly once.
#[tokio::test]
async fn on_a_cluster_a_killed_leader_stops_only_its_partitions_companies() {
    use callcap_tests::load::Load;
    // No key before the layout is set: the test's companies are chosen by partition.
    let Backend {
        nats: mut cluster,
        db,
        workers,
        ..
    } = Stack::new().cluster(false).companies(0).backend().await;
    let out = partitions_command(&cluster.seeds(), &["set", "3", "--no-wait"]).await;
    println!("{out}");
    let layout = Layout { epoch: 0, count: 3 };
    let mut leaders = Vec::new();
    for p in layout.partitions() {
        leaders.push(cluster.stream_leader(&p.stream_name()).await);
    }
    assert_eq!(
        leaders.iter().collect::<BTreeSet<_>>().len(),
        3,
        "one leader per node: {leaders:?}"
    );
    // The node to kill leads partition 0; the gateway talks to the two others (a
    // gateway's own reconnect is another test's subject).
    let killed = leaders[0];
    let others: Vec<String> = (0..3)
        .filter(|i| *i != killed)
        .map(|i| cluster.nodes[i].url())
        .collect();
    let mut cli = callcap_tests::pipeline::gateway_cli(&others.join(","), Default::default());
    cli.stream.stream_replicas = Some(3);
    let gw = Arc::new(TestGateway::start_cli(cli).await);
    let workers: Vec<_> = (0..2)
        .map(|_| workers.process(crate::WORKER_BIN, callcap_tests::free_port(), &[]))
        .collect();
    // Two companies in each partition.
    let mut companies: Vec<(Uuid, u32)> = Vec::new();
    while (0..3).any(|i| companies.iter().filter(|(_, p)| *p == i).count() < 2) {
        let c = Uuid::new_v4();
        let p = partitions::partition_index(c, 3);
        if companies.iter().filter(|(_, q)| *q == p).count() < 2 {
            companies.push((c, p));
        }
    }
    let mut loads = Vec::new();
    for (c, p) in &companies {
        let key = gw.create_key(*c).await;
        loads.push((*p, Load::start(gw.clone(), &key, *c, 4, &format!("P{p}"))));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.nodes[killed].kill();
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.nodes[killed].start_again().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut victims = Duration::ZERO;
    let mut spared = Duration::ZERO;
    let mut accepted = BTreeSet::new();
    let mut attempted = BTreeSet::new();
    for (p, load) in loads {
        let seen = load.finish().await;
        println!(
            "partition {p}: {} accepted, longest gap between 201s {:.2} s",
            seen.accepted.len(),
            seen.longest_gap.as_secs_f64()
        );
        assert!(
            seen.accepted.len() > 20,
            "partition {p} kept too little load"
        );
        if p == 0 {
            victims = victims.max(seen.longest_gap);
        } else {
            spared = spared.max(seen.longest_gap);
        }
        accepted.extend(seen.accepted);
        attempted.extend(seen.attempted);
    }
    println!(
        "| kill -9 of partition 0's leader | partition 0's companies: longest gap {:.2} s | the others': {:.2} s |",
        victims.as_secs_f64(),
        spared.as_secs_f64()
    );
    assert!(
        spared < victims && spared < Duration::from_secs(2),
        "the other partitions' companies kept getting 201s ({spared:?}) while partition 0's waited for an election ({victims:?})"
    );
    // Every 201 stored, once; anything else stored was at least attempted (a publish
    // that timed out may still have been taken).
    eventually(Duration::from_secs(90), "every 201 stored", || async {
        let ids: BTreeSet<Uuid> = db.call_ids().await.into_iter().collect();
        accepted.is_subset(&ids).then_some(())
    })
    .await;
    let ids: BTreeSet<Uuid> = db.call_ids().await.into_iter().collect();
    assert_eq!(db.count_calls().await as usize, ids.len());
    assert!(ids.is_subset(&attempted), "rows nobody posted");
    drop(workers);
}

/// The leader of each of `layout`'s streams, by node index.
async fn leaders_of(cluster: &callcap_tests::cluster::NatsCluster, layout: Layout) -> Vec<usize> {
    let mut leaders = Vec::new();
    for p in layout.partitions() {
        leaders.push(cluster.stream_leader(&p.stream_name()).await);
    }
    leaders
}

/// The third probe, item 19: after a node was killed and restarted, two partitions stayed
/// led by one node (losing it then stops two thirds of the companies), and `partitions
/// set 3` returned early. `set` with the current count and `balance` spread them again,
/// and `show` says when they are bunched.
#[tokio::test]
async fn leaders_are_spread_again_after_a_failover() {
    use callcap_tests::cluster::wait_stream_copies;
    let Backend {
        nats: mut cluster, ..
    } = Stack::new().cluster(false).companies(0).backend().await;
    partitions_command(&cluster.seeds(), &["set", "3", "--no-wait"]).await;
    let layout = Layout { epoch: 0, count: 3 };
    let distinct = |l: &[usize]| l.iter().collect::<BTreeSet<_>>().len();
    for round in 0..2 {
        let leaders = leaders_of(&cluster, layout).await;
        assert_eq!(
            distinct(&leaders),
            3,
            "round {round}: spread before: {leaders:?}"
        );
        // The leader of partition 0 dies; another node takes it over; it comes back.
        let killed = leaders[0];
        cluster.nodes[killed].kill();
        let name = layout.partitions()[0].stream_name();
        eventually(
            Duration::from_secs(30),
            "a new leader of partition 0",
            || async { (cluster.stream_leader(&name).await != killed).then_some(()) },
        )
        .await;
        cluster.nodes[killed].start_again().await;
        for p in layout.partitions() {
            wait_stream_copies(&cluster.seeds(), &p.stream_name(), 3).await;
        }
        let bunched = leaders_of(&cluster, layout).await;
        assert!(
            distinct(&bunched) < 3,
            "the failover bunched them: {bunched:?}"
        );
        let shown = partitions_command(&cluster.seeds(), &["show"]).await;
        assert!(shown.contains("leaders bunched"), "{shown}");
        // Round 0: `set` with the current count; round 1: `balance`.
        let out = if round == 0 {
            partitions_command(&cluster.seeds(), &["set", "3", "--no-wait"]).await
        } else {
            partitions_command(&cluster.seeds(), &["balance"]).await
        };
        println!("{out}");
        let spread = leaders_of(&cluster, layout).await;
        assert_eq!(
            distinct(&spread),
            3,
            "round {round}: spread again: {spread:?} ({out})"
        );
        let shown = partitions_command(&cluster.seeds(), &["show"]).await;
        assert!(!shown.contains("leaders bunched"), "{shown}");
    }
}

/// A dead letter made on the write path (a record claiming another company's call, which
/// only a stolen gateway seed could publish) names the subject its message came on. At
/// P = 3 that is the partition's subject; it used to be rebuilt as the first layout's,
/// naming a subject the message never had (dead letters are keyed by sequence and
/// subject).
#[tokio::test]
async fn a_write_path_dead_letter_names_its_messages_partition_subject() {
    let callcap_tests::stack::Pipeline {
        nats,
        db,
        gw,
        company: a,
        key,
        worker,
        ..
    } = callcap_tests::stack::Pipeline::start().await;
    partitions_command(&nats.url(), &["set", "3", "--no-wait"]).await;
    let admin = async_nats::jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let layout = partitions::current_of(&partitions::list(&admin).await.unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(layout.count, 3);
    // A's call, without an external id (its id is random, not derived).
    eventually(
        Duration::from_secs(10),
        "the gateway to follow the layout",
        || async {
            let (status, body) = gw
                .post_call(&key, &json!({"company_id": a, "notes": "A's call"}))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            (db.count_calls().await > 0).then_some(())
        },
    )
    .await;
    let a_id: Uuid = sqlx::query_scalar("SELECT id FROM call_history LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Company B's record carrying A's id, on B's partition subject.
    let b = Uuid::new_v4();
    let subject = layout.partition_of(b).subject(Lane::Main, b);
    let forged = callcap::Envelope::new(
        a_id,
        chrono::Utc::now(),
        "kx".into(),
        None,
        callcap::CallRecord::new(b),
    );
    admin
        .publish(subject.clone(), forged.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the dead letter", || async {
        (db.count_dead_letters().await == 1).then_some(())
    })
    .await;
    let (named, reason): (String, String) =
        sqlx::query_as("SELECT subject, reason FROM dead_letters")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(reason.contains("another company"), "{reason}");
    assert_eq!(
        named, subject,
        "the dead letter names the message's own subject"
    );
    worker.stop().await;
}
