//! Giving memory back to the system when a role goes quiet.
//!
//! After a burst, or a database restart that fails thousands of calls at
//! once, both allocators keep what they took at the peak: mimalloc keeps
//! freed pages in each thread's heap, glibc (which librdkafka's C threads
//! allocate from, in one arena: [`configure_allocators`]) keeps free chunks
//! in its arenas. The role's resident memory then stays at the peak's level
//! for good, though nothing uses it (issue 17 point 8,
//! `scripts/bench-memory-faults.sh`).
//!
//! A tokio worker that parks has no task to run: that is when it collects
//! its own mimalloc heap (only the owning thread may), and one of them trims
//! glibc (one call trims every arena). Each does so at most once per
//! [`INTERVAL`], so under load, when workers park between bursts of work
//! thousands of times a second, the cost is one clock read per park.

use std::{
    cell::Cell,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How often a parked worker may collect at most.
const INTERVAL: Duration = Duration::from_secs(5);

// Links the C library that defines `mi_collect` wherever this module is
// (main.rs also makes it the global allocator).
extern crate mimalloc as _;

unsafe extern "C" {
    /// mimalloc's own: frees the calling thread's empty pages and, with
    /// `force`, purges what its segments hold in reserve.
    fn mi_collect(force: bool);
}

thread_local! {
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// When glibc's arenas were last trimmed, process-wide; `None`: never.
static LAST_TRIM: Mutex<Option<Instant>> = Mutex::new(None);

/// Caps glibc at one arena, before any thread starts.
///
/// Only C code allocates from glibc here (librdkafka's threads, OpenSSL):
/// Rust allocates from mimalloc. By default glibc gives each such thread an
/// arena of its own, and `malloc_trim` cannot shrink the top of a thread's
/// arena, only of the main one: after a burst each of librdkafka's arenas
/// kept 0.5 to 4 MB resident with a few kilobytes in use (`malloc_info`
/// 30 s after `scripts/bench-memory-faults.sh`'s restarts). With one arena
/// those threads share the main heap, whose top `malloc_trim` does give
/// back. They take its lock a few times per produced message; the relay's
/// rate draining a backlog did not fall (`scripts/bench.sh`, 5 700 before,
/// 6 634 events/s after, measured together with the switch to LTO).
pub fn configure_allocators() {
    // SAFETY: mallopt takes no pointer; called first thing in main, before
    // any thread exists. glibc returns 0 when it rejects the setting, which
    // leaves the default: more memory, nothing wrong.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// For `tokio::runtime::Builder::on_thread_park`.
pub fn on_worker_park() {
    let now = Instant::now();
    let due = LAST_COLLECT.with(|last| {
        let due = last.get().is_none_or(|at| now.duration_since(at) >= INTERVAL);
        if due {
            last.set(Some(now));
        }
        due
    });
    if !due {
        return;
    }
    // SAFETY: mimalloc's API, on the calling thread's own heap; it takes no
    // pointer and may be called at any time from any thread.
    unsafe { mi_collect(true) };
    // One worker trims for all; another one parking meanwhile does not wait.
    let Ok(mut last_trim) = LAST_TRIM.try_lock() else { return };
    if last_trim.is_none_or(|at| now.duration_since(at) >= INTERVAL) {
        *last_trim = Some(now);
        // SAFETY: glibc's malloc_trim takes no pointer and locks each arena
        // itself; returning free pages to the system is all it does.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// glibc's arenas, as `malloc_info` lists them.
    fn glibc_arenas() -> usize {
        let mut buffer: *mut libc::c_char = std::ptr::null_mut();
        let mut len: libc::size_t = 0;
        // SAFETY: open_memstream allocates the buffer and updates both
        // pointers on fclose; the buffer is read once, then freed.
        unsafe {
            let stream = libc::open_memstream(&mut buffer, &mut len);
            assert!(!stream.is_null(), "open_memstream failed");
            libc::malloc_info(0, stream);
            libc::fclose(stream);
            let xml = String::from_utf8_lossy(std::slice::from_raw_parts(buffer.cast::<u8>(), len)).into_owned();
            libc::free(buffer.cast());
            xml.matches("<heap nr=").count()
        }
    }

    /// Runs in a process of its own (the test binary, re-executed on this
    /// test alone): glibc fixes its arena limit the first time it needs
    /// one, so the cap only works before the process has many threads.
    #[test]
    fn threads_started_after_the_cap_share_the_existing_arenas() {
        const CHILD: &str = "MSYS_MEMORY_ARENA_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let name = "memory::tests::threads_started_after_the_cap_share_the_existing_arenas";
            let exe = std::env::current_exe().expect("the test binary's path");
            let out = std::process::Command::new(exe)
                .args(["--exact", name, "--test-threads=1", "--nocapture"])
                .env(CHILD, "1")
                .output()
                .expect("re-running the test binary");
            let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && said.contains("1 passed"), "the child run failed:\n{said}");
            return;
        }
        configure_allocators();
        let before = glibc_arenas();
        let all_allocated = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let all_allocated = all_allocated.clone();
                std::thread::spawn(move || {
                    let block = vec![i as u8; 64 * 1024];
                    all_allocated.wait();
                    drop(block);
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("an allocating thread");
        }
        assert_eq!(glibc_arenas(), before, "four new threads made arenas of their own");
    }

    /// glibc keeps an arena's freed chunks resident while a live chunk
    /// above them pins the heap's top, as librdkafka's threads leave it
    /// after a burst. A parked worker gives those pages back. (This process
    /// has no arena cap, so the test's thread gets an arena of its own;
    /// `malloc_trim` frees the pages inside free chunks in every arena.)
    #[test]
    fn a_parked_worker_returns_freed_glibc_memory() {
        // The unit tests' allocator is the system's (glibc): mimalloc is the
        // binary's, set in main.rs. A thread of its own gets an arena of its own.
        std::thread::spawn(|| {
            let blocks: Vec<Box<[u8; 256]>> = (0..120_000).map(|i| Box::new([i as u8; 256])).collect();
            let pin = Box::new([1_u8; 256]);
            drop(blocks);
            let freed = rss_anon_kib();
            on_worker_park();
            let trimmed = rss_anon_kib();
            assert!(
                trimmed + 16 * 1024 < freed,
                "RssAnon {freed} KiB with ~30 MB freed, {trimmed} KiB after the parked worker collected"
            );
            drop(pin);
        })
        .join()
        .expect("the allocating thread");
    }
}
