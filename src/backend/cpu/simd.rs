//! Dot products of one weight row (bf16, f16 or f32) with f32 activation rows.
//!
//! This is the inner loop of every linear layer on the CPU, and batch-1 decode
//! spends nearly all its time here streaming weights from memory. Weights stay
//! in their checkpoint dtype (half the bytes of f32) and are widened in
//! registers; all sums are f32. With AVX2+FMA+F16C (checked once at run time)
//! each weight chunk is loaded once and used against up to four activation
//! rows; elsewhere a portable scalar loop gives the same results to rounding.

use half::{bf16, f16};

/// One row of a weight matrix, in its stored dtype.
#[derive(Clone, Copy)]
pub enum WeightRow<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> WeightRow<'a> {
    /// The elements in `range`.
    pub fn slice(self, range: std::ops::Range<usize>) -> WeightRow<'a> {
        match self {
            WeightRow::F32(w) => WeightRow::F32(&w[range]),
            WeightRow::Bf16(w) => WeightRow::Bf16(&w[range]),
            WeightRow::F16(w) => WeightRow::F16(&w[range]),
        }
    }
}

/// `out[j] = Σ_k w[k] · xs[j][k]` for `xs.len() <= 4` activation rows.
pub fn dot_rows(w: WeightRow<'_>, xs: &[&[f32]], out: &mut [f32]) {
    debug_assert!(xs.len() <= 4 && out.len() == xs.len());
    #[cfg(target_arch = "x86_64")]
    if avx::available() {
        // SAFETY: the CPU supports avx2, fma and f16c (checked above), and
        // every x row has the weight row's length (checked by the callers).
        unsafe { avx::dot_rows(w, xs, out) };
        return;
    }
    for (o, x) in out.iter_mut().zip(xs) {
        *o = match w {
            WeightRow::F32(w) => scalar_dot(w, x),
            WeightRow::Bf16(w) => scalar_dot(w, x),
            WeightRow::F16(w) => scalar_dot(w, x),
        };
    }
}

/// Weight rows in the prefill register tile.
pub const TILE_ROWS: usize = 3;
/// Activation rows (tokens) in the prefill register tile.
pub const TILE_TOKENS: usize = 3;

/// `out[r][t] = Σ_k w[r·len + k] · xs[t][k]`: `TILE_ROWS` consecutive weight
/// rows (`w` spans them) against `TILE_TOKENS` activation rows, the prefill
/// tile. Each 8-wide weight chunk is widened once and used for every token,
/// each activation chunk for every row: 6 loads per 9 FMAs, and the 9
/// accumulators with their operands fit the 16 ymm registers (a 4×3 tile
/// spills).
pub fn dot_tile(w: WeightRow<'_>, xs: [&[f32]; TILE_TOKENS], out: &mut [[f32; TILE_TOKENS]; TILE_ROWS]) {
    #[cfg(target_arch = "x86_64")]
    if avx::available() {
        // SAFETY: avx2, fma and f16c are present (checked above); the callers
        // pass four whole rows and activation rows of the same length.
        unsafe { avx::dot_tile(w, xs, out) };
        return;
    }
    let len = xs[0].len();
    for (r, row_out) in out.iter_mut().enumerate() {
        dot_rows(w.slice(r * len..(r + 1) * len), &xs, row_out);
    }
}

/// `Σ a[k] · b[k]` over f32 slices of equal length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0.0];
    dot_rows(WeightRow::F32(a), &[b], &mut out);
    out[0]
}

trait Widen: Copy {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

fn scalar_dot<T: Widen>(w: &[T], x: &[f32]) -> f32 {
    // Eight partial sums, as the vector path keeps, so both round alike.
    let mut acc = [0.0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += w[c * 8 + l].widen() * x[c * 8 + l];
        }
    }
    let tail: f32 = (chunks * 8..w.len()).map(|k| w[k].widen() * x[k]).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{WeightRow, Widen, TILE_ROWS, TILE_TOKENS};
    use half::{bf16, f16};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        // bf16 is the top half of an f32: widen to 32 bits and shift up.
        let raw = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Generates, per weight dtype, a one-row kernel with four independent
    /// accumulators (hides FMA latency while streaming) and a four-row kernel
    /// that loads each weight chunk once for four activation rows.
    macro_rules! kernels {
        ($ty:ty, $load:ident, $dot1:ident, $dotn:ident, $tile:ident) => {
            /// `TILE_ROWS` rows of `w` (contiguous) against `TILE_TOKENS` x rows.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $tile(w: &[$ty], xs: [&[f32]; TILE_TOKENS], out: &mut [[f32; TILE_TOKENS]; TILE_ROWS]) {
                let n = xs[0].len();
                let wp: [*const $ty; TILE_ROWS] = std::array::from_fn(|r| w.as_ptr().add(r * n));
                let xp = xs.map(|x| x.as_ptr());
                let mut acc = [[_mm256_setzero_ps(); TILE_TOKENS]; TILE_ROWS];
                let mut k = 0;
                while k + 8 <= n {
                    let xv: [__m256; TILE_TOKENS] = std::array::from_fn(|t| _mm256_loadu_ps(xp[t].add(k)));
                    for r in 0..TILE_ROWS {
                        let wv = $load(wp[r].add(k));
                        for t in 0..TILE_TOKENS {
                            acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                        }
                    }
                    k += 8;
                }
                for r in 0..TILE_ROWS {
                    for t in 0..TILE_TOKENS {
                        let tail: f32 = (k..n).map(|i| w[r * n + i].widen() * xs[t][i]).sum();
                        out[r][t] = hsum(acc[r][t]) + tail;
                    }
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $dot1(w: &[$ty], x: &[f32]) -> f32 {
                let (n, wp, xp) = (w.len(), w.as_ptr(), x.as_ptr());
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut k = 0;
                while k + 32 <= n {
                    a0 = _mm256_fmadd_ps($load(wp.add(k)), _mm256_loadu_ps(xp.add(k)), a0);
                    a1 = _mm256_fmadd_ps($load(wp.add(k + 8)), _mm256_loadu_ps(xp.add(k + 8)), a1);
                    a2 = _mm256_fmadd_ps($load(wp.add(k + 16)), _mm256_loadu_ps(xp.add(k + 16)), a2);
                    a3 = _mm256_fmadd_ps($load(wp.add(k + 24)), _mm256_loadu_ps(xp.add(k + 24)), a3);
                    k += 32;
                }
                while k + 8 <= n {
                    a0 = _mm256_fmadd_ps($load(wp.add(k)), _mm256_loadu_ps(xp.add(k)), a0);
                    k += 8;
                }
                let mut sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                for j in k..n {
                    sum += w[j].widen() * x[j];
                }
                sum
            }

            /// Up to four rows; missing rows reuse row 0 and are not stored.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $dotn(w: &[$ty], xs: &[&[f32]], out: &mut [f32]) {
                let n = w.len();
                let wp = w.as_ptr();
                let x = [0, 1, 2, 3].map(|j| xs.get(j).unwrap_or(&xs[0]).as_ptr());
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut k = 0;
                while k + 8 <= n {
                    let wv = $load(wp.add(k));
                    a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[0].add(k)), a0);
                    a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[1].add(k)), a1);
                    a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[2].add(k)), a2);
                    a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[3].add(k)), a3);
                    k += 8;
                }
                let sums = [hsum(a0), hsum(a1), hsum(a2), hsum(a3)];
                for (j, o) in out.iter_mut().enumerate() {
                    let tail: f32 = (k..n).map(|i| w[i].widen() * xs[j][i]).sum();
                    *o = sums[j] + tail;
                }
            }
        };
    }

    kernels!(f32, load_f32, dot1_f32, dotn_f32, tile_f32);
    kernels!(bf16, load_bf16, dot1_bf16, dotn_bf16, tile_bf16);
    kernels!(f16, load_f16, dot1_f16, dotn_f16, tile_f16);

    /// # Safety
    /// The CPU must support avx2, fma and f16c; `w` holds `TILE_ROWS` rows of the
    /// activation rows' length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_tile(w: WeightRow<'_>, xs: [&[f32]; TILE_TOKENS], out: &mut [[f32; TILE_TOKENS]; TILE_ROWS]) {
        match w {
            WeightRow::F32(w) => tile_f32(w, xs, out),
            WeightRow::Bf16(w) => tile_bf16(w, xs, out),
            WeightRow::F16(w) => tile_f16(w, xs, out),
        }
    }

    /// # Safety
    /// The CPU must support avx2, fma and f16c, and each `xs[j]` must be at
    /// least as long as the weight row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(w: WeightRow<'_>, xs: &[&[f32]], out: &mut [f32]) {
        if xs.len() == 1 {
            out[0] = match w {
                WeightRow::F32(w) => dot1_f32(w, xs[0]),
                WeightRow::Bf16(w) => dot1_bf16(w, xs[0]),
                WeightRow::F16(w) => dot1_f16(w, xs[0]),
            };
            return;
        }
        match w {
            WeightRow::F32(w) => dotn_f32(w, xs, out),
            WeightRow::Bf16(w) => dotn_bf16(w, xs, out),
            WeightRow::F16(w) => dotn_f16(w, xs, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn the_prefill_tile_matches_row_by_row_dots() {
        for n in [8, 13, 64, 100] {
            let w = values(TILE_ROWS * n, 5);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let xs: Vec<Vec<f32>> = (0..TILE_TOKENS as u32).map(|j| values(n, 20 + j)).collect();
            let x: [&[f32]; TILE_TOKENS] = std::array::from_fn(|t| xs[t].as_slice());
            let mut tile = [[0.0; TILE_TOKENS]; TILE_ROWS];
            dot_tile(WeightRow::Bf16(&wb), x, &mut tile);
            for (r, row) in tile.iter().enumerate() {
                let mut want = [0.0; TILE_TOKENS];
                dot_rows(WeightRow::Bf16(&wb[r * n..(r + 1) * n]), &x, &mut want);
                for t in 0..TILE_TOKENS {
                    assert!((row[t] - want[t]).abs() < 1e-4, "n={n} r={r} t={t}");
                }
            }
        }
    }

    #[test]
    fn every_dtype_and_row_count_matches_a_f64_reference() {
        for n in [1, 7, 8, 31, 32, 33, 100, 896] {
            let w = values(n, 1);
            let xs: Vec<Vec<f32>> = (0..4).map(|j| values(n, 10 + j)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            for rows in 1..=4 {
                let x: Vec<&[f32]> = xs[..rows].iter().map(|v| v.as_slice()).collect();
                for (row, wide) in [
                    (WeightRow::F32(&w), w.clone()),
                    (WeightRow::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
                    (WeightRow::F16(&wh), wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
                ] {
                    let mut out = vec![0.0; rows];
                    dot_rows(row, &x, &mut out);
                    for j in 0..rows {
                        let want: f64 = wide.iter().zip(x[j]).map(|(a, b)| *a as f64 * *b as f64).sum();
                        assert!((out[j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "n={n} rows={rows}");
                    }
                }
            }
        }
    }
}
