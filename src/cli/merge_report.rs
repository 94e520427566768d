//! `celframe merge-report OUTPUT`: after the shards of a batch (`celframe render --shard`, job
//! arrays), combines their run reports into `configs/run_report.json` and writes the prompt grid.

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::pipeline::batch::merge_reports;

#[derive(Args, Debug)]
pub struct MergeReportArgs {
    /// The outputs tree the shards wrote (the render config's output.root).
    #[arg(value_name = "OUTPUT")]
    pub output: PathBuf,
}

/// Exit 0 when every clip is done or skipped; 2 when a clip failed or was never reached.
pub fn run(args: &MergeReportArgs) -> Result<()> {
    let (report, grid) = merge_reports(&args.output)?;
    eprintln!(
        "merged {} shard report(s): {} clip(s), {} done, {} skipped, {} failed, {} not reached",
        report.merged_shards.unwrap_or(0),
        report.clips.len(),
        report.done,
        report.skipped,
        report.failed,
        report.pending
    );
    if let Some(path) = grid {
        eprintln!("prompt grid: {}", path.display());
    }
    let report_path = args.output.join("configs").join(crate::pipeline::batch::REPORT);
    if report.failed + report.pending > 0 {
        let unfinished: Vec<String> = report
            .clips
            .iter()
            .filter(|c| c.status == "failed" || c.status == "pending")
            .map(|c| format!("{} ({})", c.id, c.status))
            .collect();
        return Err(Error::Input(format!(
            "{}: {} clip(s) not rendered: {}",
            report_path.display(),
            unfinished.len(),
            unfinished.join(", ")
        )));
    }
    eprintln!("report: {}", report_path.display());
    Ok(())
}
