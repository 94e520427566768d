//! One error type for the crate, and the process exit codes it maps to (README, "Exit codes"):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | `verify`: an output is outside its tolerance or not finite |
//! | 2 | bad input: a file, field, tensor, argument or shape the user supplied, or one the engine refuses by name |
//! | 3 | no CUDA driver or device where one is needed |
//! | 4 | a CUDA driver or library call failed |
//! | 5 | an internal error: a bug in celframe (please report it) |
//! | 130, 143 | `render` stopped by SIGINT or SIGTERM (128 + the signal); run it again to resume |

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: a file, tensor, argument or shape the user supplied. Exit code 2.
    #[error("{0}")]
    Input(String),
    /// Input the engine does not handle (yet); the message names the gap. Exit code 2.
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// No CUDA driver or device, where the command needs one. Exit code 3.
    #[error("no GPU: {0}")]
    NoDevice(String),
    /// A CUDA driver or library call failed; the message names the call and what it ran. Exit code 4.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A CUDA library refused a call before queueing anything (cuBLASLt's
    /// CUBLAS_STATUS_NOT_SUPPORTED, or no algorithm for a shape), so the work can be done another
    /// way; where it cannot, a failed call like `Cuda`. Exit code 4.
    #[error("CUDA: {0}")]
    Refused(String),
    /// The engine broke one of its own rules (a weight it loaded under one name and looked up under
    /// another, say): a bug, not the user's input. Exit code 5.
    #[error("internal error (a bug in celframe): {0}")]
    Internal(String),
    /// A render stopped at a signal's request (`pipeline::resume`); `at` says where. Exit code
    /// 128 + the signal, the shell's convention (130 SIGINT, 143 SIGTERM).
    #[error(
        "{at}: stopped by {}; finished clips and saved latents are kept: run the same command again to resume",
        signal_name(*signal)
    )]
    Interrupted { signal: i32, at: String },
}

fn signal_name(signal: i32) -> String {
    match signal {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Exit code of `verify` when an output is outside its tolerance (or not finite).
pub const EXIT_OUTSIDE_TOLERANCE: u8 = 1;

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Input(_) | Error::Unsupported(_) | Error::Io { .. } => 2,
            Error::NoDevice(_) => 3,
            Error::Cuda(_) | Error::Refused(_) => 4,
            Error::Internal(_) => 5,
            Error::Interrupted { signal, .. } => 128u8.saturating_add((*signal).clamp(0, 127) as u8),
        }
    }
}

impl Error {
    /// The same error, kind and exit code kept, with `prefix` before its message.
    pub fn with_prefix(self, prefix: &str) -> Error {
        match self {
            Error::Input(m) => Error::Input(format!("{prefix}{m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{prefix}{m}")),
            Error::Io { context, source } => Error::Io { context: format!("{prefix}{context}"), source },
            Error::NoDevice(m) => Error::NoDevice(format!("{prefix}{m}")),
            Error::Cuda(m) => Error::Cuda(format!("{prefix}{m}")),
            Error::Refused(m) => Error::Refused(format!("{prefix}{m}")),
            Error::Internal(m) => Error::Internal(format!("{prefix}{m}")),
            Error::Interrupted { signal, at } => Error::Interrupted { signal, at: format!("{prefix}{at}") },
        }
    }
}

/// Shorthand for `Err(Error::Input(format!(...)))`.
#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { Err($crate::error::Error::Input(format!($($arg)*))) };
}
