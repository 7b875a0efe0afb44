//! The new vmmd's command line: the VM as Info describes it, the flags carried over from the
//! running vmmd, and how the new process comes in.

use std::fmt::Write as _;
use std::path::Path;

use vmmd_proto::v1::InfoResponse;

use super::Load;

/// vmmd flags that do not shape the VM but should stay as they were on the new process.
const CARRIED_FLAGS_WITH_VALUE: &[&str] = &[
    "--log-level",
    "--cpr-incoming-timeout",
    "--device",
    "--vfio-model",
    "--populate-after-load",
    "--cpr-exec-bridge",
];
/// Switches carried over to the new process.
const CARRIED_SWITCHES: &[&str] = &[
    "--log-json",
    "--only-cpr-capable",
    "--vfio-model-without-vaddr",
];

/// The version in `vmmd --version` output (`vmmd 0.1.0` → `0.1.0`).
pub fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .next()?
        .split_whitespace()
        .last()
        .map(str::to_owned)
}

/// vmmd's command line, from /proc (empty when it cannot be read: another host or user).
pub(super) fn read_cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The flags of a running vmmd's command line that the new one should keep (log settings, policy);
/// the VM-shaping ones come from Info instead.
pub fn carried_flags(cmdline: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = cmdline.iter().skip(1);
    while let Some(a) = it.next() {
        if CARRIED_SWITCHES.contains(&a.as_str()) {
            out.push(a.clone());
        } else if CARRIED_FLAGS_WITH_VALUE.contains(&a.as_str()) {
            if let Some(v) = it.next() {
                out.push(a.clone());
                out.push(v.clone());
            }
        } else if CARRIED_FLAGS_WITH_VALUE
            .iter()
            .any(|f| a.strip_prefix(f).is_some_and(|r| r.starts_with('=')))
        {
            out.push(a.clone());
        }
    }
    out
}

/// The new vmmd's argv: NEW, the VM as Info describes it, carried flags, and how to come in.
pub fn new_command_line(
    binary: &Path,
    info: &InfoResponse,
    state: &Path,
    load: Load,
    incoming_deadline: u64,
    carried: &[String],
    extra: &[String],
) -> Vec<String> {
    let mut argv = vec![binary.display().to_string()];
    let config = info.config.clone().unwrap_or_default();
    argv.extend(["--api-socket".to_owned(), config.api_socket.clone()]);
    if !config.kernel.is_empty() {
        argv.extend(["--kernel".to_owned(), config.kernel.clone()]);
    }
    if !config.cmdline.is_empty() {
        argv.extend(["--cmdline".to_owned(), config.cmdline.clone()]);
    }
    argv.extend(["--vcpus".to_owned(), config.vcpus.to_string()]);
    let mut memory = format!("size={}", config.memory_bytes);
    if !config.memory_path.is_empty() {
        let _ = write!(memory, ",path={}", config.memory_path);
    }
    argv.extend(["--memory".to_owned(), memory]);
    if !config.serial.is_empty() {
        argv.extend(["--serial".to_owned(), config.serial.clone()]);
    }
    let mut carried = carried.to_vec();
    if load == Load::Deferred {
        // This update's deadline replaces the running vmmd's.
        let mut keep = Vec::new();
        let mut it = carried.iter();
        while let Some(a) = it.next() {
            if a == "--cpr-incoming-timeout" {
                it.next();
            } else if !a.starts_with("--cpr-incoming-timeout=") {
                keep.push(a.clone());
            }
        }
        carried = keep;
    }
    argv.extend(carried);
    match load {
        Load::AtStart => {
            argv.extend(["--incoming".to_owned(), format!("file:{}", state.display())]);
        }
        Load::Deferred => {
            argv.extend([
                "--incoming".to_owned(),
                "defer".to_owned(),
                "--cpr-incoming-timeout".to_owned(),
                incoming_deadline.to_string(),
            ]);
        }
    }
    argv.extend(extra.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmd_proto::v1::{RunState, VmConfig};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn info() -> InfoResponse {
        InfoResponse {
            run_state: RunState::Running as i32,
            version: "0.1.0".into(),
            pid: 42,
            config: Some(VmConfig {
                vcpus: 2,
                memory_bytes: 256 << 20,
                memory_path: String::new(),
                kernel: "/k".into(),
                serial: "socket=/run/c.sock".into(),
                api_socket: "/run/api.sock".into(),
                ..VmConfig::default()
            }),
            state_format_version: 1,
            ..InfoResponse::default()
        }
    }

    #[test]
    fn new_command_line_rebuilds_the_vm_and_comes_in_from_the_state() {
        let argv = new_command_line(
            Path::new("/new/vmmd"),
            &info(),
            Path::new("/run/api.sock.cpr-state"),
            Load::AtStart,
            10,
            &s(&["--log-level", "debug"]),
            &[],
        );
        assert_eq!(
            argv,
            s(&[
                "/new/vmmd",
                "--api-socket",
                "/run/api.sock",
                "--kernel",
                "/k",
                "--vcpus",
                "2",
                "--memory",
                "size=268435456",
                "--serial",
                "socket=/run/c.sock",
                "--log-level",
                "debug",
                "--incoming",
                "file:/run/api.sock.cpr-state",
            ])
        );
        let mut file_backed = info();
        if let Some(c) = file_backed.config.as_mut() {
            c.memory_path = "/dev/shm/vm.ram".into();
        }
        let argv = new_command_line(
            Path::new("/new/vmmd"),
            &file_backed,
            Path::new("/st"),
            Load::Deferred,
            7,
            &s(&["--cpr-incoming-timeout", "30"]),
            &s(&["--fault-inject", "fail-load"]),
        );
        assert!(
            argv.contains(&"size=268435456,path=/dev/shm/vm.ram".to_owned()),
            "{argv:?}"
        );
        let tail = &argv[argv.len() - 6..];
        assert_eq!(
            tail,
            s(&[
                "--incoming",
                "defer",
                "--cpr-incoming-timeout",
                "7",
                "--fault-inject",
                "fail-load"
            ])
        );
        assert_eq!(
            argv.iter()
                .filter(|a| *a == "--cpr-incoming-timeout")
                .count(),
            1,
            "the update's deadline replaces the old one: {argv:?}"
        );
    }

    #[test]
    fn only_policy_and_log_flags_are_carried() {
        let cmd = s(&[
            "vmmd",
            "--api-socket",
            "/a",
            "--log-level=debug",
            "--log-json",
            "--incoming",
            "file:/x",
            "--fault-inject",
            "crash-during-load",
            "--only-cpr-capable",
            "--cpr-incoming-timeout",
            "5",
        ]);
        assert_eq!(
            carried_flags(&cmd),
            s(&[
                "--log-level=debug",
                "--log-json",
                "--only-cpr-capable",
                "--cpr-incoming-timeout",
                "5"
            ])
        );
        assert!(carried_flags(&[]).is_empty());
    }

    #[test]
    fn version_is_the_last_word_of_the_first_line() {
        assert_eq!(parse_version("vmmd 0.1.0\n"), Some("0.1.0".into()));
        assert_eq!(parse_version("vmmd 0.1.0+alt"), Some("0.1.0+alt".into()));
        assert_eq!(parse_version(""), None);
    }
}
