//! GEMM tuning files (`celframe::gpu::tuning`) on the CPU: written and read back they give the same
//! choices and the same text; a file made on another device, cuBLASLt or build is refused with exit
//! code 2 naming the field; malformed files are refused naming what is wrong; descriptions without an
//! entry are reported as running heuristic #1; a built-in file applies to its own identity only,
//! and every file built into this binary or recorded to be is valid for its own. The GPU side
//! (timing, outputs, processes) is tests/gemm_tuning_gpu.rs.

mod common;

use std::path::Path;
use std::process::Command;

use celframe::DType;
use celframe::gpu::blas::Gemm;
use celframe::gpu::tuning::{AlgoConfig, BUILT_IN, BuiltIn, CANDIDATES, Entry, Identity, Tuning};
use common::TempDir;
use serde_json::{Value, json};

fn identity() -> Identity {
    Identity {
        device: "NVIDIA H200".into(),
        compute_capability: "9.0".into(),
        multiprocessors: 132,
        cublaslt_version: 130_100,
        workspace_bytes: 32 << 20,
        candidates: CANDIDATES,
    }
}

fn algo(id: u64) -> AlgoConfig {
    AlgoConfig {
        id,
        tile: 20,
        stages: 8,
        splitk: 1,
        reduction: 0,
        swizzle: 1,
        custom: 0,
        inner_shape: 0,
        cluster_shape: 2,
    }
}

/// Three SDXL descriptions: an attention output projection at level 1 of 32 images 1024x576, the
/// GEGLU projection at level 2, and a batched attention-score product with an f32 output.
fn gemms() -> [Gemm; 3] {
    let scores = Gemm {
        m: 576,
        n: 77,
        k: 64,
        batch: 32,
        b_transposed: true,
        lda: 1280,
        ldb: 1280,
        ldc: 77,
        stride_a: 576 * 1280,
        stride_b: 77 * 1280,
        stride_c: 576 * 77,
        dtype: DType::F16,
        out_dtype: DType::F32,
        bias: false,
        fp8: false,
        fp8_rows: false,
    };
    [Gemm::linear(73728, 640, 640, DType::F16, true), Gemm::linear(18432, 10240, 1280, DType::F16, true), scores]
}

fn entries() -> Vec<Entry> {
    let [proj, geglu, scores] = gemms();
    vec![
        Entry { gemm: proj, index: 3, algo: algo(66), heuristic_ms: 0.3125, tuned_ms: 0.2871, timed: 8 },
        Entry { gemm: geglu, index: 0, algo: algo(71), heuristic_ms: 0.75, tuned_ms: 0.75, timed: 7 },
        Entry { gemm: scores, index: 5, algo: algo(21), heuristic_ms: 0.0412, tuned_ms: 0.0398, timed: 8 },
    ]
}

fn sample() -> Tuning {
    let mut t = Tuning::new(identity());
    for e in entries() {
        t.insert(e);
    }
    t
}

/// The error of parsing `text` against `identity()`, which must be bad input (exit code 2).
fn refused(text: &str) -> String {
    let err = Tuning::parse(text, &identity()).expect_err("the file must be refused");
    assert_eq!(err.exit_code(), 2, "{err}");
    err.to_string()
}

#[test]
fn round_trip_keeps_every_choice_and_the_text() {
    let t = sample();
    let text = t.to_json().unwrap();
    let back = Tuning::parse(&text, &identity()).unwrap();
    assert_eq!(back.len(), 3);
    assert_eq!(back.identity(), &identity());
    for e in entries() {
        assert_eq!(back.get(&e.gemm), Some(&e), "{}", e.gemm);
    }
    assert_eq!(back.to_json().unwrap(), text, "a read file writes back the same text");

    // The order of the file does not depend on the order choices were made in.
    let mut reversed = Tuning::new(identity());
    for e in entries().into_iter().rev() {
        reversed.insert(e);
    }
    assert_eq!(reversed.to_json().unwrap(), text);

    // Through a file on disk.
    let dir = TempDir::new("gemm-tuning");
    let path = dir.0.join("h200.json");
    t.save(&path).unwrap();
    let loaded = Tuning::load(&path, &identity(), "test").unwrap();
    assert_eq!(loaded.to_json().unwrap(), text);
    assert!((entries()[0].speedup() - 0.3125 / 0.2871).abs() < 1e-12);
}

/// One field of an identity changed.
type Change = fn(&mut Identity);

#[test]
fn other_device_cublaslt_or_build_is_refused_naming_the_field() {
    let changes: [(&str, Change); 6] = [
        ("device", |i| i.device = "NVIDIA A100-SXM4-80GB".into()),
        ("compute_capability", |i| i.compute_capability = "8.0".into()),
        ("multiprocessors", |i| i.multiprocessors = 114),
        ("cublaslt_version", |i| i.cublaslt_version = 130_000),
        ("workspace_bytes", |i| i.workspace_bytes = 4 << 20),
        ("candidates", |i| i.candidates = 4),
    ];
    for (field, change) in changes {
        let mut other = identity();
        change(&mut other);
        let mut t = Tuning::new(other);
        t.insert(entries()[0].clone());
        let message = refused(&t.to_json().unwrap());
        assert!(message.contains(&format!("field identity.{field} is")), "{field}: {message}");
        assert!(message.contains("tune again"), "{field}: {message}");
    }
    // Through a file: the message names it and who named it.
    let dir = TempDir::new("gemm-tuning");
    let path = dir.0.join("a100.json");
    let mut other = identity();
    other.device = "NVIDIA A100-SXM4-80GB".into();
    Tuning::new(other).save(&path).unwrap();
    let err = Tuning::load(&path, &identity(), "CELFRAME_GEMM_TUNING").unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()) && message.contains("CELFRAME_GEMM_TUNING"), "{message}");
    assert!(message.contains("identity.device") && message.contains("A100"), "{message}");
}

#[test]
fn malformed_files_are_refused_naming_what_is_wrong() {
    let good: Value = serde_json::from_str(&sample().to_json().unwrap()).unwrap();
    assert!(Tuning::parse(&good.to_string(), &identity()).is_ok());
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v.to_string()
    };
    let check = |text: String, wanted: &[&str]| {
        let message = refused(&text);
        for w in wanted {
            assert!(message.contains(w), "expected {w:?} in: {message}\nfile: {text}");
        }
    };
    check("{\"format\": ".into(), &["not valid JSON"]);
    check("[1, 2]".into(), &["field format"]);
    check(edit(&|v| v["format"] = json!("celframe-cudnn-cache")), &["field format", "celframe-cudnn-cache"]);
    check(edit(&|v| v["version"] = json!(2)), &["field version", "2"]);
    check(edit(&|v| drop(v.as_object_mut().unwrap().remove("version"))), &["field version"]);
    check(edit(&|v| drop(v.as_object_mut().unwrap().remove("identity"))), &["identity"]);
    check(edit(&|v| v["extra"] = json!(1)), &["unknown field", "extra"]);
    check(edit(&|v| v["identity"]["multiprocessors"] = json!("132")), &["invalid type"]);
    check(edit(&|v| v["gemms"] = json!({})), &["invalid type"]);
    check(edit(&|v| v["gemms"][0]["index"] = json!(8)), &["gemms[0]", "index is 8"]);
    check(edit(&|v| v["gemms"][1]["timed"] = json!(0)), &["gemms[1]", "timed is 0"]);
    check(edit(&|v| v["gemms"][1]["timed"] = json!(9)), &["gemms[1]", "timed is 9"]);
    check(edit(&|v| v["gemms"][0]["tuned_ms"] = json!(-1.0)), &["gemms[0]", "tuned_ms"]);
    check(edit(&|v| v["gemms"][0]["heuristic_ms"] = json!(0.0)), &["gemms[0]", "heuristic_ms"]);
    check(edit(&|v| v["gemms"][0]["tuned_ms"] = json!(5.0)), &["gemms[0]", "more than heuristic_ms"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["dtype"] = json!("f8")), &["unknown dtype", "f8"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["m"] = json!(0)), &["gemms[0]", "gemm.m is 0"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["lda"] = json!(10)), &["gemms[0]", "gemm.lda is 10"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["ldb"] = json!(1)), &["gemms[0]", "gemm.ldb is 1"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["batch"] = json!(1u64 << 40)), &["gemms[0]", "gemm.batch"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["stride_c"] = json!(u64::MAX)), &["gemms[0]", "gemm.stride_c"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["k"] = json!(-4)), &["invalid value"]);
    check(edit(&|v| v["gemms"][0]["gemm"]["swizzle"] = json!(1)), &["unknown field", "swizzle"]);
    check(edit(&|v| drop(v["gemms"][0]["algo"].as_object_mut().unwrap().remove("tile"))), &["tile"]);
    check(edit(&|v| v["gemms"][0]["algo"]["id"] = json!(1.5)), &["invalid type"]);
    let duplicate = edit(&|v| {
        let first = v["gemms"][0].clone();
        v["gemms"].as_array_mut().unwrap().push(first);
    });
    check(duplicate, &["gemms[3]", "a second entry"]);
    // Not a regular file, or not text: named, exit code 2.
    let dir = TempDir::new("gemm-tuning");
    let err = Tuning::load(&dir.0, &identity(), "test").unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let binary = dir.0.join("binary.json");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let err = Tuning::load(&binary, &identity(), "test").unwrap_err();
    assert!(err.exit_code() == 2 && err.to_string().contains("binary.json"), "{err}");
}

#[test]
fn missing_entries_run_heuristic_one_and_are_counted() {
    let t = sample();
    let [proj, geglu, scores] = gemms();
    let absent = Gemm::linear(18432, 1280, 5120, DType::F16, true);
    assert!(t.get(&absent).is_none());
    // One field apart is another description.
    assert!(t.get(&Gemm { bias: false, ..proj }).is_none());
    assert!(t.get(&Gemm { out_dtype: DType::F16, ..scores }).is_none());
    let e = t.estimate(&[(proj, 10), (geglu, 2), (absent, 5), (scores, 0)]);
    assert_eq!((e.tuned_descriptions, e.changed, e.missing_descriptions, e.missing_calls), (2, 1, 1, 5));
    assert!((e.heuristic_ms - (10.0 * 0.3125 + 2.0 * 0.75)).abs() < 1e-9, "{e:?}");
    assert!((e.tuned_ms - (10.0 * 0.2871 + 2.0 * 0.75)).abs() < 1e-9, "{e:?}");
}

#[test]
fn bench_tune_gemms_is_refused_where_it_cannot_apply() {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe"))
        .args(["bench", "encode", "--tune-gemms", "/nonexistent/tuning.json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tune-gemms"), "{stderr}");
}

#[test]
fn a_built_in_file_applies_to_its_own_identity_only() {
    let text = sample().to_json().unwrap();
    let files = [("h200.json", text.as_str())];
    match Tuning::built_in_from(&files, &identity()).unwrap() {
        BuiltIn::Applies(name, t) => {
            assert_eq!(name, "h200.json");
            assert_eq!(t.to_json().unwrap(), text);
        }
        other => panic!("the file's own identity: {other:?}"),
    }
    // The same device under another cuBLASLt: not applied, the reason names the field.
    let newer = Identity { cublaslt_version: 130_200, ..identity() };
    match Tuning::built_in_from(&files, &newer).unwrap() {
        BuiltIn::OtherSetup(why) => {
            assert!(why.contains("h200.json") && why.contains("identity.cublaslt_version"), "{why}")
        }
        other => panic!("another cuBLASLt: {other:?}"),
    }
    let other_device = Identity { device: "NVIDIA H100 80GB HBM3".into(), ..identity() };
    assert!(matches!(Tuning::built_in_from(&files, &other_device).unwrap(), BuiltIn::NoneForDevice));
    assert!(matches!(Tuning::built_in_from(&[], &identity()).unwrap(), BuiltIn::NoneForDevice));
    // A broken file is an error whatever the device (it was built in broken), naming the file.
    let broken = text.replace("\"index\": 3", "\"index\": 9");
    let err = Tuning::built_in_from(&[("broken.json", broken.as_str())], &other_device).unwrap_err();
    assert!(err.to_string().contains("broken.json") && err.to_string().contains("index"), "{err}");
}

/// The files built in (src/gpu/tuned/) and those recorded to be built in once checked
/// (benches/gemm_tuning/): each a valid tuning file that applies to its own identity, one per
/// identity among the built-in ones.
#[test]
fn built_in_and_recorded_tuning_files_apply_to_their_own_identity() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gemm_tuning");
    let mut recorded = Vec::new();
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            recorded.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    assert!(!recorded.is_empty(), "no tuning file recorded in {}", folder.display());
    let built_in = BUILT_IN.iter().map(|(name, text)| (name.to_string(), text.to_string()));
    for (name, text) in built_in.chain(recorded) {
        match Tuning::built_in_from(&[(&name, &text)], &own_identity(&text)).unwrap() {
            BuiltIn::Applies(_, t) => assert!(!t.is_empty(), "{name}: no entries"),
            other => panic!("{name}: {other:?}"),
        }
    }
    for (name, text) in BUILT_IN {
        match Tuning::built_in(&own_identity(text)).unwrap() {
            BuiltIn::Applies(found, _) => assert_eq!(&found, name, "two built-in files share an identity"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// The identity a tuning file's text records.
fn own_identity(text: &str) -> Identity {
    let value: Value = serde_json::from_str(text).unwrap();
    serde_json::from_value(value["identity"].clone()).unwrap()
}
