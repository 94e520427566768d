//! CUDA graphs of the render's model calls (gpu/graph.rs): a window's ControlNets, residual sums
//! and UNet (or motion UNet), both CFG halves, captured once per `GraphKey` and replayed at every
//! later step with that key. The model inputs live in static device tensors written before each
//! replay (uploads and device copies, outside the graph: the context, and the UNet's text k/v
//! when the render computed them beforehand, `InputCache::text_kv`); the rest the captured work
//! bakes in is in the key. A key's first call runs eagerly (it warms up kernel modules, cuDNN's
//! algorithm searches and the input cache), its second captures, later ones replay. All graphs of a
//! denoising run share one `GraphPool` (one scratch working set) and go with the `InputCache` at
//! the end of the run, before the VAE decodes; they also go, with their scratch, when a key is met
//! for the first time, so that eager call finds the memory. On by default on CUDA for calls small
//! enough that the host's launch cost shows (`MAX_CAPTURED_LATENT_PIXELS`);
//! `CELFRAME_CUDA_GRAPHS=0` turns graphs off, `=all` captures calls of any size, and a GPU profile
//! (`--timings`) runs eagerly.

use std::collections::{HashMap, HashSet};

use super::render::{InputCache, ModelCall, Part, WindowInputs};
use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu, Graph, GraphPool};
use crate::models::transformer::{CrossKv, TextContext};
use crate::tensor::{Storage, Tensor};

/// Model calls on more latent pixels than this (rows x latent height x width) run eagerly: their
/// kernels are long enough to hide the host's launch cost (H200, 2026-12-04: replays ran 1.040x
/// eager at 2 x 128 x 128, 1.002x at 32 x 72 x 128), while a capture keeps the GPU waiting for the
/// whole recording and the instantiation, a cost a 4-step LCM clip's two replays do not earn back.
/// Between the two measured sizes the gain is not known; the bound is 4x the smaller.
const MAX_CAPTURED_LATENT_PIXELS: usize = 4 * 2 * 128 * 128;

/// Which model calls a render captures (`CELFRAME_CUDA_GRAPHS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Capture {
    /// `0`: none.
    Off,
    /// Unset: calls of at most `MAX_CAPTURED_LATENT_PIXELS`.
    Small,
    /// `all`: every call (A/B timing of large calls).
    All,
}

impl Capture {
    fn from_env() -> Capture {
        match std::env::var("CELFRAME_CUDA_GRAPHS").as_deref() {
            Ok("0") => Capture::Off,
            Ok("all") => Capture::All,
            _ => Capture::Small,
        }
    }

    /// Whether a call on `sample` (latents [rows, h, w, channels]) is captured.
    fn takes(self, sample: &Tensor) -> bool {
        let latent_pixels = sample.shape().iter().rev().skip(1).product::<usize>();
        match self {
            Capture::Off => false,
            Capture::Small => latent_pixels <= MAX_CAPTURED_LATENT_PIXELS,
            Capture::All => true,
        }
    }
}

/// What a window's captured model call bakes in besides the shapes of the clip (dtype, latent
/// size, models: fixed for the life of the graphs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct GraphKey {
    pub(super) part: Part,
    pub(super) frames: usize,
    /// Rows of the text context (one per CFG half when the frames share a prompt, else per frame).
    pub(super) context_rows: usize,
    /// Whether the UNet reads its cross-attentions' k and v computed beforehand.
    pub(super) text_kv: bool,
    /// With a ControlNet acting at this step: the window's clip frames (they fix the hint images,
    /// per-frame strengths and active frames, and the cached inputs the nets read) and which
    /// ControlNet entries are active at the step.
    pub(super) controls: Option<(Vec<usize>, Vec<bool>)>,
}

/// The graphs of one denoising run and what they were made from.
pub(super) struct WindowGraphs {
    capture: Capture,
    pool: GraphPool,
    graphs: HashMap<GraphKey, WindowGraph>,
    /// Keys met before (captured at the next call).
    seen: HashSet<GraphKey>,
    /// Keys whose capture failed: they run eagerly.
    failed: HashSet<GraphKey>,
    pub(super) captured: usize,
    pub(super) replays: usize,
}

impl Default for WindowGraphs {
    fn default() -> WindowGraphs {
        WindowGraphs {
            capture: Capture::from_env(),
            pool: GraphPool::new(),
            graphs: HashMap::new(),
            seen: HashSet::new(),
            failed: HashSet::new(),
            captured: 0,
            replays: 0,
        }
    }
}

struct WindowGraph {
    graph: Graph,
    inputs: StaticInputs,
    /// The UNet's output, rewritten by each replay.
    out: Tensor,
    /// Cached inputs the captured work reads (text contexts of active frames, embedded hints):
    /// held so their memory stays theirs should the cache drop them.
    _kept: Vec<Tensor>,
}

/// The device tensors a graph reads its per-call inputs from.
struct StaticInputs {
    host: [Tensor; 4],
    context: Tensor,
    /// The UNet's text k/v, read through the static tensor.
    kv: Option<CrossKv>,
}

impl StaticInputs {
    fn new(gpu: &Gpu, scratch: &Arena, host: &WindowInputs, context: TextContext) -> Result<StaticInputs> {
        let up = |t: &Tensor| gpu.upload(scratch, t, t.dtype());
        let [a, b, c, d] = host.each();
        let copy = |t: &Tensor| -> Result<Tensor> {
            let to = gpu.empty(scratch, t.shape(), t.dtype())?;
            gpu.copy(&to, t)?;
            Ok(to)
        };
        let kv = match context.kv {
            Some(kv) => Some(kv.reading(copy(kv.tensor())?)?),
            None => None,
        };
        Ok(StaticInputs { host: [up(a)?, up(b)?, up(c)?, up(d)?], context: copy(context.hidden)?, kv })
    }

    /// The call's inputs written into the static tensors (same shapes: the key holds them).
    fn write(&self, gpu: &Gpu, host: &WindowInputs, context: TextContext) -> Result<()> {
        for (to, from) in self.host.iter().zip(host.each()) {
            let Storage::Device(mem) = to.storage() else {
                return Err(Error::Internal("a CUDA graph's static input is not on the device".into()));
            };
            gpu.upload_into(mem, from, to.dtype())?;
        }
        gpu.copy(&self.context, context.hidden)?;
        match (&self.kv, context.kv) {
            (Some(to), Some(from)) => gpu.copy(to.tensor(), from.tensor()),
            (None, None) => Ok(()),
            _ => Err(Error::Internal(
                "a CUDA graph replayed with text k/v where it was captured without, or back".into(),
            )),
        }
    }

    fn context(&self) -> TextContext<'_> {
        TextContext { hidden: &self.context, kv: self.kv.as_ref() }
    }

    fn inputs(&self) -> WindowInputs {
        let [a, b, c, d] = self.host.clone();
        WindowInputs { sample: a, timestep: b, text_embeds: c, time_ids: d }
    }
}

/// The window's model output on the device: replayed from its graph, captured now (a key met
/// before), or run eagerly (a key met for the first time; one whose capture failed; graphs off or
/// the call too large to gain).
pub(super) fn model_output(
    gpu: &Gpu,
    scratch: &Arena,
    key: GraphKey,
    call: &ModelCall,
    host: &WindowInputs,
    context: TextContext,
    cache: &mut InputCache,
) -> Result<Tensor> {
    if !cache.graphs.capture.takes(&host.sample) || gpu.is_profiling() {
        return call.eager(host, context, cache);
    }
    // Out of the cache while its entries serve the call; back on every path.
    let mut graphs = std::mem::take(&mut cache.graphs);
    let out = graphs.model_output(gpu, scratch, key, call, host, context, cache);
    cache.graphs = graphs;
    out
}

impl WindowGraphs {
    #[allow(clippy::too_many_arguments)]
    fn model_output(
        &mut self,
        gpu: &Gpu,
        scratch: &Arena,
        key: GraphKey,
        call: &ModelCall,
        host: &WindowInputs,
        context: TextContext,
        cache: &mut InputCache,
    ) -> Result<Tensor> {
        if let Some(w) = self.graphs.get(&key) {
            w.inputs.write(gpu, host, context)?;
            w.graph.launch(gpu)?;
            self.replays += 1;
            return Ok(w.out.clone());
        }
        let met_before = !self.seen.insert(key.clone());
        if met_before && !self.failed.contains(&key) {
            let inputs = StaticInputs::new(gpu, scratch, host, context)?;
            cache.recording = Some(Vec::new());
            let captured =
                Graph::capture(gpu, scratch, &self.pool, || call.forward(&inputs.inputs(), inputs.context(), cache));
            let kept = cache.recording.take().unwrap_or_default();
            match captured {
                Ok((graph, out)) => {
                    graph.launch(gpu)?;
                    self.captured += 1;
                    self.graphs.insert(key, WindowGraph { graph, inputs, out: out.clone(), _kept: kept });
                    return Ok(out);
                }
                Err(e) => {
                    eprintln!("note: a window's model call ({key:?}) runs without a CUDA graph: {e}");
                    self.failed.insert(key);
                }
            }
        } else if !met_before {
            // The graphs' scratch goes back for this eager call (and the captures to come).
            self.graphs.clear();
            self.pool = GraphPool::new();
        }
        call.eager(host, context, cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn latents(rows: usize, h: usize, w: usize) -> Tensor {
        Tensor::from_f32(&[rows, h, w, 4], DType::F16, &vec![0.5; rows * h * w * 4]).unwrap()
    }

    #[test]
    fn by_default_only_calls_small_enough_to_gain_are_captured() {
        let sdxl_image_cfg = latents(2, 128, 128); // 1024x1024, both CFG halves: measured 1.040x
        let graph_test_clip = latents(32, 36, 64); // tests/gpu_graph.rs: 16 frames at 512x288, CFG
        let w1 = latents(32, 72, 128); // 16 frames at 1024x576, CFG: measured 1.002x
        assert!(Capture::Small.takes(&sdxl_image_cfg) && Capture::Small.takes(&graph_test_clip));
        assert!(!Capture::Small.takes(&w1));
        assert!(Capture::All.takes(&w1) && !Capture::Off.takes(&sdxl_image_cfg));
    }
}
