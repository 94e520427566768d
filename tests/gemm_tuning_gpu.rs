//! cuBLASLt tuning on CUDA at SDXL shapes (32 images 1024x576): `Blas::tune_into` times the
//! heuristic's candidates and runs the fastest; its output must match heuristic #1's within the
//! output dtype's rounding, an in-place accumulate (C = D) must be added exactly once however many
//! timing runs there were, and every reader of the file (another handle in this process, two other
//! processes through CELFRAME_GEMM_TUNING) must give the tuner's bytes exactly. A file lacking a
//! description runs heuristic #1 for it: the bytes of a run without any file. Where a built-in file
//! was made for this device and cuBLASLt, a handle made without CELFRAME_GEMM_TUNING runs it, and
//! its outputs match heuristic #1's within the same tolerances.
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on
//! the GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently.
//!
//! Tolerances (relative L2 against heuristic #1): both run fp32 accumulation on the same inputs;
//! another tile, split-K or reduction order changes only the summation order and the final
//! rounding: f16 output 2e-3 (one fp16 rounding is <= 2^-11 relative), f32 output 1e-5.

mod common;

use std::path::Path;
use std::process::Command;

use celframe::gpu::blas::{Blas, Gemm, GemmIo};
use celframe::gpu::tuning::{BuiltIn, ENV, Tuning};
use celframe::gpu::{Arena, Gpu};
use celframe::{DType, Tensor};
use common::{TempDir, assert_close, random_tensor};

/// Where `child_process_runs_the_file` writes its outputs (set by its parent only).
const CHILD_OUT: &str = "CELFRAME_GEMM_TUNING_TEST_OUT";

struct Case {
    name: &'static str,
    gemm: Gemm,
    alpha: f32,
    /// beta · C with C apart from D (a residual).
    residual: bool,
    /// D += alpha · A · op(B): C is D itself, beta 1 (the LoRA merge).
    in_place: bool,
}

fn cases() -> Vec<Case> {
    let linear = |m, n, k| Gemm::linear(m, n, k, DType::F16, true);
    vec![
        // Level 1 (64x36 latents, 2304 tokens x 32 images): attention output projection + residual.
        Case {
            name: "level-1 attention out + residual",
            gemm: linear(73728, 640, 640),
            alpha: 1.0,
            residual: true,
            in_place: false,
        },
        // Level 2 (576 tokens x 32): GEGLU's projection to 2 x 5120 and the feed-forward output.
        Case {
            name: "level-2 GEGLU projection",
            gemm: linear(18432, 10240, 1280),
            alpha: 1.0,
            residual: false,
            in_place: false,
        },
        Case {
            name: "level-2 feed-forward out",
            gemm: linear(18432, 1280, 5120),
            alpha: 1.0,
            residual: false,
            in_place: false,
        },
        // A rank-32 LoRA merged into a 1280x1280 weight in place.
        Case {
            name: "LoRA merge in place (C = D)",
            gemm: Gemm {
                m: 1280,
                n: 1280,
                k: 32,
                batch: 1,
                b_transposed: false,
                lda: 32,
                ldb: 1280,
                ldc: 1280,
                stride_a: 0,
                stride_b: 0,
                stride_c: 0,
                dtype: DType::F16,
                out_dtype: DType::F16,
                bias: false,
                fp8: false,
                fp8_rows: false,
            },
            alpha: 0.75,
            residual: false,
            in_place: true,
        },
        // Cross-attention scores of one head, 32 images: Q rows 1280 apart, 77 keys, f32 out.
        Case {
            name: "cross-attention scores (strided batch, f32 out)",
            gemm: Gemm {
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
            },
            alpha: 0.125,
            residual: false,
            in_place: false,
        },
    ]
}

/// Elements each operand spans.
fn extents(g: &Gemm) -> (usize, usize, usize) {
    let a = (g.batch - 1) * g.stride_a + (g.m - 1) * g.lda + g.k;
    let b = (g.batch - 1) * g.stride_b + if g.b_transposed { (g.n - 1) * g.ldb + g.k } else { (g.k - 1) * g.ldb + g.n };
    let d = (g.batch - 1) * g.stride_c + (g.m - 1) * g.ldc + g.n;
    (a, b, d)
}

/// Seeded host inputs of case `i`: A, B, bias, C (a residual, or D's value before an in-place call).
fn inputs(i: usize, case: &Case) -> [Option<Tensor>; 4] {
    let g = &case.gemm;
    let (a, b, d) = extents(g);
    let seed = 100 * i as u64;
    [
        Some(random_tensor(&[a], g.dtype, seed + 1, 0.5, 0.0)),
        Some(random_tensor(&[b], g.dtype, seed + 2, 0.5, 0.0)),
        g.bias.then(|| random_tensor(&[g.n], g.dtype, seed + 3, 0.5, 0.0)),
        (case.residual || case.in_place).then(|| random_tensor(&[d], g.out_dtype, seed + 4, 1.0, 0.0)),
    ]
}

/// One call of `case` on `blas` with inputs from `inputs`; D comes back (poisoned before the call
/// unless it is C).
fn run(gpu: &Gpu, blas: &mut Blas, case: &Case, inputs: &[Option<Tensor>; 4]) -> Tensor {
    let g = &case.gemm;
    let arena = Arena::new("gemm tuning test", 2 << 30).unwrap();
    let up = |t: &Option<Tensor>, dtype| t.as_ref().map(|t| gpu.upload(&arena, t, dtype).unwrap());
    let [a, b, bias, c] =
        [up(&inputs[0], g.dtype), up(&inputs[1], g.dtype), up(&inputs[2], g.dtype), up(&inputs[3], g.out_dtype)];
    let d = if case.in_place { c.clone().unwrap() } else { gpu.empty(&arena, &[extents(g).2], g.out_dtype).unwrap() };
    let ptr = |t: &Option<Tensor>| t.as_ref().map(|t| t.device_ptr().unwrap());
    let io = GemmIo {
        a: ptr(&a).unwrap(),
        b: ptr(&b).unwrap(),
        d: d.device_ptr().unwrap(),
        bias: ptr(&bias),
        c: ptr(&c).map(|c| (c, 1.0)),
        alpha: case.alpha,
        scales: None,
    };
    blas.gemm(gpu, g, io).unwrap();
    gpu.download(&d).unwrap()
}

/// Relative L2 against heuristic #1 (see the module comment).
fn tolerance(case: &Case) -> f64 {
    if case.gemm.out_dtype == DType::F32 { 1e-5 } else { 2e-3 }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().unwrap().into_iter().map(f32::to_bits).collect()
}

fn gpu() -> Gpu {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    assert!(std::env::var_os(ENV).is_none(), "unset {ENV}: this test compares runs with and without a tuning file");
    let gpu = Gpu::from_env().unwrap();
    gpu.set_poison_outputs(true);
    gpu
}

/// Tunes every case into `path`; the tuned outputs, each checked against heuristic #1's.
fn tune(gpu: &Gpu, path: &Path) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut plain = Blas::heuristic_only(gpu.info()).unwrap();
    let mut tuner = Blas::heuristic_only(gpu.info()).unwrap();
    tuner.tune_into(path).unwrap();
    let (mut tuned, mut first) = (Vec::new(), Vec::new());
    for (i, case) in cases().iter().enumerate() {
        let x = inputs(i, case);
        let want = run(gpu, &mut plain, case, &x);
        let got = run(gpu, &mut tuner, case, &x);
        let tol = tolerance(case);
        // In place, timing into D itself would have added the product once per timed run.
        let (rel, max) = assert_close(case.name, &got, &want, tol);
        let (_, file) = tuner.tuning().unwrap();
        let e = file.get(&case.gemm).unwrap_or_else(|| panic!("{}: no entry after tuning", case.name));
        println!(
            "GPUCHECK gemm tuning {}: candidate {} of {} timed, {:.4} ms vs heuristic #1 {:.4} ms ({:.2}x); rel_l2 {rel:.2e} \
             max {max:.2e} vs heuristic #1",
            case.name,
            e.index,
            e.timed,
            e.tuned_ms,
            e.heuristic_ms,
            e.speedup()
        );
        let again = run(gpu, &mut tuner, case, &x);
        assert!(bits(&again) == bits(&got), "{}: a second call of the tuned plan gave other bytes", case.name);
        tuned.push(got);
        first.push(want);
    }
    assert_eq!(tuner.save_tuning().unwrap(), Some(path));
    (tuned, first)
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn tuned_choices_match_heuristic_one_and_readers_repeat_them() {
    let gpu = gpu();
    let dir = TempDir::new("gemm-tuning-gpu");
    let path = dir.0.join("tuning.json");
    let (tuned, first) = tune(&gpu, &path);
    let identity = Blas::heuristic_only(gpu.info()).unwrap().identity().clone();
    let file = Tuning::load(&path, &identity, "test").unwrap();
    assert_eq!(file.len(), cases().len());

    // Another handle reading the file runs the same algorithms: the same bytes.
    let mut reader = Blas::heuristic_only(gpu.info()).unwrap();
    reader.read_tuning(&path, "test").unwrap();
    for (i, case) in cases().iter().enumerate() {
        let got = run(&gpu, &mut reader, case, &inputs(i, case));
        assert!(bits(&got) == bits(&tuned[i]), "{}: a reader of the file gave other bytes than the tuner", case.name);
    }

    // A file without the first description: that one runs heuristic #1, as with no file at all.
    let mut partial = Tuning::new(identity);
    for case in &cases()[1..] {
        partial.insert(file.get(&case.gemm).unwrap().clone());
    }
    let partial_path = dir.0.join("partial.json");
    partial.save(&partial_path).unwrap();
    let mut reader = Blas::heuristic_only(gpu.info()).unwrap();
    reader.read_tuning(&partial_path, "test").unwrap();
    let case = &cases()[0];
    let got = run(&gpu, &mut reader, case, &inputs(0, case));
    assert!(bits(&got) == bits(&first[0]), "{}: without an entry the output must be heuristic #1's", case.name);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn the_built_in_file_runs_where_it_was_made() {
    let gpu = gpu();
    let mut plain = Blas::heuristic_only(gpu.info()).unwrap();
    let (name, file) = match Tuning::built_in(plain.identity()).unwrap() {
        BuiltIn::Applies(name, file) => (name, file),
        other => {
            println!(
                "GPUCHECK gemm tuning built-in: SKIPPED, no built-in file applies on {:?} ({other:?})",
                plain.identity()
            );
            return;
        }
    };
    let mut blas = Blas::new(gpu.info()).unwrap();
    let (path, _) =
        blas.tuning().expect("a built-in file applies, but a handle made without CELFRAME_GEMM_TUNING ran none");
    assert_eq!(path, Path::new(&format!("built-in {name}")));
    let (mut covered, mut changed) = (0, 0);
    for (i, case) in cases().iter().enumerate() {
        let Some(entry) = file.get(&case.gemm) else { continue };
        let x = inputs(i, case);
        let want = run(&gpu, &mut plain, case, &x);
        let got = run(&gpu, &mut blas, case, &x);
        assert_close(case.name, &got, &want, tolerance(case));
        covered += 1;
        changed += usize::from(entry.index != 0);
    }
    println!(
        "GPUCHECK gemm tuning built-in {name}: {} entries; {covered} of {} test shapes covered ({changed} run another \
         candidate than heuristic #1), outputs within tolerance of heuristic #1's",
        file.len(),
        cases().len()
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn two_processes_reading_one_file_give_identical_bytes() {
    let gpu = gpu();
    let dir = TempDir::new("gemm-tuning-gpu");
    let path = dir.0.join("tuning.json");
    let (tuned, _) = tune(&gpu, &path);
    drop(gpu);
    let exe = std::env::current_exe().unwrap();
    for child in ["child-1", "child-2"] {
        let out = dir.0.join(child);
        std::fs::create_dir_all(&out).unwrap();
        let status = Command::new(&exe)
            .args(["--exact", "child_process_runs_the_file", "--include-ignored", "--nocapture", "--test-threads=1"])
            .env(ENV, &path)
            .env(CHILD_OUT, &out)
            .status()
            .unwrap();
        assert!(status.success(), "{child} failed: {status}");
        for (i, case) in cases().iter().enumerate() {
            let bytes = std::fs::read(out.join(format!("case{i}.f32"))).unwrap();
            let got: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
            assert!(got == bits(&tuned[i]), "{}: {child} (reading {ENV}) gave other bytes than the tuner", case.name);
        }
    }
    println!("GPUCHECK gemm tuning: two processes reading {ENV} gave the tuner's bytes for {} shapes", tuned.len());
}

/// The child of `two_processes_reading_one_file_give_identical_bytes`: runs every case through the
/// device's own handle (which reads CELFRAME_GEMM_TUNING) and writes the outputs as f32 bits.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn child_process_runs_the_file() {
    let Some(out) = std::env::var_os(CHILD_OUT) else {
        println!(
            "child_process_runs_the_file: the helper process of two_processes_reading_one_file_give_identical_bytes"
        );
        return;
    };
    let gpu = Gpu::from_env().unwrap();
    gpu.set_poison_outputs(true);
    let mut blas = gpu.blas().unwrap();
    assert!(blas.tuning().is_some(), "{ENV} was not read");
    for (i, case) in cases().iter().enumerate() {
        let d = run(&gpu, &mut blas, case, &inputs(i, case));
        let bytes: Vec<u8> = bits(&d).into_iter().flat_map(u32::to_le_bytes).collect();
        std::fs::write(Path::new(&out).join(format!("case{i}.f32")), bytes).unwrap();
    }
}
