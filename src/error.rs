//! One error type for the crate. `Input` is the user's fault (bad file, bad argument, bad shape)
//! and maps to exit code 2; everything else is an engine or device failure.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: a file, tensor, argument or shape the user supplied. Exit code 2.
    #[error("{0}")]
    Input(String),
    /// A CUDA driver or library call failed; the message names the call and what it ran.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// Something the engine does not do yet; the message names the gap.
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) | Error::Io { .. } => 2,
            _ => 1,
        }
    }
}

/// Shorthand for `Err(Error::Input(format!(...)))`.
#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { Err($crate::error::Error::Input(format!($($arg)*))) };
}
