#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsnap_fuzz::diff_decode(data));
