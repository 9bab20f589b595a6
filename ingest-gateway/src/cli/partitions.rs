//! `ingest-gateway partitions show | set <N> | balance | keda`: the partition layout
//! (`callcap::partitions`), read and changed with the admin NATS identity.
//!
//! `set` is the one command that changes the number of partitions, a drain-and-switch:
//! 1. the current layout's streams are sealed: from then on they refuse every publish, so
//!    no record enters the old layout after the switch (the gateways send a refused
//!    record again to the new layout, within its request);
//! 2. the new layout's streams are created, numbered from one past the last sequence of
//!    every older stream, so a call's later submission has the higher sequence on either
//!    side of the switch (the merge orders by it);
//! 3. gateways follow within [`crate::publish::partitioned::REFRESH`] (at once on a
//!    refused publish); workers find the new streams at their next consumer check and
//!    drain the sealed ones, which stay readable for `persist-worker replay`;
//! 4. unless `--no-wait`, it waits (with progress) until the workers have stored every
//!    record of the sealed streams.
//!
//! Run again after a failure, it completes what is missing. Sealed streams are kept (a
//! sealed stream deletes nothing, not even by age): delete them with the NATS CLI once
//! their records are past the replay window you need.
//!
//! On a cluster the layout's leaders are spread one partition per node, so that a node's
//! loss stops only the companies of the partitions it led. A failover moves a leader and
//! nothing moves it back: `balance` (and `set` with the current count) spreads them
//! again, and `show` says when they are bunched.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use callcap::config::StreamArgs;
use callcap::partitions::{self, Found, Layout, Partition, MAX_PARTITIONS};
use callcap::subjects::Lane;

/// Prints every partition stream: layout, state, records, leader, lanes' backlog.
///
/// # Errors
/// When JetStream does not answer.
pub async fn show(js: &jetstream::Context, out: &mut impl Write) -> anyhow::Result<()> {
    let found = partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match partitions::current_of(&found) {
        Ok(Some(l)) => writeln!(out, "layout {}: {} partition(s)", l.epoch, l.count)?,
        Ok(None) => writeln!(out, "no CALLS stream yet (a gateway creates it at start)")?,
        Err(why) => writeln!(out, "{why}")?,
    }
    writeln!(
        out,
        "{:<14} {:>6} {:>9} {:>7} {:>12} {:>12} {:>12}  leader",
        "stream", "layout", "partition", "sealed", "records", "main left", "overflow left"
    )?;
    let mut led: std::collections::BTreeMap<String, u32> = Default::default();
    let current = partitions::current_of(&found).ok().flatten();
    for f in &found {
        let mut stream = js.get_stream(f.partition.stream_name()).await?;
        let info = stream.info().await?.clone();
        let leader = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .unwrap_or_else(|| "-".into());
        if current.is_some_and(|l| l.epoch == f.partition.epoch) && leader != "-" {
            *led.entry(leader.clone()).or_default() += 1;
        }
        let left = |lane: Lane| {
            let stream = &stream;
            async move {
                match stream.consumer_info(lane.consumer_name()).await {
                    Ok(c) => (c.num_pending + c.num_ack_pending as u64).to_string(),
                    Err(_) => "-".into(),
                }
            }
        };
        writeln!(
            out,
            "{:<14} {:>6} {:>9} {:>7} {:>12} {:>12} {:>12}  {leader}",
            f.partition.stream_name(),
            f.partition.epoch,
            format!("{}/{}", f.partition.index + 1, f.partition.count),
            if f.sealed { "yes" } else { "no" },
            info.state.messages,
            left(Lane::Main).await,
            left(Lane::Overflow).await,
        )?;
    }
    if let (Some(l), Some((node, n))) = (current, led.iter().max_by_key(|(_, n)| **n)) {
        let nodes = clustered_nodes(js, &l).await.unwrap_or_default();
        let fair = (l.count as usize).div_ceil(nodes.len().max(1)) as u32;
        if nodes.len() > 1 && *n > fair {
            writeln!(
                out,
                "leaders bunched: {node} leads {n} of {} partitions (a failover moved them); losing it stops \
                 all their companies. Run `ingest-gateway partitions balance`",
                l.count
            )?;
        }
    }
    Ok(())
}

/// The nodes a layout's streams are placed on (its first stream's peers), sorted; empty
/// on a single server.
async fn clustered_nodes(js: &jetstream::Context, layout: &Layout) -> anyhow::Result<Vec<String>> {
    let first = layout.partitions()[0].stream_name();
    let mut stream = js.get_stream(&first).await?;
    let info = stream.info().await?;
    if info.config.num_replicas < 2 {
        return Ok(Vec::new());
    }
    Ok(leader_of(js, &first).await?.1)
}

/// Spreads the current layout's leaders over the nodes again (see the module).
///
/// # Errors
/// No layout yet, or JetStream not answering.
pub async fn balance(js: &jetstream::Context, out: &mut impl Write) -> anyhow::Result<()> {
    let found = partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let layout = partitions::current_of(&found)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .context("there is no partition layout yet (no CALLS stream)")?;
    if clustered_nodes(js, &layout).await?.is_empty() {
        writeln!(
            out,
            "layout {}: a single copy of each stream: there is no other node to lead it",
            layout.epoch
        )?;
        return Ok(());
    }
    spread_leaders(js, &layout, out).await
}

/// Prints one KEDA ScaledObject per lane with a trigger per partition stream on the
/// server (KEDA scales on the largest trigger). The replica bounds are the shipped
/// ones (deploy/k8s/keda-scaledobject.yaml).
///
/// # Errors
/// When JetStream does not answer.
pub async fn keda(
    js: &jetstream::Context,
    namespace: &str,
    monitoring: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let found = partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        !found.is_empty(),
        "no CALLS stream yet (a gateway creates it at start)"
    );
    for (i, lane) in Lane::ALL.into_iter().enumerate() {
        let (min, deployment) = match lane {
            Lane::Main => (2, "persist-worker"),
            Lane::Overflow => (1, "persist-worker-overflow"),
        };
        if i > 0 {
            writeln!(out, "---")?;
        }
        writeln!(
            out,
            "# The {lane} lane's workers, on every partition stream's backlog."
        )?;
        writeln!(
            out,
            "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:"
        )?;
        writeln!(out, "  name: {deployment}\n  namespace: {namespace}\nspec:")?;
        writeln!(
            out,
            "  scaleTargetRef:\n    apiVersion: apps/v1\n    kind: Deployment"
        )?;
        writeln!(
            out,
            "    name: {deployment}\n  minReplicaCount: {min}\n  maxReplicaCount: 8"
        )?;
        writeln!(
            out,
            "  pollingInterval: 15\n  cooldownPeriod: 300\n  triggers:"
        )?;
        for f in found
            .iter()
            .filter(|f| f.subjects.contains(&f.partition.filter(lane)))
        {
            writeln!(out, "    - type: nats-jetstream\n      metadata:")?;
            writeln!(out, "        natsServerMonitoringEndpoint: {monitoring}")?;
            writeln!(out, "        account: $G")?;
            writeln!(out, "        stream: {}", f.partition.stream_name())?;
            writeln!(out, "        consumer: {}", lane.consumer_name())?;
            writeln!(out, "        lagThreshold: \"50000\"")?;
            writeln!(out, "        activationLagThreshold: \"1000\"")?;
            writeln!(out, "        useHttps: \"false\"")?;
        }
    }
    Ok(())
}

/// Changes the layout to `count` partitions (see the module).
///
/// # Errors
/// A count out of range, or JetStream refusing a step (run it again).
pub async fn set(
    js: &jetstream::Context,
    args: &StreamArgs,
    count: u32,
    wait: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_PARTITIONS).contains(&count),
        "the number of partitions must be 1 to {MAX_PARTITIONS}"
    );
    let found = partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let newest = found.iter().map(|f| f.partition.epoch).max();
    let current = partitions::current_of(&found);
    // The layout to end with: the current one when it already has `count` partitions and
    // is complete, else the newest epoch if an earlier `set` to `count` did not finish,
    // else a new epoch.
    let target = match (&current, newest) {
        (Ok(Some(l)), _) if l.count == count => {
            writeln!(out, "layout {} already has {count} partition(s)", l.epoch)?;
            // What the command promised on a cluster, one partition per node, may have
            // been undone by a failover since: spread the leaders again.
            if !clustered_nodes(js, l).await?.is_empty() {
                spread_leaders(js, l, out).await?;
            }
            return Ok(());
        }
        (Ok(None), _) => Layout { epoch: 0, count },
        (Err(_), Some(e))
            if found
                .iter()
                .any(|f| f.partition.epoch == e && f.partition.count == count) =>
        {
            Layout { epoch: e, count }
        }
        (_, Some(e)) => Layout {
            epoch: e + 1,
            count,
        },
        // A current layout or an error always comes with streams.
        (Ok(Some(_)) | Err(_), None) => Layout { epoch: 0, count },
    };
    // 1. Seal every older stream not sealed yet.
    for f in found
        .iter()
        .filter(|f| f.partition.epoch < target.epoch && !f.sealed)
    {
        seal(js, f.partition).await?;
        writeln!(out, "sealed {}", f.partition.stream_name())?;
    }
    // 2. The new streams, numbered past every older one.
    let found = partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = found
        .iter()
        .filter(|f| f.partition.epoch < target.epoch)
        .map(|f| f.last_sequence)
        .max()
        .map_or(1, |last| last + 1);
    let replicas = match args.stream_replicas {
        Some(n) => usize::from(n),
        None => replicas_of(js, &found).await?,
    };
    for p in target.partitions() {
        if found.iter().any(|f| f.partition == p) {
            continue;
        }
        let mut config = partitions::stream_config(args, replicas, p);
        if p != Partition::LEGACY {
            config.first_sequence = Some(first);
        }
        js.create_stream(config)
            .await
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", p.stream_name()))?;
        writeln!(
            out,
            "created {} ({replicas} replica(s), first sequence {first})",
            p.stream_name()
        )?;
    }
    writeln!(
        out,
        "layout {} with {count} partition(s) is current: gateways follow within seconds, \
         workers at their next consumer check",
        target.epoch
    )?;
    if replicas > 1 {
        spread_leaders(js, &target, out).await?;
    }
    if wait {
        drain(js, target.epoch, out).await?;
    }
    Ok(())
}

/// Replicas of the existing streams (the most any has), or 1 on a fresh server.
async fn replicas_of(js: &jetstream::Context, found: &[Found]) -> anyhow::Result<usize> {
    let mut most = 0;
    for f in found {
        let s = js.get_stream(f.partition.stream_name()).await?;
        most = most.max(s.cached_info().config.num_replicas);
    }
    Ok(if most == 0 {
        if callcap::subjects::clustered(js) {
            3
        } else {
            1
        }
    } else {
        most
    })
}

async fn seal(js: &jetstream::Context, p: Partition) -> anyhow::Result<()> {
    let mut stream = js.get_stream(p.stream_name()).await?;
    let info = stream.info().await?;
    let mut config = info.config.clone();
    config.sealed = true;
    // A sealed stream takes no more records: it gives back the storage it had reserved
    // (JetStream reserves max_bytes per stream), keeping room for what it holds.
    let held = i64::try_from(info.state.bytes).unwrap_or(i64::MAX);
    config.max_bytes = config.max_bytes.min(held.saturating_add(1024 * 1024));
    js.update_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("sealing {}: {e}", p.stream_name()))?;
    Ok(())
}

/// Records of the streams older than `epoch` not yet stored (both lanes' consumers'
/// pending and unacked); `None` while a lane's consumer does not exist yet.
async fn left_in_older(js: &jetstream::Context, epoch: u32) -> anyhow::Result<Option<u64>> {
    let found = partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut left = 0;
    for f in found.iter().filter(|f| f.partition.epoch < epoch) {
        let stream = js.get_stream(f.partition.stream_name()).await?;
        for lane in Lane::ALL {
            if !f.subjects.contains(&f.partition.filter(lane)) {
                continue;
            }
            match stream.consumer_info(lane.consumer_name()).await {
                Ok(c) => left += c.num_pending + c.num_ack_pending as u64,
                Err(_) if f.last_sequence == 0 => {}
                Err(_) => return Ok(None),
            }
        }
    }
    Ok(Some(left))
}

/// Waits, showing progress, until the workers have stored every record of the sealed
/// streams.
async fn drain(js: &jetstream::Context, epoch: u32, out: &mut impl Write) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    loop {
        match left_in_older(js, epoch).await? {
            Some(0) => break,
            Some(n) => bar.set_message(format!(
                "workers draining the sealed streams: {n} records not yet stored"
            )),
            None => bar.set_message("waiting for the workers' consumers on the sealed streams"),
        }
        bar.tick();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bar.finish_and_clear();
    writeln!(
        out,
        "the sealed streams are drained: every record they hold is stored"
    )?;
    Ok(())
}

/// The node leading `name`, once one is elected (within 10 s).
async fn leader_of(js: &jetstream::Context, name: &str) -> anyhow::Result<(String, Vec<String>)> {
    for _ in 0..100 {
        let mut stream = js.get_stream(name).await?;
        let info = stream.info().await?;
        if let Some(c) = info.cluster.as_ref() {
            if let Some(leader) = c.leader.clone() {
                let mut peers: Vec<String> = c.replicas.iter().map(|r| r.name.clone()).collect();
                peers.push(leader.clone());
                peers.sort();
                return Ok((leader, peers));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{name} has no leader after 10 s")
}

/// On a cluster, moves the leaders of the layout's streams so they are spread over the
/// nodes (partition i led by the i-th node, round robin): one node's loss then stops only
/// the companies of the partitions it led. A leader that will not move is reported, not
/// fatal: the layout works either way.
async fn spread_leaders(
    js: &jetstream::Context,
    layout: &Layout,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let streams: Vec<String> = layout
        .partitions()
        .iter()
        .map(|p| p.stream_name())
        .collect();
    let (_, nodes) = leader_of(js, &streams[0]).await?;
    for (i, name) in streams.iter().enumerate() {
        let wanted = &nodes[i % nodes.len()];
        let mut moved = false;
        // A node back from a failure takes a moment to be current: it cannot lead until
        // then, so the move is retried for up to 30 s.
        for _ in 0..100 {
            let (leader, _) = leader_of(js, name).await?;
            if &leader == wanted {
                moved = true;
                break;
            }
            let body = serde_json::json!({ "placement": { "preferred": wanted } });
            let reply = js
                .client()
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}"),
                    serde_json::to_vec(&body)?.into(),
                )
                .await?;
            tracing::debug!(stream = %name, reply = %String::from_utf8_lossy(&reply.payload), "leader step-down");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let (leader, _) = leader_of(js, name).await?;
        if moved || &leader == wanted {
            writeln!(out, "{name} led by {leader}")?;
        } else {
            writeln!(
                out,
                "{name} led by {leader} (could not move it to {wanted})"
            )?;
        }
    }
    Ok(())
}
