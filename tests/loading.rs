//! Loading checkpoints: a sharded copy of a fixture (written here) gives the
//! same logits as the reference; dummy weights are deterministic by seed; and
//! every way a model folder can be wrong is a clear error naming the file and
//! the problem, never a panic.

mod common;

use common::{assert_rows_close, Reference};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use shardline::backend::cpu::CpuBackend;
use shardline::backend::DType;
use shardline::generation::Generator;
use shardline::loader::LoadFormat;
use shardline::model_dir::{self, ModelOptions, OpenError};
use std::collections::HashMap;
use std::path::Path;

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn fixture_tensors(name: &str) -> Tensors {
    let bytes = std::fs::read(common::model_dir(name).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of tiny-gqa in a temp folder, with `edit` applied to its tensors and config.
fn variant(edit_tensors: impl FnOnce(&mut Tensors), edit_config: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = fixture_tensors("tiny-gqa");
    edit_tensors(&mut tensors);
    write_safetensors(&dir.path().join("model.safetensors"), &tensors);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::model_dir("tiny-gqa").join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn open_err(dir: &Path) -> String {
    match model_dir::open(CpuBackend::default(), &common::options(dir)) {
        Ok(_) => panic!("{} loaded, but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn prompt_logits(options: &ModelOptions, ids: &[u32]) -> Vec<f32> {
    let loaded = model_dir::open(CpuBackend::default(), options).unwrap();
    Generator::new(loaded.model, 256).unwrap().extend(ids, true).unwrap()
}

#[test]
fn a_sharded_copy_loads_and_gives_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = fixture_tensors("tiny-gqa");
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = HashMap::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        write_safetensors(&dir.path().join(file), part);
        weight_map.extend(part.iter().map(|t| (t.0.clone(), file.to_string())));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(common::model_dir("tiny-gqa").join("config.json"), dir.path().join("config.json")).unwrap();

    let reference = Reference::open("tiny-gqa");
    let ids = reference.ids("prompt2.input_ids");
    let (_, vocab, want) = reference.matrix("prompt2.logits");
    let logits = prompt_logits(&common::options(dir.path()), &ids);
    assert_rows_close(&logits, &want, vocab, 1e-4, "sharded tiny-gqa");
}

#[test]
fn dummy_weights_need_only_a_config_and_are_deterministic_by_seed() {
    let config = common::model_dir("tiny-gqa").join("config.json");
    let dummy = |seed| ModelOptions {
        model: config.clone(),
        load_format: LoadFormat::Dummy,
        seed,
        ..common::options(&config)
    };
    let ids = [5, 17, 300, 2];
    let a = prompt_logits(&dummy(1), &ids);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, prompt_logits(&dummy(1), &ids));
    assert_ne!(a, prompt_logits(&dummy(2), &ids));
}

#[test]
fn f16_and_bf16_weights_run_the_same_model_as_f32_to_their_precision() {
    let config = common::model_dir("tiny-mqa128").join("config.json");
    let ids = [3, 99, 512, 7, 1000];
    let logits = |dtype| {
        let options = ModelOptions {
            model: config.clone(),
            load_format: LoadFormat::Dummy,
            seed: 3,
            dummy_dtype: dtype,
        };
        prompt_logits(&options, &ids)
    };
    let exact = logits(DType::F32);
    let vocab = 1024;
    assert_rows_close(&logits(DType::F16), &exact, vocab, 2e-3, "f16 weights");
    assert_rows_close(&logits(DType::BF16), &exact, vocab, 2e-2, "bf16 weights");
}

#[test]
fn a_missing_tensor_is_named_with_its_file() {
    let dir = variant(|t| t.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight"), |_| {});
    let err = open_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("\"model.layers.1.mlp.up_proj.weight\" is missing"),
        "{err}"
    );
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes() {
    let dir = variant(|_| {}, |c| c["intermediate_size"] = 384.into());
    let err = open_err(dir.path());
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[512, 256]") && err.contains("[384, 256]"),
        "{err}"
    );
}

#[test]
fn an_unsupported_dtype_is_named() {
    let dir = variant(
        |t| {
            let norm = t.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
            norm.1 = Dtype::I32;
            norm.3 = vec![0; 4 * norm.2.iter().product::<usize>()];
        },
        |_| {},
    );
    let err = open_err(dir.path());
    assert!(
        err.contains("\"model.norm.weight\" has dtype I32") && err.contains("bf16, f16 and f32"),
        "{err}"
    );
}

#[test]
fn an_unsupported_architecture_is_named() {
    let dir = variant(
        |_| {},
        |c| {
            c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
            c["model_type"] = "llama".into();
        },
    );
    let err = open_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("unsupported architecture \"LlamaForCausalLM\""),
        "{err}"
    );
}

#[test]
fn an_invalid_head_layout_is_a_config_error() {
    let dir = variant(|_| {}, |c| c["num_key_value_heads"] = 3.into());
    let err = open_err(dir.path());
    assert!(
        err.contains("num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        "{err}"
    );
}

#[test]
fn a_folder_without_weights_or_config_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("config.json") && err.contains("No such file"), "{err}");
    std::fs::copy(common::model_dir("tiny-gqa").join("config.json"), dir.path().join("config.json")).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("no weights found") && err.contains("--load-format dummy"), "{err}");
    let err = model_dir::open(CpuBackend::default(), &common::options(&dir.path().join("nope")))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no such model folder"), "{err}");
}

#[test]
fn corrupt_and_truncated_files_are_reported_not_panicked_on() {
    let dir = variant(|_| {}, |_| {});
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
    std::fs::write(&file, b"this is not a checkpoint").unwrap();
    assert!(open_err(dir.path()).contains("not a valid safetensors file"));
}

#[test]
fn a_shard_index_naming_a_missing_file_names_it() {
    let dir = variant(|_| {}, |_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("model-00009-of-00009.safetensors"), "{err}");
}

#[test]
fn a_broken_tokenizer_is_an_error_not_a_silent_fallback() {
    let dir = variant(|_| {}, |_| {});
    std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
    let err = model_dir::open(CpuBackend::default(), &common::options(dir.path())).err().unwrap();
    assert!(
        matches!(err, OpenError::Tokenizer(_)) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );
}

#[test]
fn a_rank_reads_its_slice_straight_from_the_mapped_file() {
    use shardline::loader::{SafetensorsCheckpoint, WeightSource};
    let source = SafetensorsCheckpoint::open(&common::model_dir("tiny-gqa")).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let shape = [256, 512];
    let whole = source.tensor(name, &shape).unwrap();
    let slice = source.tensor_slice(name, &shape, 3..70, Some(128..384)).unwrap();
    assert_eq!(slice.shape, vec![67, 256]);
    assert_eq!(slice.bytes, whole.slice_rows(3..70).slice_cols(128..384).bytes);
    let rows = source
        .tensor_slice("model.layers.0.self_attn.q_proj.bias", &[256], 64..128, None)
        .unwrap();
    assert_eq!(
        rows.to_f32(),
        source.tensor("model.layers.0.self_attn.q_proj.bias", &[256]).unwrap().to_f32()[64..128]
    );
    let wrong = source.tensor_slice(name, &[512, 256], 0..1, None).unwrap_err().to_string();
    assert!(wrong.contains("shape"), "{wrong}");
}
