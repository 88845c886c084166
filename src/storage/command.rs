//! Running the system tools the image backend relies on (util-linux,
//! e2fsprogs, xfsprogs), with their output captured for error messages.

use std::process::{Command, Stdio};

/// A system tool that failed or could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{program} could not be started: {source} (is it installed?)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed {
        command: String,
        status: String,
        code: Option<i32>,
        stderr: String,
    },
}

impl CommandError {
    /// The exit code, when the tool ran and exited.
    pub fn code(&self) -> Option<i32> {
        match self {
            CommandError::Failed { code, .. } => *code,
            CommandError::Spawn { .. } => None,
        }
    }

    /// The captured standard error, empty when the tool did not start.
    pub fn stderr(&self) -> &str {
        match self {
            CommandError::Failed { stderr, .. } => stderr,
            CommandError::Spawn { .. } => "",
        }
    }
}

/// Runs `program args…`, returning its standard output on success.
pub fn run(program: &str, args: &[&str]) -> Result<String, CommandError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| CommandError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(CommandError::Failed {
        command: std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" "),
        status: out.status.to_string(),
        code: out.status.code(),
        stderr,
    })
}
