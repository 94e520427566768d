//! GPU time by kind of work (`bench --breakdown`): while a profile is open on a `Gpu`, every kernel
//! launch, cuBLASLt matmul and cuDNN convolution is bracketed by two CUDA events on the compute
//! stream and filed under the model part that issued it (a scope such as "motion", opened by the
//! graph code) and its kind (the kernel's name without its dtype suffix, "gemm", "conv"). The
//! events are read once, after the stream finishes, so profiling never makes the stream wait for
//! the host; the brackets themselves cost a few microseconds of launch gaps each, which is why
//! the breakdown runs apart from the timed forwards. A bracket also holds any time the stream
//! waited for the host inside it (a first launch loading its module, or a host that falls behind
//! the GPU), so profile warm forwards of work big enough to keep the stream ahead.

use std::collections::BTreeMap;

use super::timing::Event;
use crate::error::{Error, Result};

/// The marks of an open profile and the scopes currently open.
#[derive(Default)]
pub(super) struct Profile {
    scopes: Vec<&'static str>,
    marks: Vec<Mark>,
    /// File each GEMM under its description (`bench --breakdown-gemms`) instead of "gemm".
    pub(super) gemm_shapes: bool,
    /// The shape and floating-point operations of the next launch, to file it under its kind and
    /// shape (`Gpu::describe_next_launch`, under `gemm_shapes`).
    pub(super) next_shape: Option<(String, f64)>,
}

struct Mark {
    scope: String,
    kind: String,
    /// Floating-point operations of the work (0 where the launcher does not say).
    flop: f64,
    start: Event,
    end: Event,
}

/// One (scope, kind) line of a finished profile.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    /// The open scopes joined by '/', or "" outside every scope.
    pub scope: String,
    pub kind: String,
    pub launches: usize,
    pub ms: f64,
    /// Floating-point operations of its launches (0 where unknown: GEMMs, convolutions and the
    /// launches described by shape say).
    pub flop: f64,
}

/// "group_norm_f16" -> "group_norm": the kind of a kernel whatever dtype it was built for.
pub(super) fn kernel_kind(kernel: &str) -> &str {
    ["_f16", "_bf16", "_f32"].iter().find_map(|s| kernel.strip_suffix(s)).unwrap_or(kernel)
}

/// A launch's kind and FLOPs, with the shape (and its FLOPs) described for it, if any.
fn described(kind: &str, flop: f64, shape: Option<(String, f64)>) -> (String, f64) {
    match shape {
        Some((shape, shape_flop)) => (format!("{kind} {shape}"), flop.max(shape_flop)),
        None => (kind.to_string(), flop),
    }
}

impl Profile {
    pub(super) fn by_gemm_shape() -> Profile {
        Profile { gemm_shapes: true, ..Profile::default() }
    }

    pub(super) fn push_scope(&mut self, name: &'static str) {
        self.scopes.push(name);
    }
    pub(super) fn pop_scope(&mut self) {
        self.scopes.pop();
    }

    /// Files the work between `start` and `end` (`flop` operations, 0 if unknown) under the open
    /// scopes and `kind`.
    pub(super) fn push(&mut self, kind: &str, flop: f64, start: Event, end: Event) {
        let (kind, flop) = described(kind, flop, self.next_shape.take());
        self.marks.push(Mark { scope: self.scopes.join("/"), kind, flop, start, end });
    }

    /// The marks' times summed per (scope, kind), sorted by scope then by time, largest first. The
    /// stream must have finished (the caller synchronises).
    pub(super) fn rows(self) -> Result<Vec<ProfileRow>> {
        let mut sums: BTreeMap<(String, String), (usize, f64, f64)> = BTreeMap::new();
        for m in self.marks {
            let ms = m.start.elapsed_ms(&m.end)?;
            let e = sums.entry((m.scope, m.kind)).or_default();
            e.0 += 1;
            e.1 += ms as f64;
            e.2 += m.flop;
        }
        let mut rows: Vec<ProfileRow> = sums
            .into_iter()
            .map(|((scope, kind), (launches, ms, flop))| ProfileRow { scope, kind, launches, ms, flop })
            .collect();
        rows.sort_by(|a, b| a.scope.cmp(&b.scope).then(b.ms.total_cmp(&a.ms)));
        Ok(rows)
    }
}

/// The rows as a table: per scope its kinds, their launches, milliseconds, share of the scope and
/// of everything profiled and TFLOP/s (where the launches said their work), then each scope's total.
pub fn format_rows(rows: &[ProfileRow]) -> Result<String> {
    use std::fmt::Write;
    let total: f64 = rows.iter().map(|r| r.ms).sum();
    if rows.is_empty() || total <= 0.0 {
        return Err(Error::Internal("the profile recorded no GPU work".into()));
    }
    let mut scopes: BTreeMap<&str, f64> = BTreeMap::new();
    for r in rows {
        *scopes.entry(&r.scope).or_default() += r.ms;
    }
    let mut s = String::new();
    let name = |scope: &str| if scope.is_empty() { "(outside scopes)".to_string() } else { scope.to_string() };
    let rate = |flop: f64, ms: f64| if flop > 0.0 && ms > 0.0 { format!("{:.0}", flop / ms / 1e9) } else { "-".into() };
    let _ = writeln!(s, "| scope | kind | launches | ms | share of scope | share of all | TFLOP/s |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in rows {
        let of_scope = scopes[r.scope.as_str()];
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.1}% | {:.1}% | {} |",
            name(&r.scope),
            r.kind,
            r.launches,
            r.ms,
            100.0 * r.ms / of_scope,
            100.0 * r.ms / total,
            rate(r.flop, r.ms)
        );
    }
    for (scope, ms) in &scopes {
        let launches: usize = rows.iter().filter(|r| r.scope == *scope).map(|r| r.launches).sum();
        let _ = writeln!(s, "| {} | all | {launches} | {ms:.3} | 100% | {:.1}% | - |", name(scope), 100.0 * ms / total);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::{ProfileRow, described, format_rows, kernel_kind};

    #[test]
    fn a_described_launch_carries_its_shape_and_flops() {
        let shape = Some(("b32 h10 2304x2304".to_string(), 4.35e11));
        let (kind, flop) = described("flash_attention_wspp3_persistent_d64", 0.0, shape);
        assert_eq!(kind, "flash_attention_wspp3_persistent_d64 b32 h10 2304x2304");
        assert_eq!(flop, 4.35e11);
        assert_eq!(described("gemm", 2.0e9, None), ("gemm".to_string(), 2.0e9));
    }

    #[test]
    fn kinds_drop_the_dtype_suffix_only() {
        assert_eq!(kernel_kind("group_norm_f16"), "group_norm");
        assert_eq!(kernel_kind("flash_attention_bf16"), "flash_attention");
        assert_eq!(kernel_kind("layer_norm_f32"), "layer_norm");
        assert_eq!(kernel_kind("gemm"), "gemm");
        assert_eq!(kernel_kind("f16_first"), "f16_first");
    }

    #[test]
    fn table_shares_add_up_per_scope() {
        let row = |scope: &str, kind: &str, launches, ms, flop| ProfileRow {
            scope: scope.into(),
            kind: kind.into(),
            launches,
            ms,
            flop,
        };
        let rows = [
            row("", "conv", 4, 30.0, 0.0),
            row("motion", "gemm", 10, 7.5, 3e12),
            row("motion", "layer_norm", 5, 2.5, 0.0),
        ];
        let t = format_rows(&rows).unwrap();
        assert!(t.contains("| motion | gemm | 10 | 7.500 | 75.0% | 18.8% | 400 |"), "{t}");
        assert!(t.contains("| (outside scopes) | conv | 4 | 30.000 | 100.0% | 75.0% | - |"), "{t}");
        assert!(t.contains("| motion | all | 15 | 10.000 | 100% | 25.0% | - |"), "{t}");
        assert!(format_rows(&[]).is_err());
    }
}
