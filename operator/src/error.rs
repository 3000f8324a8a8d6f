//! The operator's one error type.

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A finalizer could not be applied or removed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// An object could not be (de)serialized.
    #[error("serialization: {0}")]
    Serde(#[from] serde_json::Error),
    /// Certificates could not be generated or loaded.
    #[error("certificates: {0}")]
    Cert(String),
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// An object is missing a field the operator needs.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(_) => "finalizer",
            Self::Serde(_) => "serde",
            Self::Cert(_) => "cert",
            Self::Config(_) => "config",
            Self::Io { .. } => "io",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
