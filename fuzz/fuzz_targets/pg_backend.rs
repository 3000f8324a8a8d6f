//! `cargo fuzz run pg_backend`: see [`agentgate_fuzz::pg_backend`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::pg_backend(data));
