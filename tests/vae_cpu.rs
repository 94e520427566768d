//! The VAE decoder on the CPU twins against diffusers (tests/fixtures/vae_tiny*, made by
//! tools/make_vae_fixtures.py: float32 on both sides), untiled and tiled; checkpoint loading
//! (diffusers folder, legacy attention names, single file), frame chunking, config and loading
//! errors.
//!
//! Tolerance: `verify`'s default bound for f32 is relative L2 <= 1e-4. Both sides compute in fp32
//! and differ by summation order (measured ~1e-7 here), so the tests assert 1e-5, which also
//! catches slips that move the output by a few 1e-5 (a norm eps of 1e-5 for 1e-6).

mod common;
#[path = "common/unet_fixtures.rs"]
mod fixtures;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use celframe::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use celframe::models::vae::{DecodeOptions, DecodeReport, Tiling, Vae, VaeConfig, VaeFormat, open_vae};
use celframe::models::{Limits, Place};
use celframe::ops::Exec;
use celframe::{DType, Error, Tensor, weights};
use fixtures::{TempDir, fixtures};
use safetensors::tensor::TensorView;

const TOL: f64 = 1e-5;
/// The tiling of vae_tiny.tiled.reference.safetensors (also in its metadata).
const FIXTURE_TILING: Tiling = Tiling { latent_tile: 8, overlap: 0.25 };

fn folder() -> PathBuf {
    fixtures().join("vae_tiny")
}
fn single_file() -> PathBuf {
    fixtures().join("vae_tiny.single_file.safetensors")
}

/// (in.z as NHWC f32, out.sample NCHW f32) of a reference file.
fn reference(name: &str) -> (Tensor, Tensor) {
    let r = weights::load(&[fixtures().join(name)]).unwrap();
    let f32 = |n: &str| {
        let t = r.get(n).unwrap();
        Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap()
    };
    (nchw_to_nhwc(&f32("in.z")).unwrap(), f32("out.sample"))
}

fn rel_l2(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let (mut d, mut n, mut m) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let e = (*x as f64 - *y as f64).abs();
        d += e * e;
        n += (*y as f64).powi(2);
        m = m.max(e);
    }
    ((d / n).sqrt(), m)
}

fn load(path: &Path) -> Vae {
    Vae::new(&open_vae(path).unwrap(), Place::Host(DType::F32)).unwrap()
}

/// Small random z [frames, h, w, 4] (std ~7.7, as latents / 0.13025): the checks that compare
/// two decodes with each other use these, since the CPU twins are slow in debug builds.
fn small_z(frames: usize, h: usize, w: usize, seed: u64) -> Tensor {
    common::random_tensor(&[frames, h, w, 4], DType::F32, seed, 7.7, 0.0)
}

fn untiled(chunk_frames: usize) -> DecodeOptions {
    DecodeOptions { chunk_frames, tiling: None }
}

/// Decodes the reference's z and checks the result against its out.sample (NCHW).
fn check(vae: &Vae, name: &str, opts: &DecodeOptions) -> DecodeReport {
    let (z, expected) = reference(name);
    let (image, report) = vae.decode_z(&Exec::Cpu, &z, opts).unwrap();
    assert_eq!(report.peak_scratch_bytes, None, "no peak on the CPU");
    let image = nhwc_to_nchw(&image).unwrap();
    let (rel, max) = rel_l2(&image, &expected);
    println!("{name} {opts:?}: {report:?}, rel L2 {rel:.2e}, max abs {max:.2e}");
    assert!(rel <= TOL, "{name}: relative L2 error {rel:.3e} (max abs {max:.3e})");
    report
}

#[test]
fn folder_matches_diffusers_decode() {
    let checkpoint = open_vae(&folder()).unwrap();
    assert_eq!(checkpoint.format, VaeFormat::Diffusers);
    let cfg = &checkpoint.config;
    assert_eq!((cfg.block_out_channels.as_slice(), cfg.layers_per_block, cfg.norm_num_groups), (&[32, 64][..], 1, 32));
    assert_eq!((cfg.scaling_factor, cfg.shift_factor, cfg.force_upcast), (0.13025, None, false));
    assert_eq!(cfg.compute_dtype(DType::F16), DType::F16, "fp16-fix: no upcast");
    let vae = Vae::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    // Chunks of 2: 2 + 1 frames.
    let report = check(&vae, "vae_tiny.reference.safetensors", &untiled(2));
    assert_eq!((report.frames, report.chunks, report.tiles), (3, 2, 1));
}

#[test]
fn tiled_decode_matches_diffusers_tiled_decode() {
    let vae = load(&folder());
    // One frame per chunk: 2 chunks of 2 x 3 tiles (the last column 4 latents wide).
    let opts = DecodeOptions { chunk_frames: 1, tiling: Some(FIXTURE_TILING) };
    let report = check(&vae, "vae_tiny.tiled.reference.safetensors", &opts);
    assert_eq!((report.chunks, report.tiles), (2, 6));
}

#[test]
fn frame_chunks_give_the_same_frames() {
    let vae = load(&folder());
    let z = small_z(3, 2, 4, 1);
    let (all, report) = vae.decode_z(&Exec::Cpu, &z, &untiled(3)).unwrap();
    assert_eq!((report.frames, report.chunks, report.tiles), (3, 1, 1));
    for k in [1, 2] {
        let (chunked, report) = vae.decode_z(&Exec::Cpu, &z, &untiled(k)).unwrap();
        assert_eq!(report.chunks, 3usize.div_ceil(k));
        assert_eq!(chunked.to_f32_vec().unwrap(), all.to_f32_vec().unwrap(), "chunks of {k}");
    }
    // Streamed: each chunk handed over as it is decoded.
    let mut seen = Vec::new();
    vae.decode_z_each(&Exec::Cpu, &z, &untiled(2), |first, images| {
        seen.push((first, images.shape().to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [(0, vec![2, 4, 8, 3]), (2, vec![1, 4, 8, 3])]);
    // Tiled: latents 5x6, tiles of 4 every 3 (8 image pixels, 2 blended, 6 kept): 2 x 2 tiles, the
    // last ones cut to 2 rows and 3 columns.
    let small = Tiling { latent_tile: 4, overlap: 0.25 };
    let tiled = |k| DecodeOptions { chunk_frames: k, tiling: Some(small) };
    let z = small_z(2, 5, 6, 2);
    let (one, report) = vae.decode_z(&Exec::Cpu, &z, &tiled(1)).unwrap();
    assert_eq!((report.chunks, report.tiles), (2, 4));
    assert_eq!(one.shape(), [2, 10, 12, 3]);
    let (two, _) = vae.decode_z(&Exec::Cpu, &z, &tiled(2)).unwrap();
    assert_eq!(one.to_f32_vec().unwrap(), two.to_f32_vec().unwrap(), "tiled, chunks of 1 and 2");
    // Latents no larger than a tile are decoded whole even with tiling on (as diffusers does).
    let (_, report) = vae.decode_z(&Exec::Cpu, &small_z(1, 4, 4, 3), &tiled(1)).unwrap();
    assert_eq!(report.tiles, 1);
}

#[test]
fn decode_frames_divides_by_the_scaling_factor() {
    let vae = load(&folder());
    let z = small_z(2, 4, 4, 4);
    let sf = vae.config.scaling_factor;
    let latents: Vec<f32> = z.to_f32_vec().unwrap().iter().map(|v| v * sf).collect();
    let latents = Tensor::from_f32(z.shape(), DType::F32, &latents).unwrap();
    let (image, _) = vae.decode_frames(&Exec::Cpu, &latents, &untiled(2)).unwrap();
    let (expected, _) = vae.decode_z(&Exec::Cpu, &z, &untiled(2)).unwrap();
    let (rel, _) = rel_l2(&image, &expected);
    assert!(rel <= TOL, "decode_frames(z * scaling_factor) vs decode_z(z): {rel:.3e}");
}

#[test]
fn single_file_gives_the_folder_architecture_and_output() {
    let single = open_vae(&single_file()).unwrap();
    let diffusers = open_vae(&folder()).unwrap();
    assert_eq!(single.format, VaeFormat::SingleFile);
    let (a, b) = (&single.config, &diffusers.config);
    assert_eq!(
        (&a.block_out_channels, a.layers_per_block, a.norm_num_groups, a.latent_channels, a.out_channels),
        (&b.block_out_channels, b.layers_per_block, b.norm_num_groups, b.latent_channels, b.out_channels)
    );
    assert_eq!((a.scaling_factor, a.mid_block_attention, a.post_quant_conv), (0.13025, true, true));
    let z = small_z(2, 4, 6, 5);
    let from_file = Vae::new(&single, Place::Host(DType::F32)).unwrap().decode_z(&Exec::Cpu, &z, &untiled(2));
    let from_folder = Vae::new(&diffusers, Place::Host(DType::F32)).unwrap().decode_z(&Exec::Cpu, &z, &untiled(2));
    assert_eq!(from_file.unwrap().0.to_f32_vec().unwrap(), from_folder.unwrap().0.to_f32_vec().unwrap());
}

/// Every tensor of the fixture folder's file, renamed / reshaped / dropped by `edit`, written as a
/// diffusers folder in `dir`.
fn write_folder(dir: &Path, edit: impl Fn(&str, &[usize]) -> Option<(String, Vec<usize>)>) {
    std::fs::copy(folder().join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(folder().join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: BTreeMap<String, TensorView> = BTreeMap::new();
    for (name, t) in st.tensors() {
        if let Some((new, shape)) = edit(&name, t.shape()) {
            views.insert(new, TensorView::new(t.dtype(), shape, t.data()).unwrap());
        }
    }
    safetensors::serialize_to_file(views, None, &dir.join("diffusion_pytorch_model.safetensors")).unwrap();
}

#[test]
fn legacy_attention_names_and_conv_shaped_projections_load() {
    let dir = TempDir::new("vae-legacy");
    let attn = "decoder.mid_block.attentions.0.";
    write_folder(&dir.0, |name, shape| {
        let Some(rest) = name.strip_prefix(attn) else {
            return Some((name.to_string(), shape.to_vec()));
        };
        let rest = rest.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.");
        let rest = rest.replace("to_out.0.", "proj_attn.");
        // Old files may also hold the projections as 1x1 convolutions.
        let shape = if shape.len() == 2 { vec![shape[0], shape[1], 1, 1] } else { shape.to_vec() };
        Some((format!("{attn}{rest}"), shape))
    });
    let z = small_z(1, 4, 6, 6);
    let (legacy, _) = load(&dir.0).decode_z(&Exec::Cpu, &z, &untiled(1)).unwrap();
    let (current, _) = load(&folder()).decode_z(&Exec::Cpu, &z, &untiled(1)).unwrap();
    assert_eq!(legacy.to_f32_vec().unwrap(), current.to_f32_vec().unwrap());
}

#[test]
fn strict_loading_lists_missing_unexpected_and_misshapen_tensors() {
    let dir = TempDir::new("vae-strict");
    write_folder(&dir.0, |name, shape| match name {
        "decoder.conv_out.bias" => None,
        "decoder.conv_in.bias" => Some(("decoder.conv_in.bias_typo".into(), shape.to_vec())),
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" => Some((name.into(), vec![32, 64])),
        // Encoder tensors of any shape are skipped, not checked.
        "encoder.conv_in.bias" => Some((name.into(), vec![4, 8])),
        _ => Some((name.to_string(), shape.to_vec())),
    });
    let err = open_vae(&dir.0).err().expect("broken folder must not load");
    let Error::Input(m) = &err else { panic!("{err}") };
    for needle in [
        "missing: 2",
        "unexpected: 1",
        "wrong shape: 1",
        "decoder.conv_out.bias",
        "decoder.conv_in.bias_typo",
        "conv_shortcut.weight: expected [32, 64, 1, 1], found [32, 64]",
    ] {
        assert!(m.contains(needle), "'{needle}' not in:\n{m}");
    }
    assert!(!m.contains("encoder."), "encoder tensors are ignored:\n{m}");
}

#[test]
fn weights_paths_are_detected_or_refused_clearly() {
    let dir = TempDir::new("vae-paths");
    // A pipeline folder holding vae/.
    std::fs::create_dir_all(dir.path("pipe/vae")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(folder().join(f), dir.path("pipe/vae").join(f)).unwrap();
    }
    assert_eq!(open_vae(&dir.path("pipe")).unwrap().format, VaeFormat::Diffusers);
    assert_eq!(open_vae(&folder().join("config.json")).unwrap().format, VaeFormat::Diffusers);
    let input_error = |path: &Path, needle: &str| {
        let err = open_vae(path).err().expect("must not load");
        assert!(matches!(&err, Error::Input(m) if m.contains(needle)), "{}: {err}", path.display());
    };
    input_error(&dir.path("missing"), "no such file");
    input_error(&dir.0, "no config.json");
    // A diffusers-named file alone has no config; a UNet fixture holds no VAE.
    input_error(&folder().join("diffusion_pytorch_model.safetensors"), "needs its config.json");
    input_error(&fixtures().join("unet_a/diffusion_pytorch_model.safetensors"), "not a VAE");
}

fn config_error(json: &str) -> Error {
    VaeConfig::from_diffusers_json(json, "config.json", &Limits::engine()).expect_err(json)
}

#[test]
fn config_errors_name_the_field() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("config.json")).unwrap()).unwrap();
    let with = |field: &str, value: serde_json::Value| {
        let mut v = base.clone();
        v[field] = value;
        v.to_string()
    };
    use serde_json::json;
    for (json, needle) in [
        ("[1, 2]".to_string(), "not a JSON object"),
        ("{".to_string(), "not valid JSON"),
        (with("_class_name", json!("UNet2DConditionModel")), "not an AutoencoderKL"),
        (with("block_out_channels", json!("wide")), "'block_out_channels'"),
        (with("block_out_channels", json!([32, 64, 128])), "'up_block_types'"),
        (with("block_out_channels", json!([])), "block_out_channels"),
        (with("layers_per_block", json!(-1)), "'layers_per_block'"),
        (with("norm_num_groups", json!(24)), "norm_num_groups 24 does not divide"),
        (with("latent_channels", json!(1.5)), "'latent_channels'"),
        (with("scaling_factor", json!("0.13")), "'scaling_factor'"),
        (with("scaling_factor", json!(0)), "scaling_factor 0"),
        (with("force_upcast", json!(1)), "'force_upcast'"),
        (with("sample_size", json!("big")), "'sample_size'"),
        (
            json!({"block_out_channels": vec![32; 17], "up_block_types": vec!["UpDecoderBlock2D"; 17]}).to_string(),
            "at most 16",
        ),
    ] {
        let err = config_error(&json);
        assert!(matches!(&err, Error::Input(m) if m.contains(needle)), "{needle}: {err}");
    }
    for (json, needle) in [
        (with("act_fn", json!("gelu")), "act_fn"),
        (with("latents_mean", json!([0, 0, 0, 0])), "latents_mean"),
        (with("up_block_types", json!(["UpDecoderBlock2D", "AttnUpDecoderBlock2D"])), "AttnUpDecoderBlock2D"),
    ] {
        let err = config_error(&json);
        assert!(matches!(&err, Error::Unsupported(m) if m.contains(needle)), "{needle}: {err}");
    }
    // Defaults and variants diffusers accepts.
    let cfg = VaeConfig::from_diffusers_json(
        &with("shift_factor", json!(0.0609)).replace("\"sample_size\":16", "\"sample_size\":[16,24]"),
        "c",
        &Limits::engine(),
    )
    .unwrap();
    assert_eq!((cfg.shift_factor, cfg.sample_size), (Some(0.0609), 16));
    let minimal = VaeConfig::from_diffusers_json("{}", "c", &Limits::engine()).unwrap();
    assert_eq!(
        (&minimal.block_out_channels[..], minimal.scaling_factor, minimal.force_upcast),
        (&[64][..], 0.18215, true)
    );
    assert_eq!(minimal.compute_dtype(DType::F16), DType::F32, "force_upcast runs f16 requests in f32");
}

#[test]
fn bad_inputs_and_tilings_are_input_errors() {
    let vae = load(&folder());
    let (z, _) = reference("vae_tiny.reference.safetensors");
    let input_error = |r: celframe::Result<(Tensor, DecodeReport)>, needle: &str| {
        let err = r.expect_err("must fail");
        assert!(matches!(&err, Error::Input(m) if m.contains(needle)), "{needle}: {err}");
    };
    input_error(vae.decode_z(&Exec::Cpu, &z, &untiled(0)), "chunk_frames");
    let three = Tensor::from_f32(&[1, 2, 2, 3], DType::F32, &[0.0; 12]).unwrap();
    input_error(vae.decode_z(&Exec::Cpu, &three, &untiled(1)), "must be NHWC");
    let flat = z.reshape(&[3, 8 * 12 * 4]).unwrap();
    input_error(vae.decode_z(&Exec::Cpu, &flat, &untiled(1)), "must be NHWC");
    let uneven = Tiling { latent_tile: 6, overlap: 0.25 };
    let tiled = |t| DecodeOptions { chunk_frames: 1, tiling: Some(t) };
    input_error(vae.decode_z(&Exec::Cpu, &z, &tiled(uneven)), "tile exactly");
    input_error(vae.decode_z(&Exec::Cpu, &z, &tiled(Tiling { latent_tile: 8, overlap: 1.0 })), "overlap");
    let f16 = Tensor::from_f32(&[1, 8, 8, 4], DType::F16, &[0.0; 256]).unwrap();
    assert!(matches!(vae.forward(&Exec::Cpu, &f16), Err(Error::Input(_))), "z in another dtype than the weights");
    let nan = Tensor::from_f32(&[1, 4, 4, 4], DType::F32, &[f32::NAN; 64]).unwrap();
    input_error(vae.decode_frames(&Exec::Cpu, &nan, &untiled(1)), "non-finite");
}

fn celframe(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The tiled reference's tensors with other metadata.
fn write_reference(path: &Path, metadata: &[(&str, &str)]) {
    let bytes = std::fs::read(fixtures().join("vae_tiny.tiled.reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: BTreeMap<String, TensorView> = st.tensors().into_iter().collect();
    let meta = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

#[test]
fn verify_cli_exit_codes_and_save() {
    let dir = TempDir::new("vae-verify-cli");
    let (weights_dir, single) = (folder(), single_file());
    let (w, single) = (weights_dir.to_str().unwrap(), single.to_str().unwrap());
    let tiled = fixtures().join("vae_tiny.tiled.reference.safetensors");
    let tiled = tiled.to_str().unwrap();
    let saved = dir.path("out.safetensors");
    let base = ["verify", "vae_decoder", "--weights", single, "--reference", tiled, "--device", "cpu"];

    // The single file against diffusers' tiled decode: the tiling comes from the metadata.
    let (code, stdout, stderr) = celframe(&[&base[..], &["--save", saved.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "within tolerance:\n{stdout}\n{stderr}");
    assert!(stdout.contains("6 tiles of 8 latents") && stdout.contains("out.sample [2, 3, 24, 32]"), "{stdout}");
    let written = weights::load(&[&saved]).unwrap();
    let expected = weights::load(&[fixtures().join("vae_tiny.tiled.reference.safetensors")]).unwrap();
    let (rel, _) = rel_l2(written.get("out.sample").unwrap(), expected.get("out.sample").unwrap());
    assert!(rel <= TOL, "--save wrote out.sample (NCHW) as computed: rel {rel:.2e}");

    // Outside tolerance: a one-frame reference whose expected image is wrong (all zeros).
    let wrong = dir.path("wrong.safetensors");
    let z: Vec<u8> = common::randn(64, 9, 7.7, 0.0).iter().flat_map(|v| v.to_le_bytes()).collect();
    let zeros = vec![0u8; 3 * 8 * 8 * 4];
    let views = BTreeMap::from([
        ("in.z".to_string(), TensorView::new(safetensors::Dtype::F32, vec![1, 4, 4, 4], &z).unwrap()),
        ("out.sample".to_string(), TensorView::new(safetensors::Dtype::F32, vec![1, 3, 8, 8], &zeros).unwrap()),
    ]);
    safetensors::serialize_to_file(views, None, &wrong).unwrap();
    let (code, stdout, _) =
        celframe(&["verify", "vae_decoder", "--weights", w, "--reference", wrong.to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(code, 1, "outside tolerance:\n{stdout}");
    assert!(stdout.contains("untiled") && stdout.contains("OUTSIDE TOLERANCE"), "{stdout}");

    let partial = dir.path("partial.safetensors");
    write_reference(&partial, &[("tile_latent_min_size", "8")]);
    let uneven = dir.path("uneven.safetensors");
    write_reference(
        &uneven,
        &[("tile_latent_min_size", "8"), ("tile_sample_min_size", "8"), ("tile_overlap_factor", "0.25")],
    );
    let unet_ref = fixtures().join("unet_a.reference.safetensors");
    let bad_inputs: [&[&str]; 4] = [
        &["verify", "vae_decoder", "--weights", w, "--reference", partial.to_str().unwrap(), "--device", "cpu"],
        &["verify", "vae_decoder", "--weights", w, "--reference", uneven.to_str().unwrap(), "--device", "cpu"],
        &["verify", "vae_decoder", "--weights", w, "--reference", unet_ref.to_str().unwrap(), "--device", "cpu"],
        &["verify", "vae_decoder", "--weights", "/nonexistent", "--reference", tiled, "--device", "cpu"],
    ];
    for args in bad_inputs {
        let (code, stdout, stderr) = celframe(args);
        assert_eq!(code, 2, "bad input {args:?}:\n{stdout}\n{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
}
