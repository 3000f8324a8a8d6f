//! `cargo fuzz run sql_classify`: see [`agentgate_fuzz::sql_classify`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::sql_classify(data));
