//! What qbproxy does to its own process so that the secrets and tokens in
//! its memory stay there: it marks itself not dumpable (`PR_SET_DUMPABLE`
//! 0), so no core file is written when it crashes and no other process of
//! the same user may attach to it or read `/proc/PID/mem` and
//! `/proc/PID/environ` (only root may). nix's safe wrapper keeps
//! `#![forbid(unsafe_code)]`.

/// Marks the process not dumpable. Called first thing in `main`, before a
/// secret is read.
pub fn not_dumpable() -> Result<(), std::io::Error> {
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_is_not_dumpable_once_marked() {
        super::not_dumpable().unwrap();
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }
}
