#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsnap_fuzz::fuse_chain(data));
