//! Resident memory of a process, with guest RAM left out.

use std::path::Path;

/// Name of the memfd vmmd backs guest RAM with.
pub const GUEST_RAM_MEMFD: &str = "vmmd-guest-ram";

/// Resident bytes of all mappings in `smaps` text except those of guest RAM.
///
/// Guest RAM is the `/memfd:vmmd-guest-ram` mapping, or `ram_path` when RAM is file-backed.
pub fn rss_excluding_guest_ram(smaps: &str, ram_path: Option<&Path>) -> u64 {
    let ram_path = ram_path.map(|p| p.to_string_lossy().into_owned());
    let mut total_kib = 0u64;
    let mut is_ram = false;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Rss:") {
            if !is_ram {
                let kib = rest.trim().trim_end_matches("kB").trim();
                total_kib += kib.parse::<u64>().unwrap_or(0);
            }
        } else if is_mapping_header(line) {
            // address perms offset dev inode [path]
            let path = line.split_whitespace().nth(5).unwrap_or("");
            let path = line
                .find(path)
                .filter(|_| !path.is_empty())
                .map_or("", |i| line[i..].trim_end());
            is_ram = path.contains(GUEST_RAM_MEMFD)
                || ram_path
                    .as_deref()
                    .is_some_and(|p| path == p || path.strip_suffix(" (deleted)") == Some(p));
        }
    }
    total_kib * 1024
}

fn is_mapping_header(line: &str) -> bool {
    let Some(range) = line.split_whitespace().next() else {
        return false;
    };
    range.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty()
            && a.bytes().all(|c| c.is_ascii_hexdigit())
            && b.bytes().all(|c| c.is_ascii_hexdigit())
    })
}

/// [`rss_excluding_guest_ram`] of the live process `pid`.
pub fn process_rss_excluding_guest_ram(pid: u32, ram_path: Option<&Path>) -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(rss_excluding_guest_ram(&smaps, ram_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 fd:01 1234  /usr/bin/vmmd
Size:               1024 kB
Rss:                 800 kB
Pss:                 800 kB
7f0000000000-7f0004000000 rw-s 00000000 00:01 99   /memfd:vmmd-guest-ram (deleted)
Size:              65536 kB
Rss:               65536 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 200 kB
7f2000000000-7f2004000000 rw-s 00000000 00:2a 77   /dev/shm/vm 1.ram
Rss:               65536 kB
VmFlags: rd wr sh mr mw me ms sd
";

    #[test]
    fn guest_ram_mappings_are_left_out() {
        // memfd RAM excluded; the file mapping counts unless it is the RAM path.
        assert_eq!(
            rss_excluding_guest_ram(SAMPLE, None),
            (800 + 200 + 65536) * 1024
        );
        assert_eq!(
            rss_excluding_guest_ram(SAMPLE, Some(Path::new("/dev/shm/vm 1.ram"))),
            (800 + 200) * 1024
        );
    }

    #[test]
    fn own_process_has_some_resident_memory() {
        let rss = process_rss_excluding_guest_ram(std::process::id(), None).expect("read smaps");
        assert!(rss > 0);
    }
}
