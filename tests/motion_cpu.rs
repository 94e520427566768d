//! The UNet with AnimateDiff motion modules on the CPU twins against diffusers'
//! UNetMotionModel (tests/fixtures/motion_a*, made by tools/make_motion_fixtures.py from unet_a and
//! a tiny MotionAdapter: float32 on both sides), motion-module loading in both key formats, load
//! errors, and `celframe verify motion_unet`'s exit codes.
//!
//! Tolerance: `verify`'s f32 bound is relative L2 <= 1e-4; measured errors are ~1e-6 (f32
//! summation order, as the UNet's), so the tests assert 1e-5. The motion modules move these
//! outputs by 0.9 relative, the mid module by 0.03 and the group-norm switch by 0.19; computing the
//! position table instead of using the file's float16-rounded one (as diffusers does) moves them by
//! ~2.4e-5, which 1e-5 also catches.

mod common;
#[path = "common/unet_fixtures.rs"]
mod fixtures;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use celframe::models::motion::checkpoint::tensor_specs;
use celframe::models::motion::{MotionConfig, TemporalTransformer};
use celframe::models::{Frames, MotionFormat, MotionModules, Place, Unet, UnetInputs, open_motion, open_unet};
use celframe::ops::Exec;
use celframe::verify::{Settings, verify_motion_unet};
use celframe::{DType, Error, Tensor};
use fixtures::{TempDir, fixtures, folder};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, serialize_to_file};

const TOL: f64 = 1e-5;

fn motion_folder() -> PathBuf {
    fixtures().join("motion_a")
}

fn motion_reference(name: &str) -> PathBuf {
    fixtures().join(format!("motion_a.{name}.reference.safetensors"))
}

/// verify_motion_unet on the CPU in f32 against a reference; returns the relative L2 error.
fn check(motion: &Path, reference: &str, across_frames: bool) -> f64 {
    let settings = Settings::cpu(DType::F32, TOL);
    let v = verify_motion_unet(&folder("a"), motion, &motion_reference(reference), &settings, across_frames).unwrap();
    let c = &v.comparisons[0];
    println!("{reference}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
    assert!(c.ok(), "{reference}: {c:?}");
    // verify runs the forward again with the text k/v computed beforehand: the same output here
    let cached = &v.comparisons[1];
    assert_eq!((cached.rel_l2, cached.max_abs), (c.rel_l2, c.max_abs), "{reference}: {cached:?}");
    c.rel_l2
}

/// The adapter's tensors (float16 values) by diffusers name.
fn adapter_tensors() -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(motion_folder().join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F16, "{name}");
            (name, (view.shape().to_vec(), view.data().to_vec()))
        })
        .collect()
}

fn write_f16(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<u8>)>) {
    let views: BTreeMap<&str, TensorView> = tensors
        .iter()
        .map(|(name, (shape, data))| (name.as_str(), TensorView::new(Dtype::F16, shape.clone(), data).unwrap()))
        .collect();
    serialize_to_file(views, None, path).unwrap();
}

/// The adapter under its original AnimateDiff names (no mid block), from the list
/// tools/make_motion_fixtures.py checked with diffusers' converter.
fn original_tensors() -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let names: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("motion_a.original_names.json")).unwrap()).unwrap();
    let diffusers = adapter_tensors();
    names["original_to_diffusers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(original, d)| (original.clone(), diffusers[d.as_str().unwrap()].clone()))
        .collect()
}

#[test]
fn adapter_folder_config_and_names() {
    let m = open_motion(&motion_folder()).unwrap();
    assert_eq!(m.format, MotionFormat::Diffusers);
    let t = |channels, heads, depth| TemporalTransformer { channels, heads, depth };
    let c = &m.config;
    assert_eq!(c.down_blocks, vec![vec![t(32, 4, 2); 2], vec![t(64, 8, 1); 2], vec![t(64, 8, 1); 2]]);
    assert_eq!(c.up_blocks, vec![vec![t(64, 8, 1); 3], vec![t(64, 8, 1); 3], vec![t(32, 4, 2); 3]]);
    assert_eq!(c.mid_block, Some(t(64, 8, 1)));
    assert_eq!((c.norm_num_groups, c.max_seq_length), (32, 32));
    // 537 tensors in the file; the 21 pos_embed.pe tables each serve attn1 and attn2.
    assert_eq!((m.weights.len(), m.names.len()), (537, 516 + 2 * 21));
    // The stored tables are the interleaved sinusoid rounded to float16.
    let stored = m.weights.get("down_blocks.1.motion_modules.0.transformer_blocks.0.pos_embed.pe").unwrap();
    let table = celframe::models::motion::temporal::position_table(32, 64);
    let (rel, max) = common::errors(&stored.to_f32_vec().unwrap(), &table);
    assert!(max <= 4.9e-4 && rel <= 1e-3, "stored vs computed table: rel {rel:.2e}, max {max:.2e}");
}

/// An adapter saved without its position tables (older diffusers) gets computed ones: the exact
/// sinusoid, 2.4e-5 relative away from the reference made with the file's float16-rounded tables,
/// hence verify's 1e-4 here.
#[test]
fn adapter_without_stored_tables_computes_them() {
    let dir = TempDir::new("motion-nope");
    let adapter = dir.path("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(motion_folder().join("config.json"), adapter.join("config.json")).unwrap();
    let mut tensors = adapter_tensors();
    tensors.retain(|name, _| !name.ends_with("pos_embed.pe"));
    write_f16(&adapter.join("diffusion_pytorch_model.safetensors"), &tensors);
    assert_eq!(open_motion(&adapter).unwrap().names.len(), 516);
    let settings = Settings::cpu(DType::F32, 1e-4);
    let v = verify_motion_unet(&folder("a"), &adapter, &motion_reference("f16"), &settings, false).unwrap();
    let c = &v.comparisons[0];
    println!("computed tables: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
    assert!(c.ok() && c.rel_l2 > TOL, "{c:?}");
}

#[test]
fn one_frame_per_video_matches_diffusers() {
    check(&motion_folder(), "f1", false);
}

#[test]
fn sixteen_frames_match_diffusers() {
    check(&motion_folder(), "f16", false);
}

#[test]
fn twenty_four_frames_match_diffusers() {
    check(&motion_folder(), "f24", false);
}

#[test]
fn controlnet_residuals_match_diffusers() {
    check(&motion_folder(), "residuals", false);
}

/// AnimateDiff-Evolved's group norms across frames: matches its reference, and is not what diffusers
/// computes (the reference without the switch is far outside the tolerance).
#[test]
fn group_norms_across_frames_match_their_reference() {
    check(&motion_folder(), "gn_frames.f16", true);
    let settings = Settings::cpu(DType::F32, TOL);
    let v = verify_motion_unet(&folder("a"), &motion_folder(), &motion_reference("f16"), &settings, true).unwrap();
    assert!(v.comparisons[0].rel_l2 > 0.1, "{:?}", v.comparisons[0]);
}

/// The original key names in one safetensors file (no mid block, like AnimateDiff-SDXL), through
/// the graph API: every loaded tensor of the UNet and the modules is read by the forward.
#[test]
fn original_names_file_without_mid_block_matches_diffusers() {
    let dir = TempDir::new("motion-original");
    let path = dir.path("mm_original.safetensors");
    write_f16(&path, &original_tensors());
    let m = open_motion(&path).unwrap();
    assert_eq!(m.format, MotionFormat::Original);
    assert_eq!(m.config.mid_block, None);
    assert_eq!((m.config.max_seq_length, m.config.down_blocks[0][0].heads), (32, 8));
    // The names and shapes do not hold the head count: the loader takes AnimateDiff's 8, and the
    // fixture's 32-wide modules (level 0) have 4, set here as a config.json would.
    let r = celframe::weights::load(&[motion_reference("nomid.f16")]).unwrap();
    let f32 = |name: &str| {
        let t = r.get(name).unwrap();
        Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap()
    };
    let unet_checkpoint = open_unet(&folder("a")).unwrap();
    let unet = Unet::new(&unet_checkpoint, Place::Host(DType::F32)).unwrap();
    let mut fixed = m;
    for m in fixed.config.down_blocks[0].iter_mut().chain(fixed.config.up_blocks[2].iter_mut()) {
        m.heads = 4;
    }
    let modules = MotionModules::new(&fixed, &unet, Place::Host(DType::F32)).unwrap();
    let sample = f32("in.sample"); // [1, 4, 16, 12, 20]
    let frames = sample.shape()[2];
    let rows = to_rows(&sample);
    let (timestep, context) = (f32("in.timestep"), f32("in.encoder_hidden_states"));
    let (text_embeds, time_ids) = (f32("in.added_cond_kwargs.text_embeds"), f32("in.added_cond_kwargs.time_ids"));
    let inputs = UnetInputs {
        sample: &rows,
        timestep: &timestep,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text_embeds),
        time_ids: Some(&time_ids),
    };
    let video = Frames { frames, group_norm_across_frames: false };
    let out = modules.forward_unet(&Exec::Cpu, &unet, &inputs, video, None).unwrap();
    let expected = to_rows(&f32("out.sample"));
    let (rel, max) = common::assert_close("original names, no mid block", &out, &expected, TOL);
    println!("original names, no mid block: rel L2 {rel:.2e}, max abs {max:.2e}");
    assert_eq!(unet.weights().unread(), Vec::<&str>::new());
    assert_eq!(modules.weights().unread(), Vec::<&str>::new());
}

/// [videos, C, F, H, W] -> [videos * F, H, W, C] (written out here, apart from the crate's).
fn to_rows(t: &Tensor) -> Tensor {
    let &[b, c, f, h, w] = t.shape() else { panic!("{t:?}") };
    let v = t.to_f32_vec().unwrap();
    let mut out = Vec::with_capacity(v.len());
    for video in 0..b {
        for frame in 0..f {
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        out.push(v[(((video * c + ch) * f + frame) * h + y) * w + x]);
                    }
                }
            }
        }
    }
    Tensor::from_f32(&[b * f, h, w, c], DType::F32, &out).unwrap()
}

/// One video of 16 frames on 2 contexts (frames 0-7, 8-15) and on 1 gives, to the bit, what the
/// contexts repeated per frame give (the cross-attentions compute K and V on the distinct rows).
#[test]
fn grouped_contexts_give_the_repeated_contexts_output() {
    use celframe::ops::rows::gather_rows;
    let unet = Unet::new(&open_unet(&folder("a")).unwrap(), Place::Host(DType::F32)).unwrap();
    let modules = MotionModules::new(&open_motion(&motion_folder()).unwrap(), &unet, Place::Host(DType::F32)).unwrap();
    let random = |shape: &[usize], seed| common::random_tensor(shape, DType::F32, seed, 1.0, 0.0);
    let frames = 16;
    let (sample, text, ids) = (random(&[frames, 8, 8, 4], 1), random(&[1, 32], 3), random(&[1, 6], 4));
    let t = Tensor::from_f32(&[1], DType::F32, &[700.0]).unwrap();
    let video = Frames { frames, group_norm_across_frames: false };
    let forward = |context: &Tensor| {
        let inputs = UnetInputs {
            sample: &sample,
            timestep: &t,
            encoder_hidden_states: context,
            cross_kv: None,
            text_embeds: Some(&text),
            time_ids: Some(&ids),
        };
        modules.forward_unet(&Exec::Cpu, &unet, &inputs, video, None).unwrap()
    };
    for groups in [2, 1] {
        let context = random(&[groups, 3, 32], 5 + groups as u64);
        let from: Vec<usize> = (0..frames).map(|f| f / (frames / groups)).collect();
        let repeated = gather_rows(&Exec::Cpu, &context, &from).unwrap();
        let (got, want) = (forward(&context), forward(&repeated));
        assert!(
            got.host_bytes().unwrap() == want.host_bytes().unwrap(),
            "{groups} contexts for {frames} frames differ"
        );
    }
}

#[test]
fn frames_beyond_the_positions_are_refused() {
    let unet_checkpoint = open_unet(&folder("a")).unwrap();
    let unet = Unet::new(&unet_checkpoint, Place::Host(DType::F32)).unwrap();
    let modules = MotionModules::new(&open_motion(&motion_folder()).unwrap(), &unet, Place::Host(DType::F32)).unwrap();
    let frames = 33;
    let sample = Tensor::from_f32(&[frames, 4, 4, 4], DType::F32, &vec![0.0; frames * 64]).unwrap();
    let context = Tensor::from_f32(&[frames, 1, 32], DType::F32, &vec![0.0; frames * 32]).unwrap();
    let timestep = Tensor::from_f32(&[1], DType::F32, &[1.0]).unwrap();
    let text = Tensor::from_f32(&[1, 32], DType::F32, &[0.0; 32]).unwrap();
    let ids = Tensor::from_f32(&[1, 6], DType::F32, &[0.0; 6]).unwrap();
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &timestep,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let video = Frames { frames, group_norm_across_frames: false };
    let err = modules.forward_unet(&Exec::Cpu, &unet, &inputs, video, None).unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("33 frames") && m.contains("1 to 32")), "{err}");
    // Per-video inputs with per-frame rows: a timestep per frame is refused by name.
    let per_frame = Tensor::from_f32(&[4], DType::F32, &[1.0; 4]).unwrap();
    let small = Tensor::from_f32(&[4, 4, 4, 4], DType::F32, &[0.0; 256]).unwrap();
    let small_context = Tensor::from_f32(&[4, 1, 32], DType::F32, &[0.0; 128]).unwrap();
    let inputs = UnetInputs { sample: &small, timestep: &per_frame, encoder_hidden_states: &small_context, ..inputs };
    let video = Frames { frames: 4, group_norm_across_frames: false };
    let err = modules.forward_unet(&Exec::Cpu, &unet, &inputs, video, None).unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("timestep") && m.contains("[1]")), "{err}");
}

/// One error, exit code 2, naming a missing, an unknown and a misshaped tensor at once.
#[test]
fn missing_unknown_and_misshaped_tensors_are_listed_in_one_error() {
    let dir = TempDir::new("motion-strict");
    // original format, single file
    let mut tensors = original_tensors();
    let missing = "down_blocks.1.motion_modules.0.temporal_transformer.proj_in.bias";
    let misshaped =
        "up_blocks.0.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_k.weight";
    tensors.remove(missing).unwrap();
    let (_, data) = tensors.get_mut(misshaped).unwrap();
    data.truncate(64 * 32 * 2);
    tensors.get_mut(misshaped).unwrap().0 = vec![64, 32];
    tensors.insert("down_blocks.0.motion_modules.0.temporal_transformer.extra.weight".into(), (vec![2], vec![0; 4]));
    let path = dir.path("broken.safetensors");
    write_f16(&path, &tensors);
    let err = open_motion(&path).err().expect("a broken file loads");
    assert_eq!(err.exit_code(), 2);
    let m = err.to_string();
    assert!(m.contains("missing: 1") && m.contains(missing), "{m}");
    assert!(m.contains("unexpected: 1") && m.contains("temporal_transformer.extra.weight"), "{m}");
    assert!(m.contains("wrong shape: 1") && m.contains(misshaped) && m.contains("[64, 64]"), "{m}");

    // diffusers folder: its config.json, weights missing one table and one weight
    let adapter = dir.path("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(motion_folder().join("config.json"), adapter.join("config.json")).unwrap();
    let mut tensors = adapter_tensors();
    tensors.remove("mid_block.motion_modules.0.transformer_blocks.0.ff.net.2.weight").unwrap();
    tensors.remove("up_blocks.1.motion_modules.0.transformer_blocks.0.pos_embed.pe").unwrap();
    write_f16(&adapter.join("diffusion_pytorch_model.safetensors"), &tensors);
    let m = open_motion(&adapter).err().expect("a broken folder loads").to_string();
    assert!(m.contains("missing: 2"), "{m}");
    assert!(m.contains("mid_block.motion_modules.0.transformer_blocks.0.ff.net.2.weight"), "{m}");
    assert!(m.contains("up_blocks.1.motion_modules.0.transformer_blocks.0.pos_embed.pe"), "{m}");
}

/// A synthetic diffusers-named file whose level-2 modules are 32 wide where unet_a's layers are 64:
/// refused by module name, with exit code 2.
#[test]
fn modules_of_another_width_are_refused_by_name() {
    let t = |channels| TemporalTransformer { channels, heads: 8, depth: 1 };
    let cfg = MotionConfig {
        down_blocks: vec![vec![t(32); 2], vec![t(64); 2], vec![t(32); 2]],
        up_blocks: vec![vec![t(64); 3], vec![t(64); 3], vec![t(32); 3]],
        mid_block: None,
        norm_num_groups: 32,
        max_seq_length: 32,
    };
    let (specs, _) = tensor_specs(&cfg, MotionFormat::Diffusers, false);
    let tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = specs
        .iter()
        .map(|s| (s.name.clone(), (s.shape.clone(), vec![0u8; 2 * s.shape.iter().product::<usize>()])))
        .collect();
    let dir = TempDir::new("motion-width");
    let path = dir.path("narrow.safetensors");
    write_f16(&path, &tensors);
    let m = open_motion(&path).unwrap();
    assert_eq!(m.config, cfg);
    let unet = Unet::new(&open_unet(&folder("a")).unwrap(), Place::Host(DType::F32)).unwrap();
    let err = MotionModules::new(&m, &unet, Place::Host(DType::F32)).err().expect("a misfit loads");
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(text.contains("down_blocks.2.motion_modules.0 is 32 channels wide") && text.contains("gives 64"), "{text}");

    // Through the CLI: exit code 2, the module named.
    let out = cli(&["--motion", path.to_str().unwrap(), "--reference", motion_reference("f1").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("down_blocks.2.motion_modules.0"), "{out:?}");
}

fn cli(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_celframe"))
        .args(["verify", "motion_unet", "--weights", folder("a").to_str().unwrap(), "--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn cli_exit_codes() {
    let motion = motion_folder();
    let m = motion.to_str().unwrap();
    // 0: within tolerance, and --save writes the 5-D output
    let dir = TempDir::new("motion-cli");
    let saved = dir.path("out.safetensors");
    let out = cli(&[
        "--motion",
        m,
        "--reference",
        motion_reference("f1").to_str().unwrap(),
        "--save",
        saved.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("out.sample [2, 4, 1, 12, 20]") && stdout.contains(": ok"), "{stdout}");
    let written = celframe::weights::load(&[&saved]).unwrap();
    assert_eq!(written.get("out.sample").unwrap().shape(), &[2, 4, 1, 12, 20]);
    // 1: outside the tolerance (below the ~1e-6 float32 summation-order error)
    let f1 = motion_reference("f1");
    let out = cli(&["--motion", m, "--reference", f1.to_str().unwrap(), "--tolerance", "1e-9"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OUTSIDE TOLERANCE"), "{out:?}");
    let gn = motion_reference("gn_frames.f16");
    // 2: no --motion; a missing tensor in the motion file; an image reference
    let out = cli(&["--reference", gn.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --motion"), "{out:?}");
    let mut tensors = original_tensors();
    let gone = "up_blocks.2.motion_modules.1.temporal_transformer.norm.bias";
    tensors.remove(gone).unwrap();
    let broken = dir.path("broken.safetensors");
    write_f16(&broken, &tensors);
    let out = cli(&["--motion", broken.to_str().unwrap(), "--reference", gn.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(gone), "{out:?}");
    let image = fixtures().join("unet_a.reference.safetensors");
    let out = cli(&["--motion", m, "--reference", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("[videos, channels, frames, height, width]"), "{out:?}");
}

/// config.json fields the engine cannot use are refused naming the file and the field (exit 2),
/// counts bounded by the checkpoint before anything is sized from them.
#[test]
fn config_json_errors_name_the_field() {
    let dir = TempDir::new("motion-config");
    let adapter = dir.path("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(
        motion_folder().join("diffusion_pytorch_model.safetensors"),
        adapter.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(motion_folder().join("config.json")).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("block_out_channels", serde_json::json!([]), "at least one width"),
        ("motion_layers_per_block", serde_json::json!(1_000_000), "exceeds"),
        ("motion_num_attention_heads", serde_json::json!([8, 8]), "list of 3"),
        ("motion_transformer_layers_per_block", serde_json::json!([[1, 1], [1, 1], [1, 1]]), "per layer"),
        ("conv_in_channels", serde_json::json!(4), "PIA"),
    ];
    for (field, value, says) in cases {
        let mut config = base.clone();
        config[field] = value;
        std::fs::write(adapter.join("config.json"), config.to_string()).unwrap();
        let err = open_motion(&adapter).err().unwrap_or_else(|| panic!("{field}: loads"));
        let text = err.to_string();
        assert_eq!(err.exit_code(), 2, "{text}");
        assert!(text.contains(field) && text.contains("config.json") && text.contains(says), "{field}: {text}");
    }
}

#[test]
fn bench_arguments_are_checked_before_any_gpu_work() {
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_celframe"))
            .args(["bench", "motion_unet", "--weights", folder("a").to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--motion"), "{out:?}");
    let out = run(&["--motion", motion_folder().to_str().unwrap(), "--frames", "33"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frames must be 1 to 32"), "{out:?}");
    // CUDA graphs are for the denoising models only.
    let out = Command::new(env!("CARGO_BIN_EXE_celframe"))
        .args(["bench", "vae_decoder", "--weights", folder("a").to_str().unwrap(), "--graph"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--graph goes with unet"), "{out:?}");
}

/// FP8 motion modules on the CPU twins: "on" (q/k/v and both feed-forward GEMMs in e4m3; proj_in,
/// to_out and ff.net.2 leave their biases pending for the next LayerNorm and proj_out) and "all"
/// (proj_out in e4m3 too, each linear adding its own bias) stay within e4m3's rounding of the f16
/// forward; a bias dropped or added twice moves the output by O(1).
#[test]
fn fp8_motion_modules_stay_near_the_f16_forward() {
    use celframe::models::transformer::Fp8Linears;
    let unet = Unet::new(&open_unet(&folder("a")).unwrap(), Place::Host(DType::F16)).unwrap();
    let checkpoint = open_motion(&motion_folder()).unwrap();
    let random = |shape: &[usize], seed| common::random_tensor(shape, DType::F16, seed, 1.0, 0.0);
    let frames = 8;
    let (sample, text, context) = (random(&[frames, 8, 8, 4], 1), random(&[1, 32], 3), random(&[1, 3, 32], 5));
    let ids = common::random_tensor(&[1, 6], DType::F32, 4, 1.0, 0.0);
    let t = Tensor::from_f32(&[1], DType::F32, &[700.0]).unwrap();
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &t,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let video = Frames { frames, group_norm_across_frames: false };
    let plain = MotionModules::new(&checkpoint, &unet, Place::Host(DType::F16)).unwrap();
    let want = plain.forward_unet(&Exec::Cpu, &unet, &inputs, video, None).unwrap();
    for which in [Fp8Linears::Wide, Fp8Linears::All] {
        let mut modules = MotionModules::new(&checkpoint, &unet, Place::Host(DType::F16)).unwrap();
        assert!(modules.enable_fp8(&Exec::Cpu, which).unwrap() > 0, "{which:?}");
        let got = modules.forward_unet(&Exec::Cpu, &unet, &inputs, video, None).unwrap();
        let (rel, _) = common::errors(&got.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap());
        println!("{which:?} FP8 motion modules vs f16: rel L2 {rel:.3e}");
        assert!(rel > 0.0 && rel < 0.15, "{which:?}: the FP8 forward is {rel:.3e} from the f16 one");
    }
}
