//! Checks an enabled-plugins file.
//!
//! `cargo run -p enabled-plugins --example check -- FILE` prints the file's
//! content in the normalised StarlingX form and exits 0, or prints the
//! error (naming the file and the position) and exits 1. Usage errors exit 2.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file] = args.as_slice() else {
        eprintln!("usage: check FILE");
        return ExitCode::from(2);
    };
    let path = PathBuf::from(file);
    match enabled_plugins::read_file(&path) {
        Ok(set) => {
            println!("{}", enabled_plugins::render_starlingx(&set));
            match set.gpu_plugin() {
                Some(label) => eprintln!("the GPU plugin is enabled with label {label}"),
                None => eprintln!("the GPU plugin is not enabled"),
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", ops_kit::Chain(&error));
            ExitCode::FAILURE
        }
    }
}
