//! A 3-node JetStream cluster on loopback, from the shipped `deploy/nats/cluster.conf`:
//! each node a [`NatsServer`] that a test can kill, stop and restart on its ports and store.

use std::time::Duration;

use crate::nats::{NatsConfig, NatsServer};
use crate::proxy::Proxy;

/// Three clustered nats-servers.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// `route_proxies[i][j]`: the proxy node `i` reaches node `j`'s routes through (none
    /// for `i == j`, and none at all in a cluster started with [`NatsCluster::start`]).
    route_proxies: Vec<Vec<Option<Proxy>>>,
}

impl NatsCluster {
    /// Starts three nodes (`n1`, `n2`, `n3`) with direct routes and waits until JetStream
    /// answers on each.
    pub async fn start() -> Self {
        Self::start_inner(false).await
    }

    /// As [`NatsCluster::start`], but every route goes through a proxy of its own (one
    /// per direction and pair), so a test can cut a node off from the others while its
    /// clients still reach it ([`NatsCluster::isolate`]).
    pub async fn start_with_cuttable_routes() -> Self {
        Self::start_inner(true).await
    }

    async fn start_inner(cuttable: bool) -> Self {
        let route_ports: Vec<u16> = (0..3).map(|_| crate::free_port()).collect();
        let mut route_proxies: Vec<Vec<Option<Proxy>>> = Vec::new();
        for i in 0..3 {
            let mut row = Vec::new();
            for (j, port) in route_ports.iter().enumerate() {
                row.push(if cuttable && i != j {
                    Some(Proxy::start(([127, 0, 0, 1], *port).into()).await)
                } else {
                    None
                });
            }
            route_proxies.push(row);
        }
        let mut nodes: Vec<NatsServer> = route_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let mut env = vec![
                    ("CALLCAP_NODE".to_owned(), format!("n{}", i + 1)),
                    (
                        "CALLCAP_CLUSTER_LISTEN".to_owned(),
                        format!("127.0.0.1:{port}"),
                    ),
                ];
                for (j, port) in route_ports.iter().enumerate() {
                    let target = route_proxies[i][j]
                        .as_ref()
                        .map_or(*port, |p| p.addr.port());
                    env.push((
                        format!("CALLCAP_ROUTE_{}", j + 1),
                        format!(
                            "nats://callcap-route:{}@127.0.0.1:{target}",
                            crate::identities::identities().route_password
                        ),
                    ));
                }
                let node = NatsServer::prepare(NatsConfig::ClusterNode, env);
                if cuttable {
                    // Routes learnt by gossip would go to the advertised (real) address,
                    // around the proxies; advertise a closed port so that only the
                    // configured, proxied routes exist.
                    node.with_args(&["--cluster_advertise", "127.0.0.1:1"])
                } else {
                    node
                }
            })
            .collect();
        for n in &mut nodes {
            n.spawn();
        }
        for n in &nodes {
            n.wait_ready().await;
        }
        NatsCluster {
            nodes,
            route_proxies,
        }
    }

    /// Cuts node `i` off from the other two (every route to and from it), leaving its
    /// client port open; waits until it reports no routes.
    pub async fn isolate(&self, i: usize) {
        self.set_routes(i, false);
        let url = format!("{}/routez", self.nodes[i].monitor_url());
        crate::eventually(
            Duration::from_secs(15),
            "the isolated node to lose its routes",
            || {
                let url = url.clone();
                async move {
                    let v: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
                    (v["num_routes"].as_u64()? == 0).then_some(())
                }
            },
        )
        .await;
    }

    /// Restores node `i`'s routes.
    pub fn heal(&self, i: usize) {
        self.set_routes(i, true);
    }

    fn set_routes(&self, i: usize, up: bool) {
        assert!(
            self.route_proxies.iter().flatten().any(Option::is_some),
            "this cluster was started without cuttable routes"
        );
        for (a, row) in self.route_proxies.iter().enumerate() {
            for (b, proxy) in row.iter().enumerate() {
                if let Some(p) = proxy.as_ref().filter(|_| a == i || b == i) {
                    if up {
                        p.up();
                    } else {
                        p.down();
                    }
                }
            }
        }
    }

    /// `NATS_URL` naming every node.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node leading `stream`, once one is elected.
    pub async fn stream_leader(&self, stream: &str) -> usize {
        let seeds = self.seeds();
        let name = crate::eventually(Duration::from_secs(30), "a stream leader", || {
            let seeds = seeds.clone();
            async move {
                let client = crate::identities::try_connect(&seeds).await?;
                let js = async_nats::jetstream::new(client);
                let mut s = js.get_stream(stream).await.ok()?;
                s.info().await.ok()?.cluster.as_ref()?.leader.clone()
            }
        })
        .await;
        self.nodes
            .iter()
            .position(|n| n.node_name() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("leader {name} is not one of the nodes"))
    }
}

/// How many copies a stream (or consumer) has that are up to date: its leader plus the
/// replicas reported current. `None` until it has a leader.
pub fn current_copies(
    cluster: Option<&async_nats::jetstream::stream::ClusterInfo>,
) -> Option<usize> {
    let c = cluster?;
    c.leader.as_ref()?;
    Some(
        1 + c
            .replicas
            .iter()
            .filter(|r| r.current && !r.offline)
            .count(),
    )
}

/// Waits until `stream` has exactly `copies` current copies (after a replica change).
pub async fn wait_stream_copies(seeds: &str, stream: &str, copies: usize) {
    let seeds = seeds.to_owned();
    let stream = stream.to_owned();
    crate::eventually(
        Duration::from_secs(180),
        &format!("{stream} to have {copies} current copies"),
        || {
            let (seeds, stream) = (seeds.clone(), stream.clone());
            async move {
                let client = crate::identities::try_connect(&seeds).await?;
                let js = async_nats::jetstream::new(client);
                let mut s = js.get_stream(&stream).await.ok()?;
                let info = s.info().await.ok()?;
                (info.config.num_replicas == copies
                    && current_copies(info.cluster.as_ref()) == Some(copies))
                .then_some(())
            }
        },
    )
    .await;
}

/// Waits until the durable consumer `consumer` of `stream` has `copies` current copies.
pub async fn wait_consumer_copies(seeds: &str, stream: &str, consumer: &str, copies: usize) {
    let (seeds, stream, consumer) = (seeds.to_owned(), stream.to_owned(), consumer.to_owned());
    crate::eventually(
        Duration::from_secs(30),
        &format!("consumer {consumer} to have {copies} current copies"),
        || {
            let (seeds, stream, consumer) = (seeds.clone(), stream.clone(), consumer.clone());
            async move {
                let client = crate::identities::try_connect(&seeds).await?;
                let js = async_nats::jetstream::new(client);
                let s = js.get_stream(&stream).await.ok()?;
                let mut c = s
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&consumer)
                    .await
                    .ok()?;
                let info = c.info().await.ok()?;
                (current_copies(info.cluster.as_ref()) == Some(copies)).then_some(())
            }
        },
    )
    .await;
}
