//! The ControlNet on the CPU twins against diffusers' ControlNetModel (tests/fixtures/controlnet_a*,
//! made by tools/make_controlnet_fixtures.py: float32 on both sides): the full, mid and small
//! variants, guess mode, every checkpoint naming (diffusers folder, diffusers-named file, cldm names
//! with and without `control_model.`), the residuals fed to the UNet, load and input errors, and
//! `celframe verify controlnet`'s exit codes. The Union (diffusers' ControlNetUnionModel,
//! tools/make_controlnet_union_fixtures.py): one and several conditions, per-condition scales,
//! guess mode, from_multi, one sample per reference; a batch of samples against the same samples
//! one at a time; its loading and input errors. Control-LoRA (tools/make_control_lora_fixtures.py,
//! tests/fixtures/control_lora: the file over unet_a against diffusers' ControlNetModel.from_unet
//! with the file applied): the architecture, the residuals, what its deltas change, its errors, the
//! CLI's --base, and a render with a Control-LoRA entry.
//!
//! Tolerance: `verify`'s f32 bound is relative L2 <= 1e-4; measured errors are 2e-7 to 1.4e-6 (f32
//! summation order), so the tests assert 1e-5 on every residual.

mod common;
#[path = "common/control_lora_fixtures.rs"]
mod control_lora;
#[path = "common/controlnet_fixtures.rs"]
mod controlnet;
#[path = "common/unet_fixtures.rs"]
mod fixtures;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use celframe::models::controlnet::checkpoint::{CLDM_PREFIX, CldmNames};
use celframe::models::controlnet::open_controlnet_with_base;
use celframe::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use celframe::models::transformer::CrossKv;
use celframe::models::{
    ControlNet, ControlNetConfig, ControlNetFormat, ControlNetUnion, ControlScale, ControlType, Limits, Place, Unet,
    UnetInputs, UnetResiduals, UnionCondition, UnionOptions, open_controlnet, open_unet,
};
use celframe::ops::Exec;
use celframe::verify::{Settings, verify_controlnet, verify_controlnet_with_base};
use celframe::{DType, Error, Tensor, weights};
use common::TempDir;
use control_lora::{Tensors, base_unet, control_lora_reference, write_control_lora};
use controlnet::{
    reference, union_tensors, write, write_cldm, write_diffusers_file, write_folder, write_folder_with,
    write_union_folder, write_union_folder_with,
};
use safetensors::{Dtype, SafeTensors};

const TOL: f64 = 1e-5;

/// verify_controlnet on the CPU in f32: every residual within TOL; returns the computed outputs.
fn check(weights: &Path, reference_name: &str) -> Vec<(String, Tensor)> {
    let v = verify_controlnet(weights, &reference(reference_name), &Settings::cpu(DType::F32, TOL)).unwrap();
    assert_eq!(v.comparisons.len(), 10, "9 down residuals and the mid residual");
    let worst = v.comparisons.iter().map(|c| c.rel_l2).fold(0.0, f64::max);
    println!("{} vs {reference_name}: worst rel L2 {worst:.2e}", weights.display());
    for c in &v.comparisons {
        assert!(c.ok(), "{reference_name}: {c:?}");
    }
    v.outputs
}

/// The reference's inputs as f32 host tensors (NHWC for images), for the graph API.
struct Inputs {
    sample: Tensor,
    timestep: Tensor,
    context: Tensor,
    text_embeds: Tensor,
    time_ids: Tensor,
    cond: Tensor,
    expected: Vec<Tensor>,
}

impl Inputs {
    fn read(name: &str) -> Inputs {
        Inputs::read_file(&reference(name))
    }

    fn read_file(path: &Path) -> Inputs {
        let r = weights::open(path, "reference").unwrap();
        let f32 = |n: &str| {
            let t = r.float(n).unwrap();
            Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap()
        };
        let mut expected: Vec<Tensor> =
            (0..9).map(|k| nchw_to_nhwc(&f32(&format!("out.down_block_res_samples.{k}"))).unwrap()).collect();
        expected.push(nchw_to_nhwc(&f32("out.mid_block_res_sample")).unwrap());
        Inputs {
            sample: nchw_to_nhwc(&f32("in.sample")).unwrap(),
            timestep: f32("in.timestep"),
            context: f32("in.encoder_hidden_states"),
            text_embeds: f32("in.added_cond_kwargs.text_embeds"),
            time_ids: f32("in.added_cond_kwargs.time_ids"),
            cond: nchw_to_nhwc(&f32("in.controlnet_cond")).unwrap(),
            expected,
        }
    }

    fn unet(&self) -> UnetInputs<'_> {
        UnetInputs {
            sample: &self.sample,
            timestep: &self.timestep,
            encoder_hidden_states: &self.context,
            cross_kv: None,
            text_embeds: Some(&self.text_embeds),
            time_ids: Some(&self.time_ids),
        }
    }
}

fn depths(cfg: &ControlNetConfig) -> (Vec<Vec<Option<usize>>>, usize) {
    let levels = cfg
        .encoder
        .down_blocks
        .iter()
        .map(|b| b.layers.iter().map(|l| l.attention.as_ref().map(|t| t.depth)).collect());
    (levels.collect(), cfg.encoder.mid_block.as_ref().unwrap().attention.depth)
}

/// The variant's folder through the graph API: its architecture as diffusers built it, every
/// residual within TOL of diffusers', and every loaded tensor read by the forward.
fn variant_matches_diffusers(variant: &str, scale: f32, depth: (Vec<Vec<Option<usize>>>, usize)) {
    let dir = TempDir::new(&format!("controlnet-{variant}"));
    let checkpoint = open_controlnet(&write_folder(&dir.0, variant)).unwrap();
    assert_eq!(checkpoint.format, ControlNetFormat::Diffusers);
    assert_eq!(depths(&checkpoint.config), depth, "{variant}: transformer depths per layer, mid");
    assert_eq!(checkpoint.config.conditioning_embedding_out_channels, [8, 16, 16, 32]);
    let cn = ControlNet::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    let x = Inputs::read(variant);
    let out = cn.forward(&Exec::Cpu, &x.unet(), &x.cond, ControlScale::new(scale)).unwrap();
    assert_eq!(out.down.len(), 9);
    for (k, (computed, expected)) in out.down.iter().chain([&out.mid]).zip(&x.expected).enumerate() {
        let (rel, max) = common::assert_close(&format!("{variant} residual {k}"), computed, expected, TOL);
        println!("{variant} residual {k}: rel L2 {rel:.2e}, max abs {max:.2e}");
    }
    assert_eq!(cn.weights().unread(), Vec::<&str>::new(), "{variant}: loaded but never read");
}

#[test]
fn full_folder_matches_diffusers() {
    let full = (vec![vec![None, None], vec![Some(1), Some(1)], vec![Some(2), Some(2)]], 2);
    variant_matches_diffusers("full", 0.75, full);
}

/// transformer_layers_per_block [0, 0, 1]: level 1's transformers have no blocks (GroupNorm,
/// proj_in, proj_out, residual), as diffusers/controlnet-*-sdxl-1.0-mid.
#[test]
fn mid_folder_matches_diffusers() {
    let mid = (vec![vec![None, None], vec![Some(0), Some(0)], vec![Some(1), Some(1)]], 1);
    variant_matches_diffusers("mid", 1.0, mid);
}

/// No attention in the down path, a mid transformer without blocks.
#[test]
fn small_folder_matches_diffusers() {
    let small = (vec![vec![None, None], vec![None, None], vec![None, None]], 0);
    variant_matches_diffusers("small", 1.3, small);
}

/// diffusers' guess mode: the reference (scale 0.5) matches, the same inputs without guess mode do
/// not, and the factors are diffusers' logspace (FORMATS / ControlNetModel.forward: 0.1 ... 0.7743,
/// mid 1).
#[test]
fn guess_mode_matches_diffusers() {
    let dir = TempDir::new("controlnet-guess");
    let full = write_folder(&dir.0, "full");
    check(&full, "guess");
    let cn = ControlNet::new(&open_controlnet(&full).unwrap(), Place::Host(DType::F32)).unwrap();
    let x = Inputs::read("guess");
    let plain = cn.forward(&Exec::Cpu, &x.unet(), &x.cond, ControlScale::new(0.5)).unwrap();
    let (rel, _) = common::errors(&plain.down[0].to_f32_vec().unwrap(), &x.expected[0].to_f32_vec().unwrap());
    assert!(rel > 1.0, "without guess mode residual 0 is 10x the reference's (rel {rel:.2})");
    let f = ControlScale { conditioning_scale: 1.0, guess_mode: true }.factors(9);
    let upstream = [0.1, 0.1292, 0.1668, 0.2154, 0.2783, 0.3594, 0.4642, 0.5995, 0.7743, 1.0];
    for (a, b) in f.iter().zip(upstream) {
        assert!((a - b).abs() < 5e-5, "{f:?}");
    }
}

/// cldm names under control_model. (with a UNet tensor and int64 ids beside them, which are
/// skipped) and at the top level: the folder's architecture read from the shapes, and diffusers'
/// outputs through the name map (checked once, with the prefix: both forms share the map).
#[test]
fn cldm_single_files_match_diffusers() {
    let dir = TempDir::new("controlnet-cldm");
    for variant in ["full", "mid"] {
        let diffusers = open_controlnet(&write_folder(&dir.0, variant)).unwrap().config;
        for (prefix, prefixed) in [(CLDM_PREFIX, true), ("", false)] {
            let file = dir.path(&format!("{variant}_{prefixed}.safetensors"));
            write_cldm(&file, variant, prefix);
            let single = open_controlnet(&file).unwrap();
            assert_eq!(single.format, ControlNetFormat::Cldm { prefixed });
            assert_eq!(single.config, diffusers, "{variant}: the architecture read from the shapes");
            if prefixed {
                check(&file, variant);
            }
        }
    }
}

/// A folder's weights file alone (diffusers names, no config.json): the architecture from its
/// shapes equals config.json's (the names are the graph's, so the forward is the folder's). The
/// small variant's depth-0 mid transformer has no cross-attention to read a width from, so its
/// outputs are compared instead.
#[test]
fn diffusers_named_single_files_derive_the_architecture() {
    let dir = TempDir::new("controlnet-diffusers-file");
    for variant in controlnet::VARIANTS {
        let file = dir.path(&format!("{variant}.safetensors"));
        write_diffusers_file(&file, variant);
        let single = open_controlnet(&file).unwrap();
        assert_eq!(single.format, ControlNetFormat::DiffusersSingleFile);
        match variant {
            "small" => drop(check(&file, variant)),
            _ => {
                assert_eq!(single.config, open_controlnet(&write_folder(&dir.0, variant)).unwrap().config, "{variant}")
            }
        }
    }
}

/// The full ControlNet's residuals in unet_a's forward: diffusers' UNet output with
/// down_block_additional_residuals / mid_block_additional_residual from diffusers' ControlNet.
#[test]
fn residuals_feed_the_unet_as_diffusers_does() {
    let dir = TempDir::new("controlnet-unet");
    let cn =
        ControlNet::new(&open_controlnet(&write_folder(&dir.0, "full")).unwrap(), Place::Host(DType::F32)).unwrap();
    let unet_checkpoint = open_unet(&fixtures::folder("a")).unwrap();
    cn.check_unet(&unet_checkpoint.config).unwrap();
    let unet = Unet::new(&unet_checkpoint, Place::Host(DType::F32)).unwrap();
    let x = Inputs::read("full");
    let residuals = cn.forward(&Exec::Cpu, &x.unet(), &x.cond, ControlScale::new(0.75)).unwrap();
    let out = nhwc_to_nchw(&unet.forward(&Exec::Cpu, &x.unet(), Some(&residuals)).unwrap()).unwrap();
    // The net's own text k/v computed beforehand give the same residuals; the UNet's are refused
    // (the same module names, other weights).
    let own = CrossKv::compute(&Exec::Cpu, cn.weights(), &x.context).unwrap().unwrap();
    let cached = UnetInputs { cross_kv: Some(&own), ..x.unet() };
    let again = cn.forward(&Exec::Cpu, &cached, &x.cond, ControlScale::new(0.75)).unwrap();
    for (a, b) in again.down.iter().chain([&again.mid]).zip(residuals.down.iter().chain([&residuals.mid])) {
        assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    }
    let unets = CrossKv::compute(&Exec::Cpu, unet.weights(), &x.context).unwrap().unwrap();
    let err =
        cn.forward(&Exec::Cpu, &UnetInputs { cross_kv: Some(&unets), ..x.unet() }, &x.cond, ControlScale::new(0.75));
    assert!(matches!(&err, Err(Error::Input(m)) if m.contains("ControlNet input: cross_kv")), "{:?}", err.err());
    let expected = weights::load(&[common_fixture("controlnet_a.full.unet_sample.safetensors")]).unwrap();
    let expected = expected.get("out.sample").unwrap();
    // Without the residuals unet_a's output is 0.76 away (tools/make_controlnet_fixtures.py prints it).
    let (rel, max) = common::assert_close("unet_a + ControlNet", &out, expected, TOL);
    println!("unet_a with the ControlNet's residuals: rel L2 {rel:.2e}, max abs {max:.2e}");

    // A UNet with other skip connections is refused by residual.
    let other = open_unet(&fixtures::folder("b")).unwrap().config;
    let err = cn.check_unet(&other).unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("down-block residuals")), "{err}");
}

fn common_fixture(name: &str) -> std::path::PathBuf {
    fixtures::fixtures().join(name)
}

/// Frames folded into the batch: one timestep and text_time per video, added to each frame, gives
/// what the same rows as images with the per-video values repeated give.
#[test]
fn frames_share_their_video_embedding() {
    let dir = TempDir::new("controlnet-frames");
    let cn =
        ControlNet::new(&open_controlnet(&write_folder(&dir.0, "small")).unwrap(), Place::Host(DType::F32)).unwrap();
    let x = Inputs::read("mid"); // 2 rows at 8x8
    let t = Tensor::from_f32(&[1], DType::F32, &[311.0]).unwrap();
    let row0 = |t: &Tensor| Tensor::from_f32(&[1, t.shape()[1]], DType::F32, &t.to_f32_vec().unwrap()[..t.shape()[1]]);
    let (text, ids) = (row0(&x.text_embeds).unwrap(), row0(&x.time_ids).unwrap());
    let video = UnetInputs { timestep: &t, text_embeds: Some(&text), time_ids: Some(&ids), ..x.unet() };
    let framed = cn.forward_frames(&Exec::Cpu, &video, &x.cond, 2, ControlScale::new(1.0)).unwrap();
    let repeat = |t: &Tensor| {
        let v = t.to_f32_vec().unwrap();
        let mut s = t.shape().to_vec();
        s[0] *= 2;
        Tensor::from_f32(&s, DType::F32, &[v.clone(), v].concat()).unwrap()
    };
    let (t2, text2, ids2) = (repeat(&t), repeat(&text), repeat(&ids));
    let images = UnetInputs { timestep: &t2, text_embeds: Some(&text2), time_ids: Some(&ids2), ..x.unet() };
    let each = cn.forward(&Exec::Cpu, &images, &x.cond, ControlScale::new(1.0)).unwrap();
    for (a, b) in framed.down.iter().chain([&framed.mid]).zip(each.down.iter().chain([&each.mid])) {
        assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    }
}

/// One context for both rows (a render's CFG half) gives, to the bit, what the context repeated
/// per row gives.
#[test]
fn a_shared_context_gives_the_repeated_contexts_residuals() {
    let dir = TempDir::new("controlnet-grouped");
    let cn =
        ControlNet::new(&open_controlnet(&write_folder(&dir.0, "full")).unwrap(), Place::Host(DType::F32)).unwrap();
    let x = Inputs::read("full"); // 2 rows
    let ctx = x.context.to_f32_vec().unwrap();
    let (tokens, width) = (x.context.shape()[1], x.context.shape()[2]);
    let one = Tensor::from_f32(&[1, tokens, width], DType::F32, &ctx[..tokens * width]).unwrap();
    let both = Tensor::from_f32(&[2, tokens, width], DType::F32, &ctx[..tokens * width].repeat(2)).unwrap();
    let run = |context: &Tensor| {
        let inputs = UnetInputs { encoder_hidden_states: context, ..x.unet() };
        cn.forward(&Exec::Cpu, &inputs, &x.cond, ControlScale::new(1.0)).unwrap()
    };
    let (grouped, repeated) = (run(&one), run(&both));
    for (a, b) in grouped.down.iter().chain([&grouped.mid]).zip(repeated.down.iter().chain([&repeated.mid])) {
        assert!(a.host_bytes().unwrap() == b.host_bytes().unwrap(), "a shared context differs from its repeats");
    }
}

/// Missing, unexpected and misshapen tensors in one error naming the file and each tensor; in a
/// cldm file the names are the file's.
#[test]
fn strict_loading_lists_missing_unexpected_and_misshapen_tensors() {
    let dir = TempDir::new("controlnet-strict");
    let folder = write_folder_with(&dir.0, "mid", |t| {
        t.remove("controlnet_down_blocks.4.bias").unwrap();
        t.insert("controlnet_down_blocks.9.weight".into(), (Dtype::F16, vec![64, 64, 1, 1], vec![0; 64 * 64 * 2]));
        let (_, shape, data) = t.get_mut("controlnet_cond_embedding.blocks.3.weight").unwrap();
        *shape = vec![16, 8, 3, 3];
        data.truncate(16 * 8 * 9 * 2);
    });
    let m = match open_controlnet(&folder) {
        Err(Error::Input(m)) => m,
        other => panic!("expected an input error, got {:?}", other.map(|c| c.format)),
    };
    for needle in [
        "diffusion_pytorch_model.safetensors",
        "missing: controlnet_down_blocks.4.bias",
        "unexpected: controlnet_down_blocks.9.weight",
        "controlnet_cond_embedding.blocks.3.weight: expected [16, 16, 3, 3], found [16, 8, 3, 3]",
    ] {
        assert!(m.contains(needle), "'{needle}' not in:\n{m}");
    }

    let file = dir.path("broken_cldm.safetensors");
    write_cldm(&file, "full", CLDM_PREFIX);
    let mut t = read_all(&file);
    t.remove("control_model.zero_convs.7.0.weight").unwrap();
    write(&file, &t);
    let err = open_controlnet(&file).err().expect("a file without a zero conv loads");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("control_model.zero_convs.7.0.weight"), "{err}");
}

fn read_all(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect()
}

/// Other kinds of checkpoint are refused by name: a UNet, a Union ControlNet, a Control-LoRA
/// without its base UNet.
#[test]
fn other_checkpoints_are_refused_by_name() {
    let dir = TempDir::new("controlnet-kinds");
    let err = |path: &Path| open_controlnet(path).err().expect("loads");
    let unet_file = fixtures::folder("a").join("diffusion_pytorch_model.safetensors");
    let e = err(&unet_file);
    assert!(matches!(&e, Error::Input(m) if m.contains("a UNet checkpoint, not a ControlNet")), "{e}");
    // a Union key makes it a Union, whose other modules must be there
    let mut union = controlnet::tensors("full");
    union.insert("control_add_embedding.linear_1.bias".into(), (Dtype::F16, vec![2], vec![0; 4]));
    let file = dir.path("union.safetensors");
    write(&file, &union);
    let e = err(&file);
    assert!(matches!(&e, Error::Input(m) if m.contains("Union modules: no task_embedding")), "{e}");
    // a Control-LoRA needs its base UNet; its marker under control_model. is not a known layout
    let mut lora = BTreeMap::new();
    lora.insert("lora_controlnet".to_string(), (Dtype::F16, vec![1], vec![0; 2]));
    lora.insert("input_hint_block.0.weight".to_string(), (Dtype::F16, vec![1], vec![0; 2]));
    let file = dir.path("control_lora.safetensors");
    write(&file, &lora);
    let e = err(&file);
    assert!(matches!(&e, Error::Input(m) if m.contains("a Control-LoRA") && m.contains("base UNet")), "{e}");
    let prefixed: Tensors = lora.into_iter().map(|(k, v)| (format!("{CLDM_PREFIX}{k}"), v)).collect();
    write(&file, &prefixed);
    let e = err(&file);
    assert!(matches!(&e, Error::Unsupported(m) if m.contains("Control-LoRA marker")), "{e}");
    // a UNet folder given as a ControlNet: its config names the class
    let e = err(&fixtures::folder("a"));
    assert!(matches!(&e, Error::Input(m) if m.contains("UNet2DConditionModel, not a ControlNetModel")), "{e}");
}

fn config_with(variant: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let path = controlnet::controlnet_dir().join(format!("config.{variant}.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

/// config.json problems name the file and the field; valid configs using what the engine lacks
/// are Unsupported; counts are bounded by the checkpoint before anything is sized.
#[test]
fn config_json_errors_name_the_field() {
    use serde_json::json;
    let parse = |json: String, limits: &Limits| ControlNetConfig::from_diffusers_json(&json, "config.json", limits);
    let engine = Limits::engine();
    let input = |json: String, needle: &str| match parse(json, &engine) {
        Err(Error::Input(m)) => assert!(m.contains(needle) && m.contains("config.json"), "'{needle}' not in: {m}"),
        other => panic!("expected an input error mentioning '{needle}', got {other:?}"),
    };
    let set = |field: &'static str, value: serde_json::Value| {
        config_with("full", move |c| drop(c.insert(field.into(), value)))
    };
    input(set("_class_name", json!("UNet2DConditionModel")), "not a ControlNetModel");
    input(set("block_out_channels", json!(32)), "'block_out_channels'");
    input(set("block_out_channels", json!([32, 64])), "'block_out_channels'");
    input(set("layers_per_block", json!([2, 2, 2])), "'layers_per_block'");
    input(set("cross_attention_dim", json!([32, 32, 32])), "'cross_attention_dim'");
    input(set("attention_head_dim", json!([1, 3, 1])), "does not divide 64");
    input(set("num_attention_heads", json!(3)), "does not divide 64");
    input(set("mid_block_type", serde_json::Value::Null), "'mid_block_type'");
    input(set("conditioning_embedding_out_channels", json!([])), "'conditioning_embedding_out_channels'");
    input(set("conditioning_embedding_out_channels", serde_json::Value::Null), "'conditioning_embedding_out_channels'");
    input(set("norm_num_groups", json!(24)), "norm groups");
    input(config_with("full", |c| drop(c.remove("addition_time_embed_dim"))), "'addition_time_embed_dim'");
    // a Union's token width defaults to SDXL's 320, not this encoder's 32
    input(set("_class_name", json!("ControlNetUnionModel")), "'num_trans_channel' = 320");
    for (field, value) in [
        ("controlnet_conditioning_channel_order", json!("bgr")),
        ("global_pool_conditions", json!(true)),
        ("mid_block_type", json!("UNetMidBlock2D")),
        ("down_block_types", json!(["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"])),
        ("class_embed_type", json!("timestep")),
    ] {
        match parse(set(field, value), &engine) {
            Err(Error::Unsupported(m)) => {
                assert!(m.contains(field) || m.contains("SimpleCrossAttn"), "{m}")
            }
            other => panic!("{field}: expected Unsupported, got {other:?}"),
        }
    }
    // num_attention_heads wins over attention_head_dim, as in ControlNetModel.__init__
    let cfg = parse(set("num_attention_heads", json!(2)), &engine).unwrap();
    assert_eq!(cfg.encoder.mid_block.unwrap().attention.heads, 2);
    // the checkpoint bounds the counts: the mid fixture's 222 tensors cannot hold 100 layers a block
    let dir = TempDir::new("controlnet-limits");
    let folder = write_folder(&dir.0, "mid");
    let limits = Limits::of(&weights::load(&[folder.join("diffusion_pytorch_model.safetensors")]).unwrap());
    match parse(set("layers_per_block", json!(100)), &limits) {
        Err(Error::Input(m)) => assert!(m.contains("more blocks than the checkpoint can hold"), "{m}"),
        other => panic!("expected the checkpoint's bound, got {other:?}"),
    }
    match parse(set("layers_per_block", json!(1u64 << 40)), &limits) {
        Err(Error::Input(m)) => assert!(m.contains("'layers_per_block'") && m.contains("exceeds"), "{m}"),
        other => panic!("expected the cap, got {other:?}"),
    }
}

/// Inputs are checked against the model before any work, naming the argument.
#[test]
fn forward_inputs_are_checked() {
    let dir = TempDir::new("controlnet-inputs");
    let cn =
        ControlNet::new(&open_controlnet(&write_folder(&dir.0, "small")).unwrap(), Place::Host(DType::F32)).unwrap();
    let x = Inputs::read("small");
    let forward = |cond: &Tensor, scale: f32| {
        cn.forward(&Exec::Cpu, &x.unet(), cond, ControlScale::new(scale)).err().expect("refused")
    };
    let half = Tensor::from_f32(&[1, 32, 32, 3], DType::F32, &vec![0.5; 32 * 32 * 3]).unwrap();
    let e = forward(&half, 1.0);
    assert!(matches!(&e, Error::Input(m) if m.contains("controlnet_cond") && m.contains("[1, 64, 64, 3]")), "{e}");
    let f16 = Tensor::from_f32(&[1, 64, 64, 3], DType::F16, &vec![0.5; 64 * 64 * 3]).unwrap();
    let e = forward(&f16, 1.0);
    assert!(matches!(&e, Error::Input(m) if m.contains("controlnet_cond") && m.contains("F32")), "{e}");
    let e = forward(&x.cond, f32::NAN);
    assert!(matches!(&e, Error::Input(m) if m.contains("conditioning_scale")), "{e}");
    let odd = Tensor::from_f32(&[1, 6, 8, 4], DType::F32, &[0.0; 192]).unwrap();
    let e = cn
        .forward(&Exec::Cpu, &UnetInputs { sample: &odd, ..x.unet() }, &x.cond, ControlScale::new(1.0))
        .err()
        .expect("refused");
    assert!(matches!(&e, Error::Unsupported(m) if m.contains("multiples of 4")), "{e}");
    let five = Tensor::from_f32(&[1, 5], DType::F32, &[0.0; 5]).unwrap();
    let inputs = UnetInputs { time_ids: Some(&five), ..x.unet() };
    let e = cn.forward(&Exec::Cpu, &inputs, &x.cond, ControlScale::new(1.0)).err().expect("refused");
    assert!(matches!(&e, Error::Input(m) if m.starts_with("ControlNet input") && m.contains("add_embedding")), "{e}");
}

fn celframe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A copy of the full reference with `edit` applied, at `path`.
fn edited_reference(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) -> String {
    let mut t = read_all(&reference("full"));
    edit(&mut t);
    write(path, &t);
    path.to_str().unwrap().to_string()
}

#[test]
fn verify_cli_exit_codes_and_save() {
    let dir = TempDir::new("controlnet-cli");
    let folder = write_folder(&dir.0, "full");
    let (w, r) = (folder.to_str().unwrap(), reference("full"));
    let r = r.to_str().unwrap();
    let saved = dir.path("out.safetensors");
    let base = ["verify", "controlnet", "--weights", w, "--reference", r, "--device", "cpu"];

    // 0, and --save writes the ten outputs (NCHW) as computed
    let (code, stdout, stderr) = celframe(&[&base[..], &["--save", saved.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches(": ok").count(), 10, "{stdout}");
    assert!(
        stdout.contains("out.down_block_res_samples.0 [2, 32, 8, 12]") && stdout.contains("conditioning_scale 0.75")
    );
    let written = weights::load(&[&saved]).unwrap();
    let expected = weights::load(&[&reference("full")]).unwrap();
    assert_eq!(written.len(), 10);
    for (name, t) in written.iter() {
        let (rel, _) = common::errors(&t.to_f32_vec().unwrap(), &expected.get(name).unwrap().to_f32_vec().unwrap());
        assert!(rel <= TOL, "{name}: {rel:.2e}");
    }
    // 1: outside a tolerance below the float32 summation error
    let (code, stdout, _) = celframe(&[&base[..], &["--tolerance", "1e-12"]].concat());
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("OUTSIDE TOLERANCE"), "{stdout}");

    // 2: bad references and arguments, each named
    let unet_ref = fixtures::reference("a");
    let scale2 = edited_reference(&dir.path("scale2.safetensors"), |t| {
        t.insert(
            "in.conditioning_scale".into(),
            (Dtype::F32, vec![2], [0.5f32, 0.5].iter().flat_map(|v| v.to_le_bytes()).collect()),
        );
    });
    let guess2 = edited_reference(&dir.path("guess2.safetensors"), |t| {
        t.insert("in.guess_mode".into(), (Dtype::I64, vec![], 2i64.to_le_bytes().to_vec()));
    });
    let no_cond = edited_reference(&dir.path("nocond.safetensors"), |t| drop(t.remove("in.controlnet_cond")));
    let small_cond = edited_reference(&dir.path("smallcond.safetensors"), |t| {
        t.insert("in.controlnet_cond".into(), (Dtype::F16, vec![2, 3, 8, 12], vec![0; 2 * 3 * 8 * 12 * 2]));
    });
    let no_mid = edited_reference(&dir.path("nomid.safetensors"), |t| drop(t.remove("out.mid_block_res_sample")));
    let cases: [(&str, &[&str], &str); 8] = [
        (w, &["--reference", unet_ref.to_str().unwrap()], "unknown tensor 'out.sample'"),
        (w, &["--reference", &scale2], "in.conditioning_scale has shape [2]"),
        (w, &["--reference", &guess2], "'in.guess_mode' holds 2"),
        (w, &["--reference", &no_cond], "no in.controlnet_cond"),
        (w, &["--reference", &small_cond], "[2, 3, 64, 96]"),
        (w, &["--reference", &no_mid], "no out.mid_block_res_sample"),
        (w, &["--reference", r, "--lora", "x.safetensors"], "--lora applies to"),
        ("/nonexistent", &["--reference", r], "no such file"),
    ];
    for (weights, extra, needle) in cases {
        let args = [&["verify", "controlnet", "--weights", weights, "--device", "cpu"][..], extra].concat();
        let (code, stdout, stderr) = celframe(&args);
        assert_eq!(code, 2, "{extra:?}:\n{stdout}\n{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{extra:?}: '{needle}' not in {stderr}");
    }
}

#[test]
fn bench_arguments_are_checked_before_any_gpu_work() {
    let dir = TempDir::new("controlnet-bench");
    let folder = write_folder(&dir.0, "small");
    let w = folder.to_str().unwrap();
    let (code, _, stderr) = celframe(&["bench", "controlnet", "--weights", w, "--batch", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--batch must be at least 1"), "{stderr}");
    let (code, _, stderr) =
        celframe(&["bench", "controlnet", "--weights", w, "--height", "100000", "--width", "100000"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("control-image activation") || stderr.contains("largest activation"), "{stderr}");
    let (code, _, stderr) = celframe(&["bench", "controlnet", "--weights", "/nonexistent"]);
    assert_eq!(code, 2, "{stderr}");
    // --conditions is the Union's, --nets the plain net's
    let union = write_union_folder(&dir.0);
    let u = union.to_str().unwrap();
    for (weights, flag, value, needle) in [
        (w, "--conditions", "2", "--conditions is for a Union"),
        (u, "--nets", "2", "--nets is for a plain ControlNet"),
        (u, "--conditions", "7", "this Union has 6 control types"),
        (u, "--conditions", "0", "--conditions must be at least 1"),
    ] {
        let (code, _, stderr) = celframe(&["bench", "controlnet", "--weights", weights, flag, value]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(needle), "'{needle}' not in {stderr}");
    }
}

/// The Union references: diffusers' ControlNetUnionModel, one sample each.
const UNION_REFERENCES: [&str; 5] =
    ["union_pose", "union_pose_depth", "union_pose_depth_b", "union_lineart_depth", "union_multi"];

/// Every Union reference through `verify controlnet` (folder and diffusers-named single file): one
/// condition (residuals scaled), two with their scales inside the fusion, types out of order with
/// guess mode, from_multi.
#[test]
fn union_matches_diffusers() {
    let dir = TempDir::new("controlnet-union");
    let folder = write_union_folder(&dir.0);
    let checkpoint = open_controlnet(&folder).unwrap();
    assert_eq!(checkpoint.format, ControlNetFormat::Diffusers);
    let u = checkpoint.config.union.clone().expect("a Union config");
    assert_eq!((u.control_types, u.token_channels, u.layers, u.type_embed_dim), (6, 32, 1, 256));
    for name in UNION_REFERENCES {
        check(&folder, name);
    }
    // xinsir's files: diffusers names without config.json, the architecture from the shapes
    let file = dir.path("union.safetensors");
    write(&file, &union_tensors());
    let single = open_controlnet(&file).unwrap();
    assert_eq!(single.format, ControlNetFormat::DiffusersSingleFile);
    assert_eq!(single.config, checkpoint.config, "the Union read from its shapes");
    check(&file, "union_pose_depth");
}

/// A Union reference's inputs, for the graph API.
struct UnionInputs {
    x: Inputs,
    types: Vec<ControlType>,
    conds: Vec<Tensor>,
    scales: Vec<f32>,
}

impl UnionInputs {
    fn read(name: &str) -> UnionInputs {
        let r = weights::open(&reference(name), "reference").unwrap();
        let f32 = |n: &str| {
            let t = r.float(n).unwrap();
            Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap()
        };
        let types: Vec<ControlType> =
            r.integers("in.control_type_idx").unwrap().into_iter().map(|k| ControlType(k as usize)).collect();
        let conds = (0..types.len()).map(|i| nchw_to_nhwc(&f32(&format!("in.controlnet_cond.{i}"))).unwrap()).collect();
        let scales = f32("in.conditioning_scale").to_f32_vec().unwrap();
        let mut expected: Vec<Tensor> =
            (0..9).map(|k| nchw_to_nhwc(&f32(&format!("out.down_block_res_samples.{k}"))).unwrap()).collect();
        expected.push(nchw_to_nhwc(&f32("out.mid_block_res_sample")).unwrap());
        let x = Inputs {
            sample: nchw_to_nhwc(&f32("in.sample")).unwrap(),
            timestep: f32("in.timestep").reshape(&[1]).unwrap(),
            context: f32("in.encoder_hidden_states"),
            text_embeds: f32("in.added_cond_kwargs.text_embeds"),
            time_ids: f32("in.added_cond_kwargs.time_ids"),
            cond: conds_placeholder(),
            expected,
        };
        UnionInputs { x, types, conds, scales }
    }
}

/// `Inputs::cond` is the plain ControlNet's; a Union's images are `UnionInputs::conds`.
fn conds_placeholder() -> Tensor {
    Tensor::from_f32(&[0], DType::F32, &[]).unwrap()
}

/// Rows `a` then `b` of two same-shaped tensors (a batch of their samples).
fn stack(a: &Tensor, b: &Tensor) -> Tensor {
    let mut shape = a.shape().to_vec();
    shape[0] += b.shape()[0];
    Tensor::from_f32(&shape, DType::F32, &[a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap()].concat()).unwrap()
}

/// Row `r` of a batch.
fn row(t: &Tensor, r: usize) -> Tensor {
    let n = t.numel() / t.shape()[0];
    let mut shape = t.shape().to_vec();
    shape[0] = 1;
    Tensor::from_f32(&shape, DType::F32, &t.to_f32_vec().unwrap()[r * n..(r + 1) * n]).unwrap()
}

fn all(r: &UnetResiduals) -> Vec<&Tensor> {
    r.down.iter().chain([&r.mid]).collect()
}

/// Per-sample semantics: the two pose + depth samples (different hints) as one batch give, row by
/// row, diffusers' residuals of each sample alone (diffusers' own batch of the two differs from
/// those by 1.7e-3 relative: tools/make_controlnet_union_fixtures.py prints it); per-row scales
/// give each row what its own scale gives alone; every tensor is read.
#[test]
fn union_batch_equals_its_samples_one_at_a_time() {
    let dir = TempDir::new("controlnet-union-batch");
    let net =
        ControlNetUnion::new(&open_controlnet(&write_union_folder(&dir.0)).unwrap(), Place::Host(DType::F32)).unwrap();
    let (a, b) = (UnionInputs::read("union_pose_depth"), UnionInputs::read("union_pose_depth_b"));
    assert_eq!((&a.types, &a.scales), (&b.types, &b.scales));
    let [sample, timestep, context, text, ids] = [
        stack(&a.x.sample, &b.x.sample),
        stack(&a.x.timestep, &b.x.timestep),
        stack(&a.x.context, &b.x.context),
        stack(&a.x.text_embeds, &b.x.text_embeds),
        stack(&a.x.time_ids, &b.x.time_ids),
    ];
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &timestep,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let conds: Vec<Tensor> = a.conds.iter().zip(&b.conds).map(|(p, q)| stack(p, q)).collect();
    let run = |scales: &[Vec<f32>]| {
        let list: Vec<UnionCondition> = a
            .types
            .iter()
            .zip(&conds)
            .zip(scales)
            .map(|((&control_type, image), scale)| UnionCondition { control_type, image, scale })
            .collect();
        net.forward(&Exec::Cpu, &inputs, &list, UnionOptions::default()).unwrap()
    };
    let batch = run(&a.scales.iter().map(|&s| vec![s]).collect::<Vec<_>>());
    for (r, single) in [&a, &b].into_iter().enumerate() {
        for (k, (computed, expected)) in all(&batch).into_iter().zip(&single.x.expected).enumerate() {
            let (rel, _) =
                common::assert_close(&format!("batch row {r}, residual {k}"), &row(computed, r), expected, TOL);
            if k == 0 {
                println!("batch row {r} vs diffusers' sample alone: residual 0 rel L2 {rel:.2e}");
            }
        }
    }
    // every tensor is read but the task vectors of the types not given
    let unused = ["task_embedding.2", "task_embedding.3", "task_embedding.4", "task_embedding.5"];
    assert_eq!(net.unread(), unused, "loaded but never read");

    // per-row scales: depth at 0.3 on row 1 only equals row 1 run alone with depth at 0.3
    let per_row = run(&[vec![1.0, 1.0], vec![a.scales[1], 0.3]]);
    let alone = {
        let list = [
            UnionCondition { control_type: b.types[0], image: &b.conds[0], scale: &[1.0] },
            UnionCondition { control_type: b.types[1], image: &b.conds[1], scale: &[0.3] },
        ];
        net.forward(&Exec::Cpu, &b.x.unet(), &list, UnionOptions::default()).unwrap()
    };
    for (k, ((p, q), e)) in all(&per_row).into_iter().zip(all(&alone)).zip(&a.x.expected).enumerate() {
        common::assert_close(&format!("per-row scales, row 1, residual {k}"), &row(p, 1), q, 1e-6);
        common::assert_close(&format!("per-row scales, row 0, residual {k}"), &row(p, 0), e, TOL);
    }
}

/// Loading: the class name does not decide (keys do), a plain net refuses a Union checkpoint and
/// back, a cldm-named Union file is refused, missing Union tensors are listed by name.
#[test]
fn union_loading_is_by_keys_and_strict() {
    let dir = TempDir::new("controlnet-union-load");
    let folder = write_union_folder(&dir.0);
    // xinsir's config_promax.json copy names ControlNetModel: still a Union by its keys
    let union_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(controlnet::controlnet_dir().join("config.union.json")).unwrap())
            .unwrap();
    let mut as_plain = union_cfg.as_object().unwrap().clone();
    as_plain.insert("_class_name".into(), "ControlNetModel".into());
    std::fs::write(folder.join("config.json"), serde_json::Value::Object(as_plain).to_string()).unwrap();
    let checkpoint = open_controlnet(&folder).unwrap();
    assert!(checkpoint.config.union.is_some());
    check(&folder, "union_pose");
    let e = ControlNet::new(&checkpoint, Place::Host(DType::F32)).err().expect("a plain ControlNet of a Union");
    assert!(matches!(&e, Error::Unsupported(m) if m.contains("ControlNetUnion")), "{e}");
    let plain = open_controlnet(&write_folder(&dir.0, "full")).unwrap();
    let e = ControlNetUnion::new(&plain, Place::Host(DType::F32)).err().expect("a Union of a plain ControlNet");
    assert!(matches!(&e, Error::Input(m) if m.contains("plain ControlNet")), "{e}");

    let broken = write_union_folder_with(&dir.path("broken"), |t| {
        t.remove("transformer_layes.0.ln_1.bias").unwrap();
        let (_, shape, _) = t.get_mut("spatial_ch_projs.bias").unwrap();
        shape[0] = 16;
        let (_, _, data) = t.get_mut("spatial_ch_projs.bias").unwrap();
        data.truncate(32);
    });
    let e = open_controlnet(&broken).err().expect("loads");
    for needle in ["missing: transformer_layes.0.ln_1.bias", "spatial_ch_projs.bias: expected [32], found [16]"] {
        assert!(e.to_string().contains(needle), "'{needle}' not in {e}");
    }

    let mut cldm = BTreeMap::new();
    for (name, t) in union_tensors() {
        cldm.insert(format!("{CLDM_PREFIX}{name}"), t);
    }
    let file = dir.path("union_cldm.safetensors");
    write(&file, &cldm);
    let e = open_controlnet(&file).err().expect("loads");
    assert!(matches!(&e, Error::Unsupported(m) if m.contains("Union") && m.contains("cldm")), "{e}");
}

/// Conditions are checked before any work, naming the condition.
#[test]
fn union_inputs_are_checked() {
    let dir = TempDir::new("controlnet-union-inputs");
    let net =
        ControlNetUnion::new(&open_controlnet(&write_union_folder(&dir.0)).unwrap(), Place::Host(DType::F32)).unwrap();
    let a = UnionInputs::read("union_pose_depth");
    let (pose, depth) = (&a.conds[0], &a.conds[1]);
    let refused = |list: &[UnionCondition], options: UnionOptions| {
        net.forward(&Exec::Cpu, &a.x.unet(), list, options).err().expect("refused").to_string()
    };
    let c = |control_type, image, scale| UnionCondition { control_type, image, scale };
    let plain = UnionOptions::default();
    let m = refused(&[c(ControlType::TILE, pose, &[1.0])], plain);
    assert!(m.contains("control type 6 (tile)") && m.contains("ProMax"), "{m}");
    let m = refused(&[c(ControlType::OPENPOSE, pose, &[1.0, 2.0, 3.0])], plain);
    assert!(m.contains("condition 0 gives 3 scales"), "{m}");
    let m = refused(&[c(ControlType::OPENPOSE, pose, &[f32::NAN])], plain);
    assert!(m.contains("conditioning_scale of condition 0"), "{m}");
    let m = refused(&[], plain);
    assert!(m.contains("no conditions"), "{m}");
    let multi = UnionOptions { from_multi: true, ..plain };
    let m = refused(&[c(ControlType::OPENPOSE, pose, &[1.0]), c(ControlType::DEPTH, depth, &[0.5])], multi);
    assert!(m.contains("from_multi") && m.contains("conditions 0 and 1"), "{m}");
    let small = Tensor::from_f32(&[1, 32, 32, 3], DType::F32, &vec![0.5; 32 * 32 * 3]).unwrap();
    let m = refused(&[c(ControlType::OPENPOSE, pose, &[1.0]), c(ControlType::DEPTH, &small, &[1.0])], plain);
    assert!(m.contains("controlnet_cond") && m.contains("condition 1, depth"), "{m}");
}

#[test]
fn control_types_by_name_follow_the_union_readme() {
    for (name, index) in
        [("openpose", 0), ("Depth", 1), ("hed", 2), ("scribble", 2), ("canny", 3), ("anime_lineart", 3), ("mlsd", 3)]
            .into_iter()
            .chain([("normal", 4), ("segment", 5), ("tile", 6), ("repaint", 7)])
    {
        assert_eq!(ControlType::parse(name).unwrap(), ControlType(index), "{name}");
    }
    assert_eq!(ControlType(3).name(), "canny");
    let e = ControlType::parse("pose").unwrap_err();
    assert!(matches!(&e, Error::Input(m) if m.contains("'pose'") && m.contains("openpose")), "{e}");
}

/// `verify controlnet` on Union references: bad ones exit 2 naming the tensor.
#[test]
fn union_verify_cli_errors() {
    let dir = TempDir::new("controlnet-union-cli");
    let folder = write_union_folder(&dir.0);
    let w = folder.to_str().unwrap();
    let edit = |name: &str, f: &dyn Fn(&mut Tensors)| {
        let mut t = read_all(&reference("union_pose_depth"));
        f(&mut t);
        let path = dir.path(&format!("{name}.safetensors"));
        write(&path, &t);
        path.to_str().unwrap().to_string()
    };
    let flags = |v: [f32; 6]| (Dtype::F32, vec![1, 6], v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    let wrong_flags = edit("flags", &|t| drop(t.insert("in.control_type".into(), flags([1., 0., 1., 0., 0., 0.]))));
    let no_second = edit("nosecond", &|t| drop(t.remove("in.controlnet_cond.1")));
    let plain_cond = edit("plaincond", &|t| {
        let c = t["in.controlnet_cond.0"].clone();
        t.insert("in.controlnet_cond".into(), c);
    });
    let third = edit("third", &|t| {
        let c = t["in.controlnet_cond.0"].clone();
        t.insert("in.controlnet_cond.2".into(), c);
    });
    let scales3 = edit("scales3", &|t| {
        let v: Vec<u8> = [1f32, 1., 1.].iter().flat_map(|x| x.to_le_bytes()).collect();
        t.insert("in.conditioning_scale".into(), (Dtype::F32, vec![3], v));
    });
    let tile = edit("tile", &|t| {
        let v: Vec<u8> = [0i64, 6].iter().flat_map(|x| x.to_le_bytes()).collect();
        t.insert("in.control_type_idx".into(), (Dtype::I64, vec![2], v));
    });
    let cases: [(&str, &str); 6] = [
        (&wrong_flags, "is not the flags of in.control_type_idx"),
        (&no_second, "no tensor 'in.controlnet_cond.1'"),
        (&plain_cond, "unknown tensor 'in.controlnet_cond'"),
        (&third, "in.controlnet_cond.2: in.control_type_idx lists 2 conditions"),
        (&scales3, "one per condition ([2])"),
        (&tile, "in.control_type_idx[1] = 6"),
    ];
    for (r, needle) in cases {
        let (code, stdout, stderr) =
            celframe(&["verify", "controlnet", "--weights", w, "--reference", r, "--device", "cpu"]);
        assert_eq!(code, 2, "{r}:\n{stdout}\n{stderr}");
        assert!(stderr.contains(needle), "'{needle}' not in {stderr}");
    }
    // a plain reference on the Union, and a Union reference on a plain ControlNet
    let plain = write_folder(&dir.0, "full");
    let union_ref = reference("union_pose");
    for (weights, r, needle) in [
        (w, reference("full"), "unknown tensor 'in.controlnet_cond'"),
        (plain.to_str().unwrap(), union_ref, "unknown tensor 'in.control_type"),
    ] {
        let (code, _, stderr) = celframe(&[
            "verify",
            "controlnet",
            "--weights",
            weights,
            "--reference",
            r.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(needle), "'{needle}' not in {stderr}");
    }
    let (code, stdout, _) = celframe(&[
        "verify",
        "controlnet",
        "--weights",
        w,
        "--reference",
        reference("union_lineart_depth").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("Union conditions [canny x 0.7, depth x 1.2] (scales inside the fusion, guess mode)"),
        "{stdout}"
    );
}

// Control-LoRA (stabilityai/control-lora) over unet_a.

/// `verify controlnet` of the Control-LoRA `file` over `base` on the CPU in f32 against
/// `reference`; the worst relative L2 error, every residual within TOL when `within`.
fn verify_control_lora(file: &Path, base: &Path, reference: &Path, within: bool) -> f64 {
    let v = verify_controlnet_with_base(file, Some(base), reference, &Settings::cpu(DType::F32, TOL)).unwrap();
    assert_eq!(v.comparisons.len(), 10, "9 down residuals and the mid residual");
    let worst = v.comparisons.iter().map(|c| c.rel_l2).fold(0.0, f64::max);
    println!("{} vs {}: worst rel L2 {worst:.2e}", file.display(), reference.display());
    if within {
        for c in &v.comparisons {
            assert!(c.ok(), "{c:?}");
        }
    }
    worst
}

/// The architecture is the base UNet's encoder with the file's conditioning embedding (what
/// diffusers' ControlNetModel.from_unet builds: the `full` fixture's config), the residuals match
/// diffusers' (from_unet, the file's full tensors copied in, up @ down added in f32), and the
/// forward reads every tensor loaded.
#[test]
fn control_lora_matches_diffusers() {
    let dir = TempDir::new("control-lora");
    let file = dir.path("control_lora.safetensors");
    write_control_lora(&file, |_| {});
    let base = base_unet();
    let checkpoint = open_controlnet_with_base(&file, Some(&base)).unwrap();
    assert_eq!(checkpoint.format, ControlNetFormat::ControlLora);
    let full = open_controlnet(&write_folder(&dir.0, "full")).unwrap().config;
    assert_eq!(checkpoint.config, full, "the ControlNet diffusers builds from unet_a");
    assert_eq!(checkpoint.deltas.as_ref().map(|d| d.len()), Some(17), "the file's up/down pairs");
    verify_control_lora(&file, &base, &control_lora_reference(), true);
    let cn = ControlNet::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    let x = Inputs::read_file(&control_lora_reference());
    let out = cn.forward(&Exec::Cpu, &x.unet(), &x.cond, ControlScale::new(0.8)).unwrap();
    for (k, (computed, expected)) in out.down.iter().chain([&out.mid]).zip(&x.expected).enumerate() {
        common::assert_close(&format!("Control-LoRA residual {k}"), computed, expected, TOL);
    }
    assert_eq!(cn.weights().unread(), Vec::<&str>::new(), "loaded but never read");
}

/// The deltas and the replaced tensors take effect: without its up/down pairs the file is far from
/// the reference (the script measured 0.35 to 0.69 per residual); with only its own modules it is
/// unet_a's encoder unchanged, the `full` ControlNet fixture, and matches that fixture's reference.
#[test]
fn control_lora_deltas_and_replacements_take_effect() {
    let dir = TempDir::new("control-lora-parts");
    let base = base_unet();
    let file = dir.path("no_deltas.safetensors");
    write_control_lora(&file, |t| t.retain(|k, _| !k.ends_with(".up") && !k.ends_with(".down")));
    let worst = verify_control_lora(&file, &base, &control_lora_reference(), false);
    assert!(worst > 0.1, "without the deltas: worst rel L2 {worst:.2e}");
    let file = dir.path("own_only.safetensors");
    let own = ["lora_controlnet", "input_hint_block.", "zero_convs.", "middle_block_out."];
    write_control_lora(&file, |t| t.retain(|k, _| own.iter().any(|p| k.starts_with(p))));
    verify_control_lora(&file, &base, &reference("full"), true);
}

/// The error (Error::Input) of opening `file`, written from the fixture with `edit`, over `base`.
fn control_lora_error(file: &Path, base: &Path, edit: impl FnOnce(&mut Tensors)) -> String {
    write_control_lora(file, edit);
    match open_controlnet_with_base(file, Some(base)).err().expect("refused") {
        Error::Input(m) => m,
        other => panic!("not an input error: {other}"),
    }
}

/// Bad files and bases are refused, naming the file and the tensors: the problems of the file's
/// keys all in one error (a missing own module, up without down, up @ down not fitting its weight,
/// a delta for a tensor the base's encoder does not have), a full tensor of the wrong shape, a base
/// UNet missing a tensor, a base of another architecture.
#[test]
fn control_lora_errors_name_the_file_and_tensor() {
    let dir = TempDir::new("control-lora-errors");
    let base = base_unet();
    let file = dir.path("bad.safetensors");
    let f16 = |shape: &[usize]| (Dtype::F16, shape.to_vec(), vec![0u8; 2 * shape.iter().product::<usize>()]);
    let m = control_lora_error(&file, &base, |t| {
        t.remove("zero_convs.3.0.weight");
        t.remove("time_embed.0.down");
        t.insert("input_blocks.4.1.proj_in.up".into(), f16(&[64, 5]));
        t.insert("input_blocks.7.1.transformer_blocks.2.attn1.to_q.up".into(), f16(&[64, 4]));
        t.insert("input_blocks.7.1.transformer_blocks.2.attn1.to_q.down".into(), f16(&[4, 64]));
    });
    for needle in [
        file.to_str().unwrap(),
        "5 problem(s)",
        "missing zero_convs.3.0.weight [32, 32, 1, 1]",
        "time_embed.0.up without time_embed.0.down",
        "input_blocks.4.1.proj_in.up [64, 5] @ input_blocks.4.1.proj_in.down [6, 64] does not make the weight [64, \
         64] of down_blocks.1.attentions.0.proj_in.weight in the base UNet",
        "input_blocks.7.1.transformer_blocks.2.attn1.to_q.up [64, 4]: the ControlNet on the base UNet's encoder has \
         no such tensor",
        "input_blocks.7.1.transformer_blocks.2.attn1.to_q.down [4, 64]",
    ] {
        assert!(m.contains(needle), "'{needle}' not in {m}");
    }
    let m =
        control_lora_error(&file, &base, |t| drop(t.insert("input_blocks.1.0.in_layers.2.bias".into(), f16(&[33]))));
    assert!(
        m.contains(file.to_str().unwrap())
            && m.contains("input_blocks.1.0.in_layers.2.bias: expected [32], found [33]"),
        "{m}"
    );

    // the base: a UNet folder without one of its tensors, and a UNet of other widths and depths
    let broken = dir.path("unet_broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(base.join("config.json"), broken.join("config.json")).unwrap();
    let mut unet = read_all(&base.join("diffusion_pytorch_model.safetensors"));
    unet.remove("down_blocks.1.resnets.0.conv1.weight");
    write(&broken.join("diffusion_pytorch_model.safetensors"), &unet);
    let m = control_lora_error(&file, &broken, |_| {});
    assert!(m.contains("missing: down_blocks.1.resnets.0.conv1.weight"), "{m}");
    let m = control_lora_error(&file, &fixtures::folder("b"), |_| {});
    assert!(m.contains(file.to_str().unwrap()) && m.contains("no such tensor"), "{m}");
}

/// `celframe verify controlnet --base`: a Control-LoRA verifies with its base UNet (0), and is
/// refused without it, as --base is with a ControlNet that holds its own encoder or another
/// component (2, naming the flag).
#[test]
fn verify_cli_takes_the_base_of_a_control_lora() {
    let dir = TempDir::new("control-lora-cli");
    let file = dir.path("control_lora.safetensors");
    write_control_lora(&file, |_| {});
    let (f, b, r) = (file.to_str().unwrap(), base_unet(), control_lora_reference());
    let (b, r) = (b.to_str().unwrap(), r.to_str().unwrap());
    let run = ["verify", "controlnet", "--weights", f, "--reference", r, "--device", "cpu"];
    let (code, stdout, stderr) = celframe(&[&run[..], &["--base", b]].concat());
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches(": ok").count(), 10, "{stdout}");
    assert!(stdout.contains(&format!("Control-LoRA over the base UNet's encoder: {b}")), "{stdout}");
    let folder = write_folder(&dir.0, "full");
    let w = folder.to_str().unwrap();
    let unet_ref = fixtures::reference("a");
    let cases: [(&[&str], &str); 3] = [
        (
            &run,
            "is a Control-LoRA (stabilityai/control-lora): give the base UNet it rebuilds the ControlNet from with --base UNET",
        ),
        (&["verify", "controlnet", "--weights", w, "--reference", r, "--base", b], "--base is for a Control-LoRA"),
        (
            &["verify", "unet", "--weights", b, "--reference", unet_ref.to_str().unwrap(), "--base", b],
            "--base is for controlnet",
        ),
    ];
    for (args, needle) in cases {
        let (code, stdout, stderr) = celframe(args);
        assert_eq!(code, 2, "{args:?}:\n{stdout}\n{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(needle), "'{needle}' not in {stderr}");
    }
}

/// A render config's ControlNet entry may be a Control-LoRA, built on the render's UNet:
/// pipeline_tiny's ControlNet written as one over pipeline_tiny's UNet (every tensor in full under
/// its cldm name, and one weight also adapted by a zero up/down pair, which the host merge adds
/// exactly) renders tests/render_e2e.rs's controlnet_video case within its tolerance of diffusers.
#[test]
fn a_render_takes_a_control_lora_entry() {
    use celframe::pipeline::config::RenderConfig;
    use celframe::pipeline::{RenderOptions, render};
    let dir = TempDir::new("control-lora-render");
    let tiny = fixtures::fixtures().join("pipeline_tiny");
    let checkpoint = open_controlnet(&tiny.join("controlnet")).unwrap();
    let map = CldmNames::new(&checkpoint.config);
    let stored = read_all(&tiny.join("controlnet/diffusion_pytorch_model.safetensors"));
    let mut file: Tensors =
        checkpoint.names.iter().map(|(name, key)| (map.cldm_name(name).unwrap(), stored[key].clone())).collect();
    let weight = map.cldm_name("down_blocks.1.attentions.0.proj_in.weight").unwrap();
    let module = weight.strip_suffix(".weight").unwrap();
    let shape = file[&weight].1.clone();
    let zero = |s: [usize; 2]| (Dtype::F16, s.to_vec(), vec![0u8; 2 * s[0] * s[1]]);
    file.insert(format!("{module}.up"), zero([shape[0], 2]));
    file.insert(format!("{module}.down"), zero([2, shape[1]]));
    file.insert("lora_controlnet".into(), (Dtype::F16, vec![1], vec![0; 2]));
    let lora = dir.path("control_lora.safetensors");
    write(&lora, &file);

    // the controlnet_video case's config (as tests/render_e2e.rs writes it) with the Control-LoRA
    let case: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny.join("controlnet_video.json")).unwrap()).unwrap();
    let noise_file = tiny.join("controlnet_video.noise.safetensors");
    let control = weights::open(&noise_file, "noise").unwrap().float("control").unwrap();
    let &[frames, h, w, _] = control.shape() else { panic!("control shape {:?}", control.shape()) };
    let values = control.to_f32_vec().unwrap();
    let images = dir.path("control");
    std::fs::create_dir_all(&images).unwrap();
    for f in 0..frames {
        let bytes = values[f * h * w * 3..][..h * w * 3].iter().map(|x| (x * 255.0).round() as u8).collect();
        let image = celframe::output::RgbImage::new(w as u32, h as u32, bytes).unwrap();
        celframe::output::write_png(&images.join(format!("{f:03}.png")), &image).unwrap();
    }
    let path = |p: &str| tiny.join(p).display().to_string();
    let out = dir.path("outputs");
    let config = serde_json::json!({
        "dtype": "f32", "device": "cpu",
        "models": {
            "unet": path("unet"), "vae": path("../vae_tiny"), "text_encoder": path("../text_encoder_tiny"),
            "text_encoder_2": path("../text_encoder_2_tiny"), "tokenizer": path("tokenizer"),
            "motion_adapter": path("motion_adapter"),
        },
        "sampler": { "name": case["sampler"], "steps": case["steps"], "cfg": case["guidance"] },
        "video": { "width": case["width"], "height": case["height"], "frames": case["frames"], "fps": 8 },
        "output": { "root": out.display().to_string(), "mp4": "builtin" },
        "clips": [{ "prompt": case["prompt"], "negative": case["negative"] }],
        "controlnets": [{
            "path": lora.display().to_string(), "kind": "openpose", "images": images.display().to_string(),
            "scale": case["controlnet_scale"], "interpolation": "hold",
        }],
    });
    let config_file = dir.path("config.json");
    std::fs::write(&config_file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let config = RenderConfig::load(&config_file).unwrap();
    let options = RenderOptions { noise: Some(noise_file), timings: false, keep_tensors: true, split: None };
    let report = render(&config, &options).unwrap();
    let latents = report.clips[0].latents.as_ref().unwrap();
    // diffusers' [1, C, F, h, w] latents, frame-major NHWC like ours
    let reference = weights::open(&tiny.join("controlnet_video.reference.safetensors"), "reference").unwrap();
    let want = reference.float("latents").unwrap();
    let &[_, c, f, lh, lw] = want.shape() else { panic!("latents {:?}", want.shape()) };
    let v = want.to_f32_vec().unwrap();
    let mut nhwc = vec![0f32; v.len()];
    for (i, x) in v.iter().enumerate() {
        let (ch, rest) = (i / (f * lh * lw), i % (f * lh * lw));
        let (frame, pixel) = (rest / (lh * lw), rest % (lh * lw));
        nhwc[(frame * lh * lw + pixel) * c + ch] = *x;
    }
    let (rel, _) = common::errors(&latents.to_f32_vec().unwrap(), &nhwc);
    println!("render with a Control-LoRA entry: latents rel L2 {rel:.2e} against diffusers");
    assert!(rel <= 1e-4, "latents rel L2 {rel:.3e} (render_e2e's tolerance 1e-4)");
}
