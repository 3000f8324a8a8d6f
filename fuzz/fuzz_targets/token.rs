//! `cargo fuzz run token`: see [`agentgate_fuzz::token`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::token(data));
