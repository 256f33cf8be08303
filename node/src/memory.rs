//! The allocator's knobs from `[memory]` (GOGC-like: the trade between memory given back to
//! the operating system and the CPU spent doing it), applied to jemalloc at start, and what
//! it reports. jemalloc is the allocator of the `keel` binary (`cli/src/main.rs`); in a
//! process where it is not (unit tests of this crate) the settings still apply to jemalloc's
//! own arenas and read back the same.
//!
//! - `dirty_decay_ms`: how long freed pages stay dirty (reusable at once, counted resident)
//!   before jemalloc purges them; `0` purges at once, `-1` never.
//! - `muzzy_decay_ms`: the same for the second stage (pages already advised lazily free).
//! - `background_threads`: jemalloc's own threads purge on schedule; without them purging
//!   happens inside allocation calls, on the node's threads.

use crate::config::MemoryConfig;

/// jemalloc's `MALLCTL_ARENAS_ALL` is not used: per-arena decay settings are set one arena at
/// a time, up to `arenas.narenas`.
fn arena_key(i: u32, what: &str) -> Vec<u8> {
    format!("arena.{i}.{what}\0").into_bytes()
}

/// The allocator settings in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatorSettings {
    /// `arenas.dirty_decay_ms`.
    pub dirty_decay_ms: i64,
    /// `arenas.muzzy_decay_ms`.
    pub muzzy_decay_ms: i64,
    /// `background_thread`.
    pub background_threads: bool,
}

#[allow(unsafe_code)]
fn write_ssize(name: &[u8], value: i64) -> Result<(), String> {
    let v = isize::try_from(value).map_err(|_| format!("{value} does not fit"))?;
    // SAFETY: `name` is a NUL-terminated mallctl name whose type is `ssize_t` (`isize` on
    // every platform Rust supports), as jemalloc's manual gives for the decay settings.
    unsafe { tikv_jemalloc_ctl::raw::write(name, v) }.map_err(|e| {
        format!(
            "jemalloc {}: {e}",
            String::from_utf8_lossy(name).trim_end_matches('\0')
        )
    })
}

#[allow(unsafe_code)]
fn read_ssize(name: &[u8]) -> Result<i64, String> {
    // SAFETY: as in `write_ssize`: an `ssize_t` setting, read by value.
    let v: isize = unsafe { tikv_jemalloc_ctl::raw::read(name) }.map_err(|e| {
        format!(
            "jemalloc {}: {e}",
            String::from_utf8_lossy(name).trim_end_matches('\0')
        )
    })?;
    Ok(v as i64)
}

/// Applies `config`'s allocator knobs: the defaults for new arenas, every existing arena, and
/// background threads. Returns what is in force after (read back).
pub fn apply(config: &MemoryConfig) -> Result<AllocatorSettings, String> {
    write_ssize(b"arenas.dirty_decay_ms\0", config.dirty_decay_ms)?;
    write_ssize(b"arenas.muzzy_decay_ms\0", config.muzzy_decay_ms)?;
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().map_err(|e| e.to_string())?;
    for i in 0..arenas {
        // Arenas not initialised yet answer an error; they take the defaults above.
        let _ = write_ssize(&arena_key(i, "dirty_decay_ms"), config.dirty_decay_ms);
        let _ = write_ssize(&arena_key(i, "muzzy_decay_ms"), config.muzzy_decay_ms);
    }
    tikv_jemalloc_ctl::background_thread::write(config.background_threads)
        .map_err(|e| format!("jemalloc background_thread: {e}"))?;
    current()
}

/// The settings in force.
pub fn current() -> Result<AllocatorSettings, String> {
    Ok(AllocatorSettings {
        dirty_decay_ms: read_ssize(b"arenas.dirty_decay_ms\0")?,
        muzzy_decay_ms: read_ssize(b"arenas.muzzy_decay_ms\0")?,
        background_threads: tikv_jemalloc_ctl::background_thread::read()
            .map_err(|e| format!("jemalloc background_thread: {e}"))?,
    })
}

/// Bytes in physically resident pages mapped by the allocator (jemalloc's
/// `stats.resident`: allocated memory plus dirty pages and allocator metadata), 0 if it
/// cannot tell.
pub fn resident_bytes() -> u64 {
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return 0;
    }
    tikv_jemalloc_ctl::stats::resident::read().map_or(0, |b| b as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_knobs_reach_jemalloc_and_read_back() {
        let before = current().unwrap();
        let config = MemoryConfig {
            dirty_decay_ms: 1_234,
            muzzy_decay_ms: 0,
            background_threads: !before.background_threads,
            ..MemoryConfig::default()
        };
        let now = apply(&config).unwrap();
        assert_eq!(now.dirty_decay_ms, 1_234);
        assert_eq!(now.muzzy_decay_ms, 0);
        assert_eq!(now.background_threads, !before.background_threads);
        // Every existing arena took them too.
        let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap();
        let mut set = 0;
        for i in 0..arenas {
            if let Ok(v) = read_ssize(&arena_key(i, "dirty_decay_ms")) {
                assert_eq!(v, 1_234, "arena {i}");
                set += 1;
            }
        }
        assert!(set >= 1);
        // Back to the defaults, so other tests see an ordinary allocator.
        let restored = apply(&MemoryConfig::default()).unwrap();
        assert_eq!(restored.dirty_decay_ms, 10_000);
        assert!(restored.background_threads);
    }
}
