//! The fixture models on the GPU: logits within 2e-2 relative of the
//! Hugging Face reference with its greedy ids up to the first near tie
//! (tiny-chat's margins are large: all of them), for the whole model and for
//! every TP/PP layout the fixture allows (ranks sharing the one GPU through
//! the in-process communicator), tiny-chat's 30 chat answers word for
//! word (greedy, picked by the sampling kernel), and seeded sampling by the
//! kernel picking what the host sampler picks from the same GPU logits.
//! Skips, saying so, where no GPU is visible.

mod common;

use common::sampled;
use common::split::{check_split, layouts, Accuracy};
use shardline::backend::cuda::CudaBackend;
use shardline::generation::{Generator, BLOCK_SIZE};
use shardline::model_dir;

/// Every rank on GPU 0, with outputs poisoned so an unwritten element shows as NaN logits.
fn first_gpu(_rank: usize) -> CudaBackend {
    let mut gpu = CudaBackend::new(0).expect("opening GPU 0");
    gpu.poison_outputs();
    gpu
}

#[test]
fn fixtures_match_hf_on_the_gpu_in_every_layout() {
    if !common::gpu_visible() {
        return;
    }
    for name in ["tiny-gqa", "tiny-mqa128", "tiny-chat"] {
        for layout in layouts(name) {
            check_split(name, layout, None, first_gpu, Accuracy::BF16);
        }
    }
}

#[test]
fn tiny_chat_answers_every_greedy_chat_case_on_the_gpu() {
    if !common::gpu_visible() {
        return;
    }
    let options = common::options(&common::model_dir("tiny-chat"));
    common::chat::answers_every_greedy_chat_case(model_dir::open(first_gpu(0), &options).unwrap());
}

#[test]
fn the_sampling_kernel_picks_what_the_host_sampler_picks() {
    if !common::gpu_visible() {
        return;
    }
    let name = "tiny-chat";
    let options = common::options(&common::model_dir(name));
    let request = sampled::request(&common::Reference::open(name).ids("prompt0.input_ids"), 32);
    let capacity = sampled::blocks(&request) * BLOCK_SIZE;
    let generator = || Generator::new(model_dir::open(first_gpu(0), &options).unwrap().model, capacity).unwrap();
    let want = sampled::by_host(generator(), &request);
    let got = sampled::by_model(generator(), &request);
    sampled::assert_same(&got, &want, "tiny-chat on the GPU");
}
