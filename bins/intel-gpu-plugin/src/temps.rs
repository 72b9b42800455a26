//! GPU temperatures from hwmon, without waking a sleeping GPU: reading a
//! `temp*_input` resumes a runtime-suspended i915 or xe device (the
//! drivers take a runtime-PM reference for the read), so a 5 s poll would
//! keep a discrete GPU out of D3 for good. A device whose
//! `power/runtime_status` says `suspended` or `suspending` is not read.

use std::collections::BTreeMap;
use std::path::Path;

use gpu_discovery::Inventory;

/// One card's reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// The hottest input, °C.
    Celsius(f64),
    /// Runtime-suspended: left asleep, not read.
    Suspended,
    /// No input could be read (the reason).
    Unreadable(String),
}

/// The PCI function's directory of a hwmon input
/// (`<dev>/hwmon/hwmonN/tempM_input`).
fn device_of(input: &Path) -> Option<&Path> {
    input.parent()?.parent()?.parent()
}

/// Reads every card that has hwmon inputs. Blocking: run it off the async
/// workers.
#[must_use]
pub fn read(inventory: &Inventory) -> BTreeMap<u32, Reading> {
    let mut out = BTreeMap::new();
    for gpu in &inventory.gpus {
        let Some(first) = gpu.temperature_inputs.first() else {
            continue;
        };
        // Read as sysfs is read everywhere: capped, and never blocking on
        // a FIFO or device planted at the name.
        let status = device_of(first)
            .and_then(|d| gpu_discovery::read_attribute(&d.join("power/runtime_status")).ok());
        if matches!(status.as_deref(), Some("suspended" | "suspending")) {
            out.insert(gpu.index, Reading::Suspended);
            continue;
        }
        let mut hottest: Option<f64> = None;
        let mut last_error = String::new();
        for input in &gpu.temperature_inputs {
            match gpu_discovery::read_attribute(input) {
                Ok(text) => match text.parse::<f64>() {
                    Ok(milli) => {
                        let c = milli / 1000.0;
                        hottest = Some(hottest.map_or(c, |h| h.max(c)));
                    }
                    Err(_) => last_error = format!("{} holds {text:?}", input.display()),
                },
                Err(e) => last_error = e.to_string(),
            }
        }
        out.insert(
            gpu.index,
            hottest.map_or(Reading::Unreadable(last_error), Reading::Celsius),
        );
    }
    out
}

/// The readings the plan uses: °C where read.
#[must_use]
pub fn celsius(readings: &BTreeMap<u32, Reading>) -> BTreeMap<u32, f64> {
    readings
        .iter()
        .filter_map(|(card, r)| match r {
            Reading::Celsius(c) => Some((*card, *c)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
    use gpu_discovery::{DiscoveryConfig, scan};

    #[test]
    fn suspended_gpus_are_not_read_and_garbage_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let mut hot = GpuSpec::new(0);
        hot.temperature_mdeg = Some(71_500);
        let mut asleep = GpuSpec::new(1).at("0000:04:00.0");
        asleep.temperature_mdeg = Some(40_000);
        let mut broken = GpuSpec::new(2).at("0000:05:00.0");
        broken.temperature_mdeg = Some(40_000);
        let node = FakeNode::build(
            dir.path(),
            &NodeSpec {
                name: "t".into(),
                gpus: vec![hot, asleep, broken],
            },
        )
        .unwrap();
        node.set_attribute(1, "power/runtime_status", "suspended\n")
            .unwrap();
        node.set_attribute(0, "power/runtime_status", "active\n")
            .unwrap();
        let inv = scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap();
        let input = inv.card("card2").unwrap().temperature_inputs[0].clone();
        std::fs::write(&input, "hot\n").unwrap();
        let r = read(&inv);
        assert_eq!(r[&0], Reading::Celsius(71.5));
        assert_eq!(r[&1], Reading::Suspended);
        assert!(
            matches!(&r[&2], Reading::Unreadable(why) if why.contains("\"hot\"")),
            "{r:?}"
        );
        assert_eq!(celsius(&r), BTreeMap::from([(0, 71.5)]));
    }

    /// A FIFO planted at a hwmon input or at `power/runtime_status` is
    /// refused, naming it, instead of blocking the reader (the old
    /// `read_to_string` waited for a writer for ever).
    #[test]
    fn a_fifo_at_an_input_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut hot = GpuSpec::new(0);
        hot.temperature_mdeg = Some(71_500);
        let node = FakeNode::build(
            dir.path(),
            &NodeSpec {
                name: "t".into(),
                gpus: vec![hot],
            },
        )
        .unwrap();
        let inv = scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap();
        let input = inv.card("card0").unwrap().temperature_inputs[0].clone();
        let status = device_of(&input).unwrap().join("power/runtime_status");
        for fifo in [&status, &input] {
            let _ = std::fs::remove_file(fifo);
            std::fs::create_dir_all(fifo.parent().unwrap()).unwrap();
            // coreutils' mkfifo(1): no new dependency for one test.
            let made = std::process::Command::new("mkfifo")
                .arg(fifo)
                .status()
                .unwrap();
            assert!(made.success());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read(&inv));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading hwmon blocked on a FIFO");
        assert!(
            matches!(&r[&0], Reading::Unreadable(why) if why.contains("not a regular file")
                && why.contains(&*input.to_string_lossy())),
            "{r:?}"
        );
    }
}
