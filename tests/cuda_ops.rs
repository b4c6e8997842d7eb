//! Op-by-op parity of the CUDA backend with the CPU backend on random
//! inputs: the same weights and activations go to both, and each output row
//! must agree within a relative bound set by what the GPU path rounds (f32
//! paths 1e-5; bf16 activations into cuBLAS and the bf16 KV cache 1e-2).
//! Every output buffer starts as NaN, so an element a kernel leaves
//! unwritten fails the finite check. The sampler has its own file,
//! `tests/cuda_sampling.rs`. Skips, saying so, where no GPU is visible.

mod common;

use common::ops::{activations, assert_close, batch_of, gpu, random, scaled_weight, weight, EXACT};
use shardline::backend::cpu::{CpuBackend, CpuTensor};
use shardline::backend::cuda::{nccl, CudaBackend, CudaTensor};
use shardline::backend::{
    AttentionSpec, Backend, DType, HostStaging, HostTensor, KvCacheShape, PagedAttentionMeta, RmsNorm, StepInputs, PREVIOUS_SAMPLE,
};
use shardline::parallel::Communicator;
use shardline::sampling::RowSampling;

const BF16_ROUNDED: f64 = 1e-2;

/// RMSNorm by a random weight of `cols` on both devices.
fn norm_weights(cpu: &CpuBackend, gpu: &CudaBackend, cols: usize, seed: u64) -> (WeightOf<CpuBackend>, WeightOf<CudaBackend>) {
    let norm = weight(&[cols], DType::BF16, seed);
    (cpu.load_weight(norm.clone()).unwrap(), gpu.load_weight(norm).unwrap())
}

type WeightOf<B> = <B as Backend>::Weight;

fn normed<W>(weight: &W) -> RmsNorm<'_, W> {
    RmsNorm { weight, eps: 1e-6 }
}

/// The bound a product of `n` tokens meets against the CPU's: cuBLAS
/// multiplies bf16 weights by bf16 activations, `rounded` times over.
fn product_tolerance(gpu: &CudaBackend, n: usize, dtype: DType, rounded: f64) -> f64 {
    match (gpu.through_matvec(n), dtype) {
        (false, DType::BF16) => rounded * BF16_ROUNDED,
        _ => EXACT,
    }
}

/// Each token count, with the mat-vec kernels on as a backend starts, and
/// those within their reach again with every product through cuBLAS.
fn both_ways(gpu: &mut CudaBackend, counts: &[usize], mut check: impl FnMut(&CudaBackend, usize)) {
    for &n in counts {
        check(gpu, n);
        if gpu.through_matvec(n) {
            gpu.through_cublas(|gpu| check(gpu, n));
        }
    }
}

#[test]
fn linear_matches_for_every_batch_size_dtype_and_bias() {
    let Some(mut gpu) = gpu() else { return };
    let cpu = CpuBackend::default();
    // Matvec for up to 8 tokens, cuBLAS above (and below, switched). The
    // mat-vec's steps of 256 weights: whole, partial with and without a
    // lane's second run of 4 (200, 100, 896, 2824), or scalar (98: rows not
    // 4-weight aligned).
    for (inner, outs) in [(256, 96), (100, 33), (200, 24), (98, 20), (896, 4864), (2824, 40)] {
        for dtype in [DType::BF16, DType::F32] {
            let w = weight(&[outs, inner], dtype, 1);
            let b = weight(&[outs], DType::BF16, 2);
            let (cw, gw) = (cpu.load_weight(w.clone()).unwrap(), gpu.load_weight(w).unwrap());
            let (cb, gb) = (cpu.load_weight(b.clone()).unwrap(), gpu.load_weight(b).unwrap());
            both_ways(&mut gpu, &[1, 3, 8, 9, 37], |gpu, n| {
                let (cx, gx) = activations(gpu, n, inner, 3 + n as u64);
                let tolerance = product_tolerance(gpu, n, dtype, 1.0);
                for bias in [false, true] {
                    let want = cpu.linear(&cx, &cw, bias.then_some(&cb)).unwrap();
                    let got = gpu.linear(&gx, &gw, bias.then_some(&gb)).unwrap();
                    let what = format!("linear [{n}, {inner}]·[{outs}, {inner}]ᵀ {dtype} bias={bias}");
                    assert_close(&want, gpu, &got, tolerance, &what);
                }
                // Added into a residual stream of about the product's size.
                let (mut c_res, mut g_res) = activations(gpu, n, outs, 50 + n as u64);
                cpu.add_linear(&mut c_res, &cx, &cw).unwrap();
                gpu.add_linear(&mut g_res, &gx, &gw).unwrap();
                let what = format!("add_linear [{n}, {inner}]·[{outs}, {inner}]ᵀ {dtype}");
                assert_close(&c_res, gpu, &g_res, tolerance, &what);
            });
        }
    }
}

#[test]
fn with_the_mat_vec_off_even_one_token_multiplies_through_cublas() {
    let Some(mut gpu) = gpu() else { return };
    let w = gpu.load_weight(weight(&[96, 256], DType::BF16, 1)).unwrap();
    let (_, x) = activations(&gpu, 1, 256, 4);
    let product = |gpu: &CudaBackend| {
        let mut out = Vec::new();
        gpu.to_host(&gpu.linear(&x, &w, None).unwrap(), &mut out).unwrap();
        out
    };
    let matvec = product(&gpu);
    let (cublas, through_matvec) = gpu.through_cublas(|gpu| (product(gpu), gpu.through_matvec(1)));
    assert!(!through_matvec);
    // cuBLAS takes the activations rounded to bf16, the mat-vec as they are.
    assert_ne!(cublas, matvec);
    assert_eq!(product(&gpu), matvec);
}

#[test]
fn swiglu_matches_for_every_batch_size_and_dtype() {
    let Some(mut gpu) = gpu() else { return };
    let cpu = CpuBackend::default();
    // The fused gate/up mat-vec for up to 8 tokens (whole, partial and
    // scalar steps, as for linear), cuBLAS and the SwiGLU kernel above (and
    // below, switched).
    for (inner, inter) in [(256, 48), (100, 17), (200, 12), (98, 10), (896, 4864), (2824, 20)] {
        for dtype in [DType::BF16, DType::F32] {
            let w = weight(&[2 * inter, inner], dtype, 13);
            let (cw, gw) = (cpu.load_weight(w.clone()).unwrap(), gpu.load_weight(w).unwrap());
            let (cn, gn) = norm_weights(&cpu, &gpu, inner, 12);
            both_ways(&mut gpu, &[1, 3, 8, 9, 37], |gpu, n| {
                let (cx, gx) = activations(gpu, n, inner, 14 + n as u64);
                // Through cuBLAS the gate and the up product each carry
                // the bf16 rounding of the activations, and SwiGLU multiplies them.
                let tolerance = product_tolerance(gpu, n, dtype, 2.0);
                let want = cpu.swiglu(&cx, normed(&cn), &cw).unwrap();
                let what = format!("swiglu [{n}, {inner}] with gate_up [{}, {inner}] {dtype}", 2 * inter);
                assert_close(&want, gpu, &gpu.swiglu(&gx, normed(&gn), &gw).unwrap(), tolerance, &what);
            });
        }
    }
}

#[test]
fn the_down_projection_reads_swiglus_bf16_output_and_never_a_stale_one() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend::default();
    // Past 8 tokens with bf16 weights the SwiGLU kernel also writes its
    // output rounded to bf16, which the down projection's GEMM reads.
    let (inner, inter, n) = (256, 48, 37);
    let load = |w: HostTensor| (cpu.load_weight(w.clone()).unwrap(), gpu.load_weight(w).unwrap());
    let (c_gate_up, g_gate_up) = load(weight(&[2 * inter, inner], DType::BF16, 13));
    let (c_down, g_down) = load(weight(&[inner, inter], DType::BF16, 15));
    let (cn, gn) = norm_weights(&cpu, &gpu, inner, 12);
    let (cx, gx) = activations(&gpu, n, inner, 16);
    let mut c_act = cpu.swiglu(&cx, normed(&cn), &c_gate_up).unwrap();
    let mut g_act = gpu.swiglu(&gx, normed(&gn), &g_gate_up).unwrap();
    let down = |c: &CpuTensor, g: &CudaTensor, what: &str| {
        let want = cpu.linear(c, &c_down, None).unwrap();
        assert_close(&want, &gpu, &gpu.linear(g, &g_down, None).unwrap(), 4.0 * BF16_ROUNDED, what);
    };
    down(&c_act, &g_act, "the down projection of SwiGLU's output");
    // Changed in place, the activations are what the product reads: no
    // rounded copy of the old values.
    let shift: Vec<f32> = random(n * inter, 17).iter().map(|v| 1000.0 * v).collect();
    let mut g_shift = gpu.zeros(n, inter).unwrap();
    g_shift.copy_from_host(&shift).unwrap();
    cpu.add_assign(&mut c_act, &CpuTensor::new(shift, n, inter)).unwrap();
    gpu.add_assign(&mut g_act, &g_shift).unwrap();
    down(&c_act, &g_act, "the down projection after an add into SwiGLU's output");
}

#[test]
fn norms_embedding_and_row_ops_match() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend::default();
    let (rows, cols) = (7, 300);
    let norm = weight(&[cols], DType::BF16, 4);
    let (cn, gn) = (cpu.load_weight(norm.clone()).unwrap(), gpu.load_weight(norm).unwrap());
    let (cx, gx) = activations(&gpu, rows, cols, 5);
    let (cy, gy) = activations(&gpu, rows, cols, 6);
    assert_close(
        &cpu.rms_norm(&cx, &cn, 1e-6).unwrap(),
        &gpu,
        &gpu.rms_norm(&gx, &gn, 1e-6).unwrap(),
        EXACT,
        "rms_norm",
    );

    let (mut c_sum, mut g_sum) = (cx.clone(), activations(&gpu, rows, cols, 5).1);
    cpu.add_assign(&mut c_sum, &cy).unwrap();
    gpu.add_assign(&mut g_sum, &gy).unwrap();
    assert_close(&c_sum, &gpu, &g_sum, EXACT, "add_assign");

    let picked = batch_of(&[0; 7], &[6, 0, 3, 3], vec![]);
    let inputs = picked.inputs(&picked.token_ids, true);
    let (c_step, g_step) = (cpu.prepare_step(inputs).unwrap(), gpu.prepare_step(inputs).unwrap());
    let want = cpu.final_norm(&cx, &c_step, &cn, 1e-6).unwrap();
    let got = gpu.final_norm(&gx, &g_step, &gn, 1e-6).unwrap();
    assert_close(&want, &gpu, &got, EXACT, "final_norm");

    for dtype in [DType::BF16, DType::F32] {
        let table = weight(&[50, cols], dtype, 8);
        let (ct, gt) = (cpu.load_weight(table.clone()).unwrap(), gpu.load_weight(table).unwrap());
        let ids = batch_of(&[3, 49, 0, 3], &[], vec![]);
        let inputs = ids.inputs(&ids.token_ids, true);
        let what = format!("embedding {dtype}");
        assert_close(
            &cpu.embedding(&ct, &cpu.prepare_step(inputs).unwrap(), 0..50).unwrap(),
            &gpu,
            &gpu.embedding(&gt, &gpu.prepare_step(inputs).unwrap(), 0..50).unwrap(),
            EXACT,
            &what,
        );
    }
    let outside = batch_of(&[50], &[], vec![]);
    let step = gpu.prepare_step(outside.inputs(&outside.token_ids, true)).unwrap();
    assert!(gpu
        .embedding(&gpu.load_weight(weight(&[50, cols], DType::BF16, 8)).unwrap(), &step, 0..50)
        .is_err());

    // Tokens the last sample left on the device (greedy: 7, then 33), read
    // as rows of a rank's slice of ids 20..40 (its 21st row the zero row).
    let values: Vec<f32> = (0..2 * 50).map(|i| if i == 7 || i == 50 + 33 { 5.0 } else { 0.0 }).collect();
    let sampled = batch_of(&[0, 0], &[0, 1], vec![RowSampling::greedy(); 2]);
    let inputs = sampled.inputs(&sampled.token_ids, true);
    let (mut c_logits, mut g_logits) = (CpuTensor::new(values.clone(), 2, 50), gpu.zeros(2, 50).unwrap());
    g_logits.copy_from_host(&values).unwrap();
    cpu.sample(&mut c_logits, &mut cpu.prepare_step(inputs).unwrap()).unwrap();
    gpu.sample(&mut g_logits, &mut gpu.prepare_step(inputs).unwrap()).unwrap();
    let slice = weight(&[21, cols], DType::BF16, 9);
    let table_row = |r: usize| slice.to_f32()[r * cols..(r + 1) * cols].to_vec();
    let (ct, gt) = (cpu.load_weight(slice.clone()).unwrap(), gpu.load_weight(slice.clone()).unwrap());
    let ahead = batch_of(&[PREVIOUS_SAMPLE | 1, 4, PREVIOUS_SAMPLE], &[], vec![]);
    let inputs = ahead.inputs(&ahead.token_ids, true);
    let want = cpu.embedding(&ct, &cpu.prepare_step(inputs).unwrap(), 20..40).unwrap();
    assert_eq!(want.row(0), table_row(13), "token 33 is the slice's row 13");
    assert_eq!(want.row(2), table_row(20), "token 7 is another rank's: the last row");
    let got = gpu.embedding(&gt, &gpu.prepare_step(inputs).unwrap(), 20..40).unwrap();
    assert_close(&want, &gpu, &got, EXACT, "embedding of the previous sample's tokens");
    let unsampled = batch_of(&[PREVIOUS_SAMPLE | 2], &[], vec![]);
    let step = cpu.prepare_step(unsampled.inputs(&unsampled.token_ids, true)).unwrap();
    assert!(cpu
        .embedding(&ct, &step, 20..40)
        .unwrap_err()
        .to_string()
        .contains("row 2 of the previous sample"));

    // Three ranks' slices of a 10-token vocabulary (4 each, the last short),
    // each with its padding column, gathered rank after rank.
    let (c_all, g_all) = activations(&gpu, 3 * 2, 5, 12);
    let want = cpu.lay_out_vocab(&c_all, 3, 4, 10).unwrap();
    assert_close(&want, &gpu, &gpu.lay_out_vocab(&g_all, 3, 4, 10).unwrap(), EXACT, "lay_out_vocab");
    assert!(gpu.lay_out_vocab(&g_all, 3, 4, 13).is_err());

    let zeros = gpu.zeros(3, 5).unwrap();
    assert_close(&CpuTensor::new(vec![0.0; 15], 3, 5), &gpu, &zeros, EXACT, "zeros");
}

/// One layer's attention over a batch mixing a fresh prefill, a chunk
/// after a cached prefix, and decode steps (one after 300 tokens, whose
/// keys the kernel splits across blocks), with scattered blocks; then a
/// step of decodes alone (blocks of one warp, as a decode graph runs them,
/// and few enough tokens for the qkv mat-vec to turn q and k and write the
/// cache itself). The qkv projection is `hidden` wide, of `dtype` weights.
fn attention_case(gpu: &CudaBackend, (heads, kv_heads, head_dim): (usize, usize, usize), hidden: usize, dtype: DType, bias: bool) {
    let cpu = CpuBackend::default();
    let spec = AttentionSpec {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    let block_size = 16;
    let shape = KvCacheShape {
        num_blocks: 70,
        block_size,
        num_kv_heads: kv_heads,
        head_dim,
    };
    let long: Vec<u32> = (12..31).chain([31]).rev().collect();
    let longer: Vec<u32> = (32..70).collect();
    let tables = [vec![7, 3], vec![2, 9], vec![11, 0, 5], long, longer];
    // Each span: (sequence, first new position, context after the step).
    let meta_for = |spans: &[(usize, usize, usize)]| {
        let mut meta = PagedAttentionMeta {
            block_size,
            ..Default::default()
        };
        let mut positions = Vec::new();
        for &(s, start, end) in spans {
            for p in start..end {
                positions.push(p as u32);
                meta.slot_mapping
                    .push(tables[s][p / block_size] * block_size as u32 + (p % block_size) as u32);
            }
            meta.query_lens.push(end - start);
            meta.context_lens.push(end);
            meta.block_tables.push(tables[s].clone());
        }
        (positions, meta)
    };
    let width = (heads + 2 * kv_heads) * head_dim;
    let table = weight(&[640, head_dim], DType::F32, 9);
    let (c_rope, g_rope) = (cpu.load_weight(table.clone()).unwrap(), gpu.load_weight(table).unwrap());
    // q, k and v of about the size of ±1 activations, as a trained model's.
    let (w, b) = (
        scaled_weight(&[width, hidden], dtype, 7, 1.0 / 16.0),
        weight(&[width], DType::F32, 8),
    );
    let (c_w, g_w) = (cpu.load_weight(w.clone()).unwrap(), gpu.load_weight(w).unwrap());
    let (c_b, g_b) = (cpu.load_weight(b.clone()).unwrap(), gpu.load_weight(b).unwrap());
    let (c_b, g_b) = (bias.then_some(&c_b), bias.then_some(&g_b));
    let (c_norm, g_norm) = norm_weights(&cpu, gpu, hidden, 11);
    let o = scaled_weight(&[hidden, heads * head_dim], dtype, 12, 1.0 / 16.0);
    let (c_o, g_o) = (cpu.load_weight(o.clone()).unwrap(), gpu.load_weight(o).unwrap());
    let mut c_cache = cpu.alloc_kv_cache(shape).unwrap();
    let mut g_cache = gpu.alloc_kv_cache(shape).unwrap();
    // A short prompt alone (one split of its keys), the cached prefixes
    // (17, 39 and 300 tokens), then the mixed batch (split keys) and
    // decode; then one sequence's decode at 601 tokens, whose keys split
    // more ways than a lane of the merge loads at once.
    for (round, spans) in [
        vec![(0, 0, 12)],
        vec![(0, 12, 12), (1, 0, 17), (2, 0, 39), (3, 0, 300)],
        vec![(0, 12, 16), (1, 17, 20), (2, 39, 40), (3, 300, 301)],
        vec![(0, 16, 17), (1, 20, 21), (2, 40, 41), (3, 301, 302)],
        vec![(4, 0, 600)],
        vec![(4, 600, 601)],
    ]
    .iter()
    .enumerate()
    {
        let (positions, meta) = meta_for(spans);
        let (cx, gx) = activations(gpu, positions.len(), hidden, 10 + round as u64);
        let ids = vec![0; positions.len()];
        let inputs = StepInputs {
            token_ids: &ids,
            positions: &positions,
            attn: &meta,
            logit_rows: &[],
            sampling: &[],
        };
        let c_step = cpu.prepare_step(inputs).unwrap();
        let g_step = gpu.prepare_step(inputs).unwrap();
        let cq = cpu
            .project_qkv(&cx, normed(&c_norm), &c_w, c_b, &mut c_cache, &c_step, &c_rope, &spec)
            .unwrap();
        let gq = gpu
            .project_qkv(&gx, normed(&g_norm), &g_w, g_b, &mut g_cache, &g_step, &g_rope, &spec)
            .unwrap();
        let what = format!("heads={heads} kv_heads={kv_heads} head_dim={head_dim} hidden={hidden} {dtype} bias={bias} round {round}");
        let projected = product_tolerance(gpu, positions.len(), dtype, 1.0);
        assert_close(&cq, gpu, &gq, projected, &format!("project_qkv {what}"));
        let want = cpu.paged_attention(&cq, &c_cache, &c_step, &spec).unwrap();
        let got = gpu.paged_attention(&gq, &g_cache, &g_step, &spec).unwrap();
        assert_close(&want, gpu, &got, BF16_ROUNDED, &format!("paged_attention {what}"));
        // Where o_proj multiplies through cuBLAS, the attention kernel also
        // writes its output rounded to bf16, which the GEMM reads.
        let o_want = cpu.linear(&want, &c_o, None).unwrap();
        let o_got = gpu.linear(&got, &g_o, None).unwrap();
        assert_close(&o_want, gpu, &o_got, 4.0 * BF16_ROUNDED, &format!("o_proj of the attention {what}"));
    }
}

#[test]
fn qkv_projection_and_paged_attention_match_for_prefill_chunks_and_decode() {
    let Some(mut gpu) = gpu() else { return };
    // Projections of whole and partial mat-vec steps, and of scalar ones (102).
    attention_case(&gpu, (4, 2, 64), 264, DType::BF16, true);
    // Decode's products through cuBLAS too, and its attention's rounded output.
    gpu.through_cublas(|gpu| attention_case(gpu, (4, 2, 64), 264, DType::BF16, true));
    attention_case(&gpu, (2, 1, 128), 100, DType::F32, false);
    attention_case(&gpu, (14, 2, 64), 200, DType::F32, true);
    attention_case(&gpu, (28, 4, 128), 264, DType::BF16, true);
    attention_case(&gpu, (2, 2, 32), 102, DType::BF16, false);
    // MQA: 32 query heads share a KV head, more rows than a block holds at once.
    attention_case(&gpu, (32, 1, 64), 264, DType::BF16, true);
}

#[test]
fn shape_mismatches_are_errors_not_faults() {
    let Some(gpu) = gpu() else { return };
    let w = gpu.load_weight(weight(&[8, 16], DType::BF16, 1)).unwrap();
    let (_, x) = activations(&gpu, 2, 15, 2);
    assert!(gpu.linear(&x, &w, None).is_err());
    let norm = gpu.load_weight(weight(&[15], DType::F32, 3)).unwrap();
    let short_norm = gpu.load_weight(weight(&[14], DType::F32, 3)).unwrap();
    assert!(gpu.swiglu(&x, normed(&norm), &w).is_err());
    let odd = gpu.load_weight(weight(&[7, 15], DType::BF16, 1)).unwrap();
    assert!(gpu.swiglu(&x, normed(&norm), &odd).is_err());
    let even = gpu.load_weight(weight(&[8, 15], DType::BF16, 1)).unwrap();
    assert!(gpu.swiglu(&x, normed(&short_norm), &even).is_err());
    let (_, y) = activations(&gpu, 3, 15, 3);
    let (_, mut z) = activations(&gpu, 2, 15, 4);
    assert!(gpu.add_assign(&mut z, &y).is_err());
    // The residual must be the product's shape: [2, 8] here.
    assert!(gpu.add_linear(&mut z, &x, &even).is_err());
    let three = batch_of(&[0; 3], &[2], vec![]);
    let step = gpu.prepare_step(three.inputs(&three.token_ids, true)).unwrap();
    assert!(gpu.final_norm(&x, &step, &norm, 1e-6).is_err());
    let two = batch_of(&[0; 2], &[1], vec![]);
    let step = gpu.prepare_step(two.inputs(&two.token_ids, true)).unwrap();
    assert!(gpu.final_norm(&x, &step, &short_norm, 1e-6).is_err());
    assert!(gpu.prepare_step(batch_of(&[0; 2], &[2], vec![]).inputs(&[0; 2], true)).is_err());
    // A head size the attention kernel has no variant for (32, 64 or 128).
    let spec = AttentionSpec {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 48,
        scale: 1.0,
    };
    let shape = KvCacheShape {
        num_blocks: 1,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 48,
    };
    let one = batch_of(&[0], &[], vec![]);
    let step = gpu.prepare_step(one.inputs(&one.token_ids, true)).unwrap();
    let (_, qkv) = activations(&gpu, 1, 4 * 48, 5);
    let mut cache = gpu.alloc_kv_cache(shape).unwrap();
    let error = gpu
        .paged_attention(&qkv, &cache, &step, &spec)
        .err()
        .expect("head_dim 48 is refused");
    assert!(error.to_string().contains("32, 64 or 128"), "{error}");
    // A qkv projection whose rows are not the heads', whose input is not
    // the weight's width, or whose norm is not the input's.
    let table = gpu.load_weight(weight(&[4, 48], DType::F32, 6)).unwrap();
    let (_, hidden) = activations(&gpu, 1, 16, 7);
    let norm_16 = gpu.load_weight(weight(&[16], DType::F32, 3)).unwrap();
    for (rows, cols, norm) in [(5 * 48, 16, &norm_16), (4 * 48, 15, &norm_16), (4 * 48, 16, &norm)] {
        let w = gpu.load_weight(weight(&[rows, cols], DType::BF16, 8)).unwrap();
        let error = gpu
            .project_qkv(&hidden, normed(norm), &w, None, &mut cache, &step, &table, &spec)
            .err()
            .expect("a mismatched projection is refused");
        assert!(error.to_string().contains("project_qkv"), "{error}");
    }
}

#[test]
fn nccl_with_one_rank_reduces_and_gathers_to_the_input() {
    let Some(gpu) = gpu() else { return };
    if !nccl::nccl_available() {
        panic!("a GPU is visible but libnccl.so cannot be loaded (tests/gpu-check.sh links it)");
    }
    let comm = nccl::NcclComm::join(&gpu, 0, 1, nccl::new_id().unwrap()).unwrap();
    assert_eq!((comm.rank(), comm.size()), (0, 1));
    let (cx, mut gx) = activations(&gpu, 3, 40, 11);
    comm.all_reduce_sum(&mut gx).unwrap();
    assert_close(&cx, &gpu, &gx, f64::EPSILON, "all_reduce over one rank");
    let mut gathered = gpu.zeros(3, 40).unwrap();
    comm.all_gather(&gx, &mut gathered).unwrap();
    assert_close(&cx, &gpu, &gathered, f64::EPSILON, "all_gather over one rank");
    assert!(comm.all_gather(&gx, &mut gpu.zeros(2, 40).unwrap()).is_err());
    comm.barrier().unwrap();
}
