//! What models take in and what they load:
//!
//! - config.json values that would size gigabytes or make every output NaN are refused as
//!   `Error::Input` (exit code 2) naming the file and the field, with a short message, before
//!   anything is allocated from them. The configs are the fixtures' own (tests/fixtures/unet_a,
//!   vae_tiny) with one field edited, written beside a link to the fixture's weights in a temp
//!   folder, and opened as a user would.
//! - every tensor a loader loads is read by the model's forward, and a weight the forward asks for
//!   that the loader did not load is an internal error (exit code 5), not the user's.

mod common;
#[path = "common/unet_fixtures.rs"]
mod fixtures;

use std::path::Path;
use std::process::Command;

use celframe::models::layout::nchw_to_nhwc;
use celframe::models::vae::{Vae, open_vae};
use celframe::models::{ModelWeights, Place, Unet, UnetInputs, open_unet};
use celframe::ops::Exec;
use celframe::{DType, Error, Tensor, weights};
use fixtures::{TempDir, fixtures, folder, reference};
use serde_json::{Map, Value, json};

/// Longest error text a refused config may give: a few lines, whatever the config's size.
const SHORT: usize = 1000;

/// A copy of `source`'s config.json edited by `edit`, beside a link to its weights, in `dir`.
fn write_folder(dir: &Path, source: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let text = std::fs::read_to_string(source.join("config.json")).unwrap();
    let mut config: Value = serde_json::from_str(&text).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::os::unix::fs::symlink(source.join(weights), dir.join(weights)).unwrap();
}

/// The error of opening config a with `edit` applied; it must be an input error (exit code 2).
fn unet_error(tag: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let dir = TempDir::new(&format!("inputs-unet-{tag}"));
    write_folder(&dir.0, &folder("a"), edit);
    input_message(open_unet(&dir.0).err().expect("the edited config must be refused"))
}

/// The error of opening vae_tiny with `edit` applied; it must be an input error (exit code 2).
fn vae_error(tag: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let dir = TempDir::new(&format!("inputs-vae-{tag}"));
    write_folder(&dir.0, &fixtures().join("vae_tiny"), edit);
    input_message(open_vae(&dir.0).err().expect("the edited config must be refused"))
}

fn input_message(err: Error) -> String {
    assert_eq!(err.exit_code(), 2, "{err}");
    match err {
        Error::Input(m) => m,
        other => panic!("expected an input error, got {other:?}"),
    }
}

/// The message names the config file and `field`, and is short.
fn assert_names(m: &str, field: &str) {
    assert!(m.contains("config.json") && m.contains(field), "'{field}' or the file not named in: {m}");
    assert!(m.len() <= SHORT, "{} characters of error:\n{}", m.len(), &m[..SHORT.min(m.len())]);
}

fn set(field: &'static str, value: Value) -> impl FnOnce(&mut Map<String, Value>) {
    move |c| drop(c.insert(field.into(), value))
}

const HUGE: [u64; 5] = [1 << 31, 1_000_000, 10_000_000, 100_000_000, 1 << 62];

#[test]
fn unet_huge_counts_and_widths_are_refused_naming_the_field() {
    for (n, &v) in HUGE.iter().enumerate() {
        let cases: [(&str, Value); 9] = [
            ("layers_per_block", json!(v)),
            ("layers_per_block", json!([2, 2, v])),
            ("transformer_layers_per_block", json!([1, 1, v])),
            ("block_out_channels", json!([32, 64, v])),
            ("attention_head_dim", json!(v)),
            ("cross_attention_dim", json!(v)),
            ("norm_num_groups", json!(v)),
            ("time_embedding_dim", json!(v)),
            ("projection_class_embeddings_input_dim", json!(v)),
        ];
        for (k, (field, value)) in cases.into_iter().enumerate() {
            let m = unet_error(&format!("{n}-{k}"), set(field, value));
            assert_names(&m, field);
            assert!(m.contains("limit") || m.contains("can hold"), "no limit named: {m}");
        }
        // Per-layer depths of the up path, with the per-layer down depths diffusers then requires.
        let m = unet_error(&format!("{n}-reverse"), |c| {
            c.insert("transformer_layers_per_block".into(), json!([1, [1, 1], [2, 2]]));
            c.insert("reverse_transformer_layers_per_block".into(), json!([[2, 2, v], [1, 1, 1], [1, 1, 1]]));
        });
        assert_names(&m, "reverse_transformer_layers_per_block");
    }
}

/// Within the engine's caps but beyond what the 618 tensors of config a's checkpoint can hold:
/// the checkpoint is named with the limit.
#[test]
fn unet_counts_are_bounded_by_the_checkpoint() {
    let m = unet_error("ckpt-layers", set("layers_per_block", json!(1000)));
    assert_names(&m, "layers_per_block");
    assert!(m.contains("618 tensors") && m.contains("diffusion_pytorch_model.safetensors"), "{m}");
    let m = unet_error("ckpt-width", set("cross_attention_dim", json!(4096)));
    assert_names(&m, "cross_attention_dim");
    assert!(m.contains("largest dimension") && m.contains("1568"), "{m}");
    // Each count fits, together they need more tensors than the file has.
    let m = unet_error("ckpt-total", |c| {
        c.insert("layers_per_block".into(), json!(100));
        c.insert("transformer_layers_per_block".into(), json!(10));
    });
    assert_names(&m, "layers_per_block");
    assert!(m.contains("at least") && m.contains("holds 618"), "{m}");
}

#[test]
fn vae_huge_counts_and_widths_are_refused_naming_the_field() {
    for (n, &v) in HUGE.iter().enumerate() {
        let cases: [(&str, Value); 6] = [
            ("layers_per_block", json!(v)),
            ("block_out_channels", json!([32, v])),
            ("latent_channels", json!(v)),
            ("out_channels", json!(v)),
            ("norm_num_groups", json!(v)),
            ("block_out_channels", json!(vec![32; v.min(100_000) as usize])),
        ];
        for (k, (field, value)) in cases.into_iter().enumerate() {
            let m = vae_error(&format!("{n}-{k}"), set(field, value));
            assert_names(&m, field);
        }
    }
    // 30 layers per block fit the engine's cap and the file's tensor count, but the ResNets they
    // make need more tensors than vae_tiny's decoder has.
    let m = vae_error("ckpt", set("layers_per_block", json!(30)));
    assert_names(&m, "layers_per_block");
    assert!(m.contains("at least") && m.contains("diffusion_pytorch_model.safetensors"), "{m}");
}

#[test]
fn zero_negative_and_infinite_eps_and_scales_are_refused() {
    for (k, (field, value)) in [
        ("norm_eps", json!(0)),
        ("norm_eps", json!(-1e-5)),
        ("norm_eps", json!(1e39)), // infinite as f32
        ("resnet_out_scale_factor", json!(0)),
        ("resnet_out_scale_factor", json!(-1.0)),
        ("mid_block_scale_factor", json!(0.0)),
        ("mid_block_scale_factor", json!(1e300)),
        ("freq_shift", json!(-1)),
    ]
    .into_iter()
    .enumerate()
    {
        let m = unet_error(&format!("scalar-{k}"), set(field, value));
        assert_names(&m, field);
    }
    for (k, value) in [json!(0), json!(-0.13), json!(1e39)].into_iter().enumerate() {
        let m = vae_error(&format!("scalar-{k}"), set("scaling_factor", value));
        assert_names(&m, "scaling_factor");
    }
}

/// 100,000 levels once printed millions of error lines; now the level count is refused first.
/// 60 levels (within the cap) are refused for the tensors they would need, also in a few lines.
#[test]
fn many_levels_give_a_short_error() {
    let levels = |n: usize| {
        move |c: &mut Map<String, Value>| {
            c.insert("down_block_types".into(), json!(vec!["DownBlock2D"; n]));
            c.insert("up_block_types".into(), json!(vec!["UpBlock2D"; n]));
            c.insert("block_out_channels".into(), json!(vec![32; n]));
            c.insert("attention_head_dim".into(), json!(1));
            c.insert("transformer_layers_per_block".into(), json!(1));
        }
    };
    let m = unet_error("levels-100000", levels(100_000));
    assert_names(&m, "down_block_types");
    let m = unet_error("levels-60", levels(60));
    assert_names(&m, "layers_per_block");
    // A long list where a short one belongs is quoted only in part.
    let m = unet_error("long-list", set("block_out_channels", json!(vec![32; 100_000])));
    assert_names(&m, "block_out_channels");
}

/// A single file's architecture comes from its shapes, not from config.json fields: `validate`
/// applies the same caps to the resolved architecture.
#[test]
fn resolved_architectures_are_capped_too() {
    let config = open_unet(&folder("a")).unwrap().config;
    let mut wide = config.clone();
    wide.block_out_channels[2] = 1 << 21;
    let mut deep = config.clone();
    deep.up_blocks[0].layers[0].attention.as_mut().unwrap().depth = 2000;
    let mut long = config;
    long.down_blocks[1].layers = vec![long.down_blocks[1].layers[1].clone(); 2000];
    for (cfg, needle) in [(wide, "'block_out_channels' = 2097152"), (deep, "depth"), (long, "down_blocks.1")] {
        let m = input_message(cfg.validate().expect_err(needle));
        assert!(m.contains(needle) && m.contains("limit"), "{needle}: {m}");
    }
}

#[test]
fn a_fifo_given_as_config_json_is_refused_not_read() {
    let dir = TempDir::new("inputs-fifo");
    let fifo = dir.path("config.json");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let m = input_message(open_unet(&fifo).err().expect("a FIFO must be refused"));
    assert!(m.contains("config.json") && m.contains("not a regular file"), "{m}");
}

fn celframe(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn verify_cli_exits_2_naming_the_file_and_field() {
    let dir = TempDir::new("inputs-cli");
    let (unet, vae) = (dir.path("unet"), dir.path("vae"));
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::create_dir_all(&vae).unwrap();
    write_folder(&unet, &folder("a"), set("layers_per_block", json!(1u64 << 62)));
    write_folder(&vae, &fixtures().join("vae_tiny"), set("layers_per_block", json!(1u64 << 31)));
    let unet_ref = fixtures().join("unet_a.reference.safetensors");
    let vae_ref = fixtures().join("vae_tiny.reference.safetensors");
    for (kind, weights, reference) in [("unet", &unet, &unet_ref), ("vae_decoder", &vae, &vae_ref)] {
        let (w, r) = (weights.to_str().unwrap(), reference.to_str().unwrap());
        let (code, stderr) = celframe(&["verify", kind, "--weights", w, "--reference", r, "--device", "cpu"]);
        assert_eq!(code, 2, "{kind}: {stderr}");
        assert!(stderr.contains("config.json") && stderr.contains("'layers_per_block'"), "{kind}: {stderr}");
        assert!(stderr.len() <= SHORT, "{kind}: {stderr}");
    }
}

/// Runs config `name` on its reference inputs (tests/fixtures/unet_<name>.reference.safetensors).
fn run_unet(unet: &Unet, name: &str) {
    let r = weights::load(&[reference(name)]).unwrap();
    let f32 = |n: &str| {
        let t = r.get(n).unwrap();
        Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap()
    };
    let sample = nchw_to_nhwc(&f32("in.sample")).unwrap();
    let (timestep, context) = (f32("in.timestep"), f32("in.encoder_hidden_states"));
    let (text_embeds, time_ids) = (f32("in.added_cond_kwargs.text_embeds"), f32("in.added_cond_kwargs.time_ids"));
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &timestep,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text_embeds),
        time_ids: Some(&time_ids),
    };
    unet.forward(&Exec::Cpu, &inputs, None).unwrap();
}

/// The loaders load exactly the tensors the specs list; a forward must read each of them, or the
/// specs and the graph disagree (a tensor loaded, converted and uploaded for nothing, or a layer the
/// graph skips). Config a has every block kind (plain and cross-attention down and up blocks, the
/// mid block, linear projections), config b the 1x1-conv projections. ControlNet residuals are
/// inputs, not weights, so they change no read.
#[test]
fn every_loaded_tensor_is_read_by_the_forward() {
    for name in ["a", "b"] {
        let unet = Unet::new(&open_unet(&folder(name)).unwrap(), Place::Host(DType::F32)).unwrap();
        let w = unet.weights();
        assert_eq!(w.unread().len(), w.len(), "config {name}: nothing is read before the forward");
        run_unet(&unet, name);
        assert_eq!(w.unread(), Vec::<&str>::new(), "config {name}: loaded tensors the UNet never read");
    }
    let vae = Vae::new(&open_vae(&fixtures().join("vae_tiny")).unwrap(), Place::Host(DType::F32)).unwrap();
    let w = vae.weights();
    assert_eq!(w.unread().len(), w.len(), "VAE: nothing is read before the forward");
    let z = common::random_tensor(&[1, 4, 4, 4], DType::F32, 1, 7.7, 0.0);
    vae.forward(&Exec::Cpu, &z).unwrap();
    assert_eq!(w.unread(), Vec::<&str>::new(), "loaded tensors the VAE decoder never read");
}

#[test]
fn a_weight_the_loader_did_not_load_is_an_internal_error() {
    let t = Tensor::from_f32(&[2], DType::F32, &[0.0; 2]).unwrap();
    let w = ModelWeights::from_tensors(vec![("conv_in.weight".into(), t)], Place::Host(DType::F32)).unwrap();
    let err = w.root().at("conv_in").get("bias").unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(matches!(&err, Error::Internal(m) if m.contains("'conv_in.bias'")), "{err}");
    assert_eq!(w.unread(), ["conv_in.weight"]);
    w.root().at("conv_in").get("weight").unwrap();
    assert!(w.unread().is_empty());
}
