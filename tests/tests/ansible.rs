//! The Ansible fleet rollout (`deploy/ansible/rollout.yml`) against four "hosts" on this machine
//! (`ansible_connection=local`, a socket directory and a binary path per host), each running one
//! or two vmmd processes with the test guest: a good rollout updates every VM; a broken binary on
//! the second batch's host halts the rollout there, no later host is touched, every guest runs.
//!
//! Needs `ansible-playbook` (ansible-core: `python3 -m pip install ansible-core`; CI installs it).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cpr_tests::cpr::{script, set_mode};
use cpr_tests::fleet::{boot_fleet, FleetVm, VmSpec};
use cpr_tests::{bins, TestDir};

/// Bytes appended to a copy of vmmd to make a distinct "new release" (the loader ignores them).
const V3_MARK: &[u8] = b"\0vmmd-release-3\0";

struct Host {
    name: String,
    socket_dir: PathBuf,
    binary_path: PathBuf,
    vms: Vec<FleetVm>,
}

fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ansible")
}

fn ansible_command() -> Command {
    let mut cmd = Command::new("ansible-playbook");
    cmd.env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("LC_ALL", "C.UTF-8")
        .env("LANG", "C.UTF-8");
    cmd
}

/// Panics with how to install ansible-playbook when it is missing: this test must not pass
/// without running the playbook.
fn require_ansible() {
    match ansible_command().arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "ansible-playbook --version failed ({}): {}; reinstall it: python3 -m pip install \
             ansible-core",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "ansible-playbook cannot be run ({e}): install ansible-core (`python3 -m pip install \
             ansible-core`, as .ci/run does) and make sure ansible-playbook is on PATH"
        ),
    }
}

/// An inventory of `hosts`, each installing `src(host)`.
fn write_inventory(
    dir: &Path,
    file: &str,
    hosts: &[Host],
    src: &dyn Fn(&Host) -> PathBuf,
) -> PathBuf {
    let mut y = String::from("all:\n  vars:\n    ansible_connection: local\n");
    y.push_str("    ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n");
    y.push_str(&format!("    vmmd_cprctl: {}\n", bins::cprctl().display()));
    y.push_str("  children:\n    vmmd_hosts:\n      hosts:\n");
    for h in hosts {
        y.push_str(&format!(
            "        {}:\n          vmmd_socket_dir: {}\n          vmmd_binary_path: {}\n          \
             vmmd_update_src: {}\n",
            h.name,
            h.socket_dir.display(),
            h.binary_path.display(),
            src(h).display()
        ));
    }
    let path = dir.join(file);
    std::fs::write(&path, y).expect("write inventory");
    path
}

fn rollout(inventory: &Path, what: &str) -> (Output, String) {
    let out = ansible_command()
        .arg("-i")
        .arg(inventory)
        .arg(ansible_dir().join("rollout.yml"))
        .current_dir(ansible_dir())
        .output()
        .expect("cannot run ansible-playbook");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let recap = stdout
        .find("PLAY RECAP")
        .map_or_else(|| "<no PLAY RECAP>".to_owned(), |i| stdout[i..].to_owned());
    let fatal: Vec<&str> = stdout.lines().filter(|l| l.starts_with("fatal:")).collect();
    eprintln!(
        "==== {what}: ansible-playbook -> {} ====\n{}\n{recap}",
        out.status,
        fatal.join("\n")
    );
    (out, stdout)
}

fn generations(hosts: &[Host]) -> Vec<u64> {
    hosts
        .iter()
        .flat_map(|h| h.vms.iter().map(|v| v.info().update_generation))
        .collect()
}

#[test]
fn canary_then_batches_and_a_broken_binary_halts_the_rollout() {
    require_ansible();
    let dir = TestDir::new("ansible");
    let layout: [(&str, &[&str]); 4] = [
        ("host1", &["h1-a", "h1-b"]),
        ("host2", &["h2-a"]),
        ("host3", &["h3-a"]),
        ("host4", &["h4-a"]),
    ];
    let mut hosts: Vec<Host> = layout
        .iter()
        .map(|(name, vms)| {
            let root = dir.join(name);
            let socket_dir = root.join("run");
            let bin = root.join("bin");
            std::fs::create_dir_all(&bin).expect("mkdir bin");
            // The host's installed vmmd: what its VMs were started from.
            let binary_path = bin.join("vmmd");
            std::fs::copy(bins::vmmd(), &binary_path).expect("install vmmd");
            let specs: Vec<VmSpec> = vms.iter().map(|v| VmSpec::plain(v)).collect();
            let vms = boot_fleet(&dir, &socket_dir, &specs);
            Host {
                name: (*name).to_owned(),
                socket_dir,
                binary_path,
                vms,
            }
        })
        .collect();

    // A good rollout: every VM of every host runs the installed new binary.
    let v2 = dir.join("vmmd-v2");
    std::fs::copy(bins::vmmd(), &v2).expect("copy vmmd");
    let inv = write_inventory(dir.path(), "good.yml", &hosts, &|_| v2.clone());
    let (out, stdout) = rollout(&inv, "good rollout");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for h in &hosts {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&h.name) && l.contains("failed=0")),
            "{} not in the recap: {stdout}",
            h.name
        );
    }
    assert!(stdout.contains("h1-b: updated, generation 1"), "{stdout}");
    assert_eq!(generations(&hosts), [1, 1, 1, 1, 1]);
    for h in &mut hosts {
        for vm in &mut h.vms {
            let info = vm.assert_runs_intact("after the good rollout");
            assert_eq!(Path::new(&info.executable), h.binary_path, "{}", vm.name);
        }
    }

    // Release 3, with a broken build on host2 (the second batch, with host3): it answers cprctl's
    // questions but is no vmmd (a script that exits 2), so vmmd refuses it before pausing.
    let v3 = dir.join("vmmd-v3");
    std::fs::copy(bins::vmmd(), &v3).expect("copy vmmd");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&v3)
        .and_then(|mut f| f.write_all(V3_MARK))
        .expect("mark release 3");
    set_mode(&v3, 0o755);
    let broken = script(
        dir.path(),
        "vmmd-broken",
        "case \"$1\" in --check-state-version) echo ok;; --version) echo vmmd 0.1.0;; *) exit 2;; esac",
    );
    let inv = write_inventory(dir.path(), "halted.yml", &hosts, &|h| {
        if h.name == "host2" {
            broken.clone()
        } else {
            v3.clone()
        }
    });
    let (out, stdout) = rollout(&inv, "halted rollout");
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("fatal: [host2]"), "{stdout}");
    assert!(
        stdout.contains("h2-a refused"),
        "the failure names the VM: {stdout}"
    );
    let recap = &stdout[stdout.find("PLAY RECAP").expect("recap")..];
    assert!(
        recap
            .lines()
            .any(|l| l.starts_with("host2") && l.contains("failed=1")),
        "{recap}"
    );
    assert!(
        !recap.contains("host4"),
        "host4 must not be touched: {recap}"
    );
    let not_updated = recap
        .find("\"vmmd_not_updated\"")
        .map(|i| {
            recap[i..]
                .split('}')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .collect::<String>()
        })
        .unwrap_or_default();
    assert!(
        not_updated.contains("\"host2\":[\"h2-a\"]"),
        "the recap's custom stats name the host and the VM: {recap}"
    );
    // host1 (canary) and host3 (same batch as host2) run release 3; host2 and host4 do not.
    assert_eq!(generations(&hosts), [2, 2, 1, 2, 1]);
    let has_mark = |p: &Path| std::fs::read(p).expect("read binary").ends_with(V3_MARK);
    assert!(has_mark(&hosts[0].binary_path));
    assert!(has_mark(&hosts[2].binary_path));
    assert!(
        !has_mark(&hosts[3].binary_path),
        "host4's binary was replaced"
    );
    // host2's binary path is back to what its VM runs.
    assert_eq!(
        std::fs::read(&hosts[1].binary_path).expect("read"),
        std::fs::read(&v2).expect("read"),
        "host2's previous vmmd was not put back"
    );
    for h in &mut hosts {
        for vm in &mut h.vms {
            let info = vm.assert_runs_intact("after the halted rollout");
            // A binary replaced under a running VM shows as `PATH (deleted)`; host4's was not.
            let exe = info.executable.trim_end_matches(" (deleted)");
            assert_eq!(Path::new(exe), h.binary_path, "{}", vm.name);
            if h.name == "host4" {
                assert_eq!(Path::new(&info.executable), h.binary_path, "{}", vm.name);
            }
        }
    }
}
