//! Any bytes: the uevent parser never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gpu_discovery::uevent::parse(data);
});
