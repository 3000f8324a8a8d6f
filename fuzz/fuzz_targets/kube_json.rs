//! `cargo fuzz run kube_json`: see [`agentgate_fuzz::kube_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::kube_json(data));
