//! The byte form of what crosses between nodes: little-endian numbers,
//! length-prefixed lists, one message per length-prefixed frame.

use super::WorkerOptions;
use crate::backend::PagedAttentionMeta;
use crate::model::{ForwardBatch, Sampling, StepOutput};
use crate::parallel::Layout;
use crate::sampling::{LogitAdjustment, RowSampling};
use std::io::{self, Read, Write};

/// Frames above this are refused, so a corrupt length cannot make a node
/// allocate without bound.
const MAX_FRAME: usize = 1 << 30;

pub fn write_frame(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)
}

pub fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut bytes = vec![0; len];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

#[derive(Default)]
pub struct Encoder {
    pub bytes: Vec<u8>,
}

impl Encoder {
    pub fn u8(&mut self, v: u8) {
        self.bytes.push(v);
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    pub fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    pub fn f32(&mut self, v: f32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, v: &[u8]) {
        self.usize(v.len());
        self.bytes.extend_from_slice(v);
    }

    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    /// A list of 4-byte values, each laid out by `to`.
    fn words<T: Copy>(&mut self, v: &[T], to: fn(T) -> [u8; 4]) {
        self.usize(v.len());
        v.iter().for_each(|&x| self.bytes.extend_from_slice(&to(x)));
    }

    pub fn u32s(&mut self, v: &[u32]) {
        self.words(v, u32::to_le_bytes);
    }

    pub fn usizes(&mut self, v: &[usize]) {
        self.usize(v.len());
        v.iter().for_each(|&x| self.usize(x));
    }

    pub fn f32s(&mut self, v: &[f32]) {
        self.words(v, f32::to_le_bytes);
    }

    pub fn option<T>(&mut self, v: Option<&T>, put: impl FnOnce(&mut Self, &T)) {
        self.u8(v.is_some() as u8);
        if let Some(v) = v {
            put(self, v);
        }
    }

    pub fn result<T>(&mut self, v: &Result<T, String>, put: impl FnOnce(&mut Self, &T)) {
        match v {
            Ok(v) => {
                self.u8(0);
                put(self, v);
            }
            Err(why) => {
                self.u8(1);
                self.str(why);
            }
        }
    }

    pub fn options(&mut self, o: &WorkerOptions) {
        self.usize(o.layout.tp);
        self.usize(o.layout.pp);
        self.option(o.pp_layers.as_ref(), |e, v| e.usizes(v));
        self.usize(o.num_kv_blocks);
        self.usize(o.block_size);
        self.u8(o.micro_batching as u8);
        self.u8(o.graphs as u8);
        self.option(o.panic_at.as_ref(), |e, &(rank, step)| {
            e.usize(rank);
            e.u64(step);
        });
    }

    pub fn batch(&mut self, b: &ForwardBatch) {
        self.u32s(&b.token_ids);
        self.u32s(&b.positions);
        self.usize(b.attn.block_size);
        self.u32s(&b.attn.slot_mapping);
        self.usizes(&b.attn.query_lens);
        self.usizes(&b.attn.context_lens);
        self.usize(b.attn.block_tables.len());
        b.attn.block_tables.iter().for_each(|t| self.u32s(t));
        self.u32s(&b.logit_rows);
        match &b.sampling {
            Sampling::Caller => self.u8(0),
            Sampling::Model { rows, logits } => {
                self.u8(1);
                self.usize(rows.len());
                rows.iter().for_each(|r| self.row_sampling(r));
                self.u8(*logits as u8);
            }
        }
    }

    fn row_sampling(&mut self, r: &RowSampling) {
        self.f32(r.temperature);
        self.u32(r.top_k);
        self.f32(r.top_p);
        self.f32(r.min_p);
        self.f32(r.repetition_penalty);
        self.f32(r.presence_penalty);
        self.f32(r.frequency_penalty);
        self.f32(r.uniform);
        self.option(r.coming.as_ref(), |e, &at| e.u32(at));
        self.usize(r.adjustments.len());
        for a in &r.adjustments {
            self.u32(a.token);
            self.f32(a.bias);
            self.u32(a.generated);
            self.u8(a.repeated as u8);
        }
    }

    pub fn output(&mut self, o: &StepOutput) {
        self.f32s(&o.logits);
        self.u32s(&o.token_ids);
    }
}

pub struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Decoder { rest: bytes }
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), String> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(format!("{n} bytes left over")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!("wanted {n} bytes, {} left", self.rest.len()));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    /// A list's length, checked against the bytes left (each item at least `item` bytes).
    fn len(&mut self, item: usize) -> Result<usize, String> {
        let n = self.usize()?;
        match n.checked_mul(item.max(1)) {
            Some(bytes) if bytes <= self.rest.len() => Ok(n),
            _ => Err(format!("a list of {n} items in {} bytes", self.rest.len())),
        }
    }

    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    pub fn usize(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|e| e.to_string())
    }

    fn word(&mut self) -> Result<[u8; 4], String> {
        Ok(self.take(4)?.try_into().expect("4 bytes"))
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        self.word().map(u32::from_le_bytes)
    }

    pub fn f32(&mut self) -> Result<f32, String> {
        self.word().map(f32::from_le_bytes)
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("a flag of {v}")),
        }
    }

    pub fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.len(1)?;
        Ok(self.take(n)?.to_vec())
    }

    pub fn str(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|e| e.to_string())
    }

    /// A list of 4-byte values, each made by `from`.
    fn words<T>(&mut self, from: fn([u8; 4]) -> T) -> Result<Vec<T>, String> {
        let n = self.len(4)?;
        let raw = self.take(n * 4)?;
        Ok(raw.chunks_exact(4).map(|c| from(c.try_into().expect("4 bytes"))).collect())
    }

    pub fn u32s(&mut self) -> Result<Vec<u32>, String> {
        self.words(u32::from_le_bytes)
    }

    pub fn usizes(&mut self) -> Result<Vec<usize>, String> {
        (0..self.len(8)?).map(|_| self.usize()).collect()
    }

    pub fn f32s(&mut self) -> Result<Vec<f32>, String> {
        self.words(f32::from_le_bytes)
    }

    pub fn option<T>(&mut self, get: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<Option<T>, String> {
        match self.flag()? {
            true => get(self).map(Some),
            false => Ok(None),
        }
    }

    pub fn result<T>(&mut self, get: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<Result<T, String>, String> {
        match self.flag()? {
            false => get(self).map(Ok),
            true => self.str().map(Err),
        }
    }

    pub fn options(&mut self) -> Result<WorkerOptions, String> {
        Ok(WorkerOptions {
            layout: Layout {
                tp: self.usize()?,
                pp: self.usize()?,
            },
            pp_layers: self.option(Self::usizes)?,
            num_kv_blocks: self.usize()?,
            block_size: self.usize()?,
            micro_batching: self.flag()?,
            graphs: self.flag()?,
            panic_at: self.option(|d| Ok((d.usize()?, d.u64()?)))?,
        })
    }

    pub fn batch(&mut self) -> Result<ForwardBatch, String> {
        Ok(ForwardBatch {
            token_ids: self.u32s()?,
            positions: self.u32s()?,
            attn: PagedAttentionMeta {
                block_size: self.usize()?,
                slot_mapping: self.u32s()?,
                query_lens: self.usizes()?,
                context_lens: self.usizes()?,
                block_tables: (0..self.len(8)?).map(|_| self.u32s()).collect::<Result<_, _>>()?,
            },
            logit_rows: self.u32s()?,
            sampling: match self.u8()? {
                0 => Sampling::Caller,
                1 => Sampling::Model {
                    rows: (0..self.len(ROW_BYTES)?).map(|_| self.row_sampling()).collect::<Result<_, _>>()?,
                    logits: self.flag()?,
                },
                tag => return Err(format!("unknown sampling {tag}")),
            },
        })
    }

    fn row_sampling(&mut self) -> Result<RowSampling, String> {
        Ok(RowSampling {
            temperature: self.f32()?,
            top_k: self.u32()?,
            top_p: self.f32()?,
            min_p: self.f32()?,
            repetition_penalty: self.f32()?,
            presence_penalty: self.f32()?,
            frequency_penalty: self.f32()?,
            uniform: self.f32()?,
            coming: self.option(Self::u32)?,
            adjustments: (0..self.len(ADJUSTMENT_BYTES)?)
                .map(|_| {
                    Ok(LogitAdjustment {
                        token: self.u32()?,
                        bias: self.f32()?,
                        generated: self.u32()?,
                        repeated: self.flag()?,
                    })
                })
                .collect::<Result<_, String>>()?,
        })
    }

    pub fn output(&mut self) -> Result<StepOutput, String> {
        Ok(StepOutput {
            logits: self.f32s()?,
            token_ids: self.u32s()?,
        })
    }
}

/// The fewest bytes an encoded [`RowSampling`] takes (no coming token,
/// no adjustments), and the bytes of one adjustment.
const ROW_BYTES: usize = 8 * 4 + 1 + 8;
const ADJUSTMENT_BYTES: usize = 3 * 4 + 1;

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> ForwardBatch {
        let row = RowSampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: 0.25,
            frequency_penalty: -0.125,
            adjustments: vec![LogitAdjustment {
                token: 12,
                bias: -0.5,
                generated: 3,
                repeated: true,
            }],
            coming: Some(1),
            uniform: 0.375,
        };
        ForwardBatch {
            sampling: Sampling::Model {
                rows: vec![row, RowSampling::greedy()],
                logits: true,
            },
            ..ForwardBatch::single(&[5, 6, 7], 2, &[3, 9], 4, false)
        }
    }

    #[test]
    fn a_batch_and_options_round_trip() {
        let options = WorkerOptions {
            layout: Layout { tp: 2, pp: 3 },
            pp_layers: Some(vec![1, 2, 3]),
            num_kv_blocks: 77,
            block_size: 16,
            micro_batching: true,
            graphs: true,
            panic_at: Some((4, 9)),
        };
        let mut e = Encoder::default();
        e.batch(&batch());
        e.options(&options);
        e.result(&Err::<StepOutput, _>("boom".into()), Encoder::output);
        let output = StepOutput {
            logits: vec![0.5, -1.0],
            token_ids: vec![7],
        };
        e.result(&Ok(output.clone()), Encoder::output);
        let mut d = Decoder::new(&e.bytes);
        assert_eq!(d.batch().unwrap(), batch());
        assert_eq!(format!("{:?}", d.options().unwrap()), format!("{options:?}"));
        assert_eq!(d.result(Decoder::output).unwrap(), Err("boom".to_string()));
        assert_eq!(d.result(Decoder::output).unwrap(), Ok(output));
        d.finish().unwrap();
    }

    #[test]
    fn truncated_or_oversized_input_is_an_error_not_a_panic() {
        let mut e = Encoder::default();
        e.batch(&batch());
        for cut in 0..e.bytes.len() {
            assert!(Decoder::new(&e.bytes[..cut]).batch().is_err(), "cut at {cut}");
        }
        let mut huge = Encoder::default();
        huge.usize(u64::MAX as usize);
        assert!(Decoder::new(&huge.bytes).u32s().is_err());
        let mut frame = Vec::new();
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut frame.as_slice()).is_err());
        let mut round = Vec::new();
        write_frame(&mut round, b"abc").unwrap();
        assert_eq!(read_frame(&mut round.as_slice()).unwrap(), b"abc");
    }
}
