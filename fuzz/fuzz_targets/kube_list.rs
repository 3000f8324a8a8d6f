//! `cargo fuzz run kube_list`: see [`agentgate_fuzz::kube_list`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate_fuzz::kube_list(data));
