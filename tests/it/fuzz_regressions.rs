//! Replays every input kept in `fuzz/regressions/<target>/` (crashes and
//! failures the fuzz targets found, plus hand-written edge cases) through
//! the same checks the targets run, so a fixed bug stays fixed without
//! a nightly toolchain. Fuzzing itself: fuzz/README.md.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no inputs in {}", dir.display());
    for input in inputs {
        let data = std::fs::read(&input).unwrap();
        eprintln!("{target}: {}", input.display());
        check(&data);
    }
}

#[test]
fn config_inputs() {
    replay("config", checks::config);
}

#[test]
fn expiry_inputs() {
    replay("expiry", checks::expiry);
}

#[test]
fn dates_inputs() {
    replay("dates", checks::dates);
}

#[test]
fn forwarding_inputs() {
    replay("forwarding", checks::forwarding);
}

#[test]
fn canonical_inputs() {
    replay("canonical", checks::canonical);
}

#[test]
fn form_inputs() {
    replay("form", checks::form);
}
