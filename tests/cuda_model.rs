//! The fixture models on the GPU: logits within 2e-2 relative of the
//! Hugging Face reference with its greedy ids, for the whole model and for
//! every TP/PP layout the fixture allows (ranks sharing the one GPU through
//! the in-process communicator), and tiny-chat's 30 chat answers word for
//! word. Skips, saying so, where no GPU is visible.

mod common;

use common::split::{check_split, layouts};
use shardline::backend::cuda::{gpu_count, CudaBackend};
use shardline::model_dir;

const TOLERANCE: f64 = 2e-2;

fn have_gpu() -> bool {
    let present = gpu_count() > 0;
    if !present {
        eprintln!("skipped: no CUDA GPU visible");
    }
    present
}

/// Every rank on the first GPU.
/// GPU 0, with outputs poisoned so an unwritten element shows as NaN logits.
fn first_gpu(_rank: usize) -> CudaBackend {
    let mut gpu = CudaBackend::new(0).expect("opening GPU 0");
    gpu.poison_outputs();
    gpu
}

#[test]
fn fixtures_match_hf_on_the_gpu_in_every_layout() {
    if !have_gpu() {
        return;
    }
    for name in ["tiny-gqa", "tiny-mqa128", "tiny-chat"] {
        for layout in layouts(name) {
            check_split(name, layout, None, first_gpu, TOLERANCE);
        }
    }
}

#[test]
fn tiny_chat_answers_every_greedy_chat_case_on_the_gpu() {
    if !have_gpu() {
        return;
    }
    let options = common::options(&common::model_dir("tiny-chat"));
    common::chat::answers_every_greedy_chat_case(model_dir::open(first_gpu(0), &options).unwrap());
}
