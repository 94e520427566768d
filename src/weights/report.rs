//! One-line reports of a load and an upload, for logs and `--verbose` output.

use std::fmt;

use crate::tensor::DType;

/// What a load read. The tensors are mapped, not read: their pages come in on first use (upload).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    pub tensors: usize,
    /// Bytes of tensor data (headers excluded).
    pub bytes: u64,
    pub files: usize,
    pub seconds: f64,
}

/// What an upload copied to the device, counted after conversion to `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadReport {
    pub tensors: usize,
    pub bytes: u64,
    pub dtype: DType,
    pub seconds: f64,
}

impl UploadReport {
    pub fn gb_per_second(&self) -> f64 {
        if self.seconds > 0.0 { self.bytes as f64 / 1e9 / self.seconds } else { 0.0 }
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("{n} {word}") } else { format!("{n} {word}s") }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loaded {}, {:.2} GB from {} in {:.2} s",
            plural(self.tensors, "tensor"),
            self.bytes as f64 / 1e9,
            plural(self.files, "file"),
            self.seconds
        )
    }
}

impl fmt::Display for UploadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uploaded {}, {:.2} GB as {:?} in {:.2} s ({:.2} GB/s)",
            plural(self.tensors, "tensor"),
            self.bytes as f64 / 1e9,
            self.dtype,
            self.seconds,
            self.gb_per_second()
        )
    }
}
