//! A model split over several machines. Node 0 (the leader) runs the
//! engine; every node runs the worker threads of its own ranks (node `n` of
//! `N` holds ranks `n·W/N .. (n+1)·W/N` of a world of `W`). Tensors cross
//! nodes through the ranks' transport (NCCL); the TCP connection each
//! follower opens to the leader carries the rest: the handshake (the split,
//! the KV cache size and the group keys the transport needs), each step's
//! batch, and the step outputs (tokens, logits) or failures coming back.
//!
//! Start-up, in order: followers connect and say who they are; the leader
//! answers with what to load; every node loads its shards and reports;
//! only when all have loaded does any rank join a group (so a node that
//! fails to load leaves nobody waiting in a join); then all report joined.

use super::peer::{read_message, Message, Peer};
use super::workers::{Load, StepResult};
use super::{Transport, WorkerOptions, Workers, WorkersError};
use crate::backend::{Backend, HostStaging};
use crate::config::ModelConfig;
use crate::model::{ForwardBatch, Qwen2ForCausalLM, Shard};
use crate::parallel::Layout;
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

impl Workers {
    /// Node 0: waits for the other nodes, tells them what to load (with
    /// the transport's group `keys`), and starts its own ranks with theirs.
    /// The returned executor runs the whole model.
    pub fn lead<B, F>(
        config: ModelConfig,
        options: WorkerOptions,
        load: F,
        transport: Transport<B>,
        keys: &[Vec<u8>],
        spec: &NodeSpec,
    ) -> Result<Self, WorkersError>
    where
        B: Backend + 'static,
        B::Tensor: HostStaging,
        F: Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync + 'static,
    {
        let layout = options.layout;
        spec.check(layout)?;
        layout.validate(&config)?;
        let followers = accept_followers(spec, fingerprint(&config, layout), &options, keys)?;
        let local = spec.ranks_of(0, layout);
        Self::spawn_on(config, options, Arc::new(load), transport, local, Nodes::Leader(followers))
    }

    /// Any other node: joins the leader, loads and runs this node's ranks
    /// (`layout` must be the leader's), with the transport `connect` makes
    /// from the leader's group keys, until the leader hangs up.
    pub fn follow<B, F>(
        config: ModelConfig,
        layout: Layout,
        load: F,
        connect: impl FnOnce(&[Vec<u8>]) -> Result<Transport<B>, String>,
        spec: &NodeSpec,
    ) -> Result<(), WorkersError>
    where
        B: Backend + 'static,
        B::Tensor: HostStaging,
        F: Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync + 'static,
    {
        spec.check(layout)?;
        let (leader, options, keys) = join_leader(spec, fingerprint(&config, layout))?;
        let local = spec.ranks_of(spec.node_rank, layout);
        let load: Arc<Load<B>> = Arc::new(load);
        let transport = connect(&keys).map_err(|why| WorkersError::Remote(format!("the leader's group keys: {why}")))?;
        let mut workers = Self::spawn_on(config, options, load, transport, local, Nodes::Follower(leader))?;
        workers.relay_steps()
    }

    /// A follower's work: each step from the leader to this node's ranks,
    /// and their results back, until the leader hangs up.
    fn relay_steps(&mut self) -> Result<(), WorkersError> {
        let Nodes::Follower(leader) = &self.nodes else {
            unreachable!("only a follower relays");
        };
        let mut steps = leader
            .split_reader()
            .map_err(|e| WorkersError::Remote(format!("the leader's connection: {e}")))?;
        let results = std::mem::replace(&mut self.results, std::sync::mpsc::channel().1);
        let mut back = leader
            .try_clone()
            .map_err(|e| WorkersError::Remote(format!("the leader's connection: {e}")))?;
        let forward = std::thread::spawn(move || {
            for result in results.iter() {
                if back.send(&Message::Result(result)).is_err() {
                    break;
                }
            }
        });
        let outcome = loop {
            match read_message(&mut steps) {
                Ok(Message::Step(batch)) => {
                    if !self.jobs.iter().all(|j| j.send(batch.clone()).is_ok()) {
                        // A rank stopped (its failure went back as a result):
                        // wait for the leader to hang up.
                        self.jobs.clear();
                    }
                }
                Ok(other) => break Err(WorkersError::Remote(format!("the leader sent {other:?} out of turn"))),
                Err(_) => break Ok(()),
            }
        };
        // The forwarding thread ends once every rank (holding a sender of
        // `results`) has stopped.
        self.stop_ranks();
        let _ = forward.join();
        outcome
    }
}

/// The other nodes, as this one sees them.
pub(super) enum Nodes {
    Alone,
    Leader(Vec<Peer>),
    Follower(Peer),
}

impl Nodes {
    /// After this node's ranks have loaded (`local`: their decode weight
    /// bytes): the leader adds every follower's and tells them all to join
    /// their groups; a follower reports and waits for that word.
    pub fn loaded(&mut self, local: Result<usize, WorkersError>) -> Result<usize, WorkersError> {
        match self {
            Nodes::Alone => local,
            Nodes::Leader(followers) => {
                let mut bytes = local?;
                for follower in followers.iter_mut() {
                    bytes += follower.await_ready().map_err(WorkersError::Remote)? as usize;
                }
                for follower in followers.iter_mut() {
                    follower
                        .send(&Message::Start)
                        .map_err(|e| WorkersError::Remote(format!("node {}: {e}", follower.node)))?;
                }
                Ok(bytes)
            }
            Nodes::Follower(leader) => {
                let report = local.as_ref().map(|&b| b as u64).map_err(|e| e.to_string());
                let _ = leader.send(&Message::Ready(report));
                let bytes = local?;
                match leader.recv() {
                    Ok(Message::Start) => Ok(bytes),
                    Ok(other) => Err(WorkersError::Remote(format!("the leader sent {other:?} out of turn"))),
                    Err(_) => Err(WorkersError::Remote(
                        "the leader hung up while the nodes loaded (another node failed)".into(),
                    )),
                }
            }
        }
    }

    /// After this node's ranks have joined their groups.
    pub fn joined(&mut self, local: Result<usize, WorkersError>) -> Result<(), WorkersError> {
        match self {
            Nodes::Alone => local.map(drop),
            Nodes::Leader(followers) => {
                local?;
                for follower in followers.iter_mut() {
                    follower.await_ready().map_err(WorkersError::Remote)?;
                }
                Ok(())
            }
            Nodes::Follower(leader) => {
                let _ = leader.send(&Message::Ready(local.as_ref().map(|_| 0).map_err(|e| e.to_string())));
                local.map(drop)
            }
        }
    }

    /// On the leader, one thread per follower passing what it sends back
    /// (logits or failures) into `results`.
    pub fn relay_results(&self, results: &Sender<StepResult>) -> Vec<JoinHandle<()>> {
        let Nodes::Leader(followers) = self else {
            return Vec::new();
        };
        followers
            .iter()
            .map(|follower| {
                let (node, results) = (follower.node, results.clone());
                let reader = follower.split_reader();
                std::thread::spawn(move || {
                    let mut reader = match reader {
                        Ok(reader) => reader,
                        Err(e) => return drop(results.send(Err(format!("node {node}: {e}")))),
                    };
                    loop {
                        let result = match read_message(&mut reader) {
                            Ok(Message::Result(result)) => result,
                            Ok(other) => Err(format!("node {node} sent {other:?} out of turn")),
                            Err(e) => Err(format!("node {node} hung up: {e}")),
                        };
                        let ended = result.is_err();
                        if results.send(result).is_err() || ended {
                            break;
                        }
                    }
                })
            })
            .collect()
    }

    /// On the leader, sends a step to every follower.
    pub fn send_step(&mut self, batch: &Arc<ForwardBatch>) -> Result<(), String> {
        let Nodes::Leader(followers) = self else {
            return Ok(());
        };
        let step = Message::Step(batch.clone()).to_frame();
        for follower in followers.iter_mut() {
            follower.send_frame(&step).map_err(|e| format!("node {}: {e}", follower.node))?;
        }
        Ok(())
    }

    /// Hangs up on every other node.
    pub fn close(&self) {
        match self {
            Nodes::Alone => {}
            Nodes::Leader(followers) => followers.iter().for_each(Peer::close),
            Nodes::Follower(leader) => leader.close(),
        }
    }
}

/// This machine's place among the nodes serving one model.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub nnodes: usize,
    pub node_rank: usize,
    /// The leader's `host:port`: it listens there, the others connect.
    pub master: String,
    /// How long the leader waits for every follower, and a follower for the leader.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("--node-rank {node_rank} must be below --nnodes {nnodes}")]
    NodeRank { node_rank: usize, nnodes: usize },
    #[error("{world} ranks do not divide over {nnodes} nodes")]
    Uneven { world: usize, nnodes: usize },
    #[error("{what} {master}: {source}")]
    Io {
        what: &'static str,
        master: String,
        source: io::Error,
    },
    #[error("no {what} within {seconds} s (is every node started with the same --master-addr/--master-port?)")]
    Timeout { what: &'static str, seconds: u64 },
    #[error("node {node} was refused: {why}")]
    Refused { node: usize, why: String },
    #[error("the leader's message was malformed: {0}")]
    Protocol(String),
}

impl NodeSpec {
    /// Node `node_rank` of `nnodes`, meeting at `addr:port` (an IPv6
    /// address is bracketed).
    pub fn new(nnodes: usize, node_rank: usize, addr: &str, port: u16, timeout: Duration) -> Self {
        let host = match addr.contains(':') {
            true => format!("[{addr}]"),
            false => addr.to_string(),
        };
        NodeSpec {
            nnodes,
            node_rank,
            master: format!("{host}:{port}"),
            timeout,
        }
    }

    pub fn check(&self, layout: Layout) -> Result<(), NodeError> {
        if self.node_rank >= self.nnodes {
            return Err(NodeError::NodeRank {
                node_rank: self.node_rank,
                nnodes: self.nnodes,
            });
        }
        let world = layout.world_size();
        if world % self.nnodes != 0 {
            return Err(NodeError::Uneven {
                world,
                nnodes: self.nnodes,
            });
        }
        Ok(())
    }

    /// The ranks node `node` runs.
    pub fn ranks_of(&self, node: usize, layout: Layout) -> Range<usize> {
        let per_node = layout.world_size() / self.nnodes;
        node * per_node..(node + 1) * per_node
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> NodeError + '_ {
        move |source| NodeError::Io {
            what,
            master: self.master.clone(),
            source,
        }
    }
}

/// What every node must agree on to serve one model together: the
/// version of shardline, the model's configuration and the split.
fn fingerprint(config: &ModelConfig, layout: Layout) -> u64 {
    crate::rng::fnv1a(format!("{} {config:?} {layout:?}", env!("CARGO_PKG_VERSION")).as_bytes())
}

/// Leader: waits for every follower, checks each agrees on `fingerprint`,
/// and welcomes them with `options` and `keys`. Returns them by node.
pub(super) fn accept_followers(
    spec: &NodeSpec,
    fingerprint: u64,
    options: &WorkerOptions,
    keys: &[Vec<u8>],
) -> Result<Vec<Peer>, NodeError> {
    let listener = TcpListener::bind(&spec.master).map_err(spec.io("listening on"))?;
    listener.set_nonblocking(true).map_err(spec.io("listening on"))?;
    let deadline = Instant::now() + spec.timeout;
    let mut followers: Vec<Peer> = Vec::new();
    while followers.len() + 1 < spec.nnodes {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(NodeError::Timeout {
                        what: "follower nodes connected",
                        seconds: spec.timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(spec.io("accepting on")(e)),
        };
        stream.set_nonblocking(false).map_err(spec.io("accepting on"))?;
        // A node says hello at once; anything else connecting is not kept waiting on.
        stream
            .set_read_timeout(Some(spec.timeout.min(Duration::from_secs(10))))
            .map_err(spec.io("accepting on"))?;
        let mut peer = Peer::new(0, stream).map_err(spec.io("accepting on"))?;
        let (node, theirs) = match peer.recv() {
            Ok(Message::Hello { node, fingerprint }) => (node, fingerprint),
            // Not a shardline node (a port scan, a health check): ignore it.
            _ => continue,
        };
        let refusal = if node == 0 || node >= spec.nnodes {
            Some(format!("node rank {node} is not one of 1..{}", spec.nnodes))
        } else if followers.iter().any(|f| f.node == node) {
            Some(format!("node rank {node} has already joined"))
        } else if theirs != fingerprint {
            Some("its version, model configuration or --tp/--pp differ from node 0's".to_string())
        } else {
            None
        };
        if let Some(why) = refusal {
            let _ = peer.send(&Message::Refuse(why.clone()));
            return Err(NodeError::Refused { node, why });
        }
        peer.node = node;
        let welcome = Message::Welcome {
            options: options.clone(),
            keys: keys.to_vec(),
        };
        peer.send(&welcome).map_err(spec.io("welcoming a node on"))?;
        peer.clear_read_timeout().map_err(spec.io("accepting on"))?;
        followers.push(peer);
    }
    followers.sort_by_key(|f| f.node);
    Ok(followers)
}

/// Follower: connects to the leader (retrying until it listens), says who
/// it is, and returns the connection with what to load.
pub(super) fn join_leader(spec: &NodeSpec, fingerprint: u64) -> Result<(Peer, WorkerOptions, Vec<Vec<u8>>), NodeError> {
    let deadline = Instant::now() + spec.timeout;
    let stream = loop {
        let addrs = spec.master.to_socket_addrs().map_err(spec.io("resolving"))?;
        if let Some(stream) = addrs
            .filter_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
            .next()
        {
            break stream;
        }
        if Instant::now() > deadline {
            return Err(NodeError::Timeout {
                what: "leader (node 0) listening",
                seconds: spec.timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut leader = Peer::new(0, stream).map_err(spec.io("connecting to"))?;
    let hello = Message::Hello {
        node: spec.node_rank,
        fingerprint,
    };
    leader.send(&hello).map_err(spec.io("greeting"))?;
    match leader.recv().map_err(spec.io("waiting for the welcome from"))? {
        Message::Welcome { options, keys } => Ok((leader, options, keys)),
        Message::Refuse(why) => Err(NodeError::Refused { node: spec.node_rank, why }),
        other => Err(NodeError::Protocol(format!("expected a welcome, got {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_address_is_a_connectable_host_and_port() {
        let second = Duration::from_secs(1);
        assert_eq!(NodeSpec::new(2, 1, "10.0.0.1", 29500, second).master, "10.0.0.1:29500");
        assert_eq!(NodeSpec::new(2, 1, "::1", 29500, second).master, "[::1]:29500");
        assert!(NodeSpec::new(2, 1, "::1", 29500, second).master.to_socket_addrs().is_ok());
    }
}
