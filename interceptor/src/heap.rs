//! heap: memory the agent frees goes back to the node. glibc's malloc raises its mmap threshold to
//! the largest block freed (up to 32 MiB), and its trim threshold with it: after the pages of a list
//! whose objects carry 256 KiB of annotations each (the API server's limit), it kept about 50 MiB
//! resident for good, though the agent's store held a few. Pinned at glibc's own starting values,
//! blocks of 128 KiB or more are mapped on their own and unmapped when freed, and a heap with 128 KiB
//! free at its top is trimmed. musl's malloc, the image's, maps large blocks on their own already.

/// glibc's starting mmap and trim thresholds, which pinning keeps.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const THRESHOLD_BYTES: libc::c_int = 128 * 1024;

/// Pins glibc's thresholds; nothing with another C library. Call before the agent allocates much.
pub fn give_back_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's parameters, under malloc's own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD_BYTES);
    }
}
