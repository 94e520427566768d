//! AnimateDiff motion modules in the UNet (diffusers `models/unets/unet_motion_model.py`,
//! UNetMotionModel and MotionAdapter; guoyww/AnimateDiff `animatediff/models/motion_module.py`).
//! A temporal transformer follows each layer (ResNet [+ Transformer2D]) of the down and up blocks,
//! before the skip connection is taken and before the down- or up-sampler, and, where the
//! checkpoint has one, the mid block's transformer: exactly where `unet::blocks` calls its layer
//! hook, so the video UNet is the image UNet's forward with the hook set.
//!
//! Frames fold into the batch (row = video * F + frame). Per video: timestep, pooled text and time
//! ids (the time and added embeddings are computed once and added to every frame); per frame: the
//! sample, the text context ([videos * F, tokens, width], as UNetMotionModel takes it, or fewer
//! rows each serving a group of consecutive rows: `UnetInputs::encoder_hidden_states`) and
//! ControlNet residuals.
//!
//! - `config`: the modules' architecture (MotionAdapter config.json or a file's shapes).
//! - `checkpoint`: opening diffusers or original-format weights, strictly.
//! - `temporal`: one temporal transformer's forward.

pub mod checkpoint;
pub mod config;
pub mod temporal;

pub use checkpoint::{MotionCheckpoint, MotionFormat, open_motion};
pub use config::{MotionConfig, TemporalTransformer};

use std::collections::HashMap;

use super::unet::{Frames, LayerPos, Unet, UnetInputs, UnetPath, UnetResiduals};
use super::weights::{Fp8SourcePlan, Fusion, ModelWeights, Place, fp8_source_plan};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

/// Frames one call may hold: the temporal attention op's limit (longer clips need context windows).
pub const MAX_FRAMES: usize = 32;

pub struct MotionModules {
    pub config: MotionConfig,
    weights: ModelWeights,
    /// Stored position tables ([positions * C] values) by graph name
    /// (`down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.pe`) with their checkpoint key,
    /// kept on the host: a forward adds the rows of its frames. Empty when the file stores none.
    tables: HashMap<String, (String, Vec<f32>)>,
}

/// A checkpoint's position tables (`….pe`, kept on the host) apart from the weights `new`
/// prepares, and those weights' fusions (each temporal attention's q, k and v as one matrix).
type Names = Vec<(String, String)>;
fn layout(checkpoint: &MotionCheckpoint) -> (Names, Names, Vec<Fusion>) {
    let (pe, names): (Names, Names) = checkpoint.names.iter().cloned().partition(|(n, _)| n.ends_with(".pe"));
    let fusions = temporal::fusions(names.iter().map(|(n, _)| n));
    (pe, names, fusions)
}

impl MotionModules {
    /// Prepares a loaded checkpoint's weights for `place`, after checking that every module sits on
    /// a layer of `unet` as wide as it.
    pub fn new(checkpoint: &MotionCheckpoint, unet: &Unet, place: Place) -> Result<MotionModules> {
        checkpoint.config.check_unet(&unet.config)?;
        if place.dtype() != unet.dtype() {
            return Err(Error::Input(format!(
                "motion modules in {:?}, the UNet in {:?}: prepare both in one dtype",
                place.dtype(),
                unet.dtype()
            )));
        }
        let (pe, names, fusions) = layout(checkpoint);
        let weights = ModelWeights::prepare_fused(&checkpoint.weights, &names, &fusions, place)?;
        let mut tables = HashMap::new();
        for (name, key) in pe {
            let values = checkpoint.weights.get(&key)?.to_f32_vec()?;
            tables.insert(name, (key, values));
        }
        Ok(MotionModules { config: checkpoint.config.clone(), weights, tables })
    }

    /// The weights `new` would give FP8 twins with `which` in `dtype` (`weights::fp8_source_plan`).
    pub fn fp8_source_plan(
        checkpoint: &MotionCheckpoint,
        which: crate::models::transformer::Fp8Linears,
        dtype: DType,
    ) -> Result<Fp8SourcePlan> {
        let (_, names, fusions) = layout(checkpoint);
        fp8_source_plan(&checkpoint.weights, &names, &fusions, which, dtype)
    }

    /// Runs the linears of its transformer blocks that `which` takes in FP8 from now on
    /// (`ModelWeights::enable_fp8`); returns how many weights got e4m3 twins.
    pub fn enable_fp8(&mut self, ex: &Exec, which: crate::models::transformer::Fp8Linears) -> Result<usize> {
        self.weights.enable_fp8(ex, |name, shape| which.takes(name, shape))
    }

    /// The prepared weights, for what changes them after the load (FP8 twins, dropping the
    /// 16-bit weights they replace: `ModelWeights::drop_fp8_sources`).
    pub fn weights_mut(&mut self) -> &mut ModelWeights {
        &mut self.weights
    }

    /// The prepared weights (which of them a forward has read: `ModelWeights::unread`).
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// The UNet with the motion modules on `video.frames` frames per video: `x.sample` [B*F, H, W,
    /// in] (NHWC), `x.encoder_hidden_states` [G, tokens, X] (G dividing B*F), `x.timestep` f32 [B],
    /// `x.text_embeds` [B, pooled], `x.time_ids` f32 [B, n]; residuals per frame. -> [B*F, H, W, out].
    pub fn forward_unet(
        &self,
        ex: &Exec,
        unet: &Unet,
        x: &UnetInputs,
        video: Frames,
        residuals: Option<&UnetResiduals>,
    ) -> Result<Tensor> {
        let frames = video.frames;
        let most = self.config.max_seq_length.min(MAX_FRAMES);
        if frames == 0 || frames > most {
            return Err(Error::Input(format!(
                "{frames} frames per video: the motion modules take 1 to {most} ({} positions, the temporal attention \
                 op's {MAX_FRAMES}); longer clips need context windows",
                self.config.max_seq_length
            )));
        }
        let rows = x.sample.shape().first().copied().unwrap_or(0);
        let mut positions = Positions { videos: rows / frames, frames, dtype: unet.dtype(), made: HashMap::new() };
        let mut hook = |pos: LayerPos, ex: &Exec, h: Tensor| -> Result<Tensor> {
            let (name, module) = match (pos.path, &self.config.mid_block) {
                (UnetPath::Mid, None) => return Ok(h),
                (UnetPath::Mid, Some(m)) => ("mid_block.motion_modules.0".to_string(), Some(m)),
                (UnetPath::Down, _) => {
                    let name = format!("down_blocks.{}.motion_modules.{}", pos.block, pos.layer);
                    (name, self.config.down_blocks.get(pos.block).and_then(|b| b.get(pos.layer)))
                }
                (UnetPath::Up, _) => {
                    let name = format!("up_blocks.{}.motion_modules.{}", pos.block, pos.layer);
                    (name, self.config.up_blocks.get(pos.block).and_then(|b| b.get(pos.layer)))
                }
            };
            // check_unet matched every layer with a module.
            let m =
                module.ok_or_else(|| Error::Internal(format!("no motion module {name} for the UNet layer {pos:?}")))?;
            let mut pe = |block: usize, attn: usize| {
                let stored = self.tables.get(&format!("{name}.transformer_blocks.{block}.attn{attn}.pe"));
                positions.rows(ex, stored, m.channels)
            };
            let w = self.weights.root().at(&name);
            temporal::forward(ex, &w, m, self.config.norm_num_groups, frames, &h, &mut pe)
        };
        unet.forward_frames(ex, x, video, residuals, &mut hook)
    }
}

/// The position rows of one forward ([videos * frames, C] each, a few kilobytes), made on first use
/// where the forward runs: one per stored table (diffusers' attn1 and attn2 share theirs), one per
/// width for computed ones.
struct Positions {
    videos: usize,
    frames: usize,
    dtype: DType,
    made: HashMap<String, Tensor>,
}

impl Positions {
    /// The rows of `stored` (checkpoint key, values), or of the computed table of `channels`.
    fn rows(&mut self, ex: &Exec, stored: Option<&(String, Vec<f32>)>, channels: usize) -> Result<Tensor> {
        let id = stored.map_or_else(|| format!("computed {channels}"), |(key, _)| key.clone());
        if let Some(t) = self.made.get(&id) {
            return Ok(t.clone());
        }
        let host = match stored {
            Some((_, table)) => temporal::position_rows(table, self.videos, self.frames, channels, self.dtype)?,
            None => {
                let table = temporal::position_table(self.frames, channels);
                temporal::position_rows(&table, self.videos, self.frames, channels, self.dtype)?
            }
        };
        // A function of the shapes only: a constant of a CUDA graph under capture.
        let rows = ex.constant(host)?;
        self.made.insert(id, rows.clone());
        Ok(rows)
    }
}
