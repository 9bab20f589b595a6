//! A 3-node JetStream cluster on loopback, from the shipped `deploy/nats/cluster.conf`:
//! each node a [`NatsServer`] that a test can kill, stop and restart on its ports and store.

use std::time::Duration;

use crate::nats::{NatsConfig, NatsServer};

/// Three clustered nats-servers.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three nodes (`n1`, `n2`, `n3`) and waits until JetStream answers on each.
    pub async fn start() -> Self {
        let route_ports: Vec<u16> = (0..3).map(|_| crate::free_port()).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
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
                for (j, r) in routes.iter().enumerate() {
                    env.push((format!("CALLCAP_ROUTE_{}", j + 1), r.clone()));
                }
                NatsServer::prepare(NatsConfig::ClusterNode, env)
            })
            .collect();
        for n in &mut nodes {
            n.spawn();
        }
        for n in &nodes {
            n.wait_ready().await;
        }
        NatsCluster { nodes }
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
                let addrs: Vec<&str> = seeds.split(',').collect();
                let client = async_nats::connect(addrs).await.ok()?;
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
