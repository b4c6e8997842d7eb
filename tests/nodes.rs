//! A model split over two nodes: node 0 leads (it runs the generator), node
//! 1 follows. Both run in this process on the CPU backend, so their ranks'
//! tensors pass through in-process endpoints, handed out as each rank joins
//! the way NCCL's join would; the start-up handshake, every step's batch
//! (with its sampling) and the results (logits, sampled tokens) cross a
//! real TCP connection on localhost.

mod common;

use common::model_dir;
use common::sampled;
use common::split::{check_prompts, run_prompt, shard_loader, worker_options, Accuracy};
use shardline::backend::cpu::CpuBackend;
use shardline::config::ModelConfig;
use shardline::executor::{Membership, NodeSpec, Transport, WorkerOptions, Workers, WorkersError};
use shardline::generation::{blocks_for, Generator, BLOCK_SIZE};
use shardline::parallel::{in_process_group, Communicator, InProcessComm, Layout};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

const FIXTURE: &str = "tiny-gqa";
const KEYS: &[u8] = b"group keys";

fn config() -> ModelConfig {
    ModelConfig::from_file(&model_dir(FIXTURE).join("config.json")).unwrap()
}

fn spec(node_rank: usize, port: u16) -> NodeSpec {
    NodeSpec {
        nnodes: 2,
        node_rank,
        master: format!("127.0.0.1:{port}"),
        timeout: Duration::from_secs(20),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every group of `layout` (TP groups first), its endpoints by rank.
type Groups = Arc<Mutex<Vec<Vec<Option<InProcessComm>>>>>;

fn groups(layout: Layout) -> Groups {
    let tp_groups = (0..layout.pp).map(|_| in_process_group(layout.tp));
    let pp_groups = (0..layout.tp).map(|_| in_process_group(layout.pp));
    let all = tp_groups.chain(pp_groups).map(|g| g.into_iter().map(Some).collect());
    Arc::new(Mutex::new(all.collect()))
}

/// Each rank that joins takes its endpoint from `groups`.
fn transport(layout: Layout, groups: Groups) -> Transport<CpuBackend> {
    Transport::Connect(Box::new(move |_: &CpuBackend, member: Membership| {
        let endpoint = groups.lock().unwrap()[member.group.index(layout)][member.rank].take();
        let endpoint = endpoint.ok_or_else(|| format!("{member:?} joined twice"))?;
        Ok(Box::new(endpoint) as Box<dyn Communicator<_>>)
    }))
}

/// Node 1 on its own thread, following node 0 on `port` with the split `layout`.
fn follower(layout: Layout, port: u16, groups: Groups, load: fn(usize) -> CpuBackend) -> JoinHandle<Result<(), WorkersError>> {
    thread::spawn(move || {
        let connect = |keys: &[Vec<u8>]| match keys {
            [key] if key == KEYS => Ok(transport(layout, groups)),
            _ => Err(format!("unexpected keys {keys:?}")),
        };
        Workers::follow(config(), layout, shard_loader(FIXTURE, load), connect, &spec(1, port))
    })
}

/// Node 0 on this thread.
fn lead(options: WorkerOptions, port: u16, groups: Groups) -> Result<Workers, WorkersError> {
    let layout = options.layout;
    let load = shard_loader(FIXTURE, |_| CpuBackend::default());
    Workers::lead(config(), options, load, transport(layout, groups), &[KEYS.to_vec()], &spec(0, port))
}

#[test]
fn a_model_split_over_two_nodes_gives_the_reference_logits_and_greedy_ids() {
    // Node 0 holds stage 0 (ranks 0, 1); node 1 holds stage 1 and with it
    // rank 2, whose logits come back over the connection.
    let layout = Layout { tp: 2, pp: 2 };
    let mut followers = Vec::new();
    check_prompts(FIXTURE, "over 2 nodes", Accuracy::F32, |num_kv_blocks| {
        let (port, groups) = (free_port(), groups(layout));
        followers.push(follower(layout, port, groups.clone(), |_| CpuBackend::default()));
        Box::new(lead(worker_options(layout, None, num_kv_blocks), port, groups).unwrap())
    });
    // Each leader has been dropped, hanging up on its follower.
    for follower in followers {
        follower.join().unwrap().unwrap();
    }
}

#[test]
fn tokens_sampled_on_the_follower_come_back_as_the_host_would_pick_them() {
    let layout = Layout { tp: 2, pp: 2 };
    let request = sampled::request(&common::Reference::open(FIXTURE).ids("prompt0.input_ids"), 16);
    let num_kv_blocks = sampled::blocks(&request);
    let want = sampled::by_host(common::generator(FIXTURE, num_kv_blocks * BLOCK_SIZE), &request);
    let (port, groups) = (free_port(), groups(layout));
    let node1 = follower(layout, port, groups.clone(), |_| CpuBackend::default());
    let leader = lead(worker_options(layout, None, num_kv_blocks), port, groups).unwrap();
    let got = sampled::by_model(Generator::with_executor(Box::new(leader), num_kv_blocks), &request);
    sampled::assert_same(&got, &want, "over 2 nodes");
    node1.join().unwrap().unwrap();
}

#[test]
fn a_rank_failing_on_the_follower_fails_the_step_on_the_leader() {
    let layout = Layout { tp: 2, pp: 2 };
    let (port, groups) = (free_port(), groups(layout));
    let node1 = follower(layout, port, groups.clone(), |_| CpuBackend::default());
    let mut options = worker_options(layout, None, blocks_for(16));
    options.panic_at = Some((3, 1));
    let leader = lead(options, port, groups).unwrap();
    let mut generator = shardline::generation::Generator::with_executor(Box::new(leader), blocks_for(16));
    generator.extend(&[1, 2, 3], false).unwrap();
    let err = generator.decode_one_token(4).unwrap_err().to_string();
    assert!(err.contains("panicked"), "{err}");
    drop(generator);
    node1.join().unwrap().unwrap();
}

#[test]
fn a_node_that_cannot_load_fails_the_start_on_both_nodes() {
    let layout = Layout { tp: 2, pp: 2 };
    let (port, groups) = (free_port(), groups(layout));
    // The follower's ranks load from a backend that is never made.
    let node1 = thread::spawn(move || {
        let load = |rank, _| Err::<shardline::model::Qwen2ForCausalLM<CpuBackend>, _>(format!("no device for rank {rank}"));
        Workers::follow(config(), layout, load, |_| Ok(transport(layout, groups)), &spec(1, port))
    });
    let err = lead(worker_options(layout, None, 4), port, Arc::new(Mutex::new(Vec::new())))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("node 1") && err.to_string().contains("no device for rank"),
        "{err}"
    );
    let err = node1.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("failed to load"), "{err}");
}

#[test]
fn a_node_with_another_split_is_refused_by_the_leader() {
    let (port, groups) = (free_port(), groups(Layout { tp: 2, pp: 1 }));
    let node1 = follower(Layout { tp: 1, pp: 2 }, port, groups.clone(), |_| CpuBackend::default());
    let err = lead(worker_options(Layout { tp: 2, pp: 1 }, None, 4), port, groups).err().unwrap();
    assert!(err.to_string().contains("--tp/--pp differ"), "{err}");
    let err = node1.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("was refused"), "{err}");
}

#[test]
fn a_second_node_with_the_same_rank_is_refused() {
    // Three stages over three nodes; two followers both say node 1.
    let layout = Layout { tp: 1, pp: 3 };
    let port = free_port();
    let three = |node| NodeSpec {
        nnodes: 3,
        ..spec(node, port)
    };
    let followers: Vec<_> = (0..2)
        .map(|_| {
            let node1 = three(1);
            thread::spawn(move || {
                let load = shard_loader(FIXTURE, |_| CpuBackend::default());
                Workers::follow(config(), layout, load, |_| Ok(Transport::InProcess), &node1)
            })
        })
        .collect();
    let load = shard_loader(FIXTURE, |_| CpuBackend::default());
    let options = worker_options(layout, None, 4);
    let err = Workers::lead(config(), options, load, Transport::InProcess, &[], &three(0))
        .err()
        .unwrap();
    assert!(err.to_string().contains("node rank 1 has already joined"), "{err}");
    for follower in followers {
        assert!(follower.join().unwrap().is_err(), "neither follower runs without its leader");
    }
}

#[test]
fn a_follower_without_a_leader_gives_up_after_its_timeout() {
    let follow = |spec: &NodeSpec| {
        let load = shard_loader(FIXTURE, |_| CpuBackend::default());
        let layout = Layout { tp: 2, pp: 1 };
        Workers::follow(config(), layout, load, |_| Ok(Transport::InProcess), spec)
            .unwrap_err()
            .to_string()
    };
    let mut alone = spec(1, free_port());
    alone.timeout = Duration::from_millis(300);
    let err = follow(&alone);
    assert!(err.contains("no leader (node 0) listening within"), "{err}");
    let err = follow(&spec(2, free_port()));
    assert!(err.contains("--node-rank 2 must be below --nnodes 2"), "{err}");
}

#[test]
fn run_prompt_on_one_node_matches_two() {
    // The same prompt on one node and on two gives bit-identical logits:
    // the connection carries the batch exactly.
    let layout = Layout { tp: 1, pp: 2 };
    let prompt = [3, 14, 15, 92, 65];
    let blocks = blocks_for(prompt.len() + 3);
    let local = Workers::spawn(
        config(),
        worker_options(layout, None, blocks),
        shard_loader(FIXTURE, |_| CpuBackend::default()),
        Transport::InProcess,
    )
    .unwrap();
    let one = run_prompt(Box::new(local), blocks, &prompt, 3);
    let (port, groups) = (free_port(), groups(layout));
    let node1 = follower(layout, port, groups.clone(), |_| CpuBackend::default());
    let two = run_prompt(
        Box::new(lead(worker_options(layout, None, blocks), port, groups).unwrap()),
        blocks,
        &prompt,
        3,
    );
    assert_eq!((one.logits, one.greedy), (two.logits, two.greedy));
    node1.join().unwrap().unwrap();
}
