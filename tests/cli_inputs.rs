//! Hostile inputs to the `celframe` binary, each class found by fuzzing the CLI: special files, a
//! header of millions of tensors, non-finite references, misshapen or mistyped reference tensors,
//! sizes that overflow, `--save` onto a link, and `--device cuda` without a GPU. Every case must
//! end promptly with its documented exit code (README, "Exit codes") and an error naming what is
//! wrong; none may panic, hang or leave a file behind. CPU only.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// `name` in `dir`, as the string the command line takes.
fn at(dir: &TempDir, name: &str) -> String {
    dir.path(name).to_str().unwrap().to_string()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture's path as a string argument.
fn fixture(name: &str) -> String {
    fixtures().join(name).to_str().unwrap().to_string()
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary, killing it and failing the test if it takes longer than `limit` (a FIFO read
/// blocks forever; CI must fail rather than hang).
fn celframe_within(limit: Duration, args: &[&str]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_celframe"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("celframe {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Outcome { code: out.status.code().unwrap_or(-1), stdout: text(&out.stdout), stderr: text(&out.stderr) }
}

/// Runs the binary with a limit that only a hang exceeds.
fn celframe(args: &[&str]) -> Outcome {
    celframe_within(Duration::from_secs(120), args)
}

/// Asserts the exit code and that stderr is one `error:` message mentioning every needle.
fn assert_error(out: &Outcome, code: i32, needles: &[&str]) {
    assert_eq!(out.code, code, "exit code\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
    let first = out.stderr.lines().next().unwrap_or_default();
    assert!(!first.contains("  "), "a run of spaces (a broken line continuation): {first}");
    for needle in needles {
        assert!(out.stderr.contains(needle), "stderr does not mention {needle:?}:\n{}", out.stderr);
    }
}

fn mkfifo(path: &str) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success(), "mkfifo {path}");
}

/// The tensors of a safetensors fixture: name -> (dtype, shape, bytes).
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(name: &str) -> Tensors {
    let bytes = std::fs::read(fixtures().join(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn write_tensors(path: &str, tensors: &Tensors) {
    let views: BTreeMap<&str, TensorView> = tensors
        .iter()
        .map(|(n, (dtype, shape, data))| (n.as_str(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, Path::new(path)).unwrap();
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

const PROMPTLY: Duration = Duration::from_secs(10);

// ---- special files ------------------------------------------------------------------------------

#[test]
fn fifos_and_devices_are_refused_promptly() {
    let dir = TempDir::new("special");
    let (unet, reference) = (fixture("unet_a"), fixture("unet_a.reference.safetensors"));
    let fifo = at(&dir, "reference.safetensors");
    mkfifo(&fifo);
    // A UNet folder whose config.json is a FIFO, given by the config's path.
    std::fs::create_dir(at(&dir, "fifo_config")).unwrap();
    let fifo_config = at(&dir, "fifo_config/config.json");
    mkfifo(&fifo_config);
    // A UNet folder whose shard index names a FIFO.
    std::fs::create_dir(at(&dir, "fifo_shard")).unwrap();
    std::fs::copy(fixtures().join("unet_a/config.json"), at(&dir, "fifo_shard/config.json")).unwrap();
    std::fs::write(
        at(&dir, "fifo_shard/diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"conv_in.weight": "shard-00001.safetensors"}}"#,
    )
    .unwrap();
    mkfifo(&at(&dir, "fifo_shard/shard-00001.safetensors"));
    let shard_folder = at(&dir, "fifo_shard");

    let cases: [(&[&str], &[&str]); 4] = [
        (&["--weights", &unet, "--reference", &fifo], &["reference.safetensors (reference file)", "a FIFO"]),
        (&["--weights", &unet, "--reference", "/dev/zero"], &["/dev/zero (reference file)", "a character device"]),
        (&["--weights", &fifo_config, "--reference", &reference], &["config.json (model config)", "a FIFO"]),
        (&["--weights", &shard_folder, "--reference", &reference], &["shard-00001.safetensors", "a FIFO"]),
    ];
    for (args, needles) in cases {
        let args = [&["verify", "unet", "--device", "cpu"], args].concat();
        assert_error(&celframe_within(PROMPTLY, &args), 2, &[needles, &["not a regular file"]].concat());
    }
}

#[test]
fn a_header_of_two_million_tensors_is_refused_fast() {
    let dir = TempDir::new("huge-header");
    // Two million minimal entries: the header length alone is past the limit.
    let entry = r#""00000000":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"#;
    let header = format!("{{{}}}", entry.repeat(2_000_000).trim_end_matches(','));
    let path = at(&dir, "reference.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let started = Instant::now();
    let out = celframe_within(
        PROMPTLY,
        &[
            "verify",
            "text_encoder",
            "--weights",
            &fixture("text_encoder_tiny"),
            "--reference",
            &path,
            "--device",
            "cpu",
        ],
    );
    assert_error(&out, 2, &["reference.safetensors (reference file)", "100000000-byte limit"]);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn save_onto_a_symlink_is_refused_and_its_target_kept() {
    let dir = TempDir::new("save-link");
    let target = at(&dir, "precious.txt");
    std::fs::write(&target, b"keep me").unwrap();
    let link = at(&dir, "out.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (weights, reference) = (fixture("text_encoder_2_tiny"), fixture("text_encoder_2_tiny.reference.safetensors"));
    let args = ["verify", "text_encoder_2", "--weights", &weights, "--reference", &reference, "--device", "cpu"];
    let out = celframe(&[&args[..], &["--save", &link]].concat());
    assert_error(&out, 2, &["out.safetensors", "a symbolic link"]);
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(dir.entries(), ["out.safetensors", "precious.txt"], "nothing written beside them");
}

// ---- reference files ----------------------------------------------------------------------------

#[test]
fn a_non_finite_reference_is_bad_input() {
    let dir = TempDir::new("nan-reference");
    let weights = fixture("unet_a");
    for (name, value) in [("out.sample", f32::NAN), ("in.sample", f32::INFINITY), ("in.timestep", f32::NAN)] {
        let mut tensors = read_tensors("unet_a.reference.safetensors");
        let shape = tensors[name].1.clone();
        let count = shape.iter().product::<usize>();
        let data = f32_bytes((0..count).map(|i| if i == count - 1 { value } else { 0.5 }));
        tensors.insert(name.into(), (Dtype::F32, shape, data));
        let path = at(&dir, &format!("{name}.safetensors"));
        write_tensors(&path, &tensors);
        let out = celframe(&["verify", "unet", "--weights", &weights, "--reference", &path, "--device", "cpu"]);
        let at = format!("index {}", count - 1);
        assert_error(&out, 2, &[&format!("tensor '{name}' holds 1 NaN or infinite values"), &at, "must be finite"]);
    }
}

/// A finite context so large that the cross-attention projections overflow float32: the computed
/// sample is NaN, which is a failed verification (exit 1) that names the count, not bad input.
#[test]
fn a_computed_output_that_is_not_finite_fails_by_name() {
    let dir = TempDir::new("overflow");
    let mut tensors = read_tensors("unet_a.reference.safetensors");
    let shape = tensors["in.encoder_hidden_states"].1.clone();
    let huge = f32_bytes((0..shape.iter().product::<usize>()).map(|i| if i % 2 == 0 { 3e38 } else { -3e38 }));
    tensors.insert("in.encoder_hidden_states".into(), (Dtype::F32, shape, huge));
    let path = at(&dir, "overflow.safetensors");
    write_tensors(&path, &tensors);
    let out = celframe(&["verify", "unet", "--weights", &fixture("unet_a"), "--reference", &path, "--device", "cpu"]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let line = out.stdout.lines().find(|l| l.starts_with("out.sample")).unwrap();
    assert!(line.ends_with(": NOT FINITE") && line.contains("3072 of 3072 values NaN or infinite"), "{line}");
    assert!(!line.contains("max abs error"), "no error figures over zero finite values: {line}");
}

#[test]
fn text_encoder_ids_are_checked_against_the_model_and_any_float_dtype_is_accepted() {
    let dir = TempDir::new("ids");
    let weights = fixture("text_encoder_2_tiny");
    let run = |path: &str| {
        celframe(&["verify", "text_encoder_2", "--weights", &weights, "--reference", path, "--device", "cpu"])
    };
    let original = read_tensors("text_encoder_2_tiny.reference.safetensors");
    let (_, shape, data) = &original["in.input_ids"];
    let ids: Vec<i64> = data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();

    // F64 ids (a float tensor holding whole ids) give the same result as the I64 ones.
    let mut tensors = original.clone();
    let f64_ids: Vec<u8> = ids.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
    tensors.insert("in.input_ids".into(), (Dtype::F64, shape.clone(), f64_ids));
    let path = at(&dir, "f64.safetensors");
    write_tensors(&path, &tensors);
    let out = run(&path);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);

    // 78 tokens per sequence: more positions than the model has.
    let mut tensors = original.clone();
    let long: Vec<u8> = (0..78i64).flat_map(|v| v.to_le_bytes()).collect();
    tensors.insert("in.input_ids".into(), (Dtype::I64, vec![1, 78], long));
    tensors.retain(|n, _| n == "in.input_ids" || n == "out.text_embeds");
    let path = at(&dir, "long.safetensors");
    write_tensors(&path, &tensors);
    assert_error(&run(&path), 2, &["in.input_ids has shape [1, 78]", "1 to 77 tokens (max_position_embeddings)"]);

    // A fraction, an id past the vocabulary, a dtype that holds no numbers.
    let vocab = 512; // text_encoder_2_tiny/config.json
    let cases: [(Dtype, Vec<u8>, &[&str]); 3] = [
        (
            Dtype::F32,
            f32_bytes(ids.iter().enumerate().map(|(i, &v)| if i == 5 { 3.5 } else { v as f32 })),
            &["tensor 'in.input_ids' (F32) holds 3.5 at index 5"],
        ),
        (
            Dtype::I64,
            ids.iter().enumerate().flat_map(|(i, &v)| if i == 7 { vocab } else { v }.to_le_bytes()).collect(),
            &["in.input_ids holds 512 at index 7", "0 to 511"],
        ),
        (Dtype::BOOL, vec![1; ids.len()], &["tensor 'in.input_ids' is BOOL", "integer tensor"]),
    ];
    for (i, (dtype, bytes, needles)) in cases.into_iter().enumerate() {
        let mut tensors = original.clone();
        tensors.insert("in.input_ids".into(), (dtype, shape.clone(), bytes));
        let path = at(&dir, &format!("case-{i}.safetensors"));
        write_tensors(&path, &tensors);
        assert_error(&run(&path), 2, needles);
    }
}

#[test]
fn shape_errors_give_the_files_nchw_shapes() {
    let dir = TempDir::new("shapes");
    // UNet: a 3-channel sample for a 4-channel UNet.
    let mut tensors = read_tensors("unet_a.reference.safetensors");
    let shape = &tensors["in.sample"].1;
    let nchw = [shape[0], 3, shape[2], shape[3]];
    tensors.insert("in.sample".into(), (Dtype::F32, nchw.to_vec(), f32_bytes(vec![0.5; nchw.iter().product()])));
    let path = at(&dir, "unet.safetensors");
    write_tensors(&path, &tensors);
    let out = celframe(&["verify", "unet", "--weights", &fixture("unet_a"), "--reference", &path, "--device", "cpu"]);
    assert_error(&out, 2, &[&format!("in.sample has shape {nchw:?}"), "NCHW [batch, 4, height, width]"]);

    // VAE: latents of 5 channels for a 4-channel VAE.
    let mut tensors = read_tensors("vae_tiny.reference.safetensors");
    tensors.insert("in.z".into(), (Dtype::F32, vec![3, 5, 8, 12], f32_bytes(vec![0.5; 3 * 5 * 8 * 12])));
    let path = at(&dir, "vae.safetensors");
    write_tensors(&path, &tensors);
    let out = celframe(&[
        "verify",
        "vae_decoder",
        "--weights",
        &fixture("vae_tiny"),
        "--reference",
        &path,
        "--device",
        "cpu",
    ]);
    assert_error(&out, 2, &["in.z has shape [3, 5, 8, 12]", "NCHW [frames, 4, height, width]"]);
}

// ---- sizes --------------------------------------------------------------------------------------

#[test]
fn bench_sizes_are_checked_before_any_device_work() {
    let unet = fixture("unet_a");
    let cases: [(&[&str], &[&str]); 6] = [
        (&["--chunk", "0"], &["--chunk must be at least 1"]),
        (&["--runs", "18446744073709551615"], &["--runs must be 1 to 10000 (got 18446744073709551615)"]),
        (&["--scratch-gb", "1e300"], &["--scratch-gb must be more than 0 and at most 4096"]),
        (&["--width", "0"], &["--width must be at least 1"]),
        (&["--batch", "18446744073709551615"], &["--batch 18446744073709551615", "largest activation", "2147483647"]),
        (&["--tokens", "4611686018427387904"], &["--tokens 4611686018427387904", "context"]),
    ];
    for (args, needles) in cases {
        let out = celframe(&[&["bench", "unet", "--weights", &unet], args].concat());
        assert_error(&out, 2, needles);
    }
}

// ---- exit codes ---------------------------------------------------------------------------------

#[test]
fn device_cuda_without_a_gpu_exits_3() {
    if celframe::gpu::Gpu::is_available() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let (weights, reference) = (fixture("unet_a"), fixture("unet_a.reference.safetensors"));
    let verify = ["verify", "unet", "--weights", &weights, "--reference", &reference, "--device", "cuda"];
    let demo = ["demo", "--device", "cuda"];
    for args in [&verify[..], &demo[..]] {
        let out = celframe_within(PROMPTLY, args);
        assert_error(&out, 3, &["no GPU", "--device cuda", "no CUDA driver or device"]);
        assert!(out.stdout.is_empty(), "nothing ran: {}", out.stdout);
    }
}

#[test]
fn help_lists_the_exit_codes() {
    for args in [&["--help"][..], &["verify", "--help"]] {
        let out = celframe(args);
        assert_eq!(out.code, 0, "{}", out.stderr);
        for line in [
            "0  success",
            "1  verify:",
            "2  bad input",
            "3  no GPU",
            "4  a CUDA",
            "5  internal error",
            "130, 143  render stopped",
        ] {
            assert!(out.stdout.contains(line), "{args:?} --help lacks {line:?}:\n{}", out.stdout);
        }
    }
}
