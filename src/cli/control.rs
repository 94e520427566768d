//! `celframe control CONFIG`: the hint images a render config gives its ControlNets, written as
//! PNGs so they can be looked at before rendering.

use std::path::PathBuf;

use clap::Args;

use crate::control::prepare::resize_lanczos;
use crate::error::{Error, Result};
use crate::output::write_png;
use crate::pipeline::config::RenderConfig;
use crate::pipeline::render::control_hints;

#[derive(Args)]
pub struct ControlArgs {
    /// The render config (TOML or JSON).
    pub config: PathBuf,
    /// Where the PNGs go (default: the config's output root + /control).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Writes `OUT/clip_NNN/controlnet_K_KIND/frame_NNNNNN.png` (a Union entry's condition J:
/// `controlnet_K_cJ_KIND`) for every frame that has a hint of its
/// own (the keyframes; every frame of a video or of interpolated poses) in every clip.
pub fn run(args: &ControlArgs) -> Result<()> {
    let config = RenderConfig::load(&args.config)?;
    config.validate().map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("{}: {m}", args.config.display())),
        other => other,
    })?;
    if config.controlnets.is_empty() {
        return Err(Error::Input(format!("{}: no controlnets to draw hints for", args.config.display())));
    }
    let out = args.out.clone().unwrap_or_else(|| config.output.root.join("control"));
    let (width, height) = (config.video.width as u32, config.video.height as u32);
    for clip in 0..config.clips.len() {
        let frames = config.clip_frames(clip);
        // A Union entry's conditions each get their folder: controlnet_K_cJ_KIND.
        let hints = config.controlnets.iter().enumerate().flat_map(|(n, entry)| {
            let union = entry.is_union();
            entry.hint_entries().into_iter().enumerate().map(move |(j, hint)| {
                let name = match union {
                    true => format!("controlnet_{}_c{}_{}", n + 1, j + 1, hint.kind),
                    false => format!("controlnet_{}_{}", n + 1, hint.kind),
                };
                (name, hint)
            })
        });
        for (name, entry) in hints {
            let (keyframes, images) = control_hints(&entry, frames, config.video.fps, width, height)?;
            let dir = out.join(format!("clip_{:03}", clip + 1)).join(name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Io { context: format!("creating {}", dir.display()), source: e })?;
            for (k, image) in keyframes.iter().zip(&images) {
                // At the render size, as the net sees it.
                write_png(&dir.join(format!("frame_{k:06}.png")), &resize_lanczos(image, width, height)?)?;
            }
            let (first, last) = (keyframes.first().copied().unwrap_or(0), keyframes.last().copied().unwrap_or(0));
            let at = if keyframes.len() > 2 && last - first + 1 == keyframes.len() {
                format!("every frame from {first} to {last}")
            } else {
                format!("frames {keyframes:?}")
            };
            let source = if entry.is_video() {
                format!("video, timing {}", entry.video_timing)
            } else {
                format!("interpolation {}, pose_interpolation {}", entry.interpolation, entry.pose_interpolation)
            };
            println!(
                "{}: {} hint{} at {at} of {frames} ({}, {source})",
                dir.display(),
                images.len(),
                if images.len() == 1 { "" } else { "s" },
                entry.kind,
            );
        }
    }
    Ok(())
}
