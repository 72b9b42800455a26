//! Any bytes: parsing never panics, and whatever parses renders to a form
//! that reads back as the same set.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = enabled_plugins::parse("fuzz", data) {
        let text = enabled_plugins::render_starlingx(&set);
        let back = enabled_plugins::parse("rendered", text.as_bytes());
        assert_eq!(back.as_ref(), Ok(&set), "{text}");
    }
});
