//! `--serial`: which backend the guest's console goes to, and its parsing.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::ConsoleError;

/// Where the guest's serial console goes, as given with `--serial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackendSpec {
    /// `socket=PATH`: a unix-socket server at PATH, one client at a time.
    Socket(PathBuf),
    /// `file=PATH`: output appended to PATH, no input.
    File(PathBuf),
    /// `pty`: a pseudo-terminal; see [`super::Console::pty_path`].
    Pty,
    /// `null`: output discarded, no input.
    Null,
}

impl FromStr for SerialBackendSpec {
    type Err = ConsoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, path) = match s.split_once('=') {
            Some((kind, path)) => (kind, Some(path)),
            None => (s, None),
        };
        let need_path = |backend: &'static str| match path {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err(ConsoleError::MissingPath { backend }),
        };
        match kind {
            "socket" => Ok(Self::Socket(need_path("socket")?)),
            "file" => Ok(Self::File(need_path("file")?)),
            "pty" | "null" if path.is_some() => Err(ConsoleError::UnexpectedPath {
                backend: if kind == "pty" { "pty" } else { "null" },
            }),
            "pty" => Ok(Self::Pty),
            "null" => Ok(Self::Null),
            _ => Err(ConsoleError::UnknownBackend(s.to_owned())),
        }
    }
}

impl fmt::Display for SerialBackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(p) => write!(f, "socket={}", p.display()),
            Self::File(p) => write!(f, "file={}", p.display()),
            Self::Pty => f.write_str("pty"),
            Self::Null => f.write_str("null"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::Console;

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "socket=/run/vmmd/a.sock",
            "file=/var/log/x.log",
            "pty",
            "null",
        ] {
            let spec: SerialBackendSpec = s.parse().expect("parse");
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "socket=/p".parse::<SerialBackendSpec>().unwrap(),
            SerialBackendSpec::Socket("/p".into())
        );
        assert_eq!(
            "file=a=b".parse::<SerialBackendSpec>().unwrap(),
            SerialBackendSpec::File("a=b".into())
        );
    }

    #[test]
    fn parse_errors() {
        let e = "foo".parse::<SerialBackendSpec>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown serial backend \"foo\": use socket=PATH, file=PATH, pty or null"
        );
        for s in ["socket", "socket=", "file", "file="] {
            assert!(matches!(
                s.parse::<SerialBackendSpec>(),
                Err(ConsoleError::MissingPath { .. })
            ));
        }
        assert!(matches!(
            "pty=/dev/x".parse::<SerialBackendSpec>(),
            Err(ConsoleError::UnexpectedPath { backend: "pty" })
        ));
        assert!(matches!(
            "".parse::<SerialBackendSpec>(),
            Err(ConsoleError::UnknownBackend(_))
        ));
        assert!(matches!(
            Console::open(&SerialBackendSpec::Null, 0),
            Err(ConsoleError::ZeroBuffer)
        ));
    }
}
