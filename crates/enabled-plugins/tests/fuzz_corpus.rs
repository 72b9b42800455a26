//! Replays the fuzz corpus (`fuzz/corpus/parse`) on stable: every input
//! parses or fails cleanly, and whatever parses round-trips through the
//! StarlingX form. `cargo xtask fuzz` grows the corpus.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;

#[test]
fn corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse");
    let mut count = 0;
    let mut parsed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Ok(set) = enabled_plugins::parse("corpus", &data) {
            parsed += 1;
            let text = enabled_plugins::render_starlingx(&set);
            let back = enabled_plugins::parse("rendered", text.as_bytes());
            assert_eq!(back.as_ref(), Ok(&set), "{}: {text}", path.display());
        }
        count += 1;
    }
    assert!(
        count >= 10,
        "the corpus in {} has only {count} inputs",
        dir.display()
    );
    assert!(
        parsed >= 5 && parsed < count,
        "the corpus should hold valid and invalid inputs"
    );
}
