//! What cprctl prints: stable JSON documents (`--json`) and their human renderings.

use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;
use vmmd_proto::v1::{
    event, Event, InfoResponse, MigrationInfo, MigrationMode, MigrationStatus, RunState,
};

/// A result cprctl can print in either format.
pub trait Render: Serialize {
    /// The human-readable form, ending with a newline.
    fn human(&self) -> String;
}

/// Prints `value` as one JSON line (`json`) or in its human form, to `out`.
pub fn print(out: &mut impl Write, value: &impl Render, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, value).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
    } else {
        out.write_all(value.human().as_bytes())?;
    }
    out.flush()
}

/// The lowercase name of a runstate, as printed and as in JSON.
pub fn run_state_name(raw: i32) -> &'static str {
    match RunState::try_from(raw) {
        Ok(RunState::Running) => "running",
        Ok(RunState::Paused) => "paused",
        Ok(RunState::Suspended) => "suspended",
        Ok(RunState::Inmigrate) => "inmigrate",
        Ok(RunState::Postmigrate) => "postmigrate",
        Ok(RunState::Shutdown) => "shutdown",
        Ok(RunState::Unspecified) | Err(_) => "unknown",
    }
}

/// The name of a migration mode, as accepted by `set-mode`.
pub fn mode_name(raw: i32) -> &'static str {
    match MigrationMode::try_from(raw) {
        Ok(MigrationMode::Normal) => "normal",
        Ok(MigrationMode::CprExec) => "cpr-exec",
        Ok(MigrationMode::CprReboot) => "cpr-reboot",
        Ok(MigrationMode::Unspecified) | Err(_) => "unspecified",
    }
}

/// The lowercase name of a migration status.
pub fn migration_status_name(raw: i32) -> &'static str {
    match MigrationStatus::try_from(raw) {
        Ok(MigrationStatus::None) => "none",
        Ok(MigrationStatus::Active) => "active",
        Ok(MigrationStatus::Completed) => "completed",
        Ok(MigrationStatus::Failed) => "failed",
        Err(_) => "unknown",
    }
}

/// `status`: what vmmd says about itself.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// Lowercase runstate.
    pub run_state: &'static str,
    /// vmmd's version.
    pub version: String,
    /// vmmd's process id.
    pub pid: u32,
    /// Milliseconds since vmmd started.
    pub uptime_ms: u64,
    /// The VM's configuration.
    pub config: ConfigView,
    /// The running binary.
    pub executable: String,
    /// State-file format version this vmmd writes.
    pub state_format_version: u32,
    /// Live updates this guest has been through.
    pub update_generation: u64,
    /// The last update step this process saw; `null` when none.
    pub update_status: Option<String>,
    /// Why a cpr-exec update is not possible right now (empty: it is).
    pub cpr_exec_blockers: Vec<String>,
    /// Why cpr-reboot is not possible right now (empty: it is).
    pub cpr_reboot_blockers: Vec<String>,
    /// Those of `cpr_reboot_blockers` that suspending the guest clears (`reboot-prep --suspend`).
    pub cpr_reboot_blockers_cleared_by_suspend: Vec<String>,
    /// The last workflow step an orchestrator reported; `null` when none.
    pub workflow_step: Option<String>,
}

/// The VM configuration part of `status`.
#[derive(Debug, Default, Serialize)]
pub struct ConfigView {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Backing file of guest RAM; `null` for an anonymous memfd.
    pub memory_path: Option<String>,
    /// Guest kernel path.
    pub kernel: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Serial backend as configured.
    pub serial: String,
    /// Pty path when the serial backend is a pty.
    pub serial_pty: Option<String>,
    /// API socket path.
    pub api_socket: String,
    /// `defer`, `file:PATH`, or `null`.
    pub incoming: Option<String>,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<InfoResponse> for StatusView {
    fn from(info: InfoResponse) -> Self {
        let config = info
            .config
            .map_or_else(ConfigView::default, |c| ConfigView {
                vcpus: c.vcpus,
                memory_bytes: c.memory_bytes,
                memory_path: non_empty(c.memory_path),
                kernel: c.kernel,
                cmdline: c.cmdline,
                serial: c.serial,
                serial_pty: non_empty(c.serial_pty),
                api_socket: c.api_socket,
                incoming: non_empty(c.incoming),
            });
        Self {
            run_state: run_state_name(info.run_state),
            version: info.version,
            pid: info.pid,
            uptime_ms: info.uptime_ms,
            config,
            executable: info.executable,
            state_format_version: info.state_format_version,
            update_generation: info.update_generation,
            update_status: non_empty(info.update_status),
            cpr_exec_blockers: info.cpr_exec_blockers,
            cpr_reboot_blockers: info.cpr_reboot_blockers,
            cpr_reboot_blockers_cleared_by_suspend: info.cpr_reboot_blockers_cleared_by_suspend,
            workflow_step: non_empty(info.workflow_step),
        }
    }
}

impl Render for StatusView {
    fn human(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let _ = writeln!(s, "run state:  {}", self.run_state);
        let _ = writeln!(s, "version:    {}", self.version);
        let _ = writeln!(s, "pid:        {}", self.pid);
        let _ = writeln!(s, "uptime:     {}", format_millis(self.uptime_ms));
        if !self.executable.is_empty() {
            let _ = writeln!(s, "executable: {}", self.executable);
        }
        let _ = writeln!(s, "state fmt:  v{}", self.state_format_version);
        let _ = writeln!(s, "updates:    {}", self.update_generation);
        if let Some(status) = &self.update_status {
            let _ = writeln!(s, "update:     {status}");
        }
        if let Some(step) = &self.workflow_step {
            let _ = writeln!(s, "workflow:   {step}");
        }
        if !self.cpr_reboot_blockers.is_empty() {
            let _ = writeln!(s, "cpr-reboot: blocked");
            for b in &self.cpr_reboot_blockers {
                let cleared = self.cpr_reboot_blockers_cleared_by_suspend.contains(b);
                let note = if cleared {
                    " (cleared by reboot-prep --suspend)"
                } else {
                    ""
                };
                let _ = writeln!(s, "  - {b}{note}");
            }
        }
        if self.cpr_exec_blockers.is_empty() {
            let _ = writeln!(s, "cpr-exec:   possible");
        } else {
            let _ = writeln!(s, "cpr-exec:   blocked");
            for b in &self.cpr_exec_blockers {
                let _ = writeln!(s, "  - {b}");
            }
        }
        let _ = writeln!(s, "vcpus:      {}", c.vcpus);
        let backing = c.memory_path.as_deref().unwrap_or("memfd");
        let _ = writeln!(
            s,
            "memory:     {} ({backing})",
            format_bytes(c.memory_bytes)
        );
        let _ = writeln!(s, "kernel:     {}", c.kernel);
        if !c.cmdline.is_empty() {
            let _ = writeln!(s, "cmdline:    {}", c.cmdline);
        }
        match &c.serial_pty {
            Some(pty) => {
                let _ = writeln!(s, "serial:     {} ({pty})", c.serial);
            }
            None => {
                let _ = writeln!(s, "serial:     {}", c.serial);
            }
        }
        let _ = writeln!(s, "api socket: {}", c.api_socket);
        if let Some(incoming) = &c.incoming {
            let _ = writeln!(s, "incoming:   {incoming}");
        }
        s
    }
}

/// `pause`, `resume`, `wakeup`: the runstate after the request.
#[derive(Debug, Serialize)]
pub struct RunStateView {
    /// Lowercase runstate.
    pub run_state: &'static str,
}

impl Render for RunStateView {
    fn human(&self) -> String {
        format!("run state: {}\n", self.run_state)
    }
}

/// `quit`: vmmd accepted the request and is exiting.
#[derive(Debug, Serialize)]
pub struct QuitView {
    /// Always true when printed.
    pub quit: bool,
}

impl Render for QuitView {
    fn human(&self) -> String {
        "vmmd is quitting\n".to_owned()
    }
}

/// `set-mode`: the migration parameters now in force.
#[derive(Debug, Serialize)]
pub struct ModeView {
    /// `normal`, `cpr-exec` or `cpr-reboot`.
    pub mode: &'static str,
    /// cpr-exec: the new binary and its arguments.
    pub exec_args: Vec<String>,
}

impl Render for ModeView {
    fn human(&self) -> String {
        let mut s = format!("migration mode: {}\n", self.mode);
        if !self.exec_args.is_empty() {
            let _ = writeln!(s, "exec:           {}", self.exec_args.join(" "));
        }
        s
    }
}

/// One timed phase of a migration.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseView {
    /// e.g. `pause`, `save-ram`.
    pub name: String,
    /// Duration in microseconds.
    pub micros: u64,
}

/// `migrate`, `migrate-incoming`, `query-migrate`.
#[derive(Debug, Serialize)]
pub struct MigrationView {
    /// `none`, `active`, `completed` or `failed`.
    pub status: &'static str,
    /// The migration mode.
    pub mode: &'static str,
    /// Where the state went or came from.
    pub uri: String,
    /// true for an incoming migration.
    pub incoming: bool,
    /// What went wrong, when `status` is `failed`.
    pub error: Option<String>,
    /// Total duration in microseconds.
    pub total_micros: u64,
    /// Time the vCPUs were stopped, in microseconds.
    pub downtime_micros: u64,
    /// Guest RAM bytes written or read.
    pub ram_bytes: u64,
    /// vCPU/VM/device state bytes written or read.
    pub state_bytes: u64,
    /// Per-phase timings, in order.
    pub phases: Vec<PhaseView>,
}

impl MigrationView {
    /// Whether vmmd reports this migration as failed.
    pub fn failed(&self) -> bool {
        self.status == "failed"
    }
}

impl From<MigrationInfo> for MigrationView {
    fn from(m: MigrationInfo) -> Self {
        Self {
            status: migration_status_name(m.status),
            mode: mode_name(m.mode),
            uri: m.uri,
            incoming: m.incoming,
            error: non_empty(m.error),
            total_micros: m.total_micros,
            downtime_micros: m.downtime_micros,
            ram_bytes: m.ram_bytes,
            state_bytes: m.state_bytes,
            phases: m
                .phases
                .into_iter()
                .map(|p| PhaseView {
                    name: p.name,
                    micros: p.micros,
                })
                .collect(),
        }
    }
}

impl Render for MigrationView {
    fn human(&self) -> String {
        let mut s = String::new();
        if self.status == "none" {
            let _ = writeln!(s, "status:     none (no migration yet)");
            let _ = writeln!(s, "mode:       {}", self.mode);
            return s;
        }
        let direction = if self.incoming {
            "incoming"
        } else {
            "outgoing"
        };
        let _ = writeln!(s, "status:     {} ({direction})", self.status);
        let _ = writeln!(s, "mode:       {}", self.mode);
        if !self.uri.is_empty() {
            let _ = writeln!(s, "uri:        {}", self.uri);
        }
        if let Some(error) = &self.error {
            let _ = writeln!(s, "error:      {error}");
        }
        let _ = writeln!(s, "total:      {}", format_micros(self.total_micros));
        let _ = writeln!(s, "downtime:   {}", format_micros(self.downtime_micros));
        let _ = writeln!(s, "ram:        {}", format_bytes(self.ram_bytes));
        let _ = writeln!(s, "state:      {}", format_bytes(self.state_bytes));
        if !self.phases.is_empty() {
            let _ = writeln!(s, "phases:");
            let width = self.phases.iter().map(|p| p.name.len()).max().unwrap_or(0);
            for p in &self.phases {
                let _ = writeln!(s, "  {:width$}  {}", p.name, format_micros(p.micros));
            }
        }
        s
    }
}

/// One event of the `events` stream.
#[derive(Debug, Serialize)]
pub struct EventView {
    /// When vmmd emitted it, microseconds since the Unix epoch.
    pub timestamp_unix_micros: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKindView,
}

/// The payload of an event.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKindView {
    /// The runstate changed.
    RunState {
        /// Previous runstate.
        old: &'static str,
        /// New runstate.
        new: &'static str,
        /// Why, e.g. `api pause`.
        reason: String,
    },
    /// A migration made progress.
    Migration {
        /// Migration status.
        status: &'static str,
        /// Current phase.
        phase: String,
        /// Bytes done so far.
        bytes_done: u64,
        /// Bytes expected in total.
        bytes_total: u64,
        /// Free-form detail.
        message: String,
        /// true for an incoming migration.
        incoming: bool,
    },
    /// An event kind this cprctl does not know.
    Unknown,
}

impl EventView {
    /// Whether this event says the VM entered `shutdown` (vmmd is about to exit).
    pub fn is_shutdown(&self) -> bool {
        matches!(
            self.kind,
            EventKindView::RunState {
                new: "shutdown",
                ..
            }
        )
    }
}

impl From<Event> for EventView {
    fn from(e: Event) -> Self {
        let kind = match e.kind {
            Some(event::Kind::RunState(r)) => EventKindView::RunState {
                old: run_state_name(r.old),
                new: run_state_name(r.new),
                reason: r.reason,
            },
            Some(event::Kind::Migration(m)) => EventKindView::Migration {
                status: migration_status_name(m.status),
                phase: m.phase,
                bytes_done: m.bytes_done,
                bytes_total: m.bytes_total,
                message: m.message,
                incoming: m.incoming,
            },
            None => EventKindView::Unknown,
        };
        Self {
            timestamp_unix_micros: e.timestamp_unix_micros,
            kind,
        }
    }
}

impl Render for EventView {
    fn human(&self) -> String {
        let secs = self.timestamp_unix_micros / 1_000_000;
        let micros = self.timestamp_unix_micros % 1_000_000;
        let when = format!("{secs}.{micros:06}");
        match &self.kind {
            EventKindView::RunState { old, new, reason } => {
                format!("{when} run-state {old} -> {new} ({reason})\n")
            }
            EventKindView::Migration {
                status,
                phase,
                bytes_done,
                bytes_total,
                message,
                incoming,
            } => {
                let direction = if *incoming { "incoming" } else { "outgoing" };
                let mut line = format!("{when} migration {direction} {status} phase={phase}");
                if *bytes_total > 0 {
                    let _ = write!(line, " {bytes_done}/{bytes_total} bytes");
                }
                if !message.is_empty() {
                    let _ = write!(line, " {message}");
                }
                line.push('\n');
                line
            }
            EventKindView::Unknown => format!("{when} unknown event\n"),
        }
    }
}

/// A failed command, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct ErrorView {
    /// The error.
    pub error: ErrorDetail,
}

/// The detail of [`ErrorView`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// gRPC code name when vmmd returned an error, e.g. `NOT_FOUND`.
    pub code: Option<&'static str>,
    /// The full message.
    pub message: String,
}

impl Render for ErrorView {
    fn human(&self) -> String {
        format!("error: {}\n", self.error.message)
    }
}

/// `1.5 s`, `12.3 ms`, `850 us`.
pub fn format_micros(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.3} s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.3} ms", us as f64 / 1e3)
    } else {
        format!("{us} us")
    }
}

fn format_millis(ms: u64) -> String {
    let (h, m, s, rest) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    if h > 0 {
        format!("{h}h {m}m {s}.{rest:03}s")
    } else if m > 0 {
        format!("{m}m {s}.{rest:03}s")
    } else {
        format!("{s}.{rest:03}s")
    }
}

/// `128 MiB`, `1.50 GiB`, `512 B`.
pub fn format_bytes(b: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = KIB * 1024;
    const GIB: u64 = MIB * 1024;
    match b {
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b if b >= GIB => format!("{:.2} GiB", b as f64 / GIB as f64),
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= MIB => format!("{:.2} MiB", b as f64 / MIB as f64),
        b if b >= KIB => format!("{:.1} KiB", b as f64 / KIB as f64),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use vmmd_proto::v1::{MigrationProgress, Phase, RunStateChanged, VmConfig};

    fn to_json(v: &impl Render) -> Value {
        let mut out = Vec::new();
        print(&mut out, v, true).expect("render JSON");
        assert_eq!(out.last(), Some(&b'\n'), "one JSON document per line");
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        serde_json::from_slice(&out).expect("output is valid JSON")
    }

    #[test]
    fn status_json_has_stable_names_and_lowercase_run_state() {
        let info = InfoResponse {
            run_state: RunState::Running as i32,
            version: "0.1.0".into(),
            pid: 42,
            uptime_ms: 1500,
            config: Some(VmConfig {
                vcpus: 2,
                memory_bytes: 128 << 20,
                memory_path: String::new(),
                kernel: "/k".into(),
                cmdline: String::new(),
                serial: "socket=/c.sock".into(),
                serial_pty: String::new(),
                api_socket: "/a.sock".into(),
                incoming: "defer".into(),
            }),
            cpr_exec_blockers: vec!["RAM is private".into()],
            update_generation: 3,
            executable: "/usr/bin/vmmd".into(),
            state_format_version: 2,
            // Fields added later (update_status, ...) stay at their defaults.
            ..InfoResponse::default()
        };
        let view = StatusView::from(info);
        let human = view.human();
        assert!(
            human.contains("cpr-exec:   blocked\n  - RAM is private\n"),
            "{human}"
        );
        let v = to_json(&view);
        assert_eq!(
            v,
            json!({
                "run_state": "running",
                "version": "0.1.0",
                "pid": 42,
                "uptime_ms": 1500,
                "config": {
                    "vcpus": 2,
                    "memory_bytes": 134217728,
                    "memory_path": null,
                    "kernel": "/k",
                    "cmdline": "",
                    "serial": "socket=/c.sock",
                    "serial_pty": null,
                    "api_socket": "/a.sock",
                    "incoming": "defer",
                },
                "executable": "/usr/bin/vmmd",
                "state_format_version": 2,
                "update_generation": 3,
                "update_status": null,
                "cpr_exec_blockers": ["RAM is private"],
                "cpr_reboot_blockers": [],
                "cpr_reboot_blockers_cleared_by_suspend": [],
                "workflow_step": null,
            })
        );
    }

    #[test]
    fn every_run_state_has_a_lowercase_name() {
        let names: Vec<_> = (0..=7).map(run_state_name).collect();
        assert_eq!(
            names,
            [
                "unknown",
                "running",
                "paused",
                "suspended",
                "inmigrate",
                "postmigrate",
                "shutdown",
                "unknown"
            ]
        );
    }

    #[test]
    fn migration_json_and_human_show_phases_and_downtime() {
        let info = MigrationInfo {
            status: MigrationStatus::Completed as i32,
            mode: MigrationMode::Normal as i32,
            uri: "file:/tmp/vm.state".into(),
            error: String::new(),
            phases: vec![
                Phase {
                    name: "pause".into(),
                    micros: 120,
                },
                Phase {
                    name: "save-ram".into(),
                    micros: 250_000,
                },
            ],
            total_micros: 251_000,
            ram_bytes: 64 << 20,
            state_bytes: 9000,
            downtime_micros: 250_500,
            incoming: false,
        };
        let view = MigrationView::from(info);
        assert!(!view.failed());
        let v = to_json(&view);
        assert_eq!(v["status"], "completed");
        assert_eq!(v["mode"], "normal");
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["downtime_micros"], 250_500);
        assert_eq!(
            v["phases"][1],
            json!({"name": "save-ram", "micros": 250000})
        );
        let human = view.human();
        assert!(
            human.contains("status:     completed (outgoing)"),
            "{human}"
        );
        assert!(human.contains("save-ram  250.000 ms"), "{human}");
        assert!(human.contains("ram:        64 MiB"), "{human}");
    }

    #[test]
    fn events_render_as_tagged_json_lines() {
        let run = EventView::from(Event {
            timestamp_unix_micros: 1_700_000_000_000_001,
            kind: Some(event::Kind::RunState(RunStateChanged {
                old: RunState::Running as i32,
                new: RunState::Paused as i32,
                reason: "api pause".into(),
            })),
        });
        assert_eq!(
            to_json(&run),
            json!({
                "timestamp_unix_micros": 1_700_000_000_000_001u64,
                "type": "run_state",
                "old": "running",
                "new": "paused",
                "reason": "api pause",
            })
        );
        assert_eq!(
            run.human(),
            "1700000000.000001 run-state running -> paused (api pause)\n"
        );
        let mig = EventView::from(Event {
            timestamp_unix_micros: 5,
            kind: Some(event::Kind::Migration(MigrationProgress {
                status: MigrationStatus::Active as i32,
                phase: "save-ram".into(),
                bytes_done: 10,
                bytes_total: 20,
                message: String::new(),
                incoming: false,
            })),
        });
        let v = to_json(&mig);
        assert_eq!(v["type"], "migration");
        assert_eq!(v["status"], "active");
        assert_eq!(v["bytes_done"], 10);
    }

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(format_bytes(256 << 20), "256 MiB");
        assert_eq!(format_bytes(1 << 30), "1 GiB");
        assert_eq!(format_bytes(1536 << 20), "1.50 GiB");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_micros(850), "850 us");
        assert_eq!(format_micros(1_500_000), "1.500 s");
        assert_eq!(format_millis(61_005), "1m 1.005s");
    }
}
