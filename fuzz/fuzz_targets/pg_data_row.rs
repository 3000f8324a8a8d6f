//! `cargo fuzz run pg_data_row`: see [`agentgate_fuzz::pg_data_row`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::pg_data_row(data));
