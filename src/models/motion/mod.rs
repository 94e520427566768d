//! AnimateDiff motion modules in the UNet (diffusers `models/unets/unet_motion_model.py`,
//! UNetMotionModel and MotionAdapter; guoyww/AnimateDiff `animatediff/models/motion_module.py`).
//! A temporal transformer follows each layer (ResNet [+ Transformer2D]) of the down and up blocks,
//! before the skip connection is taken and before the down- or up-sampler, and, where the
//! checkpoint has one, the mid block's transformer: exactly where `unet::blocks` calls its layer
//! hook, so the video UNet is the image UNet's forward with the hook set.
//!
//! Frames fold into the batch (row = video * F + frame). Per video: timestep, pooled text and time
//! ids (the time and added embeddings are computed once and added to every frame); per frame: the
//! sample, the text context ([videos * F, tokens, width], as UNetMotionModel takes it) and
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
use super::weights::{ModelWeights, Place};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

/// Frames one call may hold: the temporal attention op's limit (longer clips need context windows).
pub const MAX_FRAMES: usize = 32;

pub struct MotionModules {
    pub config: MotionConfig,
    weights: ModelWeights,
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
        let weights = ModelWeights::prepare(&checkpoint.weights, &checkpoint.names, place)?;
        Ok(MotionModules { config: checkpoint.config.clone(), weights })
    }

    /// The prepared weights (which of them a forward has read: `ModelWeights::unread`).
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// The UNet with the motion modules on `video.frames` frames per video: `x.sample` [B*F, H, W,
    /// in] (NHWC), `x.encoder_hidden_states` [B*F, tokens, X], `x.timestep` f32 [B],
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
        let mut positions = Positions { videos: rows / frames, frames, tables: HashMap::new() };
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
            let pe = positions.table(ex, m.channels, self.weights.dtype())?;
            temporal::forward(ex, &self.weights.root().at(&name), m, self.config.norm_num_groups, frames, &h, pe)
        };
        unet.forward_frames(ex, x, video, residuals, &mut hook)
    }
}

/// The position tables of one forward, one per module width, made on first use where the forward
/// runs (a few kilobytes: [videos * frames, C]).
struct Positions {
    videos: usize,
    frames: usize,
    tables: HashMap<usize, Tensor>,
}

impl Positions {
    fn table(&mut self, ex: &Exec, channels: usize, dtype: DType) -> Result<&Tensor> {
        if !self.tables.contains_key(&channels) {
            let host = temporal::position_rows(self.videos, self.frames, channels, dtype)?;
            let table = match ex {
                Exec::Cpu => host,
                Exec::Cuda { gpu, scratch } => gpu.upload(scratch, &host, dtype)?,
            };
            self.tables.insert(channels, table);
        }
        Ok(&self.tables[&channels])
    }
}
