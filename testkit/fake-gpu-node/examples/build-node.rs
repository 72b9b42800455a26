//! Builds a fake node in a directory: `build-node DIR [SPEC.toml|SPEC.json]`
//! (default: the StarlingX edge server).

use std::path::PathBuf;
use std::process::ExitCode;

use fake_gpu_node::{FakeNode, NodeSpec};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, spec) = match args.as_slice() {
        [dir] => (PathBuf::from(dir), NodeSpec::starlingx_edge()),
        [dir, spec] => match NodeSpec::load(std::path::Path::new(spec)) {
            Ok(s) => (PathBuf::from(dir), s),
            Err(e) => {
                eprintln!("build-node: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => {
            eprintln!("usage: build-node DIR [SPEC.toml|SPEC.json]");
            return ExitCode::from(2);
        }
    };
    match FakeNode::build(&dir, &spec) {
        Ok(node) => {
            println!(
                "sysfs: {}\ndevfs: {}",
                node.sysfs_root().display(),
                node.devfs_root().display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("build-node: {e}");
            ExitCode::FAILURE
        }
    }
}
