//! `cargo fuzz run manifests`: see [`agentgate_fuzz::manifests`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::manifests(data));
