//! The uevent parser: round trips and arbitrary bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use gpu_discovery::uevent::{Origin, kernel_message, parse, udev_message};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = String> {
    "[A-Z_][A-Z0-9_]{0,15}"
}
fn value() -> impl Strategy<Value = String> {
    "[^\\x00]{0,40}"
}

proptest! {
    #[test]
    fn kernel_round_trip(action in "[a-z]{1,8}", devpath in "/[a-z0-9:./_-]{0,60}", props in proptest::collection::btree_map(key(), value(), 0..12)) {
        let pairs: Vec<(&str, &str)> = props
            .iter()
            .filter(|(k, _)| k.as_str() != "ACTION" && k.as_str() != "DEVPATH")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let e = parse(&kernel_message(&action, &devpath, &pairs)).unwrap();
        prop_assert_eq!(e.origin, Origin::Kernel);
        prop_assert_eq!(&e.devpath, &devpath);
        for (k, v) in pairs {
            prop_assert_eq!(e.properties.get(k).map(String::as_str), Some(v));
        }
    }

    #[test]
    fn udev_round_trip(props in proptest::collection::btree_map(key(), value(), 0..12)) {
        let mut pairs: Vec<(&str, &str)> = vec![("ACTION", "change"), ("DEVPATH", "/devices/x")];
        pairs.extend(props.iter().filter(|(k, _)| k.as_str() != "ACTION" && k.as_str() != "DEVPATH").map(|(k, v)| (k.as_str(), v.as_str())));
        let e = parse(&udev_message(&pairs)).unwrap();
        prop_assert_eq!(e.origin, Origin::Udev);
        prop_assert_eq!(e.devpath.as_str(), "/devices/x");
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&bytes);
        let mut udev = b"libudev\0".to_vec();
        udev.extend_from_slice(&bytes);
        let _ = parse(&udev);
    }
}

#[test]
fn fuzz_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/uevent");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let _ = parse(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 4, "{}: {n} inputs", dir.display());
}
