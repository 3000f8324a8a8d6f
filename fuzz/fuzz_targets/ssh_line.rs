//! `cargo fuzz run ssh_line`: see [`agentgate_fuzz::ssh_line`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::ssh_line(data));
