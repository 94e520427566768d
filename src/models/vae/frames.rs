//! Decoding many frames in bounded memory. Frames go through the decoder in chunks of at most
//! `chunk_frames`; when a latent side exceeds the tile size, each chunk is decoded in spatial tiles
//! whose seams are blended, as diffusers' `AutoencoderKL.tiled_decode` does (so the result can be
//! checked against it):
//!
//! - Tiles of `latent_tile` latent pixels start every `stride = ⌊latent_tile · (1 − overlap)⌋`
//!   pixels in raster order; the last ones in a row or column are cut by the edge.
//! - A decoded tile is `sample_tile = latent_tile · f` pixels (f the upsampling factor). Its first
//!   `e = min(⌊sample_tile · overlap⌋, both tiles' extents)` rows are cross-faded with the last `e`
//!   rows of the (already blended) tile above: row y becomes `above · (1 − y/e) + tile · y/e`; then
//!   its first columns likewise with the tile on its left.
//! - Each tile keeps its first `sample_tile − ⌊sample_tile · overlap⌋` rows and columns, which
//!   must equal `stride · f` so that the kept parts tile the image exactly (checked).
//!
//! The mid-block attention then sees one tile rather than the whole frame, so tiled output differs
//! from untiled output (as diffusers' `models/autoencoders/autoencoder_kl.py` warns for tiling);
//! choose tiles as large as memory allows.
//!
//! Latents come from the host and images go back to it, as f32 values or as 8-bit pixels (made on
//! the device for an untiled CUDA decode: `decode_frames_pixels_each`, which the renderer uses): one tile
//! of one chunk is on the device at a time, and blending needs only the previous row of tiles.

use super::Vae;
use super::config::VaeConfig;
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::ops::rgb8::to_rgb8;
use crate::tensor::{DType, Tensor};

/// diffusers' tiled decoding (`enable_tiling()`): `tile_latent_min_size` and `tile_overlap_factor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiling {
    /// Latent pixels per tile side; tiles are used when the latents are larger along a side.
    pub latent_tile: usize,
    /// Fraction of a tile shared with its neighbour (diffusers: 0.25).
    pub overlap: f64,
}

impl Tiling {
    /// diffusers' defaults for this VAE: tiles of `sample_size` image pixels, overlap 0.25 (SDXL:
    /// 1024-pixel tiles, 128 latents).
    pub fn diffusers_default(cfg: &VaeConfig) -> Tiling {
        Tiling { latent_tile: cfg.sample_size / cfg.upsample_factor(), overlap: 0.25 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// Frames decoded together (at least 1): device memory grows with it.
    pub chunk_frames: usize,
    /// Spatial tiling above a size, or None to decode whole frames whatever their size.
    pub tiling: Option<Tiling>,
}

impl DecodeOptions {
    /// One chunk of `chunk_frames`, tiles as diffusers' defaults.
    pub fn new(cfg: &VaeConfig, chunk_frames: usize) -> DecodeOptions {
        DecodeOptions { chunk_frames, tiling: Some(Tiling::diffusers_default(cfg)) }
    }
}

/// What a decode did.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeReport {
    pub frames: usize,
    pub chunks: usize,
    /// Tiles per frame (1 when not tiled).
    pub tiles: usize,
    /// CUDA: the scratch arena's peak (the most bytes its live tensors held at once since it was
    /// made, so this decode's peak when the arena is fresh). None on the CPU, where host
    /// activations are not tracked.
    pub peak_scratch_bytes: Option<usize>,
}

/// Tile geometry in latent and image pixels (diffusers' names in the comments).
#[derive(Clone, Copy, Debug)]
struct Grid {
    latent: usize,
    /// `overlap_size`: latent pixels between tile starts.
    stride: usize,
    /// `blend_extent`: image rows / columns cross-faded at a seam.
    blend: usize,
    /// `row_limit`: image rows / columns kept of each tile.
    keep: usize,
}

impl Grid {
    fn new(t: &Tiling, factor: usize) -> Result<Grid> {
        if t.latent_tile == 0 || !(0.0..1.0).contains(&t.overlap) {
            return Err(Error::Input(format!(
                "tiling: the latent tile ({}) must be positive and the overlap ({}) in [0, 1)",
                t.latent_tile, t.overlap
            )));
        }
        let sample = t
            .latent_tile
            .checked_mul(factor)
            .ok_or_else(|| Error::Input(format!("tiling: a latent tile of {} is too large", t.latent_tile)))?;
        let stride = (t.latent_tile as f64 * (1.0 - t.overlap)) as usize;
        let blend = (sample as f64 * t.overlap) as usize;
        let keep = sample - blend;
        if stride == 0 || keep != stride * factor {
            // diffusers would then return an image of another size than f times the latents.
            return Err(Error::Input(format!(
                "tiling: a latent tile of {} with overlap {} keeps {keep} image pixels per tile but steps \
                 {stride} latents ({} pixels): choose sizes that tile exactly (e.g. a multiple of 4 with 0.25)",
                t.latent_tile,
                t.overlap,
                stride * factor
            )));
        }
        Ok(Grid { latent: t.latent_tile, stride, blend, keep })
    }

    /// Tile starts along a side of `n` latents (Python's `range(0, n, stride)`).
    fn starts(&self, n: usize) -> Vec<usize> {
        (0..n).step_by(self.stride).collect()
    }
}

/// Host f32 values of `frames` images [frames, h, w, c].
struct Block {
    frames: usize,
    h: usize,
    w: usize,
    c: usize,
    data: Vec<f32>,
}

impl Block {
    fn at(&self, f: usize, y: usize, x: usize) -> usize {
        ((f * self.h + y) * self.w + x) * self.c
    }
}

impl Vae {
    /// The pipeline's decode: the sampler's latents NHWC [N, h, w, latent_channels] (host, any
    /// float dtype) -> images NHWC [N, f*h, f*w, out_channels] (host, f32, roughly in [-1, 1]).
    /// Computes z = latents / scaling_factor (+ shift_factor) and decodes it as `decode_z`.
    /// Non-finite output is an error: the stock SDXL VAE overflows in float16.
    pub fn decode_frames(&self, ex: &Exec, latents: &Tensor, opts: &DecodeOptions) -> Result<(Tensor, DecodeReport)> {
        let mut images = Vec::new();
        let report = self.decode_frames_each(ex, latents, opts, |_, chunk| {
            images.extend(chunk.to_f32_vec()?);
            Ok(())
        })?;
        let shape = self.image_shape(latents.shape())?;
        Ok((Tensor::from_f32(&shape, DType::F32, &images)?, report))
    }

    /// `decode_frames` handing each chunk's images to `each(first_frame, images)` as soon as they
    /// are decoded (images host f32 [k, f*h, f*w, out_channels]), so that host memory stays bounded
    /// too when the frames go straight to files.
    pub fn decode_frames_each(
        &self,
        ex: &Exec,
        latents: &Tensor,
        opts: &DecodeOptions,
        mut each: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<DecodeReport> {
        self.decode_z_each(ex, &self.z_of(latents)?, opts, |first, images| {
            let bad = images.to_f32_vec()?.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(self.non_finite(bad as u64));
            }
            each(first, images)
        })
    }

    /// `decode_frames_each` for frames that go to image files: each chunk's images as 8-bit pixels
    /// (`ops::rgb8`, converted on the device for an untiled CUDA decode) beside the images as the
    /// decoder left them (on the device or the host, in the VAE's dtype), for callers that also
    /// keep values.
    pub fn decode_frames_pixels_each(
        &self,
        ex: &Exec,
        latents: &Tensor,
        opts: &DecodeOptions,
        mut each: impl FnMut(usize, Vec<u8>, &Tensor) -> Result<()>,
    ) -> Result<DecodeReport> {
        self.decode_z_chunks(ex, &self.z_of(latents)?, opts, |first, images| {
            let on = if images.is_device() { *ex } else { Exec::Cpu };
            let pixels = to_rgb8(&on, &images)?;
            if pixels.non_finite > 0 {
                return Err(self.non_finite(pixels.non_finite));
            }
            each(first, pixels.bytes, &images)
        })
    }

    /// z = latents / scaling_factor (+ shift_factor), on the host in f32.
    fn z_of(&self, latents: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (sf, shift) = (cfg.scaling_factor, cfg.shift_factor.unwrap_or(0.0));
        let values: Vec<f32> = host_values(latents, "latents")?.iter().map(|v| v / sf + shift).collect();
        Tensor::from_f32(latents.shape(), DType::F32, &values)
    }

    fn non_finite(&self, count: u64) -> Error {
        Error::Input(format!(
            "VAE decode: {count} non-finite output values in {:?}: a VAE that overflows in float16 (the stock \
             SDXL VAE) needs float32 or bf16, or the fp16-fix weights",
            self.dtype()
        ))
    }

    /// diffusers' `decode(z)` (z already divided by the scaling factor) over many frames: z NHWC
    /// [N, h, w, latent_channels] on the host in any float dtype, decoded `opts.chunk_frames` at a
    /// time, tiled as `opts.tiling` says -> host f32 images [N, f*h, f*w, out_channels].
    pub fn decode_z(&self, ex: &Exec, z: &Tensor, opts: &DecodeOptions) -> Result<(Tensor, DecodeReport)> {
        let mut images = Vec::new();
        let report = self.decode_z_each(ex, z, opts, |_, chunk| {
            images.extend(chunk.to_f32_vec()?);
            Ok(())
        })?;
        let shape = self.image_shape(z.shape())?;
        Ok((Tensor::from_f32(&shape, DType::F32, &images)?, report))
    }

    /// `decode_z` handing each chunk's images to `each(first_frame, images)` (see
    /// `decode_frames_each`).
    pub fn decode_z_each(
        &self,
        ex: &Exec,
        z: &Tensor,
        opts: &DecodeOptions,
        mut each: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<DecodeReport> {
        self.decode_z_chunks(ex, z, opts, |first, images| {
            let images = if images.is_device() { download(ex, &images)? } else { images };
            each(first, Tensor::from_f32(images.shape(), DType::F32, &images.to_f32_vec()?)?)
        })
    }

    /// `decode_z_each`'s loop, handing each chunk's images over as the decoder left them: on the
    /// device for an untiled CUDA decode, else on the host.
    fn decode_z_chunks(
        &self,
        ex: &Exec,
        z: &Tensor,
        opts: &DecodeOptions,
        mut each: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<DecodeReport> {
        let cfg = &self.config;
        let [n, h, w, oh, ow, oc] = self.image_dims(z.shape())?;
        if opts.chunk_frames == 0 {
            return Err(Error::Input("VAE decode: chunk_frames must be at least 1".into()));
        }
        let grid = match opts.tiling {
            Some(t) => Some(Grid::new(&t, cfg.upsample_factor())?).filter(|g| h > g.latent || w > g.latent),
            None => None,
        };
        let values = host_values(z, "z")?;
        let c = cfg.latent_channels;
        let frame_in = h * w * c;
        let mut chunks = 0;
        for first in (0..n).step_by(opts.chunk_frames) {
            let k = opts.chunk_frames.min(n - first);
            let latents = Block { frames: k, h, w, c, data: values[first * frame_in..(first + k) * frame_in].to_vec() };
            let images = match &grid {
                None => self.forward_block(ex, &latents)?,
                Some(g) => Tensor::from_f32(&[k, oh, ow, oc], DType::F32, &self.decode_tiled(ex, &latents, g)?.data)?,
            };
            each(first, images)?;
            chunks += 1;
        }
        let tiles = grid.map_or(1, |g| g.starts(h).len() * g.starts(w).len());
        let peak_scratch_bytes = match ex {
            Exec::Cpu => None,
            Exec::Cuda { scratch, .. } => Some(scratch.peak()),
        };
        Ok(DecodeReport { frames: n, chunks, tiles, peak_scratch_bytes })
    }

    /// The images' shape [N, f*h, f*w, out_channels] for latents of `shape`.
    fn image_shape(&self, shape: &[usize]) -> Result<[usize; 4]> {
        let [n, _, _, oh, ow, oc] = self.image_dims(shape)?;
        Ok([n, oh, ow, oc])
    }

    /// [N, h, w, f*h, f*w, out_channels] for latents of `shape`, checked.
    fn image_dims(&self, shape: &[usize]) -> Result<[usize; 6]> {
        let cfg = &self.config;
        let bad = || {
            Error::Input(format!(
                "VAE decode: latents {shape:?} must be NHWC [frames, height, width, {}] with no empty side",
                cfg.latent_channels
            ))
        };
        let &[n, h, w, c] = shape else { return Err(bad()) };
        if c != cfg.latent_channels || n == 0 || h == 0 || w == 0 {
            return Err(bad());
        }
        let f = cfg.upsample_factor();
        let (oh, ow) = (h.checked_mul(f).ok_or_else(bad)?, w.checked_mul(f).ok_or_else(bad)?);
        Ok([n, h, w, oh, ow, cfg.out_channels])
    }

    /// One untiled forward of host latents, on the Exec's side (the images stay there).
    fn forward_block(&self, ex: &Exec, latents: &Block) -> Result<Tensor> {
        let shape = [latents.frames, latents.h, latents.w, latents.c];
        let z = Tensor::from_f32(&shape, self.dtype(), &latents.data)?;
        match ex {
            Exec::Cpu => self.forward(ex, &z),
            Exec::Cuda { gpu, scratch } => self.forward(ex, &gpu.upload(scratch, &z, self.dtype())?),
        }
    }

    /// `forward_block` with the result back on the host.
    fn decode_block(&self, ex: &Exec, latents: &Block) -> Result<Block> {
        let image = download(ex, &self.forward_block(ex, latents)?)?;
        let &[frames, h, w, c] = image.shape() else {
            return Err(Error::Input(format!("VAE decoder output {image:?} is not NHWC")));
        };
        Ok(Block { frames, h, w, c, data: image.to_f32_vec()? })
    }

    /// diffusers' `tiled_decode` on one chunk (see the module doc), keeping one row of tiles.
    fn decode_tiled(&self, ex: &Exec, latents: &Block, g: &Grid) -> Result<Block> {
        let f = self.config.upsample_factor();
        let (n, c) = (latents.frames, self.config.out_channels);
        let mut out = Block { frames: n, h: latents.h * f, w: latents.w * f, c, data: Vec::new() };
        out.data = vec![0f32; n * out.h * out.w * c];
        let mut above: Vec<Block> = Vec::new();
        let mut y0 = 0;
        for &i in &g.starts(latents.h) {
            let mut row: Vec<Block> = Vec::new();
            let mut x0 = 0;
            let mut kept_rows = 0;
            for (j, &jx) in g.starts(latents.w).iter().enumerate() {
                let mut tile = self.decode_block(ex, &crop(latents, i, jx, g.latent))?;
                if let Some(up) = above.get(j) {
                    blend_rows(up, &mut tile, g.blend)?;
                }
                if let Some(left) = row.last() {
                    blend_columns(left, &mut tile, g.blend)?;
                }
                // Keep the tile's first `keep` rows and columns.
                let (th, tw) = (tile.h.min(g.keep), tile.w.min(g.keep));
                if y0 + th > out.h || x0 + tw > out.w {
                    return Err(Error::Input("VAE tiled decode: tiles overrun the image".into()));
                }
                for fr in 0..n {
                    for y in 0..th {
                        let src = tile.at(fr, y, 0);
                        let dst = out.at(fr, y0 + y, x0);
                        out.data[dst..dst + tw * c].copy_from_slice(&tile.data[src..src + tw * c]);
                    }
                }
                x0 += tw;
                kept_rows = th;
                row.push(tile);
            }
            y0 += kept_rows;
            above = row;
        }
        if (y0, above.iter().map(|t| t.w.min(g.keep)).sum::<usize>()) != (out.h, out.w) {
            return Err(Error::Input(format!("VAE tiled decode: the kept tiles do not cover {}x{}", out.h, out.w)));
        }
        Ok(out)
    }
}

/// The latents' values widened to f32 (host tensors only).
/// A tensor the Exec made, on the host.
fn download(ex: &Exec, t: &Tensor) -> Result<Tensor> {
    match ex {
        Exec::Cuda { gpu, .. } if t.is_device() => gpu.download(t),
        _ => Ok(t.clone()),
    }
}

fn host_values(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    if t.is_device() {
        return Err(Error::Input(format!("VAE decode: {what} {t:?} must be on the host (decoded images go there)")));
    }
    t.to_f32_vec()
}

/// Latents [y0.., x0..] of at most `size` x `size` pixels (cut by the edges).
fn crop(b: &Block, y0: usize, x0: usize, size: usize) -> Block {
    let (h, w) = (size.min(b.h - y0), size.min(b.w - x0));
    let mut data = Vec::with_capacity(b.frames * h * w * b.c);
    for f in 0..b.frames {
        for y in 0..h {
            let start = b.at(f, y0 + y, x0);
            data.extend_from_slice(&b.data[start..start + w * b.c]);
        }
    }
    Block { frames: b.frames, h, w, c: b.c, data }
}

/// diffusers' `blend_v`: the first rows of `b` cross-faded with the last rows of `a` (above it).
fn blend_rows(a: &Block, b: &mut Block, extent: usize) -> Result<()> {
    if a.w != b.w || a.frames != b.frames {
        return Err(Error::Input("VAE tiled decode: tiles of one column differ in width".into()));
    }
    let e = extent.min(a.h).min(b.h);
    let row = b.w * b.c;
    for f in 0..b.frames {
        for y in 0..e {
            let t = y as f64 / e as f64;
            let (wa, wb) = ((1.0 - t) as f32, t as f32);
            let (src, dst) = (a.at(f, a.h - e + y, 0), b.at(f, y, 0));
            for (o, v) in b.data[dst..dst + row].iter_mut().zip(&a.data[src..src + row]) {
                *o = v * wa + *o * wb;
            }
        }
    }
    Ok(())
}

/// diffusers' `blend_h`: the first columns of `b` cross-faded with the last columns of `a` (left).
fn blend_columns(a: &Block, b: &mut Block, extent: usize) -> Result<()> {
    if a.h != b.h || a.frames != b.frames {
        return Err(Error::Input("VAE tiled decode: tiles of one row differ in height".into()));
    }
    let e = extent.min(a.w).min(b.w);
    let c = b.c;
    for f in 0..b.frames {
        for y in 0..b.h {
            for x in 0..e {
                let t = x as f64 / e as f64;
                let (wa, wb) = ((1.0 - t) as f32, t as f32);
                let (src, dst) = (a.at(f, y, a.w - e + x), b.at(f, y, x));
                for ch in 0..c {
                    b.data[dst + ch] = a.data[src + ch] * wa + b.data[dst + ch] * wb;
                }
            }
        }
    }
    Ok(())
}
