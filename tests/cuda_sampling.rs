//! The CUDA sampler (`kernels/sampling.cu`) against the host's reference
//! (`src/sampling/choose.rs`): on the same logits and rows, the device must
//! pick the host's token for every row and leave the same adjusted logits.
//! Rows of every kind: greedy, each cut alone and together, ties, the
//! bands a cut narrows its search to and their edges, penalties, and the
//! coming tokens of a step planned ahead. Skips, saying so, where no GPU is
//! visible.

mod common;

use common::ops::{assert_close, batch_of, gpu, random, weight, EXACT};
use shardline::backend::cpu::{CpuBackend, CpuTensor};
use shardline::backend::cuda::CudaBackend;
use shardline::backend::{Backend, DType, HostStaging, PREVIOUS_SAMPLE};
use shardline::rng::Rng;
use shardline::sampling::{LogitAdjustment, RowSampling};

/// Samples `rows` of `values` ([rows, vocab]) on both devices after an
/// embedding of `ids` (which resolves the rows' coming tokens on the GPU):
/// the GPU must pick the host's token for every row and leave the same
/// adjusted logits.
fn assert_host_picks_after(
    cpu: &CpuBackend,
    gpu: &CudaBackend,
    ids: &[u32],
    rows: &[RowSampling],
    values: &[f32],
    vocab: usize,
    what: &str,
) {
    let n = rows.len();
    let mut cpu_logits = CpuTensor::new(values.to_vec(), n, vocab);
    let mut gpu_logits = gpu.zeros(n, vocab).unwrap();
    gpu_logits.copy_from_host(values).unwrap();
    let batch = batch_of(ids, &(0..n as u32).collect::<Vec<_>>(), rows.to_vec());
    let inputs = batch.inputs(&batch.token_ids, true);
    let (mut c_step, mut g_step) = (cpu.prepare_step(inputs).unwrap(), gpu.prepare_step(inputs).unwrap());
    let table = gpu.load_weight(weight(&[1, 8], DType::F32, 3)).unwrap();
    gpu.embedding(&table, &g_step, 0..1).unwrap();
    cpu.sample(&mut cpu_logits, &mut c_step).unwrap();
    gpu.sample(&mut gpu_logits, &mut g_step).unwrap();
    let want = cpu.fetched(cpu.fetch_sampled(&c_step).unwrap(), n).unwrap();
    let got = gpu.fetched(gpu.fetch_sampled(&g_step).unwrap(), n).unwrap();
    for (r, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(
            w,
            g,
            "{what}, vocab {vocab}, row {r}: {:?}",
            RowSampling {
                adjustments: vec![],
                ..rows[r].clone()
            }
        );
    }
    assert_close(
        &cpu_logits,
        gpu,
        &gpu_logits,
        EXACT,
        &format!("adjusted logits, {what}, vocab {vocab}"),
    );
}

/// [`assert_host_picks_after`] a step of known tokens.
fn assert_host_picks(gpu: &CudaBackend, rows: &[RowSampling], values: &[f32], vocab: usize, what: &str) {
    assert_host_picks_after(&CpuBackend::default(), gpu, &vec![0; rows.len()], rows, values, vocab, what);
}

/// Rows of every kind the sampler meets: greedy with and without penalties,
/// each cut alone and together, ties at the cuts (coarse logits), rows
/// whose last id stands out (the end of the last warp's part of a row), a
/// Qwen2-sized vocabulary and small ones (1,025 ids: 16 warps' parts of
/// whole 32-id loads must round up to cover it). The device must pick the
/// host's token and leave the same adjusted logits.
#[test]
fn sampling_picks_the_tokens_the_host_picks() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::seeded(21);
    for vocab in [151_936usize, 1000, 1025] {
        let mut rows = Vec::new();
        for case in 0..48 {
            let (temperature, top_k, top_p, min_p) = [
                (0.0, 0, 1.0, 0.0),
                (1.0, 0, 1.0, 0.0),
                (0.7, 40, 1.0, 0.0),
                (1.0, 0, 0.9, 0.0),
                (1.3, 0, 1.0, 0.05),
                (0.8, 50, 0.95, 0.02),
                (1.0, 1, 1.0, 0.0),
                (2.0, 0, 0.3, 0.0),
            ][case % 8];
            // None; a token alone each (a repetition penalty alone, over
            // more ids than 512 threads take 4 at a time); or bias and
            // counts too.
            let adjustments = match case % 3 {
                0 => Vec::new(),
                1 => (0..vocab as u32)
                    .step_by(vocab.div_ceil(3000))
                    .map(|t| LogitAdjustment::from_parts(t, 0.0, 0, true))
                    .collect(),
                _ => vec![
                    LogitAdjustment::from_parts(3, 2.5, 0, false),
                    LogitAdjustment::from_parts(17, -1.0, 2, true),
                    LogitAdjustment::from_parts(vocab as u32 - 1, 0.0, 1, true),
                ],
            };
            let (presence_penalty, frequency_penalty) = [(0.0, 0.0), (0.4, 0.3)][case % 2];
            rows.push(RowSampling {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty: 1.3,
                presence_penalty,
                frequency_penalty,
                adjustments,
                coming: None,
                uniform: rng.next_f32(),
            });
        }
        let mut values = random(rows.len() * vocab, 22);
        for (r, row) in values.chunks_mut(vocab).enumerate() {
            let coarse = (r / 8) % 2 == 1;
            row.iter_mut()
                .for_each(|v| *v = if coarse { (*v * 12.0).floor() } else { *v * 9.0 });
            if r % 5 == 4 {
                row[vocab - 1] = 30.0;
            }
        }
        assert_host_picks(&gpu, &rows, &values, vocab, "random rows");
    }
}

/// A step of rows that leave each other two SMs or more splits each greedy
/// row over blocks (the emulated GPU's 132 SMs: 32 a row at most, 2 a row
/// for 64 rows); the parts' maxima must merge to the host's pick.
/// Rows tie at 5 in two parts (the lower id wins), or peak at the last id,
/// or lose their peak to a penalty (each part adjusts its own ids); among
/// them, a row drawn at temperature 1 alone splits its draw (each part
/// weighs its own ids). Vocabularies of 1,040
/// and 33 ids leave the last parts empty (and 32 parts of 32 ids would miss
/// 1,040's last 16). Each step runs twice, so a count of finished parts
/// that is not set back to zero shows.
#[test]
fn greedy_rows_split_over_blocks_pick_the_hosts_token() {
    let Some(gpu) = gpu() else { return };
    for vocab in [151_936usize, 1040, 33] {
        let (first, second) = (vocab / 3, 2 * vocab / 3);
        for rows in [1, 2, 3, 8, 64] {
            for shift in 0..2 {
                let mut values = random(rows * vocab, (vocab + rows + shift) as u64);
                let sampling: Vec<RowSampling> = (0..rows)
                    .map(|r| {
                        let row = &mut values[r * vocab..(r + 1) * vocab];
                        let kind = (r + shift) % 4;
                        match kind {
                            1 => row[vocab - 1] = 5.0,
                            _ => (row[first + r % 2], row[second]) = (5.0, 5.0),
                        }
                        match kind {
                            2 => RowSampling {
                                repetition_penalty: 1.3,
                                adjustments: vec![LogitAdjustment::from_parts((first + r % 2) as u32, 0.0, 0, true)],
                                ..RowSampling::greedy()
                            },
                            3 => RowSampling {
                                temperature: 1.0,
                                uniform: 0.5,
                                ..RowSampling::greedy()
                            },
                            _ => RowSampling::greedy(),
                        }
                    })
                    .collect();
                for round in 0..2 {
                    let what = format!("{rows} rows (shift {shift}), round {round}");
                    assert_host_picks(&gpu, &sampling, &values, vocab, &what);
                }
            }
        }
    }
}

/// A step of few rows (1, 3, 8 and 64 here) splits a drawn row whose
/// top-k keeps at most 256 over blocks too, as many as leave each part
/// room for its k best among 512, and one with no top-k over every block
/// (the draw walks the parts' masses, or top-p's cut gathers the band the
/// parts' band sums choose; the parts count the ids the row's adjustments
/// change as adjusted, and the last to finish adjusts them): the draw must
/// be the host's. Each cut with a top-k, on fine and coarse logits (ties
/// at the k-th across parts), with penalties on ids of every part; a flat row
/// (each part of a Qwen2-sized row ties more than 512 at its k-th: the
/// last block then draws from the whole row alone); a top-k of 300 (one
/// block); a greedy row with penalties; rows drawn at a temperature alone,
/// fine, coarse with min-p and flat, and one with penalties (its best
/// logit, in a middle part, is penalized: a best that counted it as it
/// came would weigh every id against too high a logit); rows cut by top-p
/// alone: peaked (ids of every part lead, tied in sevens across parts: the
/// band holds them), spread (a Qwen2-sized row's band holds thousands: the
/// last block selects over the whole row), flat, peaked with a top-p too
/// near 1 for any band and a min-p, and peaked with penalties (the band
/// holds the nucleus too); rows with no top-k whose biases raise ids of
/// every part past the row's best, drawn with a min-p (which weighs
/// against the raised best) and cut by top-p, and a flat row whose biases
/// raise 600 ids into top-p's band (counted as they came, it would hold
/// none, and a gather of 600 would overrun the 512 candidates). Draws of 0
/// and 0.999 reach the first and last parts. Each step runs twice, so a count
/// of finished parts that is not set back to zero shows.
#[test]
fn drawn_rows_split_over_blocks_draw_the_hosts_token() {
    const KINDS: usize = 20;
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::seeded(41);
    for vocab in [151_936usize, 1040, 33] {
        let mut spread: Vec<u32> = (0..vocab as u32).step_by(vocab / 40 + 1).chain([vocab as u32 - 1]).collect();
        // A row's adjustments name distinct ids.
        spread.dedup();
        for (rows, shifts) in [(1, KINDS), (3, 6), (8, 3), (64, 1)] {
            for shift in 0..shifts {
                let mut values = random(rows * vocab, (vocab + 10 * rows + shift) as u64);
                let sampling: Vec<RowSampling> = (0..rows)
                    .map(|r| {
                        let kind = (r + rows * shift) % KINDS;
                        let (temperature, top_k, top_p, min_p) = [
                            (0.7, 20, 0.8, 0.0),
                            (1.0, 1, 1.0, 0.0),
                            (1.3, 2, 0.95, 0.05),
                            (0.8, 64, 1.0, 0.0),
                            (1.0, 256, 0.9, 0.0),
                            (0.9, 300, 0.9, 0.0),
                            (0.7, 20, 1.0, 0.0),
                            (0.0, 0, 1.0, 0.0),
                            (1.0, 0, 1.0, 0.0),
                            (1.3, 0, 1.0, 0.05),
                            (0.8, 0, 1.0, 0.0),
                            (1.0, 0, 1.0, 0.0),
                            (1.0, 0, 0.8, 0.0),
                            (1.0, 0, 0.9, 0.0),
                            (0.9, 0, 0.9, 0.0),
                            (1.0, 0, 0.9995, 0.05),
                            (0.8, 0, 0.9, 0.0),
                            (1.0, 0, 1.0, 0.05),
                            (0.9, 0, 0.9, 0.0),
                            (1.0, 0, 0.9, 0.0),
                        ][kind];
                        let row = &mut values[r * vocab..(r + 1) * vocab];
                        match kind {
                            2 | 3 | 9 => row.iter_mut().for_each(|v| *v = (*v * 12.0).floor()),
                            6 | 11 | 14 | 19 => row.fill(1.0),
                            // The best logit is one a penalty lowers, in a middle
                            // part of a row flat enough that every part's mass counts.
                            10 => row[spread[spread.len() / 2] as usize] = 3.0,
                            _ => row.iter_mut().for_each(|v| *v *= 9.0),
                        }
                        if matches!(kind, 12 | 15 | 16) {
                            for (j, &t) in spread.iter().enumerate() {
                                row[t as usize] = 12.0 - 0.05 * (j % 7) as f32;
                            }
                        }
                        let adjustments = match kind {
                            0 | 7 | 10 | 16 => spread.iter().map(|&t| LogitAdjustment::from_parts(t, 0.0, 0, true)).collect(),
                            3 => spread
                                .iter()
                                .map(|&t| LogitAdjustment::from_parts(t, 1.5, t % 3, t % 2 == 0))
                                .collect(),
                            17 | 18 => spread
                                .iter()
                                .enumerate()
                                .map(|(j, &t)| LogitAdjustment::from_parts(t, 4.0 + 0.5 * (j % 7) as f32, t % 3, t % 2 == 0))
                                .collect(),
                            19 => (0..vocab as u32)
                                .step_by((vocab / 600).max(1))
                                .take(600)
                                .map(|t| LogitAdjustment::from_parts(t, 10.0, 0, false))
                                .collect(),
                            _ => Vec::new(),
                        };
                        RowSampling {
                            temperature,
                            top_k,
                            top_p,
                            min_p,
                            repetition_penalty: 1.3,
                            presence_penalty: 0.4,
                            frequency_penalty: 0.3,
                            adjustments,
                            coming: None,
                            uniform: [0.0, 0.999, rng.next_f32()][r % 3],
                        }
                    })
                    .collect();
                for round in 0..2 {
                    let what = format!("{rows} drawn rows (shift {shift}), round {round}");
                    assert_host_picks(&gpu, &sampling, &values, vocab, &what);
                }
            }
        }
    }
}

/// The scaled distances below the best logit that a top-k or top-p cut
/// first narrows its search to (kernels/sampling.cu): 40 × 2^(j − 7).
const BAND_EDGES: [f32; 8] = [0.3125, 0.625, 1.25, 2.5, 5.0, 10.0, 20.0, 40.0];

#[test]
fn sampling_cuts_match_the_host_whichever_band_holds_what_they_keep() {
    let Some(gpu) = gpu() else { return };
    // One token at 10; a cluster at `distance` below it in scaled logits
    // (jittered within its band, or all tied), and the rest of the row
    // either past the floor or spread over every band beyond the cluster.
    // A distance past the floor leaves fewer tokens above it than k. Top-k
    // 2 then top-p 0.95 keeps both where they are close: the nucleus runs
    // to the last token top-k leaves.
    let mut distances: Vec<f32> = BAND_EDGES.iter().map(|edge| edge * 0.8).collect();
    distances.push(45.0);
    let vocab = 151_936;
    let (mut rows, mut values) = (Vec::new(), Vec::new());
    let mut rng = Rng::seeded(23);
    for (case, &distance) in distances.iter().enumerate() {
        for (cut, (temperature, top_k, top_p)) in [(0.7, 20, 1.0), (1.0, 0, 0.8), (0.7, 20, 0.8), (1.0, 2, 0.95)]
            .into_iter()
            .enumerate()
        {
            for shape in 0..2 {
                let tied = (case + cut) % 2 == 0;
                let mut row: Vec<f32> = (0..vocab)
                    .map(|_| match shape {
                        0 => 10.0 - temperature * (50.0 + 10.0 * rng.next_f32()),
                        _ => 10.0 - temperature * (distance + 0.5 + 60.0 * rng.next_f32()),
                    })
                    .collect();
                let best = (case * 7919 + cut * 104_729) % vocab;
                row[best] = 10.0;
                for j in 1..=40 {
                    let id = (best + j * 3001) % vocab;
                    let jitter = if tied { 0.0 } else { 0.1 * distance * rng.next_f32() };
                    row[id] = 10.0 - temperature * (distance + jitter);
                }
                // A draw of 0 takes the kept token of the lowest id, however light.
                for uniform in [0.0, 0.5, 0.97] {
                    rows.push(RowSampling {
                        temperature,
                        top_k,
                        top_p,
                        uniform,
                        ..RowSampling::greedy()
                    });
                    values.extend_from_slice(&row);
                }
            }
        }
    }
    assert_host_picks(&gpu, &rows, &values, vocab, "banded rows");
}

/// The float after `x`, and the one before it.
fn next_up(x: f32) -> f32 {
    match x {
        0.0 => f32::from_bits(1),
        _ if x > 0.0 => f32::from_bits(x.to_bits() + 1),
        _ => f32::from_bits(x.to_bits() - 1),
    }
}

fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

/// The least logit whose scaled value lies within `edge` of `best`'s at
/// `temperature` (as the sampler rounds both), and the float after it,
/// which must scale to the same value: a tie at the band's edge.
fn tie_at_edge(best: f32, edge: f32, temperature: f32) -> (f32, f32) {
    let reach = best / temperature - edge;
    let mut least = reach * temperature;
    while least / temperature >= reach {
        least = next_down(least);
    }
    while least / temperature < reach {
        least = next_up(least);
    }
    let after = next_up(least);
    assert_eq!(
        least / temperature,
        after / temperature,
        "no tie at {edge} below {best}, temperature {temperature}"
    );
    (least, after)
}

/// Two logits whose scaled values tie at a band's edge, or the floor's: the
/// device tests a band on the logits themselves, so the least logit that
/// scales into it must be exact, or the tie's lower id (id 0, which a draw
/// of 0 takes where it is kept) falls out while the higher one stays. At a
/// temperature of 1.9 the pair sits 1.25 below the best scaled logit (band
/// 2's edge) with one token between, so top-k 3 cuts inside the tie; at
/// 1.02 it sits at the floor, 40 below, with the rest of the row under it.
/// Both temperatures and bests were chosen where `scaled edge × temperature`
/// rounds above the tie's lower logit.
#[test]
fn sampling_keeps_both_logits_of_a_tie_at_a_band_edge() {
    let Some(gpu) = gpu() else { return };
    let vocab = 151_936;
    let (mut rows, mut values) = (Vec::new(), Vec::new());
    for (temperature, best, edge, between, rest, top_k) in [
        (1.9, 10.0, BAND_EDGES[2], Some(8.5), -50.0, 3),
        (1.02, 25.5, BAND_EDGES[7], None, -100.0, 0),
        (1.02, 25.5, BAND_EDGES[7], None, -100.0, 3),
    ] {
        let (least, after) = tie_at_edge(best, edge, temperature);
        let mut row = vec![rest; vocab];
        (row[0], row[1], row[5]) = (least, after, best);
        if let Some(between) = between {
            row[6] = between;
        }
        rows.push(RowSampling {
            temperature,
            top_k,
            uniform: 0.0,
            ..RowSampling::greedy()
        });
        values.extend_from_slice(&row);
    }
    assert_host_picks(&gpu, &rows, &values, vocab, "ties at a band's edge");
}

#[test]
fn penalties_count_the_coming_token_the_embedding_resolves() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend::default();
    let vocab = 1000;
    // The previous sample picks these (greedy over one-hot rows).
    let picked = [7u32, 3, 500, 999, 3, 42];
    let n = picked.len();
    let mut one_hot = vec![0.0; n * vocab];
    picked.iter().enumerate().for_each(|(r, &t)| one_hot[r * vocab + t as usize] = 5.0);
    let greedy = vec![RowSampling::greedy(); n];
    assert_host_picks_after(&cpu, &gpu, &vec![0; n], &greedy, &one_hot, vocab, "the previous sample");
    // Each row takes its sequence's coming token from the row after it
    // (the previous sample's rows in another order), and lists tokens 3
    // and 500: rows 0, 1 and 3 count a listed token once more, the others
    // a new one. Rows 0–2 have every penalty, and token 3 generated twice;
    // rows 3–5 a repetition penalty alone (their tokens sent alone). The
    // drawn rows 1 and 5 have no top-k (5 a top-p), so they split over every
    // block, which count the coming token as adjusted: row 1's is listed,
    // row 5's is not; both have a min-p. Row 3 has a top-k. The logits are
    // flat near the coming tokens so the penalties decide the picks.
    let ids: Vec<u32> = (0..n as u32).map(|r| PREVIOUS_SAMPLE | ((r + 1) % n as u32)).collect();
    let mut rng = Rng::seeded(31);
    let rows: Vec<RowSampling> = (0..n)
        .map(|r| RowSampling {
            temperature: [0.0, 0.8][r % 2],
            top_k: [0, 0, 0, 20, 0, 0][r],
            top_p: [1.0, 1.0, 1.0, 1.0, 1.0, 0.9][r],
            min_p: [0.0, 0.3, 0.0, 0.0, 0.0, 0.3][r],
            repetition_penalty: 1.3,
            presence_penalty: [0.4, 0.0][r / 3],
            frequency_penalty: [0.3, 0.0][r / 3],
            adjustments: match r / 3 {
                0 => vec![
                    LogitAdjustment::from_parts(3, 0.5, 2, true),
                    LogitAdjustment::from_parts(500, 0.0, 0, true),
                ],
                _ => vec![
                    LogitAdjustment::from_parts(3, 0.0, 0, true),
                    LogitAdjustment::from_parts(500, 0.0, 0, true),
                ],
            },
            coming: Some((r as u32 + 1) % n as u32),
            uniform: rng.next_f32(),
        })
        .collect();
    let mut values: Vec<f32> = random(n * vocab, 32).iter().map(|v| v * 0.2 + 2.0).collect();
    // The split rows' coming tokens lead their rows as they came, so the
    // best (which min-p weighs against) must count them adjusted.
    for r in [1, 5] {
        values[r * vocab + picked[(r + 1) % n] as usize] = 3.0;
    }
    assert_host_picks_after(&cpu, &gpu, &ids, &rows, &values, vocab, "coming tokens");
}
