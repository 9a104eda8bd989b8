#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::new_layer::run(data));
