//! Migration URIs (`file:PATH`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a migration writes to or reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A state file on the local file system.
    File(PathBuf),
}

/// A URI vmmd cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The scheme is not one vmmd supports.
    #[error("unsupported migration URI scheme {scheme:?} in {uri:?}: use file:PATH")]
    UnknownScheme {
        /// The scheme found.
        scheme: String,
        /// The whole URI.
        uri: String,
    },
    /// No scheme at all.
    #[error("migration URI {0:?} has no scheme: use file:PATH")]
    NoScheme(String),
    /// `file:` without a path.
    #[error("migration URI {0:?} has an empty path: use file:PATH")]
    EmptyPath(String),
}

impl FromStr for MigrationUri {
    type Err = UriError;
    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let Some((scheme, rest)) = uri.split_once(':') else {
            return Err(UriError::NoScheme(uri.to_string()));
        };
        match scheme {
            "file" => {
                if rest.is_empty() {
                    return Err(UriError::EmptyPath(uri.to_string()));
                }
                Ok(MigrationUri::File(PathBuf::from(rest)))
            }
            _ => Err(UriError::UnknownScheme {
                scheme: scheme.to_string(),
                uri: uri.to_string(),
            }),
        }
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_and_refuses_others() {
        assert_eq!(
            "file:/tmp/vm.state".parse::<MigrationUri>(),
            Ok(MigrationUri::File("/tmp/vm.state".into()))
        );
        assert!(matches!(
            "tcp:1.2.3.4:5".parse::<MigrationUri>(),
            Err(UriError::UnknownScheme { .. })
        ));
        assert!(matches!(
            "file:".parse::<MigrationUri>(),
            Err(UriError::EmptyPath(_))
        ));
        assert!(matches!(
            "/tmp/x".parse::<MigrationUri>(),
            Err(UriError::NoScheme(_))
        ));
        assert_eq!(MigrationUri::File("/a".into()).to_string(), "file:/a");
    }
}
