//! LoRA files (src/models/lora): key resolution, accounting, scale rules, roles and errors on small
//! synthetic files the tests write, against the tiny fixture models (tests/fixtures/unet_a,
//! text_encoder*_tiny, motion_a); merged models (UNet, text encoders, the motion UNet with UNet and
//! motion LoRAs, DoRA) against diffusers on the fixtures of tools/make_lora_fixtures.py;
//! `celframe verify --lora`.

#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use celframe::models::clip::{TextEncoderKind, open_text_encoder};
use celframe::models::lora::{Component, LoraSpec, Loras, Role, Targets, resolve};
use celframe::models::{open_motion, open_unet};
use celframe::verify::{
    LoraOptions, Settings, Verification, verify_motion_unet_with_loras, verify_text_encoder,
    verify_text_encoder_with_loras, verify_unet, verify_unet_with_loras,
};
use celframe::{DType, Error, Tensor, weights};
use unet_fixtures::{TempDir, fixtures, write_single_file_a};

/// Deterministic values in [-0.5, 0.5) (an LCG), different per seed.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// A tensor entry of a file to write: name, shape, values.
type Entry = (String, Vec<usize>, Vec<f32>);

fn entry(name: &str, shape: &[usize], seed: u64) -> Entry {
    (name.to_string(), shape.to_vec(), values(shape.iter().product(), seed))
}
fn scalar(name: &str, v: f32) -> Entry {
    (name.to_string(), vec![], vec![v])
}

fn write(path: &Path, entries: &[Entry], metadata: Option<&str>) {
    let tensors: Vec<(String, Tensor)> =
        entries.iter().map(|(n, s, v)| (n.clone(), Tensor::from_f32(s, DType::F32, v).unwrap())).collect();
    let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let metadata = metadata.map(|m| HashMap::from([("lora_adapter_metadata".to_string(), m.to_string())]));
    weights::save(path, &named, metadata).unwrap();
}

fn spec(path: &Path, weight: f64) -> LoraSpec {
    LoraSpec::new(path, weight, None)
}

fn unet_targets() -> (celframe::models::UnetCheckpoint, Targets) {
    let checkpoint = open_unet(&fixtures().join("unet_a")).unwrap();
    let mut targets = Targets::new();
    targets.add_unet(&checkpoint).unwrap();
    (checkpoint, targets)
}

/// The merged f32 weight `name` of the UNet fixture under `loras`.
fn merged_unet(loras: &Loras, checkpoint: &celframe::models::UnetCheckpoint, name: &str) -> Vec<f32> {
    let base = checkpoint.weights.get(name).unwrap();
    let merge = loras.merge(Component::Unet).expect("a UNet delta");
    merge.merged(name, base, DType::F32).unwrap().expect("a delta for the weight").to_f32_vec().unwrap()
}

/// W + scale · up · down in f64, independently of the crate (a plain triple loop).
fn expected(base: &Tensor, up: &Entry, down: &Entry, scale: f64) -> Vec<f32> {
    let w = base.to_f32_vec().unwrap();
    let (out, rank) = (up.1[0], up.1[1]);
    let cols = down.2.len() / rank;
    (0..out * cols)
        .map(|idx| {
            let (o, j) = (idx / cols, idx % cols);
            let d: f64 = (0..rank).map(|r| up.2[o * rank + r] as f64 * down.2[r * cols + j] as f64).sum();
            (w[idx] as f64 + scale * d) as f32
        })
        .collect()
}

const PROJ_IN: &str = "down_blocks.1.attentions.0.proj_in.weight";

#[test]
fn kohya_sgm_kohya_diffusers_and_peft_names_reach_the_same_weight() {
    let dir = TempDir::new("lora-spellings");
    let (checkpoint, targets) = unet_targets();
    let down = entry("d", &[2, 64], 1);
    let up = entry("u", &[64, 2], 2);
    let kohya = |module: &str| {
        vec![
            (format!("{module}.lora_down.weight"), down.1.clone(), down.2.clone()),
            (format!("{module}.lora_up.weight"), up.1.clone(), up.2.clone()),
            scalar(&format!("{module}.alpha"), 1.0),
        ]
    };
    // input_blocks.4.1 is down_blocks.1.attentions.0 (diffusers' single-file name map)
    write(&dir.path("sgm.safetensors"), &kohya("lora_unet_input_blocks_4_1_proj_in"), None);
    write(&dir.path("diffusers.safetensors"), &kohya("lora_unet_down_blocks_1_attentions_0_proj_in"), None);
    let peft = "unet.down_blocks.1.attentions.0.proj_in";
    write(
        &dir.path("peft.safetensors"),
        &[
            (format!("{peft}.lora_A.weight"), down.1.clone(), down.2.clone()),
            (format!("{peft}.lora_B.weight"), up.1.clone(), up.2.clone()),
        ],
        Some(r#"{"unet.r": 2, "unet.lora_alpha": 1.0}"#),
    );
    let want = expected(checkpoint.weights.get(PROJ_IN).unwrap(), &up, &down, 0.75 * 0.5);
    for file in ["sgm", "diffusers", "peft"] {
        let loras = resolve(&[spec(&dir.path(&format!("{file}.safetensors")), 0.75)], &targets, false).unwrap();
        assert_eq!(loras.merge(Component::Unet).unwrap().len(), 1, "{file}");
        let got = merged_unet(&loras, &checkpoint, PROJ_IN);
        assert_eq!(got, want, "{file}: W + 0.75 * (1/2) * up down");
        println!("{}", loras.summary.join("\n"));
    }
}

#[test]
fn resnet_and_sampler_convs_resolve_under_both_unet_spellings() {
    // LoCon on ResNet convs and samplers: SGM in_layers.2 / op / output_blocks.2.2.conv, diffusers
    // conv1 / downsamplers.0.conv / upsamplers.0.conv.
    let dir = TempDir::new("lora-convs");
    let (checkpoint, targets) = unet_targets();
    let cases = [
        ("lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1.weight", 32),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1.weight", 32),
        ("lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv.weight", 32),
        ("lora_unet_output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv.weight", 64),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "up_blocks.0.upsamplers.0.conv.weight", 64),
    ];
    for (i, (module, weight, c)) in cases.into_iter().enumerate() {
        let down = entry(&format!("{module}.lora_down.weight"), &[4, c, 3, 3], 10 + i as u64);
        let up = entry(&format!("{module}.lora_up.weight"), &[c, 4, 1, 1], 20 + i as u64);
        let file = dir.path(&format!("{i}.safetensors"));
        write(&file, &[down.clone(), up.clone(), scalar(&format!("{module}.alpha"), 8.0)], None);
        let loras = resolve(&[spec(&file, 1.0)], &targets, false).unwrap();
        let up2 = (up.0.clone(), vec![c, 4], up.2.clone());
        let want = expected(checkpoint.weights.get(weight).unwrap(), &up2, &down, 2.0);
        assert_eq!(merged_unet(&loras, &checkpoint, weight), want, "{module} -> {weight}");
    }
}

#[test]
fn tucker_locon_is_accepted_on_a_3x3_conv_and_a_1x1_down_is_required() {
    let dir = TempDir::new("lora-tucker");
    let (_, targets) = unet_targets();
    let m = "lora_unet_input_blocks_1_0_in_layers_2";
    let file = dir.path("tucker.safetensors");
    let mut entries = vec![
        entry(&format!("{m}.lora_down.weight"), &[2, 32, 1, 1], 1),
        entry(&format!("{m}.lora_mid.weight"), &[2, 2, 3, 3], 2),
        entry(&format!("{m}.lora_up.weight"), &[32, 2, 1, 1], 3),
    ];
    write(&file, &entries, None);
    let loras = resolve(&[spec(&file, 1.0)], &targets, false).unwrap();
    assert_eq!(loras.merge(Component::Unet).unwrap().len(), 1);
    entries[0] = entry(&format!("{m}.lora_down.weight"), &[2, 32, 3, 3], 1);
    write(&file, &entries, None);
    let e = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, Error::Input(_)) && msg.contains("lora_mid.weight [2, 2, 3, 3]"), "{msg}");
}

#[test]
fn every_key_is_accounted_for_in_one_error_or_a_lenient_warning() {
    let dir = TempDir::new("lora-accounting");
    let (_, targets) = unet_targets();
    let good = "lora_unet_input_blocks_4_1_proj_in";
    let nowhere = "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q";
    let file = dir.path("mixed.safetensors");
    write(
        &file,
        &[
            entry(&format!("{good}.lora_down.weight"), &[2, 64], 1),
            entry(&format!("{good}.lora_up.weight"), &[64, 2], 2),
            entry(&format!("{nowhere}.lora_down.weight"), &[2, 64], 3),
            entry(&format!("{nowhere}.lora_up.weight"), &[64, 2], 4),
            scalar(&format!("{nowhere}.alpha"), 1.0),
            scalar("not_a_lora_key", 1.0),
            entry("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", &[2, 64], 5),
            entry("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", &[256, 2], 6),
        ],
        None,
    );
    let e = resolve(&[spec(&file, 1.0)], &targets, false).err().expect("strict: an error");
    assert_eq!(e.exit_code(), 2);
    let msg = e.to_string();
    assert!(msg.contains("targets nothing in the loaded models: 4"), "{msg}");
    for key in [
        format!("{nowhere}.lora_down.weight"),
        format!("{nowhere}.lora_up.weight"),
        format!("{nowhere}.alpha"),
        "not_a_lora_key".to_string(),
    ] {
        assert!(msg.contains(&format!("{}: {key}", file.display())), "{key} listed with its file: {msg}");
    }
    let loras = resolve(&[spec(&file, 1.0)], &targets, true).unwrap();
    let summary = loras.summary.join("\n");
    assert!(summary.contains("unet 1 modules"), "{summary}");
    assert!(summary.contains("1 modules for text_encoder (not loaded here)"), "{summary}");
    assert!(summary.contains("WARNING: 4 keys target nothing"), "{summary}");
    assert_eq!(loras.merge(Component::Unet).unwrap().len(), 1);
    assert!(loras.merge(Component::TextEncoder).is_none());
}

#[test]
fn shape_mismatches_name_the_key_and_both_shapes() {
    let dir = TempDir::new("lora-shapes");
    let (_, targets) = unet_targets();
    // attn2.to_k reads the 32-wide context: [64, 32]; a down of [2, 64] makes [64, 64].
    let m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k";
    let file = dir.path("shape.safetensors");
    write(
        &file,
        &[entry(&format!("{m}.lora_down.weight"), &[2, 64], 1), entry(&format!("{m}.lora_up.weight"), &[64, 2], 2)],
        None,
    );
    let e = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, Error::Input(_)), "{msg}");
    for part in [
        format!("{m}.lora_down.weight [2, 64]"),
        "[64, 64] delta".to_string(),
        "'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight' is [64, 32]".to_string(),
        file.display().to_string(),
    ] {
        assert!(msg.contains(&part), "'{part}' in: {msg}");
    }
    // Ranks that disagree between down and up.
    write(
        &file,
        &[entry(&format!("{m}.lora_down.weight"), &[2, 32], 1), entry(&format!("{m}.lora_up.weight"), &[64, 3], 2)],
        None,
    );
    let msg = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap().to_string();
    assert!(msg.contains("[2, 32]") && msg.contains("[64, 3]") && msg.contains("one rank"), "{msg}");
}

#[test]
fn bad_input_is_an_input_error_naming_file_and_key() {
    let dir = TempDir::new("lora-bad");
    let (_, targets) = unet_targets();
    let m = "lora_unet_input_blocks_4_1_proj_in";
    let pair =
        [entry(&format!("{m}.lora_down.weight"), &[2, 64], 1), entry(&format!("{m}.lora_up.weight"), &[64, 2], 2)];
    let file = dir.path("bad.safetensors");
    for (alpha, why) in [
        ((format!("{m}.alpha"), vec![2], vec![1.0, 2.0]), "one finite number"),
        ((format!("{m}.alpha"), vec![], vec![f32::NAN]), "one finite number"),
    ] {
        write(&file, &[pair[0].clone(), pair[1].clone(), alpha], None);
        let e = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, Error::Input(_)), "{msg}");
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains(&format!("{m}.alpha")) && msg.contains(why),
            "{msg}"
        );
    }
    // A down without its up.
    write(&file, &[pair[0].clone()], None);
    let msg = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap().to_string();
    assert!(msg.contains(m) && msg.contains("both a down and an up"), "{msg}");
    // Not a safetensors file at all.
    std::fs::write(&file, b"not safetensors").unwrap();
    let e = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap();
    assert!(matches!(e, Error::Input(_)) && e.to_string().contains(&file.display().to_string()), "{e}");
    // Metadata that is not PEFT's JSON.
    write(&file, &pair, Some("{not json"));
    let e = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap();
    assert!(matches!(e, Error::Input(_)) && e.to_string().contains("lora_adapter_metadata"), "{e}");
}

#[test]
fn formats_not_merged_yet_are_refused_by_name() {
    let dir = TempDir::new("lora-unsupported");
    let (_, targets) = unet_targets();
    let m = "lora_unet_input_blocks_4_1_proj_in";
    let file = dir.path("loha.safetensors");
    for (param, name) in
        [("hada_t1", "LoHa with Tucker cores"), ("lokr_t2", "LoKr with a Tucker core"), ("oft_blocks", "OFT")]
    {
        write(&file, &[entry(&format!("{m}.{param}"), &[64, 2], 1), scalar(&format!("{m}.alpha"), 1.0)], None);
        let e = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, Error::Unsupported(_)) && msg.contains(name) && msg.contains(m), "{msg}");
        assert_eq!(e.exit_code(), 2);
    }
}

/// The scale a file gives the proj_in weight, read back from the merge: (W' − W) / (up · down).
fn scale_of(file: &Path, weight: f64) -> f64 {
    let (checkpoint, targets) = unet_targets();
    let loras = resolve(&[spec(file, weight)], &targets, false).unwrap();
    let merged = merged_unet(&loras, &checkpoint, PROJ_IN);
    let base = checkpoint.weights.get(PROJ_IN).unwrap().to_f32_vec().unwrap();
    // up and down are all ones in these files: every element of up · down is the rank, 4
    (merged[0] as f64 - base[0] as f64) / 4.0
}

#[test]
fn alpha_rules_kohya_and_peft() {
    let dir = TempDir::new("lora-alpha");
    let ones = |name: String, shape: &[usize]| (name, shape.to_vec(), vec![1.0; shape.iter().product()]);
    let kohya = |alpha: Option<f32>| {
        let m = "lora_unet_input_blocks_4_1_proj_in";
        let mut e =
            vec![ones(format!("{m}.lora_down.weight"), &[4, 64]), ones(format!("{m}.lora_up.weight"), &[64, 4])];
        e.extend(alpha.map(|a| scalar(&format!("{m}.alpha"), a)));
        e
    };
    let p = "unet.down_blocks.1.attentions.0.proj_in";
    let peft = vec![ones(format!("{p}.lora_A.weight"), &[4, 64]), ones(format!("{p}.lora_B.weight"), &[64, 4])];
    let file = dir.path("a.safetensors");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-3 * b.abs().max(1e-3);
    let cases: Vec<(Vec<Entry>, Option<&str>, f64, &str)> = vec![
        (kohya(Some(2.0)), None, 0.5, "kohya alpha 2, rank 4"),
        (kohya(None), None, 1.0, "kohya without alpha: alpha = rank"),
        (kohya(Some(0.0)), None, 1.0, "kohya alpha 0: alpha = rank"),
        (peft.clone(), None, 1.0, "PEFT without metadata: alpha = rank"),
        (peft.clone(), Some(r#"{"unet.lora_alpha": 8}"#), 2.0, "PEFT lora_alpha 8"),
        (
            peft.clone(),
            Some(r#"{"unet.lora_alpha": 8, "unet.alpha_pattern": {"attentions.0.proj_in": 1}}"#),
            0.25,
            "alpha_pattern on the path's end",
        ),
        (
            peft.clone(),
            Some(
                r#"{"unet.lora_alpha": 8, "unet.alpha_pattern": {"^attentions.0.proj_in": 3, "^down_blocks.1.attentions.0.proj_in": 1}}"#,
            ),
            0.25,
            "'^' anchors a pattern at the path's start",
        ),
        (
            peft.clone(),
            Some(r#"{"unet.lora_alpha": 8, "unet.alpha_pattern": {"tions.0.proj_in": 1}}"#),
            2.0,
            "a pattern matches whole dotted components only",
        ),
        (peft.clone(), Some(r#"{"unet.lora_alpha": 8, "unet.use_rslora": true}"#), 4.0, "rsLoRA: alpha / sqrt(r)"),
        (peft.clone(), Some(r#"{"text_encoder.lora_alpha": 8}"#), 1.0, "another component's config"),
    ];
    for (entries, metadata, want, what) in cases {
        write(&file, &entries, metadata);
        let got = scale_of(&file, 1.0);
        assert!(close(got, want), "{what}: scale {got}, expected {want}");
    }
    write(&file, &kohya(Some(2.0)), None);
    assert!(close(scale_of(&file, -1.5), -0.75), "strength multiplies");
}

#[test]
fn text_encoder_modules_resolve_in_both_formats_with_their_own_strength() {
    let dir = TempDir::new("lora-te");
    let l = open_text_encoder(&fixtures().join("text_encoder_tiny"), TextEncoderKind::ClipL).unwrap();
    let g = open_text_encoder(&fixtures().join("text_encoder_2_tiny"), TextEncoderKind::ClipG).unwrap();
    let mut targets = Targets::new();
    targets.add_text_encoder(&l).unwrap();
    targets.add_text_encoder(&g).unwrap();
    let file = dir.path("te.safetensors");
    let te1 = "lora_te1_text_model_encoder_layers_1_self_attn_q_proj";
    let te2 = "text_encoder_2.text_model.encoder.layers.2.mlp.fc2";
    write(
        &file,
        &[
            entry(&format!("{te1}.lora_down.weight"), &[2, 64], 1),
            entry(&format!("{te1}.lora_up.weight"), &[64, 2], 2),
            entry(&format!("{te2}.lora_A.weight"), &[2, 256], 3),
            entry(&format!("{te2}.lora_B.weight"), &[128, 2], 4),
            entry("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", &[2, 64], 5),
            entry("lora_unet_input_blocks_4_1_proj_in.lora_up.weight", &[64, 2], 6),
        ],
        None,
    );
    let lora = LoraSpec { path: file.clone(), unet: 0.0, text_encoder: 0.5, role: None };
    let loras = resolve(&[lora], &targets, false).unwrap();
    let summary = loras.summary.join("\n");
    assert!(summary.contains("text_encoder 1 modules") && summary.contains("text_encoder_2 1 modules"), "{summary}");
    assert!(summary.contains("1 modules for unet (not loaded here)"), "{summary}");
    let merge = loras.merge(Component::TextEncoder2).unwrap();
    let name = "encoder.layers.2.mlp.fc2.weight";
    let base = g.weights.get(&format!("text_model.{name}")).unwrap();
    let got = merge.merged(name, base, DType::F32).unwrap().unwrap().to_f32_vec().unwrap();
    let want = expected(base, &entry("u", &[128, 2], 4), &entry("d", &[2, 256], 3), 0.5);
    assert_eq!(got, want, "text-encoder strength 0.5, alpha = rank");
    assert!(loras.merge(Component::TextEncoder).unwrap().names().eq(["encoder.layers.1.self_attn.q_proj.weight"]));
}

#[test]
fn two_modules_for_one_weight_in_one_file_are_refused() {
    let dir = TempDir::new("lora-twice");
    let (_, targets) = unet_targets();
    let file = dir.path("twice.safetensors");
    let mut entries = Vec::new();
    for m in ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"] {
        entries.push(entry(&format!("{m}.lora_down.weight"), &[2, 64], 1));
        entries.push(entry(&format!("{m}.lora_up.weight"), &[64, 2], 2));
    }
    write(&file, &entries, None);
    let msg = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap().to_string();
    assert!(msg.contains("both adapt unet 'down_blocks.1.attentions.0.proj_in.weight'"), "{msg}");
}

#[test]
fn lora_arguments_parse_path_and_weight() {
    let p = |s: &str| LoraSpec::parse(s);
    assert_eq!(p("a.safetensors").unwrap(), spec(Path::new("a.safetensors"), 1.0));
    assert_eq!(p("dir/a.safetensors:0.6").unwrap(), spec(Path::new("dir/a.safetensors"), 0.6));
    assert_eq!(p("x:y.safetensors").unwrap(), spec(Path::new("x:y.safetensors"), 1.0));
    assert_eq!(p("a.safetensors:-1").unwrap(), spec(Path::new("a.safetensors"), -1.0));
    for bad in ["", ":0.5", "a.safetensors:inf", "a.safetensors:1e9", "a.safetensors:NaN", "style=", "style=:0.8"] {
        assert!(matches!(p(bad), Err(Error::Input(_))), "{bad:?}");
    }
    // [ROLE=]PATH[:WEIGHT]
    let with_role = |path: &str, w: f64, role: Role| LoraSpec::new(path, w, Some(role));
    assert_eq!(p("style=a.safetensors:0.8").unwrap(), with_role("a.safetensors", 0.8, Role::Style));
    assert_eq!(p("LCM=dir/lcm.safetensors").unwrap(), with_role("dir/lcm.safetensors", 1.0, Role::Lcm));
    assert_eq!(p("motion=x:y.safetensors").unwrap(), with_role("x:y.safetensors", 1.0, Role::Motion));
    // an '=' after a '/' or '.' is part of the path
    assert_eq!(p("./a=b.safetensors:0.5").unwrap(), spec(Path::new("./a=b.safetensors"), 0.5));
    assert_eq!(p("dir/a=b.safetensors").unwrap(), spec(Path::new("dir/a=b.safetensors"), 1.0));
    let e = p("stlye=a.safetensors").unwrap_err();
    assert!(
        matches!(&e, Error::Input(m) if m.contains("stlye") && m.contains("style, character, utility, lcm, motion"))
    );
}

#[test]
fn model_weights_merge_before_the_layout_change_and_round_once() {
    use celframe::models::{ModelWeights, Place};
    use celframe::ops::conv::weight_oihw_to_ohwi;
    let dir = TempDir::new("lora-prepare");
    let (checkpoint, targets) = unet_targets();
    let m = "lora_unet_input_blocks_1_0_in_layers_2";
    let file = dir.path("conv.safetensors");
    write(
        &file,
        &[
            entry(&format!("{m}.lora_down.weight"), &[4, 32, 3, 3], 1),
            entry(&format!("{m}.lora_up.weight"), &[32, 4, 1, 1], 2),
        ],
        None,
    );
    let loras = resolve(&[spec(&file, 1.0)], &targets, false).unwrap();
    let merge = loras.merge(Component::Unet).unwrap();
    let conv = "down_blocks.0.resnets.0.conv1.weight";
    let base = checkpoint.weights.get(conv).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let host = Place::Host(dtype);
        let w =
            ModelWeights::prepare(&checkpoint.weights, &checkpoint.names, Place::Merged { place: &host, loras: merge })
                .unwrap();
        let got = w.root().get(conv).unwrap();
        let want = weight_oihw_to_ohwi(&merge.merged(conv, base, dtype).unwrap().unwrap()).unwrap();
        assert_eq!((got.dtype(), got.shape()), (dtype, want.shape()));
        assert_eq!(got.host_bytes().unwrap(), want.host_bytes().unwrap(), "{dtype:?}: merged, then KRSC");
        // Weights no delta targets are prepared as without LoRAs.
        let plain = ModelWeights::prepare(&checkpoint.weights, &checkpoint.names, host).unwrap();
        let other = "down_blocks.0.resnets.0.conv2.weight";
        assert_eq!(
            w.root().get(other).unwrap().host_bytes().unwrap(),
            plain.root().get(other).unwrap().host_bytes().unwrap()
        );
        assert_ne!(got.host_bytes().unwrap(), plain.root().get(conv).unwrap().host_bytes().unwrap());
    }
    let host = Place::Host(DType::F32);
    let once = Place::Merged { place: &host, loras: merge };
    let twice = Place::Merged { place: &once, loras: merge };
    let e = ModelWeights::prepare(&checkpoint.weights, &checkpoint.names, twice).err().unwrap();
    assert!(matches!(e, Error::Internal(_)), "{e}");
}

/// LoRAs on attn1.to_k and attn2.to_v reach the fused projections the forward multiplies
/// (`models::transformer::QKV`, `KV`): each row block of a fused matrix holds its part's weight
/// bytes, merged where a LoRA targets the part and at base elsewhere.
#[test]
fn loras_on_fused_projections_reach_their_rows_of_the_fused_matrix() {
    use celframe::models::transformer::{KV, QKV};
    use celframe::models::{Place, Unet};
    let dir = TempDir::new("lora-fused");
    let (checkpoint, targets) = unet_targets();
    let block = "down_blocks.1.attentions.0.transformer_blocks.0";
    let m = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0";
    let file = dir.path("qkv.safetensors");
    write(
        &file,
        &[
            entry(&format!("{m}_attn1_to_k.lora_down.weight"), &[2, 64], 1),
            entry(&format!("{m}_attn1_to_k.lora_up.weight"), &[64, 2], 2),
            entry(&format!("{m}_attn2_to_v.lora_down.weight"), &[2, 32], 3),
            entry(&format!("{m}_attn2_to_v.lora_up.weight"), &[64, 2], 4),
        ],
        None,
    );
    let loras = resolve(&[spec(&file, 1.0)], &targets, false).unwrap();
    let merge = loras.merge(Component::Unet).unwrap();
    assert_eq!(merge.len(), 2);
    for dtype in [DType::F32, DType::F16] {
        let host = Place::Host(dtype);
        let merged = Unet::new(&checkpoint, Place::Merged { place: &host, loras: merge }).unwrap();
        let plain = Unet::new(&checkpoint, host).unwrap();
        for (attn, parts, targeted) in [("attn1", &QKV[..], "to_k"), ("attn2", &KV[..], "to_v")] {
            let module = format!("{block}.{attn}");
            let fused = merged.weights().root().at(&module).rows(parts).unwrap();
            let bytes = fused.host_bytes().unwrap();
            let mut at = 0;
            for &part in parts {
                let name = format!("{module}.{part}.weight");
                let w = merged.weights().tensor(&name).unwrap();
                let rows = &bytes[at..at + w.size_bytes()];
                assert_eq!(rows, w.host_bytes().unwrap(), "{dtype:?} {module}: the rows of {part}");
                let base = plain.weights().tensor(&name).unwrap().host_bytes().unwrap();
                assert_eq!(rows != base, part == targeted, "{dtype:?} {module}: {part} merged iff targeted");
                at += w.size_bytes();
            }
            assert_eq!((at, fused.shape()[0]), (bytes.len(), 64 * parts.len()), "{dtype:?} {module}");
        }
    }
}

// ---- merged models against diffusers (tools/make_lora_fixtures.py: load_lora_weights,
// set_adapters, fuse_lora; float32 on both sides). The issue's bound is relative L2 <= 1e-4;
// measured errors are ~1e-7 (summation order), so the tests assert 1e-5.

const TOL: f64 = 1e-5;

fn lora_options(loras: &[(&str, f64)]) -> LoraOptions {
    let files = loras.iter().map(|(name, w)| spec(&fixtures().join(format!("{name}.safetensors")), *w)).collect();
    LoraOptions { files, lenient: false }
}

fn verify_unet_case(case: &str, loras: &[(&str, f64)]) -> Verification {
    let reference = fixtures().join(format!("{case}.unet.reference.safetensors"));
    let settings = Settings::cpu(DType::F32, TOL);
    verify_unet_with_loras(&fixtures().join("unet_a"), &reference, &settings, &lora_options(loras)).unwrap()
}

fn assert_within(v: &Verification, what: &str) {
    println!("{}", v.summary);
    for c in &v.comparisons {
        println!("{what}: {} rel L2 {:.2e}, max abs {:.2e}", c.name, c.rel_l2, c.max_abs);
        assert!(c.ok(), "{what}: {c:?}");
    }
}

#[test]
fn unet_kohya_sgm_names_match_diffusers() {
    assert_within(&verify_unet_case("lora_kohya_sgm", &[("lora_kohya_sgm", 0.8)]), "kohya SGM x0.8");
}

#[test]
fn unet_kohya_diffusers_paths_match_diffusers() {
    assert_within(&verify_unet_case("lora_kohya_diffusers", &[("lora_kohya_diffusers", 1.0)]), "kohya diffusers");
}

#[test]
fn unet_locon_3x3_matches_diffusers() {
    assert_within(&verify_unet_case("lora_locon_sgm", &[("lora_locon_sgm", 1.0)]), "LoCon 3x3");
}

#[test]
fn unet_peft_with_alpha_in_metadata_matches_diffusers() {
    assert_within(&verify_unet_case("lora_peft", &[("lora_peft", 1.0)]), "PEFT");
}

#[test]
fn unet_two_loras_at_once_match_diffusers() {
    assert_within(&verify_unet_case("lora_two", &[("lora_kohya_sgm", 0.7), ("lora_peft", -0.5)]), "two LoRAs");
}

/// Without the LoRA, or at another strength, the references are far off: the comparisons above
/// can fail.
#[test]
fn the_lora_references_differ_from_the_plain_model() {
    let settings = Settings::cpu(DType::F32, TOL);
    let reference = fixtures().join("lora_two.unet.reference.safetensors");
    let none = verify_unet(&fixtures().join("unet_a"), &reference, &settings).unwrap();
    let one = verify_unet_case("lora_two", &[("lora_kohya_sgm", 0.7)]);
    let swapped = verify_unet_case("lora_two", &[("lora_kohya_sgm", 0.7), ("lora_peft", 0.5)]);
    for (v, what) in [(none, "no LoRA"), (one, "one of the two"), (swapped, "the second at +0.5")] {
        let c = &v.comparisons[0];
        assert!(c.rel_l2 > 1e-2, "{what}: rel L2 {:.2e}", c.rel_l2);
    }
}

#[test]
fn text_encoder_loras_match_diffusers_and_leave_unet_keys_to_the_unet() {
    for kind in [TextEncoderKind::ClipL, TextEncoderKind::ClipG] {
        let folder = fixtures().join(format!("{}_tiny", kind.folder()));
        let reference = fixtures().join(format!("lora_te_kohya.{}.reference.safetensors", kind.folder()));
        let settings = Settings::cpu(DType::F32, TOL);
        let loras = lora_options(&[("lora_te_kohya", 1.0)]);
        let v = verify_text_encoder_with_loras(kind, &folder, &reference, &settings, &loras).unwrap();
        assert_within(&v, kind.folder());
        assert!(v.summary.contains("modules for unet (not loaded here)"), "{}", v.summary);
        let plain = verify_text_encoder(kind, &folder, &reference, &settings).unwrap();
        assert!(plain.comparisons.iter().all(|c| c.rel_l2 > 1e-2), "{}: the LoRA changes every output", kind.folder());
    }
}

#[test]
fn a_single_file_unet_takes_the_same_loras() {
    let dir = TempDir::new("lora-single");
    let file = dir.path("unet_a.safetensors");
    write_single_file_a(&file);
    let reference = fixtures().join("lora_two.unet.reference.safetensors");
    let loras = lora_options(&[("lora_kohya_sgm", 0.7), ("lora_peft", -0.5)]);
    let v = verify_unet_with_loras(&file, &reference, &Settings::cpu(DType::F32, TOL), &loras).unwrap();
    assert_within(&v, "single file");
}

fn celframe(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn cli_lora_flags() {
    let f = |name: &str| fixtures().join(name).display().to_string();
    let (unet, reference) = (f("unet_a"), f("lora_two.unet.reference.safetensors"));
    let (sgm, peft) =
        (format!("{}:0.7", f("lora_kohya_sgm.safetensors")), format!("{}:-0.5", f("lora_peft.safetensors")));
    let base = ["verify", "unet", "--device", "cpu", "--weights", &unet, "--reference", &reference];
    let (code, out) = celframe(&[&base[..], &["--lora", &sgm, "--lora", &peft]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("lora_kohya_sgm.safetensors (unet x0.7") && out.contains("(unet x-0.5"), "{out}");
    // A LoRA with keys for the text encoders and the UNet: the text-encoder keys are counted.
    let te = f("lora_te_kohya.safetensors");
    let (code, out) = celframe(&[&base[..], &["--lora", &te]].concat());
    assert_eq!(code, 1, "runs, but the reference is another LoRA's: {out}");
    assert!(out.contains("for text_encoder (not loaded here)") && out.contains("for text_encoder_2"), "{out}");
    // Keys that target nothing: exit 2, or a warning with --lora-lenient.
    let dir = TempDir::new("lora-cli");
    let stray = dir.path("stray.safetensors");
    write(&stray, &[scalar("lora_unet_nowhere.alpha", 1.0)], None);
    let stray = stray.display().to_string();
    let (code, out) = celframe(&[&base[..], &["--lora", &stray]].concat());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("lora_unet_nowhere.alpha"), "{out}");
    let (code, out) = celframe(&[&base[..], &["--lora", &stray, "--lora-lenient"]].concat());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("WARNING: 1 keys target nothing"), "{out}");
    // --lora on the VAE, a bad weight, a missing file: exit 2.
    let vae = ["verify", "vae_decoder", "--device", "cpu", "--weights", &unet, "--reference", &reference];
    let (code, out) = celframe(&[&vae[..], &["--lora", &te]].concat());
    assert_eq!(code, 2, "{out}");
    let (code, out) = celframe(&[&base[..], &["--lora", &format!("{te}:nan")]].concat());
    assert_eq!(code, 2, "{out}");
    let (code, out) = celframe(&[&base[..], &["--lora", "no/such/file.safetensors"]].concat());
    assert_eq!(code, 2, "{out}");
}

// ---- LyCORIS formats against the script's own maths (tools/make_lora_fixtures.py `lycoris`:
// LyCORIS `functional/{loha,lokr}.py`; diffusers loads none of them into an
// SDXL UNet), float32 on both sides.

#[test]
fn unet_loha_matches_the_reference_maths() {
    assert_within(&verify_unet_case("lora_loha", &[("lora_loha", 1.0)]), "LoHa");
}

#[test]
fn unet_lokr_matches_the_reference_maths() {
    assert_within(&verify_unet_case("lora_lokr", &[("lora_lokr", 0.6)]), "LoKr x0.6");
}

#[test]
fn unet_full_diff_with_bias_matches_the_reference_maths() {
    let v = verify_unet_case("lora_full", &[("lora_full", 1.0)]);
    assert!(v.summary.contains("unet 2 modules"), "{}", v.summary);
    assert_within(&v, "diff + diff_b");
}

#[test]
fn the_lycoris_references_differ_from_the_plain_model() {
    let settings = Settings::cpu(DType::F32, TOL);
    for case in ["lora_loha", "lora_lokr", "lora_full"] {
        let reference = fixtures().join(format!("{case}.unet.reference.safetensors"));
        let c = verify_unet(&fixtures().join("unet_a"), &reference, &settings).unwrap().comparisons[0].clone();
        assert!(c.rel_l2 > 1e-2, "{case}: rel L2 {:.2e}", c.rel_l2);
    }
    // LoKr's scale rule: at another strength the result is off.
    let c = verify_unet_case("lora_lokr", &[("lora_lokr", 1.0)]).comparisons[0].clone();
    assert!(c.rel_l2 > 1e-3, "LoKr at 1.0 instead of 0.6: rel L2 {:.2e}", c.rel_l2);
}

#[test]
fn lycoris_modules_that_do_not_fit_are_refused_with_their_shapes() {
    let dir = TempDir::new("lora-lycoris-bad");
    let (_, targets) = unet_targets();
    let m = "lora_unet_input_blocks_4_1_proj_in";
    let file = dir.path("bad.safetensors");
    let cases: Vec<(Vec<Entry>, &str)> = vec![
        (vec![entry(&format!("{m}.hada_w1_a"), &[64, 2], 1)], "LoHa needs"),
        (
            vec![
                entry(&format!("{m}.hada_w1_a"), &[64, 2], 1),
                entry(&format!("{m}.hada_w1_b"), &[2, 64], 2),
                entry(&format!("{m}.hada_w2_a"), &[64, 2], 3),
                entry(&format!("{m}.hada_w2_b"), &[2, 32], 4),
            ],
            "[2, 32]",
        ),
        (
            vec![entry(&format!("{m}.lokr_w1"), &[8, 8], 1), entry(&format!("{m}.lokr_w2"), &[8, 4], 2)],
            "kron([8, 8], [8, 4])",
        ),
        (vec![entry(&format!("{m}.lokr_w1"), &[8, 8], 1), entry(&format!("{m}.lokr_w2_a"), &[8, 2], 2)], "LoKr needs"),
        (
            vec![entry(&format!("{m}.diff"), &[64, 64], 1), entry(&format!("{m}.lora_down.weight"), &[2, 64], 2)],
            "not one format",
        ),
        (vec![entry(&format!("{m}.diff_b"), &[32], 1)], "diff_b is [32]"),
        (vec![entry(&format!("{m}.diff"), &[64, 64], 1), scalar(&format!("{m}.alpha"), 1.0)], "takes no alpha"),
    ];
    for (entries, want) in cases {
        write(&file, &entries, None);
        let e = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap();
        assert!(matches!(e, Error::Input(_)) && e.to_string().contains(want), "'{want}' in: {e}");
    }
}

// ---- DoRA (src/models/lora/merge.rs `Dora`). PEFT files against diffusers' `fuse_lora`; kohya /
// LyCORIS `dora_scale` files against LyCORIS' maths in tools/make_lora_fixtures.py
// (`kohya_dora`: diffusers 0.42 drops `dora_scale` keys for SDXL).

#[test]
fn unet_peft_dora_matches_diffusers() {
    assert_within(&verify_unet_case("lora_dora_peft", &[("lora_dora_peft", 0.7)]), "PEFT DoRA x0.7");
}

#[test]
fn unet_dora_with_a_plain_lora_matches_diffusers_in_either_order() {
    // diffusers fused the DoRA file first; each module's change is taken against the weight before
    // any LoRA, so the order given here does not matter (checked on the merged weights).
    let case = "lora_dora_two";
    assert_within(&verify_unet_case(case, &[("lora_peft", -0.5), ("lora_dora_peft", 0.7)]), "LoRA, then DoRA");
    let (checkpoint, targets) = unet_targets();
    let merge = |order: &[(&str, f64)]| resolve(&lora_options(order).files, &targets, false).unwrap();
    let (a, b) = (
        merge(&[("lora_peft", -0.5), ("lora_dora_peft", 0.7)]),
        merge(&[("lora_dora_peft", 0.7), ("lora_peft", -0.5)]),
    );
    let (a, b) = (a.merge(Component::Unet).unwrap(), b.merge(Component::Unet).unwrap());
    let name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    assert!(!a.is_additive(name) && a.deltas(name).unwrap().len() == 2, "both files adapt {name}");
    for name in a.names() {
        let base = checkpoint.weights.get(name).unwrap();
        let (x, y) = (a.merged(name, base, DType::F32).unwrap(), b.merged(name, base, DType::F32).unwrap());
        assert_eq!(x.unwrap().to_f32_vec().unwrap(), y.unwrap().to_f32_vec().unwrap(), "{name}");
    }
}

#[test]
fn unet_kohya_dora_scale_on_both_axes_matches_the_lycoris_maths() {
    let v = verify_unet_case("lora_dora_kohya", &[("lora_dora_kohya", 0.8)]);
    assert!(v.summary.contains("unet 5 modules"), "{}", v.summary);
    assert_within(&v, "dora_scale x0.8");
}

/// A copy of a fixture LoRA without the keys `drop` accepts, in `dir`.
fn without(dir: &TempDir, name: &str, drop: impl Fn(&str) -> bool) -> std::path::PathBuf {
    let file = weights::open(&fixtures().join(format!("{name}.safetensors")), "LoRA").unwrap();
    let kept: Vec<Entry> = file
        .names()
        .filter(|n| !drop(n))
        .map(|n| {
            let t = file.float(n).unwrap();
            (n.to_string(), t.shape().to_vec(), t.to_f32_vec().unwrap())
        })
        .collect();
    let path = dir.path(&format!("{name}.stripped.safetensors"));
    write(&path, &kept, file.metadata().get("lora_adapter_metadata").map(String::as_str));
    path
}

/// The DoRA comparisons above can fail: without DoRA, at another strength, or with the strength
/// applied the other format's way, the outputs are far off.
#[test]
fn the_dora_references_differ_from_plain_lora_and_other_strengths() {
    let settings = Settings::cpu(DType::F32, TOL);
    let rel = |reference: &str, specs: Vec<LoraSpec>| {
        let reference = fixtures().join(format!("{reference}.unet.reference.safetensors"));
        let v = verify_unet_with_loras(
            &fixtures().join("unet_a"),
            &reference,
            &settings,
            &LoraOptions { files: specs, lenient: false },
        )
        .unwrap();
        v.comparisons[0].rel_l2
    };
    let f = |name: &str| fixtures().join(format!("{name}.safetensors"));
    let dir = TempDir::new("lora-dora-refs");
    // dora_scale dropped (what diffusers 0.42 does with kohya DoRA files): a plain LoRA
    let plain = without(&dir, "lora_dora_kohya", |n| n.ends_with(".dora_scale"));
    let cases = [
        ("lora_dora_kohya", vec![LoraSpec::new(plain, 0.8, None)], "dora_scale dropped"),
        ("lora_dora_peft", vec![LoraSpec::new(f("lora_dora_peft"), 1.0, None)], "PEFT DoRA at 1.0"),
        ("lora_dora_two", vec![LoraSpec::new(f("lora_dora_peft"), 0.7, None)], "the DoRA file alone"),
    ];
    for (reference, specs, what) in cases {
        let e = rel(reference, specs);
        assert!(e > 1e-3, "{what}: rel L2 {e:.2e}");
    }
}

#[test]
fn dora_magnitudes_that_do_not_fit_are_input_errors_naming_key_and_shapes() {
    let dir = TempDir::new("lora-dora-bad");
    let (_, targets) = unet_targets();
    let file = dir.path("bad.safetensors");
    let k = "lora_unet_input_blocks_4_1_proj_in"; // [64, 64]
    let pair = |m: &str, down: &[usize], up: &[usize]| {
        vec![entry(&format!("{m}.lora_down.weight"), down, 1), entry(&format!("{m}.lora_up.weight"), up, 2)]
    };
    let p = "unet.down_blocks.1.attentions.0.proj_in";
    let peft = |mag: &[usize]| {
        vec![
            entry(&format!("{p}.lora_A.weight"), &[2, 64], 1),
            entry(&format!("{p}.lora_B.weight"), &[64, 2], 2),
            entry(&format!("{p}.lora_magnitude_vector"), mag, 3),
        ]
    };
    let c = "lora_unet_input_blocks_1_0_in_layers_2"; // conv [32, 32, 3, 3]
    let cases: Vec<(Vec<Entry>, Option<&str>, Vec<&str>)> = vec![
        (
            [pair(k, &[2, 64], &[64, 2]), vec![entry(&format!("{k}.dora_scale"), &[64], 3)]].concat(),
            None,
            vec!["dora_scale is [64]", "[64, 1, ...]", "[1, 64, ...]"],
        ),
        (
            [pair(c, &[2, 32, 3, 3], &[32, 2, 1, 1]), vec![entry(&format!("{c}.dora_scale"), &[32, 1], 3)]].concat(),
            None,
            vec!["dora_scale is [32, 1]", "[32, 32, 3, 3]"],
        ),
        (peft(&[32]), None, vec!["lora_magnitude_vector is [32]", "[64] on a Linear"]),
        (peft(&[1, 64, 1, 1]), None, vec!["lora_magnitude_vector is [1, 64, 1, 1]"]),
        (
            pair(p, &[2, 64], &[64, 2])
                .into_iter()
                .map(|(n, s, v)| (n.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."), s, v))
                .collect(),
            Some(r#"{"unet.use_dora": true}"#),
            vec!["use_dora", "no lora_magnitude_vector"],
        ),
        (
            vec![entry(&format!("{k}.diff"), &[64, 64], 1), entry(&format!("{k}.dora_scale"), &[64, 1], 2)],
            None,
            vec!["full diff"],
        ),
    ];
    for (entries, metadata, parts) in cases {
        write(&file, &entries, metadata);
        let e = resolve(&[spec(&file, 1.0)], &targets, false).err().expect("an error");
        let msg = e.to_string();
        assert!(matches!(e, Error::Input(_)), "{msg}");
        for part in parts.iter().chain(&[file.display().to_string().as_str()]) {
            assert!(msg.contains(part), "'{part}' in: {msg}");
        }
    }
}

#[test]
fn two_dora_modules_on_one_weight_are_refused() {
    let dir = TempDir::new("lora-dora-twice");
    let (_, targets) = unet_targets();
    let k = "lora_unet_input_blocks_4_1_proj_in";
    let dora = [
        entry(&format!("{k}.lora_down.weight"), &[2, 64], 1),
        entry(&format!("{k}.lora_up.weight"), &[64, 2], 2),
        entry(&format!("{k}.dora_scale"), &[64, 1], 3),
    ];
    let (a, b) = (dir.path("a.safetensors"), dir.path("b.safetensors"));
    write(&a, &dora, None);
    write(&b, &dora, None);
    let e = resolve(&[spec(&a, 1.0), spec(&b, 1.0)], &targets, false).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, Error::Unsupported(_)) && msg.contains("adapts with DoRA too"), "{msg}");
    assert!(msg.contains(&a.display().to_string()) && msg.contains(&b.display().to_string()), "{msg}");
    // One DoRA module and a plain one on the same weight are fine.
    write(&b, &dora[..2], None);
    let loras = resolve(&[spec(&a, 1.0), spec(&b, 1.0)], &targets, false).unwrap();
    let merge = loras.merge(Component::Unet).unwrap();
    assert!(!merge.is_additive(PROJ_IN) && merge.deltas(PROJ_IN).unwrap().len() == 2);
}

// ---- LoRAs on the motion UNet (tools/make_lora_fixtures.py `motion_case`: diffusers'
// AnimateDiffSDXLPipeline with lora_kohya_sgm x0.8 on the UNet and lora_motion x0.7 on the motion
// modules, fused; 1 video x 4 frames at 8x8).

fn verify_motion_case(loras: &[LoraSpec]) -> Verification {
    let options = LoraOptions { files: loras.to_vec(), lenient: false };
    verify_motion_unet_with_loras(
        &fixtures().join("unet_a"),
        &fixtures().join("motion_a"),
        &fixtures().join("lora_motion.motion_unet.reference.safetensors"),
        &Settings::cpu(DType::F32, TOL),
        false,
        &options,
    )
    .unwrap()
}

fn motion_specs(motion_file: &Path, motion_weight: f64) -> Vec<LoraSpec> {
    vec![
        LoraSpec::new(fixtures().join("lora_kohya_sgm.safetensors"), 0.8, Some(Role::Style)),
        LoraSpec::new(motion_file, motion_weight, Some(Role::Motion)),
    ]
}

/// Processor-form motion LoRA module keys (`unet.<attention>.processor.<proj>_lora`) and their
/// down/up tensors, from the fixture.
fn motion_lora_entries() -> Vec<(String, String, Entry)> {
    let file = weights::open(&fixtures().join("lora_motion.safetensors"), "LoRA").unwrap();
    file.names()
        .map(|n| {
            let t = file.float(n).unwrap();
            let (head, which) = n.rsplit_once("_lora.").unwrap(); // (unet.<attn>.processor.to_q, down.weight)
            let (attention, proj) = head.rsplit_once(".processor.").unwrap();
            (
                attention.to_string(),
                format!("{proj}|{which}"),
                (n.to_string(), t.shape().to_vec(), t.to_f32_vec().unwrap()),
            )
        })
        .collect()
}

#[test]
fn motion_unet_with_a_unet_and_a_motion_lora_matches_diffusers() {
    let v = verify_motion_case(&motion_specs(&fixtures().join("lora_motion.safetensors"), 0.7));
    let pairs = motion_lora_entries().len() / 2;
    assert!(v.summary.contains(&format!("motion_modules {pairs} modules")), "{}", v.summary);
    assert!(v.summary.contains("lora_kohya_sgm.safetensors [style]"), "{}", v.summary);
    // 0.7 is outside the motion role's recommended 1.0: a warning, not an error
    assert!(v.summary.contains("WARNING: LoRA") && v.summary.contains("weight 0.7 is outside"), "{}", v.summary);
    assert_within(&v, "kohya UNet LoRA + motion LoRA");
}

#[test]
fn motion_loras_in_original_animatediff_and_peft_names_merge_the_same() {
    // The original names of the motion modules' tensors, as tools/make_motion_fixtures.py wrote
    // and diffusers' converter checked them (motion_a.original_names.json): diffusers -> original.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("motion_a.original_names.json")).unwrap())
            .unwrap();
    let original: HashMap<String, String> = json["original_to_diffusers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(o, d)| (d.as_str().unwrap().to_string(), o.clone()))
        .collect();
    let dir = TempDir::new("lora-motion-names");
    let (mut peft, mut guoyww) = (Vec::new(), Vec::new());
    let mut mid = 0;
    for (attention, kind, (_, shape, values)) in motion_lora_entries() {
        let (proj, which) = kind.split_once('|').unwrap();
        let module = if proj == "to_out" { "to_out.0" } else { proj };
        let ab = if which == "down.weight" { "lora_A" } else { "lora_B" };
        let peft_key = format!("{attention}.{module}.{ab}.weight");
        peft.push((peft_key.clone(), shape.clone(), values.clone()));
        // guoyww/AnimateDiff MotionLoRA keys: <original attention path>.processor.<proj>_lora.<which>
        let diffusers_weight = format!("{}.{module}.weight", attention.strip_prefix("unet.").unwrap());
        match original.get(&diffusers_weight) {
            Some(o) => {
                let o_attention = o.strip_suffix(&format!(".{module}.weight")).unwrap();
                guoyww.push((format!("{o_attention}.processor.{proj}_lora.{which}"), shape, values));
            }
            // the names file has no mid block (the SDXL module has none): PEFT names there
            None => {
                mid += 1;
                guoyww.push((peft_key, shape, values));
            }
        }
    }
    assert!(
        mid > 0 && guoyww.iter().filter(|(n, ..)| n.contains(".temporal_transformer.")).count() == peft.len() - mid
    );
    // The same deltas on the same weights as the processor-form fixture, which is checked against
    // diffusers above.
    let unet = open_unet(&fixtures().join("unet_a")).unwrap();
    let motion = open_motion(&fixtures().join("motion_a")).unwrap();
    let mut targets = Targets::new();
    targets.add_unet(&unet).unwrap();
    targets.add_motion(&motion).unwrap();
    let merged = |file: &Path| {
        let loras = resolve(&[spec(file, 0.7)], &targets, false).unwrap();
        let merge = loras.merge(Component::Motion).unwrap();
        let mut out: Vec<(String, Vec<f32>)> = merge
            .names()
            .map(|n| {
                let base = motion.weights.get(n).unwrap();
                (n.to_string(), merge.merged(n, base, DType::F32).unwrap().unwrap().to_f32_vec().unwrap())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        (loras.summary.join("\n"), out)
    };
    let (_, want) = merged(&fixtures().join("lora_motion.safetensors"));
    assert_eq!(want.len(), peft.len() / 2);
    for (entries, what) in [(peft, "PEFT names"), (guoyww, "original AnimateDiff names (mid block: PEFT)")] {
        let file = dir.path("motion.safetensors");
        write(&file, &entries, None);
        let (summary, got) = merged(&file);
        assert!(summary.contains(&format!("motion_modules {} modules", entries.len() / 2)), "{what}: {summary}");
        assert!(got == want, "{what}: the merged motion weights differ from the processor-form file's");
    }
}

#[test]
fn the_motion_lora_reference_differs_without_the_motion_lora_or_at_another_strength() {
    let motion = fixtures().join("lora_motion.safetensors");
    let unet_only = vec![motion_specs(&motion, 0.7).remove(0)];
    for (specs, what) in [(unet_only, "the UNet LoRA only"), (motion_specs(&motion, 1.0), "the motion LoRA at 1.0")] {
        let c = verify_motion_case(&specs).comparisons[0].clone();
        assert!(c.rel_l2 > 1e-3, "{what}: rel L2 {:.2e}", c.rel_l2);
    }
}

#[test]
fn motion_modules_enter_the_name_map_only_when_loaded() {
    let dir = TempDir::new("lora-motion-map");
    let motion = open_motion(&fixtures().join("motion_a")).unwrap();
    let (_, mut targets) = unet_targets();
    let attn = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2";
    let keys = [
        format!("unet.{attn}.processor.to_out_lora.down.weight"),
        format!("unet.{attn}.processor.to_out_lora.up.weight"),
    ];
    let file = dir.path("one.safetensors");
    write(&file, &[entry(&keys[0], &[2, 64], 1), entry(&keys[1], &[64, 2], 2)], None);
    // UNet only: counted for the motion modules, not an error
    let loras = resolve(&[spec(&file, 1.0)], &targets, false).unwrap();
    assert!(loras.summary[0].contains("1 modules for motion_modules (not loaded here)"), "{:?}", loras.summary);
    targets.add_motion(&motion).unwrap();
    let loras = resolve(&[spec(&file, 0.5)], &targets, false).unwrap();
    let merge = loras.merge(Component::Motion).unwrap();
    let name = format!("{attn}.to_out.0.weight");
    assert!(merge.names().eq([name.as_str()]) && loras.merge(Component::Unet).is_none());
    // W + 0.5 · up · down (no alpha: scale = strength), on the stored weight
    let base = motion.weights.get(&name).unwrap();
    let got = merge.merged(&name, base, DType::F32).unwrap().unwrap().to_f32_vec().unwrap();
    let want = expected(base, &entry("u", &[64, 2], 2), &entry("d", &[2, 64], 1), 0.5);
    assert_eq!(got, want);
    // a width that does not fit: the key and both shapes
    write(&file, &[entry(&keys[0], &[2, 32], 1), entry(&keys[1], &[32, 2], 2)], None);
    let msg = resolve(&[spec(&file, 1.0)], &targets, false).err().unwrap().to_string();
    assert!(msg.contains(&format!("{} [2, 32]", keys[0])) && msg.contains(&format!("'{name}' is [64, 64]")), "{msg}");
}

#[test]
fn cli_motion_unet_takes_roles_and_refuses_a_fourth_lora() {
    let f = |name: &str| fixtures().join(name).display().to_string();
    let (unet, motion, reference) = (f("unet_a"), f("motion_a"), f("lora_motion.motion_unet.reference.safetensors"));
    let base = [
        "verify",
        "motion_unet",
        "--device",
        "cpu",
        "--weights",
        &unet,
        "--motion",
        &motion,
        "--reference",
        &reference,
    ];
    let style = format!("style={}:0.8", f("lora_kohya_sgm.safetensors"));
    let pan = format!("motion={}:0.7", f("lora_motion.safetensors"));
    let (code, out) = celframe(&[&base[..], &["--lora", &style, "--lora", &pan]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("[motion]") && out.contains("motion_modules") && out.contains("outside the recommended 1"),
        "{out}"
    );
    // three more LoRAs without roles: four besides the motion LoRA
    let te = f("lora_te_kohya.safetensors");
    let more = ["--lora", &te, "--lora", &te, "--lora", &te];
    let (code, out) = celframe(&[&base[..], &["--lora", &style, "--lora", &pan], &more[..]].concat());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("at most 3 LoRAs besides the LCM-LoRA and the motion LoRA") && out.contains("(no role)"),
        "{out}"
    );
    let (code, out) = celframe(&[&base[..], &["--lora", &format!("motoin={}", f("lora_motion.safetensors"))]].concat());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown LoRA role 'motoin'"), "{out}");
}

/// Both text encoders loaded at once (as the pipeline loads them): `lora_te1_` and `lora_te2_`
/// modules of one file name weights alike (`encoder.layers.0....`) but adapt different models.
#[test]
fn one_file_adapts_both_text_encoders_loaded_together() {
    let lora = fixtures().join("lora_te_kohya.safetensors");
    let mut targets = Targets::new();
    let mut checkpoints = Vec::new();
    for kind in [TextEncoderKind::ClipL, TextEncoderKind::ClipG] {
        let checkpoint = open_text_encoder(&fixtures().join(format!("{}_tiny", kind.folder())), kind).unwrap();
        targets.add_text_encoder(&checkpoint).unwrap();
        checkpoints.push(checkpoint);
    }
    let loras = resolve(&[spec(&lora, 0.5)], &targets, false).unwrap();
    let file = weights::open(&lora, "LoRA file").unwrap();
    let factor = |name: String| -> Entry {
        let t = file.float(&name).unwrap();
        (name, t.shape().to_vec(), t.to_f32_vec().unwrap())
    };
    let graph = "encoder.layers.0.self_attn.q_proj.weight";
    for (checkpoint, (component, prefix)) in
        checkpoints.iter().zip([(Component::TextEncoder, "lora_te1_"), (Component::TextEncoder2, "lora_te2_")])
    {
        let module = format!("{prefix}text_model_encoder_layers_0_self_attn_q_proj");
        let (up, down) = (factor(format!("{module}.lora_up.weight")), factor(format!("{module}.lora_down.weight")));
        let alpha = file.float(&format!("{module}.alpha")).unwrap().to_f32_vec().unwrap()[0] as f64;
        let base = checkpoint.weights.get(&format!("text_model.{graph}")).unwrap();
        let merge = loras.merge(component).unwrap_or_else(|| panic!("no delta for {}", component.name()));
        let merged = merge.merged(graph, base, DType::F32).unwrap().expect("a delta for q_proj").to_f32_vec().unwrap();
        let want = expected(base, &up, &down, 0.5 * alpha / down.1[0] as f64);
        let worst = merged.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{}: merged q_proj off by {worst}", component.name());
    }
}
