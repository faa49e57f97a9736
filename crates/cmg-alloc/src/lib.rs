//! The memory allocator of every cmg process: mimalloc, set up so that an idle connection costs
//! no more resident memory than with the system allocator.
//!
//! Why not the system allocator: relaying moves buffers between the runtime's worker threads,
//! and glibc's per-thread arenas then contend on locks; in the gateway benchmark (`cmg-bench`,
//! gateway) the relayed request rate was about 1.4–1.7 times higher with mimalloc on the
//! same machine. Why the tuning: by default mimalloc commits its arenas eagerly on Linux, so
//! every byte of a connection's partly used buffers (hyper, h2, rustls) becomes resident; with
//! eager arena commit off, memory per idle TLS connection is about what it is with glibc.
//!
//! This crate owns only that choice. A binary installs it with
//! `#[global_allocator] static A: cmg_alloc::Allocator = cmg_alloc::Allocator;` and calls
//! [`tune`] at the start of `main`.

/// The allocator type to install as `#[global_allocator]`.
pub use mimalloc::MiMalloc as Allocator;

/// `mi_option_arena_eager_commit` in mimalloc's `mi_option_e` (the same in v2 and v3; the Rust
/// bindings do not name it).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

extern "C" fn set_options() {
    // SAFETY: setting an option is a plain store in mimalloc's option table; 0 (commit arena
    // memory on demand) is a valid value of this option.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) }
}

/// The options must be set before the first allocation reserves mimalloc's first arena, and the
/// Rust runtime allocates before `main`: so they are set by an ELF constructor.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static SET_OPTIONS_AT_LOAD: extern "C" fn() = set_options;

/// Makes sure the options are applied (on Linux they already are, from before `main`); call it
/// at the start of `main`: it also keeps this crate's constructor linked in.
pub fn tune() {
    set_options();
}
