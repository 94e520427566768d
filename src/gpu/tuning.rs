//! GEMM tuning files: per GEMM description, which of cuBLASLt's heuristic candidates runs it.
//!
//! cuBLASLt's heuristic #1 is not always its fastest algorithm for a shape. Timing the candidates
//! in every process would let two processes pick differently and round differently, so frames
//! would differ between a render, its resume and its shards. Instead `celframe bench ...
//! --tune-gemms FILE` times them once and writes FILE; processes given it (`CELFRAME_GEMM_TUNING`)
//! run exactly the recorded choices.
//!
//! Files tuned on the GPUs celframe is measured on can be built into the binary (`BUILT_IN`, from
//! `src/gpu/tuned/`): without `CELFRAME_GEMM_TUNING`, the one made under this process's identity
//! runs, else heuristic #1; `CELFRAME_GEMM_TUNING=none` runs heuristic #1 everywhere.
//!
//! A file is JSON: `identity`, the device, cuBLASLt version, workspace and candidate count it was
//! tuned under (any difference refuses the file: the heuristic's list, and so the choice, depends
//! on them), then `gemms`, one entry per description: the chosen candidate's index in the heuristic's list, its
//! configuration (cuBLASLt's `CUBLASLT_ALGO_CONFIG_*` attributes, checked when the file is used),
//! and the median times of heuristic #1 and of the choice.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::blas::Gemm;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The environment variable naming the tuning file renders, benches and verify runs read.
pub const ENV: &str = "CELFRAME_GEMM_TUNING";
/// The value of `ENV` that runs cuBLASLt's heuristic #1 for every description (no file, not even a
/// built-in one).
pub const NONE: &str = "none";
/// Tuning files built into the binary, by file name: each is the `gemm_tuning.json` that
/// `tools/gemm_tune_gpu.sh` wrote on the device its identity names (the UNet at 32 images
/// 1024x576, 2 images 1024x1024 and 2 images 1024x576, the motion UNet at 2x16 frames 1024x576),
/// copied into `src/gpu/tuned/` once the whole-model checks passed under it (`CELFRAME_GEMM_TUNING`
/// naming the file). At most one per identity. The H100's file (2026-12-07) was tuned with each
/// candidate sustained for 100 ms (`CELFRAME_GEMM_TUNE_SUSTAIN_MS=100`); benches/gemm_tuning/ holds
/// the H200's file of 2026-12-06, which waits on those checks.
pub const BUILT_IN: &[(&str, &str)] =
    &[("nvidia_h100_80gb_hbm3.json", include_str!("tuned/nvidia_h100_80gb_hbm3.json"))];
/// The `format` field of every tuning file.
pub const FORMAT: &str = "celframe-gemm-tuning";
/// The `version` field this build writes and reads.
pub const VERSION: u32 = 1;
/// Heuristic candidates asked for, timed and indexed per description.
pub const CANDIDATES: usize = 8;
/// Largest tuning file read (a UNet at one size has ~100 descriptions of ~600 bytes).
const FILE_LIMIT: u64 = 16 << 20;

/// What decides cuBLASLt's candidate list: a file made under other values is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub device: String,
    /// "major.minor".
    pub compute_capability: String,
    pub multiprocessors: u32,
    /// `cublasLtGetVersion()`.
    pub cublaslt_version: u64,
    pub workspace_bytes: u64,
    pub candidates: usize,
}

/// An algorithm's configuration attributes as cuBLASLt reports them (`CUBLASLT_ALGO_CONFIG_ID`,
/// `_TILE_ID`, `_STAGES_ID`, `_SPLITK_NUM`, `_REDUCTION_SCHEME`, `_CTA_SWIZZLING`,
/// `_CUSTOM_OPTION`, `_INNER_SHAPE_ID`, `_CLUSTER_SHAPE_ID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgoConfig {
    pub id: u64,
    pub tile: u64,
    pub stages: u64,
    pub splitk: u64,
    pub reduction: u64,
    pub swizzle: u64,
    pub custom: u64,
    pub inner_shape: u64,
    pub cluster_shape: u64,
}

/// One description's choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub gemm: Gemm,
    /// Position of the choice in the heuristic's list of `candidates` (0: heuristic #1).
    pub index: usize,
    pub algo: AlgoConfig,
    /// Median milliseconds of heuristic #1 and of the choice, timed in the same process.
    pub heuristic_ms: f64,
    pub tuned_ms: f64,
    /// Candidates that ran and were timed (the heuristic may offer fewer than `candidates`).
    pub timed: usize,
}

impl Entry {
    /// heuristic #1's time over the choice's.
    pub fn speedup(&self) -> f64 {
        self.heuristic_ms / self.tuned_ms
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    format: String,
    version: u32,
    identity: Identity,
    gemms: Vec<Entry>,
}

/// A tuning file in memory.
#[derive(Clone, Debug)]
pub struct Tuning {
    identity: Identity,
    entries: HashMap<Gemm, Entry>,
}

impl Tuning {
    pub fn new(identity: Identity) -> Tuning {
        Tuning { identity, entries: HashMap::new() }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn get(&self, g: &Gemm) -> Option<&Entry> {
        self.entries.get(g)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds (or replaces) the choice for `entry.gemm`.
    pub fn insert(&mut self, entry: Entry) {
        self.entries.insert(entry.gemm, entry);
    }

    /// Reads `path`, refused unless it was made under `expected`. `origin` says who named the file
    /// (`CELFRAME_GEMM_TUNING`, `--tune-gemms`) for the messages.
    pub fn load(path: &Path, expected: &Identity, origin: &str) -> Result<Tuning> {
        let what = format!("GEMM tuning file, {origin}");
        let text = crate::io::read_text(path, FILE_LIMIT, &what)?;
        Tuning::parse(&text, expected).map_err(|e| e.with_prefix(&format!("{} ({what}): ", path.display())))
    }

    /// A file's text, checked field by field; errors name the field.
    pub fn parse(text: &str, expected: &Identity) -> Result<Tuning> {
        // Format and version first, so another kind of file or version is named as such rather
        // than by its first unexpected field.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Input(format!("not valid JSON: {e}")))?;
        let field = |name: &str| value.get(name).map_or_else(|| "missing".to_string(), |v| v.to_string());
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(Error::Input(format!(
                "field format is {}, not \"{FORMAT}\": not a GEMM tuning file",
                field("format")
            )));
        }
        if value.get("version").and_then(|v| v.as_u64()) != Some(VERSION as u64) {
            return Err(Error::Input(format!(
                "field version is {}; this celframe reads version {VERSION}: tune again",
                field("version")
            )));
        }
        let file: FileJson = serde_json::from_str(text).map_err(|e| Error::Input(format!("{e}")))?;
        check_identity(&file.identity, expected)?;
        let mut tuning = Tuning::new(file.identity);
        for (i, entry) in file.gemms.into_iter().enumerate() {
            check_entry(&entry, tuning.identity.candidates).map_err(|e| e.with_prefix(&format!("gemms[{i}]: ")))?;
            if tuning.entries.contains_key(&entry.gemm) {
                return Err(Error::Input(format!("gemms[{i}]: a second entry for gemm {}", entry.gemm)));
            }
            tuning.insert(entry);
        }
        Ok(tuning)
    }

    /// The file's text: entries in a fixed order, so equal tunings give equal files.
    pub fn to_json(&self) -> Result<String> {
        let mut gemms: Vec<Entry> = self.entries.values().cloned().collect();
        gemms.sort_by_key(|e| order(&e.gemm));
        let file = FileJson { format: FORMAT.into(), version: VERSION, identity: self.identity.clone(), gemms };
        let mut text = serde_json::to_string_pretty(&file)
            .map_err(|e| Error::Internal(format!("GEMM tuning file not serialisable: {e}")))?;
        text.push('\n');
        Ok(text)
    }

    /// Writes the file through a temporary name (a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::output::write_atomic(path, self.to_json()?.as_bytes())
    }

    /// What the file's timings say `calls` (a description and how often it ran, e.g. in one
    /// forward) cost with heuristic #1 and with the choices.
    pub fn estimate(&self, calls: &[(Gemm, u64)]) -> Estimate {
        let mut e = Estimate::default();
        for (g, n) in calls.iter().filter(|(_, n)| *n > 0) {
            match self.get(g) {
                Some(entry) => {
                    e.tuned_descriptions += 1;
                    e.changed += usize::from(entry.index != 0);
                    e.heuristic_ms += *n as f64 * entry.heuristic_ms;
                    e.tuned_ms += *n as f64 * entry.tuned_ms;
                }
                None => {
                    e.missing_descriptions += 1;
                    e.missing_calls += n;
                }
            }
        }
        e
    }
}

/// What `Tuning::built_in` found for a process.
#[derive(Debug)]
pub enum BuiltIn {
    /// A built-in file made under the process's identity: its name and choices.
    Applies(String, Tuning),
    /// Files for this device exist, none made under the rest of the identity: why not, per file.
    OtherSetup(String),
    /// No built-in file for this device.
    NoneForDevice,
}

impl Tuning {
    /// The built-in tuning file made under `identity`, if any.
    pub fn built_in(identity: &Identity) -> Result<BuiltIn> {
        Tuning::built_in_from(BUILT_IN, identity)
    }

    /// As `built_in`, among `files` (name, text). A file that is not a valid tuning file for its
    /// own identity is an error (it was built in broken).
    pub fn built_in_from(files: &[(&str, &str)], identity: &Identity) -> Result<BuiltIn> {
        let mut why_not = Vec::new();
        for (name, text) in files {
            let own = built_in_identity(name, text)?;
            let tuning = Tuning::parse(text, &own)
                .map_err(|e| Error::Internal(format!("built-in GEMM tuning file {name}: {e}")))?;
            if own.device != identity.device {
                continue;
            }
            match identity_difference(&own, identity) {
                None => return Ok(BuiltIn::Applies(name.to_string(), tuning)),
                Some(why) => why_not.push(format!("{name}: {why}")),
            }
        }
        Ok(if why_not.is_empty() { BuiltIn::NoneForDevice } else { BuiltIn::OtherSetup(why_not.join("; ")) })
    }
}

/// The identity a built-in file records.
fn built_in_identity(name: &str, text: &str) -> Result<Identity> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Internal(format!("built-in GEMM tuning file {name}: not valid JSON: {e}")))?;
    serde_json::from_value(value.get("identity").cloned().unwrap_or_default())
        .map_err(|e| Error::Internal(format!("built-in GEMM tuning file {name}: field identity: {e}")))
}

/// `Tuning::estimate`'s sums.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    /// Descriptions with an entry, and how many of those run another candidate than #1.
    pub tuned_descriptions: usize,
    pub changed: usize,
    /// Descriptions without one (they run heuristic #1), and their calls.
    pub missing_descriptions: usize,
    pub missing_calls: u64,
    /// Milliseconds of the described calls with heuristic #1 and with the choices.
    pub heuristic_ms: f64,
    pub tuned_ms: f64,
}

fn check_identity(found: &Identity, expected: &Identity) -> Result<()> {
    match identity_difference(found, expected) {
        None => Ok(()),
        Some(why) => Err(Error::Input(format!(
            "{why}; tune again for this machine (celframe bench ... --tune-gemms FILE) or unset CELFRAME_GEMM_TUNING"
        ))),
    }
}

/// How a file's identity `found` differs from the process's, naming the first field that does.
fn identity_difference(found: &Identity, expected: &Identity) -> Option<String> {
    let differs = |field: &str, found: String, here: String, why: &str| {
        Some(format!("field identity.{field} is {found}, but {here}: {why}"))
    };
    if found.device != expected.device {
        return differs(
            "device",
            format!("{:?}", found.device),
            format!("this GPU is {:?}", expected.device),
            "the file was tuned on another device",
        );
    }
    if found.compute_capability != expected.compute_capability {
        return differs(
            "compute_capability",
            format!("{:?}", found.compute_capability),
            format!("this GPU's is {:?}", expected.compute_capability),
            "the file was tuned on another device",
        );
    }
    if found.multiprocessors != expected.multiprocessors {
        return differs(
            "multiprocessors",
            found.multiprocessors.to_string(),
            format!("this GPU has {}", expected.multiprocessors),
            "the file was tuned on another device (or another MIG slice)",
        );
    }
    if found.cublaslt_version != expected.cublaslt_version {
        return differs(
            "cublaslt_version",
            found.cublaslt_version.to_string(),
            format!("this process loaded cuBLASLt {}", expected.cublaslt_version),
            "another cuBLASLt may list other candidates",
        );
    }
    if found.workspace_bytes != expected.workspace_bytes {
        return differs(
            "workspace_bytes",
            found.workspace_bytes.to_string(),
            format!("this build gives cuBLASLt {}", expected.workspace_bytes),
            "the workspace limits the candidates",
        );
    }
    if found.candidates != expected.candidates {
        return differs(
            "candidates",
            found.candidates.to_string(),
            format!("this build asks for {}", expected.candidates),
            "the indexes refer to another list length",
        );
    }
    None
}

fn check_entry(e: &Entry, candidates: usize) -> Result<()> {
    let g = &e.gemm;
    let bad = |what: String| Err(Error::Input(format!("{what} (gemm {g})")));
    // cuBLASLt takes rows and columns as u64, leading dimensions and strides as i64, the batch as
    // i32; far smaller limits still hold every model's shapes.
    let dims = [("m", g.m), ("n", g.n), ("k", g.k), ("batch", g.batch)];
    if let Some((name, v)) = dims.iter().find(|(_, v)| *v == 0 || *v > i32::MAX as usize) {
        return bad(format!("gemm.{name} is {v}; it must be 1 to {}", i32::MAX));
    }
    let b_row = if g.b_transposed { g.k } else { g.n };
    for (name, ld, row) in [("lda", g.lda, g.k), ("ldb", g.ldb, b_row), ("ldc", g.ldc, g.n)] {
        if ld < row || ld > i32::MAX as usize {
            return bad(format!("gemm.{name} is {ld}; it must be {row} (a row's length) to {}", i32::MAX));
        }
    }
    for (name, v) in [("stride_a", g.stride_a), ("stride_b", g.stride_b), ("stride_c", g.stride_c)] {
        if v > i64::MAX as usize / 8 {
            return bad(format!("gemm.{name} is {v}, beyond any device memory"));
        }
    }
    if e.timed == 0 || e.timed > candidates {
        return bad(format!("timed is {}; it must be 1 to candidates ({candidates})", e.timed));
    }
    if e.index >= candidates {
        return bad(format!("index is {}; it must be below candidates ({candidates})", e.index));
    }
    for (name, ms) in [("heuristic_ms", e.heuristic_ms), ("tuned_ms", e.tuned_ms)] {
        if !(ms.is_finite() && ms > 0.0) {
            return bad(format!("{name} is {ms}; it must be a positive number of milliseconds"));
        }
    }
    if e.tuned_ms > e.heuristic_ms {
        return bad(format!(
            "tuned_ms {} is more than heuristic_ms {}: the choice is the fastest candidate timed, heuristic #1 among them",
            e.tuned_ms, e.heuristic_ms
        ));
    }
    Ok(())
}

/// A sort key for a description (file order: by dtype, then size).
fn order(g: &Gemm) -> impl Ord + use<> {
    (
        (g.dtype.kernel_suffix(), g.out_dtype.kernel_suffix(), g.m, g.n, g.k, g.batch, g.b_transposed),
        (g.lda, g.ldb, g.ldc, g.stride_a, g.stride_b, g.stride_c, g.bias),
    )
}

/// A dtype as its name in files ("f16", "bf16", "f32"), for serde's `with`.
pub(crate) mod dtype_name {
    use super::DType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(d.kernel_suffix())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            "f32" => Ok(DType::F32),
            _ => Err(serde::de::Error::custom(format!("unknown dtype \"{name}\" (expected f16, bf16 or f32)"))),
        }
    }
}
