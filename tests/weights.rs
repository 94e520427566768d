//! Loading safetensors checkpoints on the host: round trips, strict checks, shards and indexes,
//! and corrupt files (each must give an `Error::Input` naming the file, never a panic).
//! CPU only: no GPU, no network.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use celframe::tensor::{HostBytes, Storage};
use celframe::weights::{self, LoadReport, LoadedWeights, TensorSpec, UploadReport};
use celframe::{DType, Error, Tensor};
use common::TempDir;

/// The message of an `Error::Input`, failing on success or any other error.
fn input_error(result: celframe::Result<LoadedWeights>) -> String {
    match result {
        Err(Error::Input(m)) => m,
        Err(other) => panic!("expected Error::Input, got {other:?}"),
        Ok(w) => panic!("expected an error, loaded {} tensors", w.len()),
    }
}

fn assert_mentions(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(message.contains(needle), "error does not mention {needle:?}:\n{message}");
    }
}

/// A file in the safetensors layout from a header given as JSON text and raw data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn f32_tensor(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 1.0).collect();
    Tensor::from_f32(shape, DType::F32, &values).unwrap()
}

/// Saves `tensors` (all F32, shapes as given) to `path`.
fn save_f32(path: &Path, tensors: &[(&str, &[usize])]) -> PathBuf {
    let owned: Vec<(String, Tensor)> =
        tensors.iter().map(|(name, shape)| (name.to_string(), f32_tensor(shape))).collect();
    let refs: Vec<(String, &Tensor)> = owned.iter().map(|(n, t)| (n.clone(), t)).collect();
    weights::save(path, &refs, None).unwrap();
    path.to_path_buf()
}

#[test]
fn round_trip_keeps_names_dtypes_and_values() {
    let dir = TempDir::new("round-trip");
    // Values that each dtype has to round: the loaded values must be exactly the rounded ones.
    let values = [0.1, -5.4321, 65504.0, 1e-3, -0.0, 2.5e-8, 7.0, 1234.567];
    let names = [
        ("model.diffusion_model.input_blocks.0.0.weight", DType::F16),
        ("conv_in.bias", DType::BF16),
        ("time_embedding.linear_1.weight", DType::F32),
    ];
    let tensors: Vec<(String, Tensor)> = names
        .iter()
        .map(|(name, dtype)| {
            let t = Tensor::from_f32(&[2, 4], *dtype, &values).unwrap();
            (name.to_string(), t)
        })
        .collect();
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.path("model.safetensors");
    weights::save(&path, &refs, Some(metadata)).unwrap();
    assert_eq!(dir.entries(), ["model.safetensors"], "no temporary left");

    let loaded = weights::load(&[&path]).unwrap();
    assert_eq!(loaded.len(), 3);
    for (name, dtype) in names {
        let t = loaded.get(name).unwrap();
        assert_eq!(t.dtype(), dtype, "{name}");
        assert_eq!(t.shape(), [2, 4], "{name}");
        let expected = Tensor::from_f32(&[2, 4], dtype, &values).unwrap();
        let (got, want) = (t.to_f32_vec().unwrap(), expected.to_f32_vec().unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{name}");
    }
    // F16 really rounded (0.1 is not representable), so the comparison above is not vacuous.
    let f16 = loaded.get(names[0].0).unwrap().to_f32_vec().unwrap();
    assert_ne!(f16[0], 0.1);
    assert_eq!(f16[0], DType::F16.round(0.1));

    let report = loaded.report();
    assert_eq!((report.tensors, report.files, report.bytes), (3, 1, 8 * 2 + 8 * 2 + 8 * 4));
    assert_eq!(loaded.files(), [path]);
}

#[test]
fn loading_maps_the_file_without_copying() {
    let dir = TempDir::new("no-copy");
    let path = save_f32(&dir.path("a.safetensors"), &[("a", &[3]), ("b", &[2, 2])]);
    let loaded = weights::load(&[&path]).unwrap();
    let file = std::fs::read(&path).unwrap();
    let mut maps = Vec::new();
    for name in ["a", "b"] {
        let t = loaded.get(name).unwrap();
        let Storage::Host(HostBytes::Mapped { map, start, len }) = t.storage() else {
            panic!("{name} is not a view of the mapped file");
        };
        assert_eq!(*len, t.size_bytes());
        assert_eq!(&file[*start..*start + *len], t.host_bytes().unwrap());
        // The tensor's bytes are the map's own memory, not a copy.
        assert_eq!(t.host_bytes().unwrap().as_ptr(), map[*start..].as_ptr());
        maps.push(map.clone());
    }
    assert!(Arc::ptr_eq(&maps[0], &maps[1]), "one map per file");
}

#[test]
fn strict_loading_accepts_a_matching_checkpoint_and_skips_ignored_prefixes() {
    let dir = TempDir::new("strict-ok");
    let path = dir.path("unet.safetensors");
    let weight = f32_tensor(&[4, 3]);
    let bias = f32_tensor(&[4]);
    let ema = f32_tensor(&[4, 3]);
    weights::save(
        &path,
        &[("proj.weight".into(), &weight), ("proj.bias".into(), &bias), ("model_ema.proj.weight".into(), &ema)],
        None,
    )
    .unwrap();
    let expected = [TensorSpec::new("proj.weight", &[4, 3]), TensorSpec::new("proj.bias", &[4])];
    let loaded = weights::load_strict(&[&path], &expected, &["model_ema."]).unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded.get("proj.weight").unwrap().shape(), [4, 3]);
    // Ignored tensors are not loaded; asking for one names it.
    let Err(Error::Input(m)) = loaded.get("model_ema.proj.weight") else {
        panic!("an ignored tensor was loaded");
    };
    assert_mentions(&m, &["model_ema.proj.weight"]);
}

#[test]
fn strict_loading_lists_every_problem_in_one_error() {
    let dir = TempDir::new("strict-bad");
    let path = save_f32(
        &dir.path("unet.safetensors"),
        &[
            ("conv.weight", &[320, 4, 1, 1]),
            ("norm.weight", &[320]),
            ("stray.a", &[2]),
            ("stray.b", &[3]),
            ("ignored.x", &[1]),
        ],
    );
    let expected = [
        TensorSpec::new("conv.weight", &[320, 4, 3, 3]),
        TensorSpec::new("norm.weight", &[320]),
        TensorSpec::new("gone.one", &[8]),
        TensorSpec::new("gone.two", &[8, 8]),
    ];
    let m = input_error(weights::load_strict(&[&path], &expected, &["ignored."]));
    assert_mentions(
        &m,
        &[
            &path.display().to_string(),
            "missing: 2",
            "unexpected: 2",
            "wrong shape: 1",
            "missing: gone.one, expected shape [8]",
            "missing: gone.two, expected shape [8, 8]",
            "unexpected: stray.a",
            "unexpected: stray.b",
            "wrong shape: conv.weight: expected [320, 4, 3, 3], found [320, 4, 1, 1]",
        ],
    );
    assert!(!m.contains("norm.weight"), "a correct tensor is listed:\n{m}");
    assert!(!m.contains("ignored.x"), "an ignored tensor is listed:\n{m}");
    // One line per problem after the summary.
    assert_eq!(m.lines().count(), 1 + 5, "{m}");
}

/// A valid two-tensor file, for cutting and corrupting.
fn valid_file(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    let path = save_f32(&dir.path("good.safetensors"), &[("a", &[4]), ("b", &[2, 3])]);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

#[test]
fn truncated_files_are_reported_not_panicked_on() {
    let dir = TempDir::new("truncated");
    let (_, bytes) = valid_file(&dir);
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header_len;
    let cuts = [
        (0, "too short"),
        (3, "too short"),
        (7, "too short"),
        (8, "header length"),
        (8 + header_len / 2, "header length"),
        (data_start - 1, "header length"),
        (data_start, "ends past"),
        (data_start + 5, "ends past"),
        (bytes.len() - 1, "ends past"),
    ];
    for (cut, why) in cuts {
        let path = write(&dir.path(&format!("cut-{cut}.safetensors")), &bytes[..cut]);
        let m = input_error(weights::load(&[&path]));
        assert_mentions(&m, &[&path.display().to_string(), why]);
    }
    // Cut inside the data, the error names the tensor whose bytes are gone: the last one, "b"
    // (sorted by name, a comes first at the same dtype).
    let path = write(&dir.path("cut-data.safetensors"), &bytes[..bytes.len() - 4]);
    assert_mentions(&input_error(weights::load(&[path])), &["tensor 'b'"]);
}

#[test]
fn a_header_length_beyond_the_file_is_reported() {
    let dir = TempDir::new("header-length");
    let (_, bytes) = valid_file(&dir);
    for claimed in [bytes.len() as u64, u64::MAX, 1 << 40] {
        let mut corrupt = bytes.clone();
        corrupt[..8].copy_from_slice(&claimed.to_le_bytes());
        let path = write(&dir.path(&format!("len-{claimed}.safetensors")), &corrupt);
        let m = input_error(weights::load(&[&path]));
        assert_mentions(&m, &[&path.display().to_string(), &claimed.to_string()]);
    }
}

#[test]
fn invalid_header_json_is_reported() {
    let dir = TempDir::new("json");
    let cases: [(&str, &[u8]); 4] = [
        ("not-json", b"{\"a\": {\"dtype\": \"F32\",,}"),
        ("not-utf8", b"{\"a\xff\xfe\": 1}"),
        ("array", b"[1, 2, 3]"),
        ("empty", b""),
    ];
    for (name, header) in cases {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        let path = write(&dir.path(&format!("{name}.safetensors")), &bytes);
        let m = input_error(weights::load(&[&path]));
        assert_mentions(&m, &[&path.display().to_string(), "JSON object"]);
    }
    // Valid JSON, but an entry that is not a tensor description names the tensor.
    let path = write(&dir.path("entry.safetensors"), &raw_file(r#"{"w":{"dtype":"F32","shape":[1]}}"#, &[0; 4]));
    let m = input_error(weights::load(&[&path]));
    assert_mentions(&m, &[&path.display().to_string(), "tensor 'w'", "data_offsets"]);
}

#[test]
fn offsets_outside_the_data_or_inconsistent_are_reported() {
    let dir = TempDir::new("offsets");
    let cases = [
        // Past the end of the data.
        (r#"{"w":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#, 16, "tensor 'w'", "ends past the 16 bytes"),
        // Byte count that does not match dtype x shape.
        (
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
            "tensor 'w'",
            "holds 8 bytes but its dtype and shape need 12",
        ),
        // A hole before the first tensor.
        (r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8, "tensor 'w'", "overlap or leave a hole"),
        // Two tensors sharing bytes.
        (
            r#"{"u":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "tensor 'v'",
            "overlap or leave a hole",
        ),
        // End before start.
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#,
            4,
            "tensor 'x'",
            "ends before it starts",
        ),
        // Bytes after the last tensor.
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            12,
            "weights file",
            "cover 4 bytes of data but the file holds 12",
        ),
        // A shape whose byte count overflows.
        (
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904, 8],"data_offsets":[0,4]}}"#,
            4,
            "tensor 'w'",
            "overflows",
        ),
    ];
    for (i, (header, data_len, who, why)) in cases.into_iter().enumerate() {
        let path = write(&dir.path(&format!("case-{i}.safetensors")), &raw_file(header, &vec![0; data_len]));
        let m = input_error(weights::load(&[&path]));
        assert_mentions(&m, &[&path.display().to_string(), who, why]);
    }
}

/// The safetensors crate's own reader adds these offsets to the header length unchecked and
/// panics (debug builds) on this header; the loader must refuse it with an error.
#[test]
fn offsets_summing_near_the_address_space_are_refused_without_panic() {
    let dir = TempDir::new("huge");
    let size: u64 = (1 << 61) - 1; // bytes of an F4 tensor of 2 * size elements
    let entries: Vec<String> = (0..8)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"F4","shape":[{}],"data_offsets":[{},{}]}}"#,
                size * 2,
                size * i,
                size * (i + 1)
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let path = write(&dir.path("huge.safetensors"), &raw_file(&header, &[0; 64]));
    let m = input_error(weights::load(&[&path]));
    assert_mentions(&m, &[&path.display().to_string(), "tensor 't0'", "ends past"]);
}

#[test]
fn non_float_dtypes_are_named_with_their_tensor() {
    let dir = TempDir::new("dtypes");
    let header = r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},
        "scale":{"dtype":"F64","shape":[1],"data_offsets":[16,24]},
        "mask":{"dtype":"U8","shape":[8],"data_offsets":[24,32]},
        "ok":{"dtype":"F16","shape":[4],"data_offsets":[32,40]}}"#;
    let path = write(&dir.path("ints.safetensors"), &raw_file(header, &[0; 40]));
    let m = input_error(weights::load(&[&path]));
    assert_mentions(
        &m,
        &[&path.display().to_string(), "unsupported dtype: 3", "ids is I64", "scale is F64", "mask is U8"],
    );
    assert!(!m.contains("ok is"), "{m}");

    // Strict: a non-float tensor the model expects is named; one under an ignored prefix is not.
    let expected = [TensorSpec::new("scale", &[1]), TensorSpec::new("ok", &[4])];
    let m = input_error(weights::load_strict(&[&path], &expected, &["ids", "mask"]));
    assert_mentions(&m, &["unsupported dtype: 1", "scale is F64"]);
    assert!(!m.contains("ids") && !m.contains("mask"), "{m}");

    // A dtype the format does not know names the tensor too.
    let path = write(
        &dir.path("unknown.safetensors"),
        &raw_file(r#"{"q":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#, &[0]),
    );
    let m = input_error(weights::load(&[&path]));
    assert_mentions(&m, &[&path.display().to_string(), "tensor 'q'", "Q4"]);
}

#[test]
fn shards_load_together_and_a_name_in_two_shards_is_an_error() {
    let dir = TempDir::new("shards");
    let one = save_f32(
        &dir.path("diffusion_pytorch_model-00001-of-00002.safetensors"),
        &[("down.0.weight", &[2, 2]), ("shared.weight", &[3])],
    );
    let two = save_f32(&dir.path("diffusion_pytorch_model-00002-of-00002.safetensors"), &[("up.0.weight", &[5])]);
    let loaded = weights::load(&[&one, &two]).unwrap();
    assert_eq!(loaded.len(), 3);
    assert_eq!(loaded.get("up.0.weight").unwrap().shape(), [5]);
    assert_eq!(loaded.report().files, 2);

    let three = save_f32(&dir.path("extra.safetensors"), &[("shared.weight", &[3]), ("up.0.weight", &[5])]);
    let m = input_error(weights::load(&[&one, &two, &three]));
    assert_mentions(
        &m,
        &[
            "duplicate name: 2",
            &format!("shared.weight (in {} and {})", one.display(), three.display()),
            &format!("up.0.weight (in {} and {})", two.display(), three.display()),
        ],
    );
}

#[test]
fn an_index_json_loads_the_files_it_names() {
    let dir = TempDir::new("index");
    save_f32(&dir.path("model-00001-of-00002.safetensors"), &[("a.weight", &[2]), ("b.weight", &[3])]);
    save_f32(&dir.path("model-00002-of-00002.safetensors"), &[("c.weight", &[4])]);
    let index = write(
        &dir.path("model.safetensors.index.json"),
        br#"{"metadata": {"total_size": 36},
            "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                           "b.weight": "model-00001-of-00002.safetensors",
                           "c.weight": "model-00002-of-00002.safetensors"}}"#,
    );
    let expected =
        [TensorSpec::new("a.weight", &[2]), TensorSpec::new("b.weight", &[3]), TensorSpec::new("c.weight", &[4])];
    let loaded = weights::load_strict(&[&index], &expected, &[]).unwrap();
    assert_eq!(loaded.len(), 3);
    assert_eq!(
        loaded.files(),
        [dir.path("model-00001-of-00002.safetensors"), dir.path("model-00002-of-00002.safetensors")]
    );

    // A shard the index names but the folder lacks.
    let index = write(
        &dir.path("partial.safetensors.index.json"),
        br#"{"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "z.weight": "model-00003-of-00003.safetensors"}}"#,
    );
    let m = input_error(weights::load(&[index]));
    assert_mentions(&m, &["model-00003-of-00003.safetensors", "cannot read"]);

    // Not an index at all.
    let index = write(&dir.path("bad.safetensors.index.json"), br#"{"weights": {}}"#);
    let m = input_error(weights::load(&[&index]));
    assert_mentions(&m, &[&index.display().to_string(), "weight_map"]);
}

#[test]
fn a_missing_file_names_its_path() {
    let dir = TempDir::new("missing");
    let path = dir.path("nowhere.safetensors");
    let m = input_error(weights::load(&[&path]));
    assert_mentions(&m, &[&path.display().to_string(), "cannot read"]);
    let m = input_error(weights::load::<PathBuf>(&[]));
    assert_mentions(&m, &["no weights file"]);
}

#[test]
fn get_names_the_missing_tensor() {
    let dir = TempDir::new("get");
    let path = save_f32(&dir.path("w.safetensors"), &[("present", &[1])]);
    let loaded = weights::load(&[&path]).unwrap();
    let Err(Error::Input(m)) = loaded.get("absent.weight") else {
        panic!("got a tensor for a name the file lacks");
    };
    assert_mentions(&m, &["absent.weight", &path.display().to_string()]);
}

#[test]
fn a_failed_save_leaves_nothing_behind() {
    let dir = TempDir::new("save-fail");
    let t = f32_tensor(&[2]);
    // The destination is a folder: refused before anything is written.
    std::fs::create_dir(dir.path("taken")).unwrap();
    let err = weights::save(&dir.path("taken"), &[("t".into(), &t)], None).unwrap_err();
    assert!(err.to_string().contains("taken"), "{err}");
    assert_eq!(dir.entries(), ["taken"]);
    // The same name twice is refused before anything is written.
    let path = dir.path("twice.safetensors");
    let err = weights::save(&path, &[("t".into(), &t), ("t".into(), &t)], None).unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("'t' is given twice")), "{err}");
    assert_eq!(dir.entries(), ["taken"]);
}

#[test]
fn reports_print_one_line() {
    let load = LoadReport { tensors: 1680, bytes: 5_140_000_000, files: 1, seconds: 0.03 };
    assert_eq!(load.to_string(), "loaded 1680 tensors, 5.14 GB from 1 file in 0.03 s");
    let upload = UploadReport { tensors: 1, bytes: 3_000_000_000, dtype: DType::F16, seconds: 1.5 };
    assert_eq!(upload.gb_per_second(), 2.0);
    assert_eq!(upload.to_string(), "uploaded 1 tensor, 3.00 GB as F16 in 1.50 s (2.00 GB/s)");
}

#[test]
fn a_long_problem_list_names_the_first_of_each_kind_and_counts_the_rest() {
    let dir = TempDir::new("many-problems");
    let path = save_f32(&dir.path("w.safetensors"), &[("present", &[1]), ("stray", &[1])]);
    // As a config of absurd depth would expect: thousands of tensors the file lacks.
    let expected: Vec<TensorSpec> = (0..5000)
        .map(|i| TensorSpec::new(format!("blocks.{i}.weight"), &[2]))
        .chain([TensorSpec::new("present", &[1])])
        .collect();
    let m = input_error(weights::load_strict(&[&path], &expected, &[]));
    let listed = weights::LISTED_PER_KIND;
    assert_mentions(
        &m,
        &[
            "missing: 5000",
            "unexpected: 1",
            "missing: blocks.0.weight",
            &format!("... and {} more missing", 5000 - listed),
            "unexpected: stray",
        ],
    );
    // The summary, `listed` missing lines and their "... and N more", one unexpected line.
    assert_eq!(m.lines().count(), 1 + listed + 1 + 1, "{m}");
    assert_eq!(m.lines().filter(|l| l.starts_with("  missing: ")).count(), listed);
}

/// Runs `f` on a thread and fails if it takes longer than `limit` (a FIFO read blocks forever).
fn within<T: Send + 'static>(limit: std::time::Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || send.send(f()));
    receive.recv_timeout(limit).unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn special_files_are_refused_without_reading_them() {
    let dir = TempDir::new("special");
    let fifo = dir.path("fifo.safetensors");
    mkfifo(&fifo);
    let index =
        write(&dir.path("model.safetensors.index.json"), br#"{"weight_map": {"a.weight": "fifo.safetensors"}}"#);
    let fifo_index = dir.path("fifo.safetensors.index.json");
    mkfifo(&fifo_index);
    let limit = std::time::Duration::from_secs(10);
    for (path, what) in [
        (fifo.clone(), "a FIFO"),
        (index, "a FIFO"),
        (fifo_index, "a FIFO"),
        (PathBuf::from("/dev/zero"), "a character device"),
        (dir.0.clone(), "a folder"),
    ] {
        let m = within(limit, move || input_error(weights::load(&[&path])));
        assert_mentions(&m, &["not a regular file", what]);
    }
    let m = within(limit, move || match weights::open(&fifo, "reference file") {
        Err(Error::Input(m)) => m,
        _ => panic!("a FIFO opened as a reference"),
    });
    assert_mentions(&m, &["fifo.safetensors (reference file)", "a FIFO"]);
}

/// A header's JSON text with `n` minimal (empty) tensor entries.
fn many_entries(n: usize) -> String {
    let entries: Vec<String> =
        (0..n).map(|i| format!(r#""{i:x}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#)).collect();
    format!("{{{}}}", entries.join(","))
}

#[test]
fn headers_beyond_the_limits_are_refused_fast() {
    let dir = TempDir::new("header-limits");
    // Two million entries need more header bytes than the limit: refused from the length alone.
    let entry = many_entries(1).len() - 2;
    let claimed = 2_000_000 * (entry as u64 + 1);
    assert!(claimed > weights::MAX_HEADER_BYTES);
    let mut bytes = claimed.to_le_bytes().to_vec();
    bytes.extend_from_slice(many_entries(1000).as_bytes());
    let path = write(&dir.path("claims.safetensors"), &bytes);
    let started = std::time::Instant::now();
    let m = input_error(weights::load(&[&path]));
    assert_mentions(&m, &[&claimed.to_string(), &format!("{}-byte limit", weights::MAX_HEADER_BYTES)]);

    // Within the byte limit, one entry more than the tensor limit: refused while parsing.
    let path = write(&dir.path("count.safetensors"), &raw_file(&many_entries(weights::MAX_TENSORS + 1), &[]));
    let m = input_error(weights::load(&[&path]));
    assert_mentions(&m, &[&path.display().to_string(), &format!("more than {} tensors", weights::MAX_TENSORS)]);
    assert!(started.elapsed().as_secs_f64() < 2.0, "took {:?}", started.elapsed());

    // At the limit, the file loads: the limit is the count, not something smaller.
    let path = write(&dir.path("at-limit.safetensors"), &raw_file(&many_entries(1000), &[]));
    assert_eq!(weights::open(&path, "test").unwrap().names().count(), 1000);
}

#[test]
fn save_refuses_to_replace_a_link_or_a_folder() {
    let dir = TempDir::new("save-special");
    let target = write(&dir.path("precious.txt"), b"keep me");
    let link = dir.path("out.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let t = f32_tensor(&[2]);
    let err = weights::save(&link, &[("t".into(), &t)], None).unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("a symbolic link")), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(dir.entries(), ["out.safetensors", "precious.txt"], "no temporary left");
    // A regular file is replaced whole.
    save_f32(&target, &[("t", &[2])]);
    assert_eq!(weights::load(&[&target]).unwrap().len(), 1);
}

#[test]
fn a_tensor_file_gives_metadata_and_exact_integers() {
    let dir = TempDir::new("tensor-file");
    let header = r#"{"__metadata__":{"tile_overlap_factor":"0.25"},
        "ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},
        "big":{"dtype":"I32","shape":[1],"data_offsets":[16,20]},
        "huge":{"dtype":"U64","shape":[1],"data_offsets":[20,28]},
        "whole":{"dtype":"F64","shape":[2],"data_offsets":[28,44]},
        "half":{"dtype":"F32","shape":[1],"data_offsets":[44,48]},
        "mask":{"dtype":"BOOL","shape":[1],"data_offsets":[48,49]}}"#;
    let mut data = Vec::new();
    [49406i64, -3].iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
    data.extend_from_slice(&((1i32 << 24) + 1).to_le_bytes());
    data.extend_from_slice(&u64::MAX.to_le_bytes());
    [7.0f64, -1e300].iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
    data.extend_from_slice(&0.5f32.to_le_bytes());
    data.push(1);
    let path = write(&dir.path("ref.safetensors"), &raw_file(header, &data));
    let file = weights::open(&path, "reference file").unwrap();
    assert_eq!(file.metadata().get("tile_overlap_factor").map(String::as_str), Some("0.25"));
    assert_eq!(file.names().collect::<Vec<_>>(), ["big", "half", "huge", "ids", "mask", "whole"]);

    assert_eq!(file.integers("ids").unwrap(), [49406, -3]);
    assert_eq!(file.integers("big").unwrap(), [(1 << 24) + 1]);
    let error = |r: celframe::Result<_>| match r {
        Err(Error::Input(m)) => {
            assert!(!m.contains("  "), "a message with a run of spaces (a broken line continuation): {m}");
            m
        }
        _ => panic!("expected an input error"),
    };
    assert_mentions(&error(file.integers("huge").map(drop)), &["tensor 'huge'", &u64::MAX.to_string()]);
    assert_mentions(&error(file.integers("whole").map(drop)), &["tensor 'whole'", "index 1", "not an integer"]);
    assert_mentions(&error(file.integers("half").map(drop)), &["tensor 'half'", "0.5"]);
    assert_mentions(&error(file.integers("mask").map(drop)), &["tensor 'mask' is BOOL", "integer"]);

    // As float: integers only where float32 holds them exactly; F64 rounded to F32.
    assert_eq!(file.float("ids").unwrap().to_f32_vec().unwrap(), [49406.0, -3.0]);
    assert_mentions(&error(file.float("big").map(drop)), &["tensor 'big'", "16777217", "2^24"]);
    let whole = file.float("whole").unwrap();
    assert_eq!((whole.dtype(), whole.to_f32_vec().unwrap()[0]), (DType::F32, 7.0));
    assert!(whole.to_f32_vec().unwrap()[1].is_infinite(), "-1e300 is beyond float32");
    assert_mentions(&error(file.float("mask").map(drop)), &["tensor 'mask' is BOOL", "F64"]);
    assert_mentions(&error(file.float("absent").map(drop)), &[&path.display().to_string(), "no tensor 'absent'"]);
}
