//! The UNet graph on the CPU twins against diffusers (tests/fixtures/unet_*, made by
//! tools/make_unet_fixtures.py: float32 on both sides), checkpoint loading (diffusers folder and
//! single file), config and loading errors, and `celframe verify`'s exit codes.
//!
//! Tolerance: `verify`'s default bound for f32 is relative L2 <= 1e-4. Measured errors are ~9e-7
//! (summation order over a few hundred layers), so the tests assert 1e-5, which also catches slips
//! that move the output by a few 1e-5, such as a norm eps of 1e-5 for 1e-6.

mod common;
#[path = "common/unet_fixtures.rs"]
mod fixtures;

use std::process::Command;

use celframe::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use celframe::models::transformer::{CrossKv, Fp8Linears};
use celframe::models::unet::{LayerPos, UnetPath};
use celframe::models::{Limits, Place, Unet, UnetConfig, UnetFormat, UnetInputs, UnetResiduals, open_unet};
use celframe::ops::Exec;
use celframe::ops::elementwise::add;
use celframe::ops::fp8::Fp8Scaling;
use celframe::verify::{Settings, verify_unet};
use celframe::{DType, Error, Tensor, weights};
use fixtures::{TempDir, folder, reference, write_single_file_a};

const TOL: f64 = 1e-5;

fn check_f32(weights: &std::path::Path, reference: &std::path::Path) -> Tensor {
    let v = verify_unet(weights, reference, &Settings::cpu(DType::F32, TOL)).unwrap();
    let c = &v.comparisons[0];
    println!("{} vs {}: rel L2 {:.2e}, max abs {:.2e}", weights.display(), reference.display(), c.rel_l2, c.max_abs);
    assert!(c.ok(), "{c:?}");
    // verify runs the forward again with the text k/v computed beforehand: the same output here
    let cached = &v.comparisons[1];
    assert_eq!((cached.rel_l2, cached.max_abs), (c.rel_l2, c.max_abs), "{cached:?}");
    v.outputs[0].1.clone()
}

#[test]
fn config_a_folder_matches_diffusers() {
    check_f32(&folder("a"), &reference("a"));
}

/// Through the public graph API rather than `verify`: NCHW -> NHWC at the boundary, f32 host
/// tensors, one forward.
#[test]
fn config_b_folder_matches_diffusers_through_the_graph_api() {
    let checkpoint = open_unet(&folder("b")).unwrap();
    assert_eq!(checkpoint.format, UnetFormat::Diffusers);
    let cfg = &checkpoint.config;
    assert_eq!((cfg.in_channels, cfg.block_out_channels.as_slice(), cfg.norm_num_groups), (9, &[64, 64][..], 16));
    assert!(!cfg.use_linear_projection && !cfg.flip_sin_to_cos && cfg.freq_shift == 1.0);
    let unet = Unet::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    let b = ReferenceB::read();
    let inputs = b.inputs();
    let out = nhwc_to_nchw(&unet.forward(&Exec::Cpu, &inputs, None).unwrap()).unwrap();
    let (rel, max) = rel_l2(&out, &b.f32("out.sample"));
    println!("config b: rel L2 {rel:.2e}, max abs {max:.2e}");
    assert!(rel <= TOL, "config b: relative L2 error {rel:.3e}");
}

#[test]
fn single_file_a_gives_config_a_and_the_same_output() {
    let dir = TempDir::new("unet-single-file");
    let file = dir.path("unet_a.safetensors");
    write_single_file_a(&file);
    let single = open_unet(&file).unwrap();
    let diffusers = open_unet(&folder("a")).unwrap();
    assert_eq!(single.format, UnetFormat::SingleFile);
    assert_eq!(single.config, diffusers.config, "the architecture derived from shapes is config a's");
    let from_file = check_f32(&file, &reference("a"));
    let from_folder = check_f32(&folder("a"), &reference("a"));
    assert_eq!(from_file.to_f32_vec().unwrap(), from_folder.to_f32_vec().unwrap(), "same weights, same output");
}

#[test]
fn controlnet_residuals_are_added_where_diffusers_adds_them() {
    let with = check_f32(&folder("a"), &reference("a.residuals"));
    let without = check_f32(&folder("a"), &reference("a"));
    let (change, _) = rel_l2(&with, &without);
    assert!(change > 0.1, "the residuals must matter for the check to mean anything (changed {change:.3})");
}

#[test]
fn residual_count_and_shapes_are_checked() {
    let checkpoint = open_unet(&folder("a")).unwrap();
    let cfg = &checkpoint.config;
    assert_eq!(cfg.skips().len(), 9, "conv_in, 3 levels x 2 layers, 2 downsamplers");
    let unet = Unet::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    let zeros = |shape: &[usize]| Tensor::from_f32(shape, DType::F32, &vec![0.0; shape.iter().product()]).unwrap();
    let (sample, t, context) = (zeros(&[1, 8, 8, 4]), zeros(&[1]), zeros(&[1, 3, 32]));
    let (text, ids) = (zeros(&[1, 32]), zeros(&[1, 6]));
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &t,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let residuals = UnetResiduals { down: vec![zeros(&[1, 8, 8, 32]); 8], mid: zeros(&[1, 2, 2, 64]) };
    let err = unet.forward(&Exec::Cpu, &inputs, Some(&residuals)).unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("8 down-block residuals") && m.contains("9 skip")), "{err}");
    let odd = zeros(&[1, 6, 8, 4]);
    let err = unet.forward(&Exec::Cpu, &UnetInputs { sample: &odd, ..inputs }, None).unwrap_err();
    assert!(matches!(&err, Error::Unsupported(m) if m.contains("multiples of 4")), "{err}");
    let (five_ids, wide_text) = (zeros(&[1, 5]), zeros(&[1, 33]));
    let err = unet.forward(&Exec::Cpu, &UnetInputs { time_ids: Some(&five_ids), ..inputs }, None).unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("add_embedding takes 1568")), "{err}");
    let err = unet.forward(&Exec::Cpu, &UnetInputs { text_embeds: Some(&wide_text), ..inputs }, None).unwrap_err();
    assert!(matches!(err, Error::Input(_)));
}

/// A context per group of consecutive sample rows (a render's one per CFG half) gives, to the bit,
/// what repeating it per row gives: 4 rows of config a on 2 contexts (rows 0-1, 2-3) and on 1. A
/// context count that does not divide the rows is refused by name.
#[test]
fn grouped_contexts_give_the_repeated_contexts_output() {
    use celframe::ops::rows::gather_rows;
    let unet = Unet::new(&open_unet(&folder("a")).unwrap(), Place::Host(DType::F32)).unwrap();
    let random = |shape: &[usize], seed| common::random_tensor(shape, DType::F32, seed, 1.0, 0.0);
    let (sample, text, ids) = (random(&[4, 8, 8, 4], 1), random(&[4, 32], 3), random(&[4, 6], 4));
    let t = Tensor::from_f32(&[4], DType::F32, &[900.0, 500.0, 900.0, 500.0]).unwrap();
    let forward = |context: &Tensor| {
        let inputs = UnetInputs {
            sample: &sample,
            timestep: &t,
            encoder_hidden_states: context,
            cross_kv: None,
            text_embeds: Some(&text),
            time_ids: Some(&ids),
        };
        unet.forward(&Exec::Cpu, &inputs, None)
    };
    for (groups, from) in [(2, [0, 0, 1, 1]), (1, [0, 0, 0, 0])] {
        let context = random(&[groups, 3, 32], 2 + groups as u64);
        let repeated = gather_rows(&Exec::Cpu, &context, &from).unwrap();
        let (got, want) = (forward(&context).unwrap(), forward(&repeated).unwrap());
        assert!(got.host_bytes().unwrap() == want.host_bytes().unwrap(), "{groups} contexts for 4 rows differ");
    }
    let err = forward(&random(&[3, 3, 32], 9)).unwrap_err();
    assert!(
        matches!(&err, Error::Input(m) if m.contains("encoder_hidden_states") && m.contains("4 sample rows")),
        "{err}"
    );
}

/// The per-layer hook (where motion modules go) sees every layer of config a, in diffusers' order,
/// with the layer's output; an identity hook changes nothing, and what a hook returns is what the
/// path continues with.
#[test]
fn layer_hooks_see_every_layer_in_order() {
    let unet = Unet::new(&open_unet(&folder("a")).unwrap(), Place::Host(DType::F32)).unwrap();
    let random = |shape: &[usize], seed| common::random_tensor(shape, DType::F32, seed, 1.0, 0.0);
    let (sample, context, text, ids) =
        (random(&[1, 8, 8, 4], 1), random(&[1, 3, 32], 2), random(&[1, 32], 3), random(&[1, 6], 4));
    let t = Tensor::from_f32(&[1], DType::F32, &[500.0]).unwrap();
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &t,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text),
        time_ids: Some(&ids),
    };
    let plain = unet.forward(&Exec::Cpu, &inputs, None).unwrap().to_f32_vec().unwrap();

    let mut seen = Vec::new();
    let hooked = unet
        .forward_with(&Exec::Cpu, &inputs, None, &mut |pos, _, h| {
            seen.push((pos, h.shape().to_vec()));
            Ok(h)
        })
        .unwrap();
    assert_eq!(hooked.to_f32_vec().unwrap(), plain, "an identity hook gives the same bits as no hook");
    // Config a: 3 levels of 2 layers, 32 / 64 / 64 channels; up blocks of 3 layers.
    let at = |path, block, layer, hw: usize, c: usize| (LayerPos { path, block, layer }, vec![1, hw, hw, c]);
    use UnetPath::{Down, Mid, Up};
    let expected = vec![
        at(Down, 0, 0, 8, 32),
        at(Down, 0, 1, 8, 32),
        at(Down, 1, 0, 4, 64),
        at(Down, 1, 1, 4, 64),
        at(Down, 2, 0, 2, 64),
        at(Down, 2, 1, 2, 64),
        at(Mid, 0, 0, 2, 64),
        at(Up, 0, 0, 2, 64),
        at(Up, 0, 1, 2, 64),
        at(Up, 0, 2, 2, 64),
        at(Up, 1, 0, 4, 64),
        at(Up, 1, 1, 4, 64),
        at(Up, 1, 2, 4, 64),
        at(Up, 2, 0, 8, 32),
        at(Up, 2, 1, 8, 32),
        at(Up, 2, 2, 8, 32),
    ];
    assert_eq!(seen, expected);

    let doubled = unet
        .forward_with(&Exec::Cpu, &inputs, None, &mut |pos, ex, h| match pos.path {
            Mid => add(ex, &h, &h, 1.0),
            _ => Ok(h),
        })
        .unwrap();
    let (change, _) = rel_l2(&doubled, &Tensor::from_f32(doubled.shape(), DType::F32, &plain).unwrap());
    assert!(change > 1e-3, "a hook's output must be used (changed {change:.2e})");
}

fn config_error(json: &str) -> Error {
    UnetConfig::from_diffusers_json(json, "config.json", &Limits::engine()).expect_err(json)
}

/// config a's config.json with `edit` applied to its fields.
fn config_a_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let text = std::fs::read_to_string(folder("a").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

#[test]
fn config_json_errors_name_the_field() {
    use serde_json::json;
    let input = |json: String, needle: &str| match config_error(&json) {
        Error::Input(m) => assert!(m.contains(needle) && m.contains("config.json"), "'{needle}' not in: {m}"),
        other => panic!("expected an input error mentioning '{needle}', got {other:?}"),
    };
    input("{ not json".into(), "not valid JSON");
    input("[1, 2]".into(), "not a JSON object");
    input(config_a_with(|c| drop(c.remove("block_out_channels"))), "'block_out_channels'");
    input(config_a_with(|c| drop(c.insert("block_out_channels".into(), json!([32, 64])))), "'block_out_channels'");
    input(config_a_with(|c| drop(c.insert("block_out_channels".into(), json!("wide")))), "'block_out_channels'");
    input(config_a_with(|c| drop(c.insert("layers_per_block".into(), json!(-1)))), "'layers_per_block'");
    input(config_a_with(|c| drop(c.insert("attention_head_dim".into(), json!([1, 3, 1])))), "does not divide 64");
    input(config_a_with(|c| drop(c.insert("norm_num_groups".into(), json!(24)))), "norm groups");
    input(config_a_with(|c| drop(c.insert("up_block_types".into(), json!(["UpBlock2D"])))), "up_block_types");
    input(config_a_with(|c| drop(c.remove("addition_time_embed_dim"))), "'addition_time_embed_dim'");
    input(config_a_with(|c| drop(c.insert("num_attention_heads".into(), json!(2)))), "'num_attention_heads'");
    input(config_a_with(|c| drop(c.insert("_class_name".into(), json!("ControlNetModel")))), "ControlNetModel");
    input(
        config_a_with(|c| drop(c.insert("transformer_layers_per_block".into(), json!([1, [1, 1], 2])))),
        "'reverse_transformer_layers_per_block'",
    );
    // Valid configs the engine does not implement are Unsupported, naming the field.
    for (field, value) in [
        ("class_embed_type", json!("timestep")),
        ("time_cond_proj_dim", json!(256)),
        ("resnet_time_scale_shift", json!("scale_shift")),
        ("down_block_types", json!(["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"])),
    ] {
        match config_error(&config_a_with(|c| drop(c.insert(field.into(), value)))) {
            Error::Unsupported(m) => assert!(m.contains(field) || m.contains("SimpleCrossAttn"), "{m}"),
            other => panic!("{field}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn config_json_reads_per_layer_depths_and_defaults() {
    use serde_json::json;
    let json = config_a_with(|c| {
        c.insert("transformer_layers_per_block".into(), json!([1, [1, 2], [2, 3]]));
        c.insert("reverse_transformer_layers_per_block".into(), json!([[3, 2, 1], [1, 1, 2], [1, 1, 1]]));
        c.remove("norm_eps");
    });
    let cfg = UnetConfig::from_diffusers_json(&json, "config.json", &Limits::engine()).unwrap();
    let depths = |layers: &[celframe::models::unet::config::Layer]| -> Vec<usize> {
        layers.iter().filter_map(|l| l.attention.as_ref().map(|t| t.depth)).collect()
    };
    assert_eq!(depths(&cfg.down_blocks[1].layers), [1, 2]);
    assert_eq!(depths(&cfg.down_blocks[2].layers), [2, 3]);
    assert_eq!(cfg.mid_block.as_ref().unwrap().attention.depth, 2, "mid: the last level's first depth");
    assert_eq!(depths(&cfg.up_blocks[0].layers), [3, 2, 1]);
    assert_eq!(depths(&cfg.up_blocks[1].layers), [1, 1, 2]);
    assert_eq!(cfg.norm_eps, 1e-5, "diffusers' default");
    let absent =
        UnetConfig::from_diffusers_json(&config_a_with(|c| drop(c.remove("mid_block_type"))), "c", &Limits::engine())
            .unwrap();
    assert!(absent.mid_block.is_some(), "an absent mid_block_type is diffusers' default, the cross-attention block");
    let null = config_a_with(|c| drop(c.insert("mid_block_type".into(), serde_json::Value::Null)));
    assert!(
        UnetConfig::from_diffusers_json(&null, "c", &Limits::engine()).unwrap().mid_block.is_none(),
        "null: no mid block"
    );
    // Up ResNets take [x, skip] (diffusers `unet_2d_blocks.py` CrossAttnUpBlock2D: the previous
    // output or the block's width, plus `res_skip_channels`): SDXL's pattern at config a's sizes.
    let widths: Vec<usize> = cfg.up_blocks.iter().flat_map(|b| b.layers.iter().map(|l| l.resnet.in_channels)).collect();
    assert_eq!(widths, [128, 128, 128, 128, 128, 96, 96, 64, 64]);
}

#[test]
fn strict_loading_lists_missing_unexpected_and_misshapen_tensors() {
    let dir = TempDir::new("unet-strict");
    let unet = dir.path("unet");
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::copy(folder("a").join("config.json"), unet.join("config.json")).unwrap();
    let loaded = weights::load(&[folder("a").join("diffusion_pytorch_model.safetensors")]).unwrap();
    let mut tensors: Vec<(String, Tensor)> = loaded
        .iter()
        .filter(|(n, _)| *n != "mid_block.attentions.0.proj_out.bias")
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    for (name, t) in tensors.iter_mut() {
        if name == "conv_in.bias" {
            *t = Tensor::from_f32(&[31], DType::F16, &[0.0; 31]).unwrap();
        }
    }
    tensors.push((
        "down_blocks.0.attentions.0.norm.weight".into(),
        Tensor::from_f32(&[32], DType::F16, &[1.0; 32]).unwrap(),
    ));
    let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    weights::save(&unet.join("diffusion_pytorch_model.safetensors"), &named, None).unwrap();
    // The pipeline folder (holding unet/) is accepted too.
    let err = open_unet(&dir.0).err().expect("a broken checkpoint must not load");
    let Error::Input(m) = err else { panic!("expected an input error, got {err:?}") };
    for needle in [
        "missing: mid_block.attentions.0.proj_out.bias",
        "unexpected: down_blocks.0.attentions.0.norm.weight",
        "wrong shape: conv_in.bias: expected [32], found [31]",
    ] {
        assert!(m.contains(needle), "'{needle}' not in:\n{m}");
    }
}

#[test]
fn weights_paths_are_detected_or_refused_clearly() {
    let dir = TempDir::new("unet-detect");
    let err = |p: &std::path::Path| match open_unet(p) {
        Err(Error::Input(m)) => m,
        Err(other) => panic!("{}: expected an input error, got {other:?}", p.display()),
        Ok(_) => panic!("{} opened", p.display()),
    };
    assert!(err(&dir.0).contains("no config.json"));
    assert!(err(&dir.path("missing.safetensors")).contains("no such file"));
    // diffusers-named weights without their config.json
    let diffusers_file = folder("a").join("diffusion_pytorch_model.safetensors");
    assert!(err(&diffusers_file).contains("needs its config.json"));
    // the config.json path itself opens its folder
    assert_eq!(open_unet(&folder("b").join("config.json")).unwrap().config.in_channels, 9);
    // a single file missing a UNet tensor names it
    let t = Tensor::from_f32(&[2], DType::F16, &[0.0; 2]).unwrap();
    let partial = dir.path("partial.safetensors");
    weights::save(&partial, &[("model.diffusion_model.input_blocks.0.0.bias".into(), &t)], None).unwrap();
    assert!(err(&partial).contains("model.diffusion_model.input_blocks.0.0.weight"));
}

fn celframe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn verify_cli_exit_codes_and_save() {
    let dir = TempDir::new("unet-verify-cli");
    let (a, ra, rb) = (folder("a"), reference("a"), reference("b"));
    let (a, ra, rb) = (a.to_str().unwrap(), ra.to_str().unwrap(), rb.to_str().unwrap());
    let saved = dir.path("out.safetensors");
    let base = ["verify", "unet", "--weights", a, "--reference", ra, "--device", "cpu"];

    let (code, stdout, stderr) = celframe(&[&base[..], &["--save", saved.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "within tolerance:\n{stdout}\n{stderr}");
    assert!(stdout.contains("out.sample [2, 4, 16, 24]: max abs error") && stdout.contains(": ok"), "{stdout}");
    let written = weights::load(&[&saved]).unwrap();
    let expected = weights::load(&[reference("a")]).unwrap();
    let (rel, _) = rel_l2(written.get("out.sample").unwrap(), expected.get("out.sample").unwrap());
    assert!(rel <= TOL, "--save wrote out.sample (NCHW) as computed: rel {rel:.2e}");

    let (code, stdout, _) = celframe(&[&base[..], &["--tolerance", "1e-12"]].concat());
    assert_eq!(code, 1, "outside tolerance:\n{stdout}");
    assert!(stdout.contains("OUTSIDE TOLERANCE"), "{stdout}");

    let bad_dtype = [&base[..], &["--dtype", "f8"]].concat();
    let bad_inputs: [&[&str]; 5] = [
        &["verify", "unet", "--weights", a, "--reference", rb, "--device", "cpu"], // config b's inputs
        &["verify", "unet", "--weights", a, "--reference", "/nonexistent.safetensors", "--device", "cpu"],
        &["verify", "vae", "--weights", a, "--reference", ra],
        &["verify", "unet", "--weights", "/nonexistent", "--reference", ra, "--device", "cpu"],
        &bad_dtype,
    ];
    for args in bad_inputs {
        let (code, stdout, stderr) = celframe(args);
        assert_eq!(code, 2, "bad input {args:?}:\n{stdout}\n{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
}

fn rel_l2(actual: &Tensor, expected: &Tensor) -> (f64, f64) {
    assert_eq!(actual.shape(), expected.shape());
    let (a, e) = (actual.to_f32_vec().unwrap(), expected.to_f32_vec().unwrap());
    let (mut diff, mut norm, mut max) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&e) {
        let d = (*x as f64 - *y as f64).abs();
        diff += d * d;
        norm += (*y as f64).powi(2);
        max = max.max(d);
    }
    ((diff / norm).sqrt(), max)
}

/// The tensor `name` of `file` as an f32 host tensor.
fn f32_tensor(file: &weights::LoadedWeights, name: &str) -> Tensor {
    let t = file.get(name).unwrap();
    Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap()
}

/// unet_b's reference: the file, and its inputs as f32 host tensors (the sample NHWC).
struct ReferenceB {
    file: weights::LoadedWeights,
    sample: Tensor,
    timestep: Tensor,
    context: Tensor,
    text_embeds: Tensor,
    time_ids: Tensor,
}

impl ReferenceB {
    fn read() -> ReferenceB {
        let file = weights::load(&[reference("b")]).unwrap();
        let f32 = |name: &str| f32_tensor(&file, name);
        ReferenceB {
            sample: nchw_to_nhwc(&f32("in.sample")).unwrap(),
            timestep: f32("in.timestep"),
            context: f32("in.encoder_hidden_states"),
            text_embeds: f32("in.added_cond_kwargs.text_embeds"),
            time_ids: f32("in.added_cond_kwargs.time_ids"),
            file,
        }
    }

    fn f32(&self, name: &str) -> Tensor {
        f32_tensor(&self.file, name)
    }

    fn inputs(&self) -> UnetInputs<'_> {
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

/// Every cross-attention's k and v computed beforehand (one GEMM by the stacked matrix, as a
/// render does once per text context) give the forward's output bit for bit on the CPU twins,
/// where each output element sums the same products in the same order either way; and they are
/// read only by the weights that made them, as those weights are.
#[test]
fn text_kv_computed_beforehand_give_the_same_output_for_their_weights_only() {
    let checkpoint = open_unet(&folder("b")).unwrap();
    let unet = Unet::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    let b = ReferenceB::read();
    let inputs = b.inputs();
    let context = &b.context;
    let kv = CrossKv::compute(&Exec::Cpu, unet.weights(), context).unwrap().expect("config b has cross-attentions");
    // [G, T, Σ 2C]: a k and a v of C columns per attn2 module
    let attn2 = unet.weights().unread().iter().filter(|n| n.contains(".attn2.to_k.")).count();
    assert_eq!(attn2, 0, "computing k and v reads every attn2 projection");
    let (g, t) = (context.shape()[0], context.shape()[1]);
    assert_eq!(&kv.tensor().shape()[..2], &[g, t]);
    let with_kv = UnetInputs { cross_kv: Some(&kv), ..inputs };
    let cached = unet.forward(&Exec::Cpu, &with_kv, None).unwrap().to_f32_vec().unwrap();
    let plain = unet.forward(&Exec::Cpu, &inputs, None).unwrap().to_f32_vec().unwrap();
    assert!(plain.iter().any(|v| *v != 0.0));
    assert_eq!(cached, plain, "the forward with k and v computed beforehand");

    let refused = |unet: &Unet, x: &UnetInputs, what: &str| {
        let err = unet.forward(&Exec::Cpu, x, None).unwrap_err();
        assert!(matches!(err, Error::Input(_)) && err.to_string().contains("cross_kv"), "{what}: {err}");
    };
    // another preparation of the same checkpoint: other weights
    let other = Unet::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    refused(&other, &with_kv, "other weights");
    // k and v of a context of another shape
    let first_row = Tensor::from_f32(
        &[1, t, context.shape()[2]],
        DType::F32,
        &context.to_f32_vec().unwrap()[..t * context.shape()[2]],
    )
    .unwrap();
    let one_row = CrossKv::compute(&Exec::Cpu, unet.weights(), &first_row).unwrap().unwrap();
    refused(&unet, &UnetInputs { cross_kv: Some(&one_row), ..inputs }, "another context shape");
    // the weights changed in place after (a LoRA switch)
    unet.weights().changed();
    refused(&unet, &with_kv, "changed weights");
}

/// FP8 linears on the CPU twins: every transformer-block linear gets an e4m3 twin (6 per block:
/// the fused q/k/v, to_out and the cross-attention's to_q and to_out, both feed-forward GEMMs; 2
/// per transformer: proj_in and proj_out, here 1x1 convolutions; not the text k/v), the forward runs
/// through them (its output moves away from the f16 one by the quantization's cost), and twins
/// left stale by a change of the weights in place are refused by name until quantized again.
#[test]
fn fp8_linears_run_the_transformer_blocks_through_e4m3_twins() {
    let checkpoint = open_unet(&folder("b")).unwrap();
    let b = ReferenceB::read();
    let half = |t: &Tensor| Tensor::from_f32(t.shape(), DType::F16, &t.to_f32_vec().unwrap()).unwrap();
    let (sample, timestep, context) = (half(&b.sample), b.timestep.clone(), half(&b.context));
    let (text_embeds, time_ids) = (half(&b.text_embeds), b.time_ids.clone());
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &timestep,
        encoder_hidden_states: &context,
        cross_kv: None,
        text_embeds: Some(&text_embeds),
        time_ids: Some(&time_ids),
    };
    let plain = Unet::new(&checkpoint, Place::Host(DType::F16)).unwrap();
    let want = plain.forward(&Exec::Cpu, &inputs, None).unwrap();
    let mut unet = Unet::new(&checkpoint, Place::Host(DType::F16)).unwrap();
    let names: Vec<&String> = checkpoint.names.iter().map(|(n, _)| n).collect();
    let blocks = names.iter().filter(|n| n.ends_with(".attn1.to_q.weight")).count();
    let transformers = names.iter().filter(|n| n.ends_with(".proj_in.weight")).count();
    assert!(blocks > 0 && transformers > 0);
    // "on": the linears whose input a LayerNorm or GEGLU writes (the fused q/k/v, attn2's to_q,
    // both feed-forward GEMMs; this model's other widths, 64, are below its 1536 outputs); "all"
    // adds both to_out and proj_in/out
    assert_eq!(unet.enable_fp8(&Exec::Cpu, Fp8Linears::Wide).unwrap(), 4 * blocks);
    // The plan a render sizes its arenas by (checkpoint shapes only) counts the same weights.
    let planned = |which| Unet::fp8_source_plan(&checkpoint, which, DType::F16).unwrap();
    assert_eq!(planned(Fp8Linears::Wide).bytes, unet.weights().fp8_twinned_bytes());
    assert_eq!(unet.enable_fp8(&Exec::Cpu, Fp8Linears::All).unwrap(), 2 * blocks + 2 * transformers);
    assert_eq!(planned(Fp8Linears::All).bytes, unet.weights().fp8_twinned_bytes());
    assert!(planned(Fp8Linears::All).bytes > planned(Fp8Linears::Wide).bytes);
    assert_eq!(planned(Fp8Linears::Off), Default::default());
    assert_eq!(Unet::fp8_source_plan(&checkpoint, Fp8Linears::All, DType::F32).unwrap().bytes, 0);
    assert_eq!(unet.weights().fp8_scaling(), Some(Fp8Scaling::Rows));
    let got = unet.forward(&Exec::Cpu, &inputs, None).unwrap();
    let (rel, _) = rel_l2(&got, &want);
    println!("fp8 forward vs f16: rel L2 {rel:.3e}");
    // e4m3 rounds each operand by up to 1/16 (~4% rel L2 per linear on random operands); through
    // this model's 10 blocks it measured 6.9e-2 with one scale per tensor, 5.9e-2 per row. A wrong
    // scale or byte order gives O(1).
    assert!(rel > 0.0 && rel < 0.15, "the FP8 forward is {rel:.3e} from the f16 one");
    // a change in place (a LoRA merge) makes the twins stale
    unet.weights().changed();
    let err = unet.forward(&Exec::Cpu, &inputs, None).unwrap_err();
    assert!(matches!(err, Error::Internal(_)) && err.to_string().contains("FP8 twin of"), "{err}");
    // f32 weights are refused, unless nothing is taken
    let mut f32_unet = Unet::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    assert_eq!(f32_unet.enable_fp8(&Exec::Cpu, Fp8Linears::Off).unwrap(), 0);
    assert!(matches!(f32_unet.enable_fp8(&Exec::Cpu, Fp8Linears::All), Err(Error::Input(_))));
}
