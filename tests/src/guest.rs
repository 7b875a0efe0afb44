//! Parsers for the test guest's console lines.

use std::collections::HashMap;

/// A guest line that does not have the expected shape.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The line does not start with the expected keyword.
    #[error("expected a line starting with {expected:?}")]
    Keyword {
        /// The keyword.
        expected: &'static str,
    },
    /// A `key=value` field is missing.
    #[error("field {0:?} is missing")]
    Missing(&'static str),
    /// A field's value does not parse.
    #[error("field {field:?} has bad value {value:?}")]
    Value {
        /// The field.
        field: &'static str,
        /// Its text.
        value: String,
    },
}

/// `key=value` fields after the keyword; unknown keys are kept and ignored by the parsers.
fn fields<'a>(
    line: &'a str,
    keyword: &'static str,
) -> Result<HashMap<&'a str, &'a str>, ParseError> {
    let rest = line
        .strip_prefix(keyword)
        .filter(|r| r.is_empty() || r.starts_with(' '))
        .ok_or(ParseError::Keyword { expected: keyword })?;
    Ok(rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect())
}

fn field<T: std::str::FromStr>(
    f: &HashMap<&str, &str>,
    name: &'static str,
) -> Result<T, ParseError> {
    let v = f.get(name).ok_or(ParseError::Missing(name))?;
    v.parse().map_err(|_| ParseError::Value {
        field: name,
        value: (*v).to_owned(),
    })
}

fn hex_field(f: &HashMap<&str, &str>, name: &'static str) -> Result<u64, ParseError> {
    let v = f.get(name).ok_or(ParseError::Missing(name))?;
    u64::from_str_radix(v, 16).map_err(|_| ParseError::Value {
        field: name,
        value: (*v).to_owned(),
    })
}

/// `READY cpus=<n> ram_mib=<m> seed=<16 hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// vCPUs the guest runs on.
    pub cpus: u32,
    /// RAM it filled, in MiB.
    pub ram_mib: u64,
    /// The pattern seed.
    pub seed: u64,
}

impl Ready {
    /// Parses a READY line.
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let f = fields(line, "READY")?;
        Ok(Self {
            cpus: field(&f, "cpus")?,
            ram_mib: field(&f, "ram_mib")?,
            seed: hex_field(&f, "seed")?,
        })
    }
}

/// `COUNTERS hb=<dec> cpus=<n> iters=<a>,<b>,... maxgap_us=<a>,<b>,... fails=<dec> suspends=<dec>
/// seed=<16 hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Heartbeats emitted since boot.
    pub hb: u64,
    /// vCPUs running guest code.
    pub cpus: u32,
    /// Work-loop iterations per vCPU.
    pub iters: Vec<u64>,
    /// Per vCPU, the largest gap the guest's own TSC saw between two loop iterations since boot
    /// or the last `g` (µs); empty from a guest too old to report it.
    pub maxgap_us: Vec<u64>,
    /// Failures the guest detected.
    pub fails: u64,
    /// Times the guest suspended.
    pub suspends: u64,
    /// The pattern seed.
    pub seed: u64,
}

impl Counters {
    /// Parses a COUNTERS line.
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let f = fields(line, "COUNTERS")?;
        let list = |name: &'static str, text: &str| {
            text.split(',')
                .map(str::parse)
                .collect::<Result<Vec<u64>, _>>()
                .map_err(|_| ParseError::Value {
                    field: name,
                    value: text.to_owned(),
                })
        };
        let iters = list("iters", f.get("iters").ok_or(ParseError::Missing("iters"))?)?;
        let maxgap_us = match f.get("maxgap_us") {
            Some(text) => list("maxgap_us", text)?,
            None => Vec::new(),
        };
        Ok(Self {
            hb: field(&f, "hb")?,
            cpus: field(&f, "cpus")?,
            iters,
            maxgap_us,
            fails: field(&f, "fails")?,
            suspends: field(&f, "suspends")?,
            seed: hex_field(&f, "seed")?,
        })
    }

    /// Panics unless `self` (taken later) continues `earlier`: same seed and vCPUs, no counter went back.
    pub fn assert_continues(&self, earlier: &Counters) {
        assert_eq!(
            self.seed, earlier.seed,
            "seed changed: {earlier:?} -> {self:?}"
        );
        assert_eq!(
            self.cpus, earlier.cpus,
            "vCPU count changed: {earlier:?} -> {self:?}"
        );
        assert!(
            self.hb >= earlier.hb,
            "heartbeat counter went back: {earlier:?} -> {self:?}"
        );
        assert_eq!(
            self.iters.len(),
            earlier.iters.len(),
            "{earlier:?} -> {self:?}"
        );
        for (cpu, (now, before)) in self.iters.iter().zip(&earlier.iters).enumerate() {
            assert!(
                now >= before,
                "cpu{cpu} iterations went back: {earlier:?} -> {self:?}"
            );
        }
        assert_eq!(self.fails, 0, "the guest counted failures: {self:?}");
    }
}

/// `VERIFY OK <hex>` or `VERIFY FAIL <detail>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Memory matches the pattern; the hash of all of it.
    Ok(String),
    /// Memory does not match.
    Fail(String),
}

impl Verify {
    /// Parses a VERIFY line.
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let rest = line
            .strip_prefix("VERIFY ")
            .ok_or(ParseError::Keyword { expected: "VERIFY" })?;
        if let Some(hash) = rest.strip_prefix("OK ") {
            let hash = hash.trim();
            if hash.is_empty() || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ParseError::Value {
                    field: "hash",
                    value: hash.to_owned(),
                });
            }
            Ok(Self::Ok(hash.to_owned()))
        } else if let Some(detail) = rest.strip_prefix("FAIL") {
            Ok(Self::Fail(detail.trim().to_owned()))
        } else {
            Err(ParseError::Keyword {
                expected: "VERIFY OK|FAIL",
            })
        }
    }

    /// The hash; panics with the failure detail when verification failed.
    pub fn expect_ok(self) -> String {
        match self {
            Self::Ok(hash) => hash,
            Self::Fail(detail) => panic!("guest memory verification failed: {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line() {
        let r = Ready::parse("READY cpus=2 ram_mib=128 seed=00000000deadbeef").expect("parses");
        assert_eq!(
            r,
            Ready {
                cpus: 2,
                ram_mib: 128,
                seed: 0xdead_beef
            }
        );
        assert_eq!(
            Ready::parse("READY cpus=2 ram_mib=128"),
            Err(ParseError::Missing("seed"))
        );
        assert!(Ready::parse("READYX cpus=1").is_err());
    }

    #[test]
    fn counters_line_and_continuation() {
        let a = Counters::parse(
            "COUNTERS hb=100 cpus=2 iters=5,7 fails=0 suspends=0 seed=0000000000000042",
        )
        .expect("parses");
        assert_eq!(a.iters, [5, 7]);
        assert_eq!(a.seed, 0x42);
        let b = Counters::parse(
            "COUNTERS hb=150 cpus=2 iters=9,7 fails=0 suspends=1 seed=0000000000000042 extra=1",
        )
        .expect("unknown fields are ignored");
        b.assert_continues(&a);
        let went_back = std::panic::catch_unwind(|| a.assert_continues(&b));
        assert!(went_back.is_err(), "a counter going back must be caught");
        assert!(Counters::parse("COUNTERS hb=1 cpus=1 iters=x fails=0 suspends=0 seed=1").is_err());
    }

    #[test]
    fn verify_line() {
        assert_eq!(
            Verify::parse("VERIFY OK 0123456789abcdef"),
            Ok(Verify::Ok("0123456789abcdef".into()))
        );
        assert_eq!(
            Verify::parse("VERIFY FAIL page 0x1000 expected 1 got 2"),
            Ok(Verify::Fail("page 0x1000 expected 1 got 2".into()))
        );
        assert!(Verify::parse("VERIFY OK").is_err());
        assert!(Verify::parse("VERIFY MAYBE").is_err());
    }
}
