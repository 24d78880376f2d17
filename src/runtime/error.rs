//! What can go wrong running a container, and the exit status each gives.

use crate::vmm;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The bundle or its config.json is unusable.
    #[error("{0}")]
    Bundle(String),
    /// The process cannot be started; `code` is what a shell would exit with.
    #[error("{message}")]
    Exec { message: String, code: i32 },
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    #[error("root filesystem image: {0}")]
    Image(#[from] super::image::ImageError),
    /// The guest agent failed, vanished or broke the protocol.
    #[error("guest agent: {0}")]
    Agent(String),
    /// The microVM ended before the container did.
    #[error("the microVM ended unexpectedly: {0}")]
    VmEnded(String),
    /// The state store refused (an id in use, a status that does not allow it).
    #[error("{0}")]
    State(String),
    /// No container has this id.
    #[error("container does not exist")]
    NotFound(String),
    /// A hook failed (OCI `hooks`).
    #[error("{0}")]
    Hook(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl RuntimeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }

    /// The exit status `skiff` reports for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            RuntimeError::Exec { code, .. } => *code,
            _ => 1,
        }
    }
}
