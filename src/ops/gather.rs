//! Token embedding lookup with the learned position embedding added (the CLIP text encoders'
//! first step): out[r] = table[ids[r]] + positions[r % seq].

use super::{Exec, grid_for, host_out, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::params::EmbeddingParams;
use crate::tensor::{DType, Tensor};

/// Ids are exact in f32 up to here, the form they travel to the device in (tensors are float).
const MAX_ID: usize = 1 << 24;

/// `ids` are `batch * seq` token ids (row-major), `table` [vocab, dim], `positions` [>= seq, dim]
/// or None; the result is [batch, seq, dim] in the table's dtype. Ids are checked against the
/// vocabulary on the host, so a bad id is an error, never an out-of-bounds read.
pub fn token_embedding(
    ex: &Exec,
    ids: &[u32],
    seq: usize,
    table: &Tensor,
    positions: Option<&Tensor>,
) -> Result<Tensor> {
    let mut inputs = vec![table];
    inputs.extend(positions);
    ex.expect_inputs("token_embedding", &inputs)?;
    let dtype = same_dtype("token_embedding", &inputs)?;
    let &[vocab, dim] = table.shape() else {
        return Err(Error::Input(format!("token_embedding: table {table:?} must be [vocab, dim]")));
    };
    if seq == 0 || ids.is_empty() || !ids.len().is_multiple_of(seq) {
        return Err(Error::Input(format!(
            "token_embedding: {} ids cannot be cut into sequences of {seq} tokens (the count must be a positive multiple of the sequence length)",
            ids.len()
        )));
    }
    if let Some(p) = positions.filter(|p| p.shape().len() != 2 || p.shape()[0] < seq || p.shape()[1] != dim) {
        return Err(Error::Input(format!("token_embedding: positions {p:?} must be [>= {seq}, {dim}]")));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab.min(MAX_ID)) {
        return Err(Error::Input(format!("token_embedding: token id {id} is outside the vocabulary of {vocab}")));
    }
    let rows = ids.len();
    let shape = [rows / seq, seq, dim];
    match ex {
        Exec::Cpu => {
            let t = table.to_f32_vec()?;
            let p = positions.map(|p| p.to_f32_vec()).transpose()?;
            let mut out = vec![0f32; rows * dim];
            for (r, (row, &id)) in out.chunks_exact_mut(dim.max(1)).zip(ids).enumerate() {
                let src = &t[id as usize * dim..][..dim];
                for (j, o) in row.iter_mut().enumerate() {
                    *o = src[j] + p.as_ref().map_or(0.0, |p| p[(r % seq) * dim + j]);
                }
            }
            host_out(&shape, dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let id_values: Vec<f32> = ids.iter().map(|&id| id as f32).collect();
            let ids_dev = gpu.upload(scratch, &Tensor::from_f32(&[rows], DType::F32, &id_values)?, DType::F32)?;
            let out = gpu.empty(scratch, &shape, dtype)?;
            let p = EmbeddingParams {
                ids: ids_dev.device_ptr()? as *const f32,
                table: table.device_ptr()? as *const _,
                positions: match positions {
                    Some(p) => p.device_ptr()? as *const _,
                    None => std::ptr::null(),
                },
                out: out.device_ptr()? as *mut _,
                rows: rows as i64,
                seq: seq as i32,
                dim: dim as i32,
            };
            gpu.launch(
                kernel_for!("token_embedding", dtype),
                (grid_for(rows * dim.div_ceil(8), 256), 1, 1),
                (256, 1, 1),
                0,
                &p,
            )?;
            Ok(out)
        }
    }
}
