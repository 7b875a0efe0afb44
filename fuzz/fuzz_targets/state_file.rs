//! Fuzzes the state-file parser: any byte string must give a VM state or a clean error, never a panic,
//! an abort or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmmd::state::parse_state_file(data);
});
