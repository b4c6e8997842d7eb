//! Memory-mapped safetensors checkpoints: `model.safetensors`, or shards
//! listed in `model.safetensors.index.json`. Headers are parsed once; a
//! tensor's bytes are copied out of the mapping only when asked for, so a
//! rank that needs part of a model touches only that part.

use super::{dtype_from_safetensors, LoadError, WeightSource};
use crate::backend::{DType, HostTensor};
use ::safetensors::tensor::{Metadata, SafeTensors, TensorInfo};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

pub struct SafetensorsCheckpoint {
    files: Vec<MappedFile>,
    /// Tensor name → index into `files`.
    location: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl SafetensorsCheckpoint {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| LoadError::io(&index, e))?;
            let parsed: ShardIndex = serde_json::from_str(&text).map_err(|e| LoadError::json(&index, e))?;
            let mut shard_names: Vec<&String> = parsed.weight_map.values().collect();
            shard_names.sort();
            shard_names.dedup();
            let files = shard_names
                .iter()
                .map(|name| map_file(&dir.join(name)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut location = HashMap::new();
            for (tensor, shard) in &parsed.weight_map {
                let file = shard_names.binary_search(&shard).expect("shard listed above");
                if files[file].metadata.info(tensor).is_none() {
                    return Err(LoadError::MissingTensor {
                        path: files[file].path.clone(),
                        name: tensor.clone(),
                    });
                }
                location.insert(tensor.clone(), file);
            }
            return Ok(SafetensorsCheckpoint { files, location });
        }
        if single.exists() {
            let file = map_file(&single)?;
            let location = file.metadata.tensors().into_keys().map(|name| (name, 0)).collect();
            return Ok(SafetensorsCheckpoint {
                files: vec![file],
                location,
            });
        }
        Err(LoadError::NoWeights { path: dir.into() })
    }

    /// The file reported in errors about tensors that are nowhere.
    fn primary_path(&self) -> &Path {
        &self.files[0].path
    }
}

fn map_file(path: &Path) -> Result<MappedFile, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    // SAFETY: the mapping is read-only; shardline never writes checkpoint
    // files, and replacing one while a server has it open is unsupported.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::BadSafetensors {
        path: path.into(),
        message: e.to_string(),
    })?;
    Ok(MappedFile {
        path: path.into(),
        mmap,
        data_start: 8 + header_len,
        metadata,
    })
}

impl SafetensorsCheckpoint {
    /// The file holding tensor `name`, its header entry, and its dtype.
    fn info(&self, name: &str) -> Result<(&MappedFile, &TensorInfo, DType), LoadError> {
        let Some(&index) = self.location.get(name) else {
            return Err(LoadError::MissingTensor {
                path: self.primary_path().into(),
                name: name.into(),
            });
        };
        let file = &self.files[index];
        let info = file.metadata.info(name).expect("indexed tensors exist in their file");
        let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| LoadError::UnsupportedDtype {
            path: file.path.clone(),
            name: name.into(),
            dtype: format!("{:?}", info.dtype),
        })?;
        Ok((file, info, dtype))
    }

    /// The dtype and the mapped bytes of tensor `name`, checked against `shape`.
    fn locate(&self, name: &str, shape: &[usize]) -> Result<(DType, &[u8]), LoadError> {
        let (file, info, dtype) = self.info(name)?;
        if info.shape != shape {
            return Err(LoadError::ShapeMismatch {
                path: file.path.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let Some(bytes) = file.mmap.get(file.data_start + start..file.data_start + end) else {
            let message = format!("tensor {name:?} lies past the end of the file (truncated download?)");
            return Err(LoadError::BadSafetensors {
                path: file.path.clone(),
                message,
            });
        };
        Ok((dtype, bytes))
    }
}

impl WeightSource for SafetensorsCheckpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        let (dtype, bytes) = self.locate(name, shape)?;
        Ok(HostTensor {
            dtype,
            shape: shape.to_vec(),
            bytes: bytes.to_vec(),
        })
    }

    fn tensor_slice(&self, name: &str, shape: &[usize], rows: Range<usize>, cols: Option<Range<usize>>) -> Result<HostTensor, LoadError> {
        let (dtype, bytes) = self.locate(name, shape)?;
        let size = dtype.size_in_bytes();
        let row_len: usize = shape[1..].iter().product();
        let span = cols.clone().unwrap_or(0..row_len);
        let mut out = Vec::with_capacity(rows.len() * span.len() * size);
        for r in rows.clone() {
            out.extend_from_slice(&bytes[(r * row_len + span.start) * size..(r * row_len + span.end) * size]);
        }
        let mut out_shape = shape.to_vec();
        out_shape[0] = rows.len();
        if cols.is_some() {
            out_shape[1] = span.len();
        }
        Ok(HostTensor {
            dtype,
            shape: out_shape,
            bytes: out,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn dtype(&self, name: &str) -> Result<DType, LoadError> {
        Ok(self.info(name)?.2)
    }
}
