//! The agent's memory held by the C allocator (glibc's malloc).
//!
//! glibc gives each thread that allocates while another holds an arena's
//! lock an arena of its own, up to 8 per core, and keeps what is freed in
//! each arena for reuse. The agent's storage work runs on up to 16 blocking
//! threads (a burst of claims wakes all of them), so a burst leaves as many
//! arenas behind, each holding the pages it once used: that, not live data,
//! was most of the agent's resident memory after a burst (`make
//! bench-scale`, docs/BENCHMARKS.md). Two arenas are enough for an agent
//! whose threads mostly wait on the kernel and the apiserver, and what the
//! allocator keeps free is handed back to the kernel after a burst.
//!
//! Both are no-ops where the C library is not glibc.

// mallopt and malloc_trim have no safe wrapper; both only tune the
// allocator and are sound to call at any time from any thread.
#![allow(unsafe_code)]

/// Arenas the allocator may make (glibc's default: 8 per core).
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's arenas at [`MALLOC_ARENAS`]. Call it first thing in
/// `main`, before any thread starts. `MALLOC_ARENA_MAX` in the environment
/// (glibc's own knob) wins: it is left as the user set it.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt changes allocator parameters only; it takes no
        // pointers and is thread-safe.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// Hands the pages the allocator holds free, in every arena, back to the
/// kernel. Cheap for an agent of tens of MiB (it walks the free lists);
/// run it on a blocking thread.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and locks each arena itself.
    unsafe {
        libc::malloc_trim(0);
    }
}
