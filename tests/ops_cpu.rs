//! CPU twins against PyTorch / diffusers reference outputs (tests/fixtures/ops_reference.safetensors,
//! made by tools/make_op_fixtures.py). Both sides compute in float32, so the tolerance is float32
//! rounding over short reductions: relative L2 error 1e-5 (measured errors are near 1e-7).

mod common;

use celframe::ops::Exec;
use celframe::ops::attention::{
    FlashAttention, TemporalAttention, attention, attention_grouped, flash_attention, temporal_attention,
};
use celframe::ops::conv::{Conv2d, conv2d, weight_oihw_to_ohwi};
use celframe::ops::elementwise::{add, geglu, gelu, mul, residual_add, scale, silu};
use celframe::ops::embedding::{TimestepEmbedding, timestep_embedding};
use celframe::ops::linear::linear;
use celframe::ops::norm::{
    GroupNorm, group_norm, group_norm_concat, group_norm_of_biased, layer_norm, layer_norm_add, layer_norm_shifted,
};
use celframe::ops::upsample::upsample_nearest2x;
use celframe::{DType, Error, Tensor};
use common::{assert_close, fixture};

const TOL: f64 = 1e-5;
const CPU: Exec = Exec::Cpu;

#[test]
fn group_norm_matches_torch_per_image_and_across_frames() {
    let f = fixture("ops_reference.safetensors");
    let gn = |silu, groups, eps, frames| GroupNorm { groups, eps, silu, frames };
    let (x, g, b) = (&f["group_norm.x"], &f["group_norm.gamma"], &f["group_norm.beta"]);
    assert_close("group_norm", &group_norm(&CPU, x, g, b, gn(false, 32, 1e-5, 1)).unwrap(), &f["group_norm.out"], TOL);
    assert_close(
        "group_norm+silu",
        &group_norm(&CPU, x, g, b, gn(true, 32, 1e-5, 1)).unwrap(),
        &f["group_norm_silu.out"],
        TOL,
    );
    let (x, g, b) = (&f["group_norm_frames.x"], &f["group_norm_frames.gamma"], &f["group_norm_frames.beta"]);
    let out = group_norm(&CPU, x, g, b, gn(false, 8, 1e-6, 4)).unwrap();
    assert_close("group_norm over 4 frames", &out, &f["group_norm_frames.out"], TOL);
    // Per-frame statistics are a different function: the fixture must tell them apart.
    let per_frame = group_norm(&CPU, x, g, b, gn(false, 8, 1e-6, 1)).unwrap();
    let (rel, _) = common::errors(&per_frame.to_f32_vec().unwrap(), &f["group_norm_frames.out"].to_f32_vec().unwrap());
    assert!(rel > 1e-2, "per-frame and per-video statistics should differ, rel {rel}");
}

#[test]
fn group_norm_of_a_concatenation_read_in_parts_matches_torch() {
    // The fixture's input cut on the channels into [x, tail] (a cut inside a group, and one after
    // the first channel): the norm equals torch's of the whole, and the concatenation written
    // beside it is the whole input again. Parts that disagree before the channels are refused.
    let f = fixture("ops_reference.safetensors");
    let (x, g, b) = (&f["group_norm.x"], &f["group_norm.gamma"], &f["group_norm.beta"]);
    let (lead, c) = x.shape().split_at(x.shape().len() - 1);
    let c = c[0];
    let values = x.to_f32_vec().unwrap();
    let part = |from: usize, to: usize| {
        let v: Vec<f32> = values.chunks_exact(c).flat_map(|px| px[from..to].iter().copied()).collect();
        Tensor::from_f32(&[lead, &[to - from]].concat(), DType::F32, &v).unwrap()
    };
    let cfg = GroupNorm { groups: 32, eps: 1e-5, silu: false, frames: 1 };
    for cut in [c / 2 + 3, 1] {
        let (y, cat) = group_norm_concat(&CPU, &part(0, cut), &part(cut, c), g, b, cfg).unwrap();
        assert_close(&format!("group_norm of [x, tail] cut at {cut}"), &y, &f["group_norm.out"], TOL);
        assert_eq!(cat.shape(), x.shape());
        assert_eq!(cat.to_f32_vec().unwrap(), values, "the concatenation cut at {cut} is not the input");
    }
    let other = Tensor::from_f32(&[1, 8], DType::F32, &[0.0; 8]).unwrap();
    let Err(Error::Input(m)) = group_norm_concat(&CPU, &part(0, 8), &other, g, b, cfg) else {
        panic!("parts of different leading shapes were taken")
    };
    assert!(m.contains("group_norm_concat") && m.contains("differ before the channels"), "{m}");
}

#[test]
fn group_norm_of_a_bias_per_image_or_video_is_the_norm_of_the_sum() {
    // A ResNet's norm2 of conv1's output plus its time embedding, one row per image ([6, C]) or per
    // video of 3 frames ([2, C], per-frame statistics: each frame reads its video's row), against
    // the norm of the sum made by the broadcast add, in f32 (the twins round the same way).
    let (n, h, w, c) = (6, 3, 5, 16);
    let x = common::random_tensor(&[n, h, w, c], DType::F32, 7, 1.0, 0.2);
    let (g, b) =
        (common::random_tensor(&[c], DType::F32, 8, 0.5, 1.0), common::random_tensor(&[c], DType::F32, 9, 0.5, 0.0));
    for (rows, frames) in [(6, 1), (2, 1), (2, 3)] {
        let cfg = GroupNorm { groups: 4, eps: 1e-6, silu: true, frames };
        let t = common::random_tensor(&[rows, c], DType::F32, 10, 3.0, 1.0);
        let summed = add(&CPU, &x.reshape(&[rows, n / rows * h, w, c]).unwrap(), &t, 1.0).unwrap();
        let expected = group_norm(&CPU, &summed.reshape(&[n, h, w, c]).unwrap(), &g, &b, cfg).unwrap();
        let out = group_norm_of_biased(&CPU, &x, &t, &g, &b, cfg).unwrap();
        assert_close(&format!("group_norm of x + [{rows}, C], frames {frames}"), &out, &expected, TOL);
    }
    // A bias whose rows do not divide the normalised domains is refused by name.
    let cfg = GroupNorm { groups: 4, eps: 1e-6, silu: false, frames: 1 };
    let t = common::random_tensor(&[4, c], DType::F32, 11, 1.0, 0.0);
    let Err(Error::Input(m)) = group_norm_of_biased(&CPU, &x, &t, &g, &b, cfg) else {
        panic!("a [4, C] bias was taken")
    };
    assert!(m.contains("input bias") && m.contains("6 normalised domains"), "{m}");
}

#[test]
fn layer_norm_of_a_shifted_stream_is_the_norm_of_the_rounded_sum() {
    // A motion module's stream lacking its pending biases: the norm of x + shift rounded to the
    // dtype (what a bias epilogue would have stored), in f16 as the models run it.
    let (x, shift) = (
        common::random_tensor(&[4, 3, 40], DType::F16, 21, 2.0, 0.3),
        common::random_tensor(&[40], DType::F16, 22, 1.0, 0.5),
    );
    let (g, b, rows) = (
        common::random_tensor(&[40], DType::F16, 23, 0.5, 1.0),
        common::random_tensor(&[40], DType::F16, 24, 0.5, 0.0),
        common::random_tensor(&[4, 40], DType::F16, 25, 1.0, 0.0),
    );
    let stored = add(&CPU, &x, &shift, 1.0).unwrap();
    let expected = layer_norm_add(&CPU, &stored, Some(&g), Some(&b), 1e-5, Some(&rows)).unwrap();
    let out = layer_norm_shifted(&CPU, &x, Some(&shift), Some(&g), Some(&b), 1e-5, Some(&rows)).unwrap();
    assert_close("layer_norm of x + shift", &out, &expected, 0.0);
    let unshifted = layer_norm_add(&CPU, &x, Some(&g), Some(&b), 1e-5, Some(&rows)).unwrap();
    let (rel, _) = common::errors(&unshifted.to_f32_vec().unwrap(), &expected.to_f32_vec().unwrap());
    assert!(rel > 1e-2, "the shift should change the norm, rel {rel}");
    let Err(Error::Input(m)) = layer_norm_shifted(&CPU, &x, Some(&rows), None, None, 1e-5, None) else { panic!() };
    assert!(m.contains("must be [40]"), "{m}");
}

#[test]
fn layer_norm_matches_torch() {
    let f = fixture("ops_reference.safetensors");
    let out =
        layer_norm(&CPU, &f["layer_norm.x"], Some(&f["layer_norm.gamma"]), Some(&f["layer_norm.beta"]), 1e-5).unwrap();
    assert_close("layer_norm", &out, &f["layer_norm.out"], TOL);
}

#[test]
fn layer_norm_with_rows_added_matches_torch() {
    let f = fixture("ops_reference.safetensors");
    let (g, b) = (Some(&f["layer_norm_add.gamma"]), Some(&f["layer_norm_add.beta"]));
    let out = layer_norm_add(&CPU, &f["layer_norm_add.x"], g, b, 1e-5, Some(&f["layer_norm_add.rows"])).unwrap();
    assert_close("layer_norm + rows", &out, &f["layer_norm_add.out"], TOL);
    // Rows under the wrong index (a table [L, C] or one row per token) are refused by name.
    let x = &f["layer_norm_add.x"];
    for rows in [&f["layer_norm_add.gamma"], x] {
        match layer_norm_add(&CPU, x, g, b, 1e-5, Some(rows)) {
            Err(Error::Input(m)) => assert!(m.contains("added rows"), "{m}"),
            other => panic!("rows {rows:?}: expected an input error, got {other:?}"),
        }
    }
}

#[test]
fn residual_add_matches_torch_with_and_without_a_shortcut_bias() {
    let f = fixture("ops_reference.safetensors");
    let (a, s, b2) = (&f["residual_add.conv2"], &f["residual_add.shortcut"], &f["residual_add.conv2_bias"]);
    let both = residual_add(&CPU, a, s, b2, Some(&f["residual_add.shortcut_bias"]), 0.5).unwrap();
    assert_close("residual_add, both biases, / 2", &both, &f["residual_add.out"], TOL);
    let one = residual_add(&CPU, a, s, b2, None, 1.0).unwrap();
    assert_close("residual_add, identity shortcut", &one, &f["residual_add.out_identity_shortcut"], TOL);
    let bad = |r: celframe::Result<celframe::Tensor>, what: &str| match r {
        Err(Error::Input(m)) => assert!(m.contains("residual_add"), "{what}: {m}"),
        other => panic!("{what}: expected an input error, got {other:?}"),
    };
    bad(residual_add(&CPU, a, &f["elementwise.a"], b2, None, 1.0), "shapes differ");
    bad(residual_add(&CPU, a, s, &f["elementwise.bias"], None, 1.0), "bias width");
    bad(residual_add(&CPU, a, s, b2, Some(&f["elementwise.bias"]), 1.0), "second bias width");
}

#[test]
fn elementwise_family_matches_torch() {
    let f = fixture("ops_reference.safetensors");
    let (a, b) = (&f["elementwise.a"], &f["elementwise.b"]);
    assert_close("add", &add(&CPU, a, b, 1.0).unwrap(), &f["elementwise.add"], TOL);
    assert_close("add scaled", &add(&CPU, a, b, 0.5).unwrap(), &f["elementwise.add_scaled"], TOL);
    assert_close("add bias", &add(&CPU, a, &f["elementwise.bias"], 1.0).unwrap(), &f["elementwise.add_bias"], TOL);
    assert_close(
        "add per image",
        &add(&CPU, a, &f["elementwise.per_image"], 1.0).unwrap(),
        &f["elementwise.add_per_image"],
        TOL,
    );
    assert_close("mul", &mul(&CPU, a, b).unwrap(), &f["elementwise.mul"], TOL);
    assert_close("scale", &scale(&CPU, a, -1.25).unwrap(), &f["elementwise.scale"], TOL);
    assert_close("silu", &silu(&CPU, a).unwrap(), &f["elementwise.silu"], TOL);
    assert_close("gelu", &gelu(&CPU, a).unwrap(), &f["elementwise.gelu"], TOL);
    assert_close("geglu", &geglu(&CPU, &f["geglu.x"], None).unwrap(), &f["geglu.out"], TOL);
}

/// GEGLU's bias (the FP8 projection's, added in the pass) goes to the value half and the gate half
/// as diffusers' projection bias does: the same as adding it to the projection first.
#[test]
fn geglu_bias_matches_the_bias_added_before() {
    let f = fixture("ops_reference.safetensors");
    let x = &f["geglu.x"];
    let two_d = *x.shape().last().unwrap();
    let values: Vec<f32> = (0..two_d).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.15).collect();
    let bias = Tensor::from_f32(&[two_d], x.dtype(), &values).unwrap();
    let want = geglu(&CPU, &add(&CPU, x, &bias, 1.0).unwrap(), None).unwrap();
    assert_close("geglu with bias", &geglu(&CPU, x, Some(&bias)).unwrap(), &want, TOL);
}

/// e4m3 rows with a scale each against the values they encode (`exact`, rounded to a 16-bit
/// dtype or not): each row's scale maps its largest magnitude to 448 and every value decodes
/// within e4m3's rounding (1/16 relative, or half a subnormal step), plus f16's 2^-11.
fn assert_e4m3_rows_within_rounding(what: &str, q: &celframe::ops::fp8::Fp8Matrix, exact: &[f32]) {
    use celframe::ops::fp8::{Fp8Scaling, e4m3_to_f32};
    let [rows, cols] = q.shape();
    assert_eq!((rows * cols, q.scaling()), (exact.len(), Fp8Scaling::Rows), "{what}");
    let (bytes, scales) = q.to_host(&CPU).unwrap();
    for (r, row) in exact.chunks(cols).enumerate() {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((scales[r] * 448.0 - amax).abs() <= amax * 1e-3, "{what} row {r}: scale {} for max {amax}", scales[r]);
        for (j, v) in row.iter().enumerate() {
            let back = e4m3_to_f32(bytes[r * cols + j]) * scales[r];
            let bound = (v.abs() / 16.0).max(scales[r] * 2f32.powi(-10)) + v.abs() * 1e-3;
            assert!((back - v).abs() <= bound, "{what} row {r} column {j}: {v} -> {back}");
        }
    }
}

/// GEGLU writing e4m3 rows (the input of an FP8 ff.net.2 with per-row scales).
#[test]
fn geglu_fp8_rows_are_geglu_within_e4m3_rounding() {
    use celframe::ops::elementwise::geglu_fp8;
    let f = fixture("ops_reference.safetensors");
    let x = &f["geglu.x"];
    let exact = geglu(&CPU, x, None).unwrap().to_f32_vec().unwrap();
    assert_e4m3_rows_within_rounding("geglu_fp8", &geglu_fp8(&CPU, x, None).unwrap(), &exact);
}

/// The LayerNorm writing e4m3 rows (the input of an FP8 linear with per-row scales), in the motion
/// modules' form [frames, tokens, C] with a row added per frame; rows of different magnitudes
/// after the affine, so each row's scale is its own. f32 is refused (FP8 linears take 16-bit
/// models only).
#[test]
fn layer_norm_fp8_rows_are_the_layer_norm_within_e4m3_rounding() {
    use celframe::ops::norm::layer_norm_fp8;
    let (f, l, c) = (2, 3, 32);
    let xv: Vec<f32> = (0..f * l * c).map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * (1 + i / c) as f32).collect();
    let gv: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.05).collect();
    let bv: Vec<f32> = (0..c).map(|i| i as f32 * 0.01 - 0.1).collect();
    let av: Vec<f32> = (0..f * c).map(|i| (i / c) as f32 * 3.0 + (i % c) as f32 * 0.02).collect();
    let t = |shape: &[usize], v: &[f32]| Tensor::from_f32(shape, DType::F16, v).unwrap();
    let (x, g, b, a) = (t(&[f, l, c], &xv), t(&[c], &gv), t(&[c], &bv), t(&[f, c], &av));
    let exact = layer_norm_add(&CPU, &x, Some(&g), Some(&b), 1e-5, Some(&a)).unwrap().to_f32_vec().unwrap();
    let q = layer_norm_fp8(&CPU, &x, None, Some(&g), Some(&b), 1e-5, Some(&a)).unwrap();
    assert_e4m3_rows_within_rounding("layer_norm_fp8", &q, &exact);
    let x32 = Tensor::from_f32(&[2, c], DType::F32, &xv[..2 * c]).unwrap();
    assert!(matches!(layer_norm_fp8(&CPU, &x32, None, None, None, 1e-5, None), Err(Error::Input(_))));
}

#[test]
fn linear_matches_torch() {
    let f = fixture("ops_reference.safetensors");
    let out = linear(&CPU, &f["linear.x"], &f["linear.weight"], Some(&f["linear.bias"])).unwrap();
    assert_close("linear", &out, &f["linear.out"], TOL);
}

#[test]
fn conv2d_matches_torch_3x3_stride_1_and_2_and_1x1() {
    let f = fixture("ops_reference.safetensors");
    let x = &f["conv.x"];
    let w3 = weight_oihw_to_ohwi(&f["conv.w3"]).unwrap();
    let w1 = weight_oihw_to_ohwi(&f["conv.w1"]).unwrap();
    let s1 = conv2d(&CPU, x, &w3, Some(&f["conv.b3"]), Conv2d { stride: 1, padding: 1 }).unwrap();
    let s2 = conv2d(&CPU, x, &w3, Some(&f["conv.b3"]), Conv2d { stride: 2, padding: 1 }).unwrap();
    let one = conv2d(&CPU, x, &w1, Some(&f["conv.b1"]), Conv2d { stride: 1, padding: 0 }).unwrap();
    assert_close("conv 3x3 s1", &s1, &f["conv.out3_s1"], TOL);
    assert_close("conv 3x3 s2", &s2, &f["conv.out3_s2"], TOL);
    assert_close("conv 1x1", &one, &f["conv.out1"], TOL);
}

#[test]
fn upsample_matches_torch() {
    let f = fixture("ops_reference.safetensors");
    assert_close("upsample", &upsample_nearest2x(&CPU, &f["upsample.x"]).unwrap(), &f["upsample.out"], 0.0);
}

#[test]
fn timestep_embedding_matches_diffusers() {
    let f = fixture("ops_reference.safetensors");
    let t = &f["timestep.t"];
    // Angles up to ~1000 rad in fp32 on both sides: the references round t*freq the same way.
    let e320 = timestep_embedding(&CPU, t, TimestepEmbedding::sdxl(320), DType::F32).unwrap();
    let e256 = timestep_embedding(&CPU, t, TimestepEmbedding::sdxl(256), DType::F32).unwrap();
    let odd = TimestepEmbedding { dim: 33, flip_sin_to_cos: false, shift: 1.0, scale: 1.0, max_period: 10000.0 };
    let e33 = timestep_embedding(&CPU, t, odd, DType::F32).unwrap();
    assert_close("timestep 320", &e320, &f["timestep.out320"], TOL);
    assert_close("timestep 256", &e256, &f["timestep.out256"], TOL);
    assert_close("timestep 33 (odd, sin first, shift 1)", &e33, &f["timestep.out_shift1"], TOL);
}

#[test]
fn bad_shapes_are_input_errors_not_panics() {
    let f = fixture("ops_reference.safetensors");
    let x = &f["group_norm.x"];
    let g = &f["group_norm.gamma"];
    let bad = |r: celframe::Result<celframe::Tensor>, what: &str| match r {
        Err(Error::Input(msg)) => assert!(!msg.is_empty(), "{what}"),
        other => panic!("{what}: expected an input error, got {other:?}"),
    };
    bad(
        group_norm(&CPU, x, g, g, GroupNorm { groups: 7, eps: 1e-5, silu: false, frames: 1 }),
        "groups not dividing channels",
    );
    bad(
        group_norm(&CPU, x, g, g, GroupNorm { groups: 32, eps: 1e-5, silu: false, frames: 3 }),
        "batch not a multiple of frames",
    );
    bad(linear(&CPU, x, &f["linear.weight"], None), "linear width mismatch");
    bad(add(&CPU, x, &f["conv.b3"], 1.0), "unbroadcastable add");
    bad(geglu(&CPU, &f["timestep.out_shift1"], None), "geglu odd width");
    bad(geglu(&CPU, &f["geglu.x"], Some(&f["conv.b3"])), "geglu bias of another width");
    bad(conv2d(&CPU, x, &f["conv.w3"], None, Conv2d { stride: 1, padding: 1 }), "conv weight not KRSC");
}

#[test]
fn temporal_attention_matches_torch_sdpa() {
    let f = fixture("ops_reference.safetensors");
    let cfg = TemporalAttention { frames: 5, heads: 8, scale: 1.0 / (8f32).sqrt() };
    let out = temporal_attention(&CPU, &f["temporal.q"], &f["temporal.k"], &f["temporal.v"], cfg).unwrap();
    assert_close("temporal attention", &out, &f["temporal.out"], TOL);
    let bad = TemporalAttention { frames: 3, ..cfg };
    assert!(matches!(
        temporal_attention(&CPU, &f["temporal.q"], &f["temporal.k"], &f["temporal.v"], bad),
        Err(Error::Input(_))
    ));
}

#[test]
fn flash_attention_matches_torch_sdpa_cross_and_causal() {
    let f = fixture("ops_reference.safetensors");
    let cfg = FlashAttention { heads: 2, causal: false, scale: 0.125 };
    let out = flash_attention(&CPU, &f["flash.q"], &f["flash.k"], &f["flash.v"], cfg).unwrap();
    assert_close("cross attention", &out, &f["flash.out"], TOL);
    let x = &f["flash.x"];
    let causal = flash_attention(&CPU, x, x, x, FlashAttention { causal: true, ..cfg }).unwrap();
    assert_close("causal self attention", &causal, &f["flash.causal"], TOL);
    let bad =
        flash_attention(&CPU, &f["flash.q"], &f["flash.k"], &f["flash.v"], FlashAttention { causal: true, ..cfg });
    assert!(matches!(bad, Err(Error::Input(_))), "causal with seq_q != seq_k must be refused");
}

/// Attention on G contexts for B query rows (context g serving rows g * B/G ..) is, to the bit,
/// attention with each context repeated over its rows: 6 rows on 1, 2, 3 and 6 contexts, through
/// the flash route's twin (head dim 64, f16) and the gemm route's (head dim 40, f32).
#[test]
fn grouped_attention_is_attention_on_repeated_contexts() {
    use celframe::ops::rows::gather_rows;
    use common::random_tensor;
    let rows = 6;
    for (heads, d, dtype) in [(2, 64, DType::F16), (3, 40, DType::F32)] {
        let (c, cfg) = (heads * d, FlashAttention { heads, causal: false, scale: 1.0 / (d as f32).sqrt() });
        let q = random_tensor(&[rows, 5, c], dtype, 1, 1.0, 0.0);
        for g in [1, 2, 3, 6] {
            let k = random_tensor(&[g, 7, c], dtype, 10 + g as u64, 1.0, 0.0);
            let v = random_tensor(&[g, 7, c], dtype, 20 + g as u64, 1.0, 0.0);
            let from: Vec<usize> = (0..rows).map(|r| r / (rows / g)).collect();
            let (k_rows, v_rows) = (gather_rows(&CPU, &k, &from).unwrap(), gather_rows(&CPU, &v, &from).unwrap());
            let want = attention(&CPU, &q, &k_rows, &v_rows, cfg).unwrap();
            let got = attention_grouped(&CPU, &q, &k, &v, cfg).unwrap();
            assert_eq!(got.shape(), q.shape());
            assert!(
                got.host_bytes().unwrap() == want.host_bytes().unwrap(),
                "{g} contexts for {rows} rows, head dim {d} {dtype:?}: differs from the repeated contexts"
            );
        }
    }
    // Refused by name: 4 contexts for 6 rows, a width that is not q's, a causal mask over groups.
    let cfg = FlashAttention { heads: 2, causal: false, scale: 0.125 };
    let q = random_tensor(&[rows, 5, 128], DType::F32, 1, 1.0, 0.0);
    let kv4 = random_tensor(&[4, 7, 128], DType::F32, 2, 1.0, 0.0);
    let narrow = random_tensor(&[2, 7, 64], DType::F32, 3, 1.0, 0.0);
    let kv2 = random_tensor(&[2, 5, 128], DType::F32, 4, 1.0, 0.0);
    for (what, r) in [
        ("4 contexts for 6 rows", attention_grouped(&CPU, &q, &kv4, &kv4, cfg)),
        ("a narrower context", attention_grouped(&CPU, &q, &narrow, &narrow, cfg)),
        ("causal over groups", attention_grouped(&CPU, &q, &kv2, &kv2, FlashAttention { causal: true, ..cfg })),
    ] {
        assert!(matches!(&r, Err(Error::Input(m)) if m.contains("attention_grouped")), "{what}: {r:?}");
    }
}

/// Columns `first..first + width` of every row of `t`, copied into a tensor of their own.
fn columns_copy(t: &celframe::Tensor, first: usize, width: usize) -> celframe::Tensor {
    let stride = *t.shape().last().unwrap();
    let values: Vec<f32> =
        t.to_f32_vec().unwrap().chunks(stride).flat_map(|row| row[first..first + width].to_vec()).collect();
    let mut shape = t.shape().to_vec();
    *shape.last_mut().unwrap() = width;
    celframe::Tensor::from_f32(&shape, t.dtype(), &values).unwrap()
}

/// q, k and v read as column blocks of one fused projection's output ([.., 3C], or [.., 2C] for k
/// and v of a cross attention) give the bytes the contiguous tensors give: flash route (head dim
/// 64, f16, grouped contexts), gemm route (head dim 40, f32), temporal attention (bf16).
#[test]
fn attention_on_column_blocks_is_attention_on_their_copies() {
    use celframe::ops::attention::Columns;
    use common::random_tensor;
    let same = |what: &str, got: celframe::Tensor, want: celframe::Tensor| {
        assert_eq!(got.shape(), want.shape(), "{what}");
        assert!(got.host_bytes().unwrap() == want.host_bytes().unwrap(), "{what}: differs from contiguous inputs");
    };
    for (heads, d, dtype) in [(2, 64, DType::F16), (3, 40, DType::F32)] {
        let (c, cfg) = (heads * d, FlashAttention { heads, causal: false, scale: 1.0 / (d as f32).sqrt() });
        // self-attention: q, k, v at columns 0, C, 2C of [B, L, 3C]
        let qkv = random_tensor(&[2, 9, 3 * c], dtype, 1, 1.0, 0.0);
        let [q, k, v] = Columns::split(&qkv).unwrap();
        assert_eq!(q.shape(), [2, 9, c]);
        let (qc, kc, vc) = (columns_copy(&qkv, 0, c), columns_copy(&qkv, c, c), columns_copy(&qkv, 2 * c, c));
        assert_eq!(k.to_f32_vec().unwrap(), kc.to_f32_vec().unwrap());
        let want = attention(&CPU, &qc, &kc, &vc, cfg).unwrap();
        same(&format!("self {dtype:?}"), attention(&CPU, q.clone(), k.clone(), v.clone(), cfg).unwrap(), want);
        let causal = FlashAttention { causal: true, ..cfg };
        let want = flash_attention(&CPU, &qc, &kc, &vc, causal).unwrap();
        same(&format!("causal {dtype:?}"), flash_attention(&CPU, q, k, v, causal).unwrap(), want);
        // cross attention on 2 contexts for 6 rows: k, v at columns 0, C of [G, T, 2C]
        let x = random_tensor(&[6, 5, c], dtype, 2, 1.0, 0.0);
        let kv = random_tensor(&[2, 7, 2 * c], dtype, 3, 1.0, 0.0);
        let [k, v] = Columns::split(&kv).unwrap();
        let want = attention_grouped(&CPU, &x, &columns_copy(&kv, 0, c), &columns_copy(&kv, c, c), cfg).unwrap();
        same(&format!("grouped cross {dtype:?}"), attention_grouped(&CPU, &x, k, v, cfg).unwrap(), want);
    }
    // temporal: [videos * frames, H, W, 3C], 4 heads of 8, 2 videos of 3 frames
    let cfg = TemporalAttention { frames: 3, heads: 4, scale: 1.0 / (8f32).sqrt() };
    let qkv = random_tensor(&[6, 2, 3, 96], DType::BF16, 4, 1.0, 0.0);
    let [q, k, v] = Columns::split(&qkv).unwrap();
    let want = temporal_attention(
        &CPU,
        &columns_copy(&qkv, 0, 32),
        &columns_copy(&qkv, 32, 32),
        &columns_copy(&qkv, 64, 32),
        cfg,
    )
    .unwrap();
    same("temporal", temporal_attention(&CPU, q, k, v, cfg).unwrap(), want);
    // Column ranges outside the rows, and widths that do not split, are refused.
    assert!(matches!(Columns::new(&qkv, 64, 33), Err(Error::Input(_))));
    assert!(matches!(Columns::new(&qkv, usize::MAX, 2), Err(Error::Input(_))));
    assert!(matches!(Columns::split::<5>(&qkv), Err(Error::Input(_))));
    let odd = Columns::new(&qkv, 1, 32).unwrap();
    let shifted = temporal_attention(&CPU, odd.clone(), odd.clone(), odd, cfg).unwrap();
    let copy = columns_copy(&qkv, 1, 32);
    same("temporal at column 1", shifted, temporal_attention(&CPU, &copy, &copy, &copy, cfg).unwrap());
}

#[test]
fn concat_last_puts_a_then_b_in_every_row() {
    use celframe::Tensor;
    use celframe::ops::concat::concat_last;
    let a = Tensor::from_f32(&[2, 1, 2], DType::F16, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let b = Tensor::from_f32(&[2, 1, 3], DType::F16, &[5.0, 6.0, 7.0, 8.0, 9.0, 10.0]).unwrap();
    let out = concat_last(&CPU, &a, &b).unwrap();
    assert_eq!(out.shape(), [2, 1, 5]);
    assert_eq!(out.to_f32_vec().unwrap(), [1.0, 2.0, 5.0, 6.0, 7.0, 3.0, 4.0, 8.0, 9.0, 10.0]);
    let wrong = Tensor::from_f32(&[1, 2, 3], DType::F16, &[0.0; 6]).unwrap();
    assert!(matches!(concat_last(&CPU, &a, &wrong), Err(Error::Input(_))), "leading dimensions differ");
    let f32 = Tensor::from_f32(&[2, 1, 3], DType::F32, &[0.0; 6]).unwrap();
    assert!(matches!(concat_last(&CPU, &a, &f32), Err(Error::Input(_))), "dtypes differ");
}

#[test]
fn scale_rows_scales_each_leading_slice_and_refuses_a_wrong_count() {
    use celframe::Tensor;
    use celframe::ops::elementwise::scale_rows;
    let values: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
    let t = Tensor::from_f32(&[2, 2, 3], DType::F32, &values).unwrap();
    let got = scale_rows(&CPU, &t, &[2.0, -0.5]).unwrap().to_f32_vec().unwrap();
    let want: Vec<f32> = values.iter().enumerate().map(|(i, v)| v * if i < 6 { 2.0 } else { -0.5 }).collect();
    assert_eq!(got, want);
    let err = scale_rows(&CPU, &t, &[1.0, 2.0, 3.0]).unwrap_err().to_string();
    assert!(err.contains("scale_rows") && err.contains("3 factors"), "{err}");
}

/// The test inputs' generator as one sequential stream: what `common::randn` computes in blocks on
/// all cores.
fn randn_sequential(n: usize, seed: u64, scale: f32, shift: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut uniform = move || {
        s = common::xorshift(s);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * scale + shift
        })
        .collect()
}

#[test]
fn random_inputs_drawn_on_all_cores_are_one_sequential_stream() {
    // Block edges (65,536 values a block) and a partial last block; bit for bit.
    for (n, seed) in [(0, 1), (1, 2), (7, 3), (65_535, 4), (65_536, 5), (65_537, 6), (3 * 65_536 + 11, 7)] {
        let got = common::randn(n, seed, 1.5, 0.25);
        let want = randn_sequential(n, seed, 1.5, 0.25);
        assert_eq!(got.len(), n);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "n {n} seed {seed}");
    }
    // The block errors summed in order: the whole-slice sums up to rounding.
    let (a, e) = (common::randn(200_000, 8, 1.0, 0.0), common::randn(200_000, 9, 1.0, 0.0));
    let (rel, max) = common::errors(&a, &e);
    let (mut diff, mut norm, mut want_max) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&e) {
        let d = (*x as f64 - *y as f64).abs();
        (diff, norm, want_max) = (diff + d * d, norm + (*y as f64).powi(2), want_max.max(d));
    }
    assert!((rel - (diff / norm).sqrt()).abs() < 1e-12 && max == want_max, "{rel} {max}");
}

/// Our e4m3 rounding against ml_dtypes' (tools/make_fp8_fixtures.py): every e4m3 value, every tie
/// between neighbours and values just off them, subnormals, random magnitudes; byte for byte.
#[test]
fn e4m3_rounding_matches_ml_dtypes() {
    use celframe::ops::fp8::{e4m3_from_f32, e4m3_to_f32};
    let f = fixture("fp8_e4m3.safetensors");
    let values = f["values"].to_f32_vec().unwrap();
    let expected = f["e4m3"].to_f32_vec().unwrap();
    assert!(values.len() > 5000);
    let wrong: Vec<(f32, u8, u8)> = values
        .iter()
        .zip(&expected)
        .map(|(&v, &e)| (v, e4m3_from_f32(v), e as u8))
        .filter(|(_, ours, theirs)| ours != theirs)
        .collect();
    assert!(wrong.is_empty(), "{} of {} differ, first {:?}", wrong.len(), values.len(), &wrong[..wrong.len().min(5)]);
    for (&v, &e) in values.iter().zip(&expected) {
        let back = e4m3_to_f32(e as u8);
        assert!((back - v).abs() <= v.abs() / 16.0 + 2f32.powi(-10), "{v} -> {back}");
    }
}

/// The upsampler that writes its block's concatenation takes a skip of its output's size and dtype only.
#[test]
fn upsample_conv_concat_names_a_skip_of_the_wrong_size() {
    use celframe::ops::upsample::upsample2x_conv3x3_concat;
    let t = |shape: &[usize]| Tensor::from_f32(shape, DType::F32, &vec![0.5; shape.iter().product()]).unwrap();
    let (x, w) = (t(&[1, 2, 3, 4]), t(&[8, 3, 3, 4]));
    let good = upsample2x_conv3x3_concat(&CPU, &x, &w, None, &t(&[1, 4, 6, 5])).unwrap();
    assert_eq!(good.shape(), [1, 4, 6, 13]);
    for skip in [t(&[1, 2, 3, 5]), t(&[4, 6, 5])] {
        match upsample2x_conv3x3_concat(&CPU, &x, &w, None, &skip) {
            Err(Error::Input(m)) => assert!(m.contains("skip") && m.contains("[1, 4, 6, C]"), "{m}"),
            other => panic!("skip {skip:?}: {other:?}"),
        }
    }
    let half = Tensor::from_f32(&[1, 4, 6, 8], DType::F16, &[0.5; 192]).unwrap();
    match upsample2x_conv3x3_concat(&CPU, &x, &w, None, &half) {
        Err(Error::Input(m)) => assert!(m.contains("skip") && m.contains("dtype"), "{m}"),
        other => panic!("an f16 skip beside f32: {other:?}"),
    }
}
