//! `cargo fuzz run pg_frontend`: see [`agentgate_fuzz::pg_frontend`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::pg_frontend(data));
