//! bpf::sys: the map operations aya 0.14 does not offer, as raw `bpf(2)` calls on a map's fd.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Takes `key`'s value out of a hash map in one step (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, Linux 5.14+ for
/// hash maps): of two callers racing for one record, exactly one gets it. `Ok(None)`: no such key.
pub fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    match map_elem_call(
        bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM,
        map,
        key,
        value.as_mut_ptr().cast(),
    ) {
        // SAFETY: the kernel wrote a whole value, and any bit pattern is a valid `Pod`.
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Whether the kernel refused the operation as unknown for this map type (kernels before 5.14).
pub fn is_unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP))
}

/// Deletes `key`; `Ok(false)`: it was not there (someone else took it).
pub fn delete<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    match map_elem_call(bpf_cmd::BPF_MAP_DELETE_ELEM, map, key, std::ptr::null_mut()) {
        Ok(()) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

fn map_elem_call<K>(cmd: bpf_cmd, map: BorrowedFd<'_>, key: &K, value: *mut u8) -> io::Result<()> {
    // SAFETY: bpf_attr is a plain C union for which all-zero is the documented "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The union's anonymous map-element member is the one these commands read.
    let elem = unsafe { &mut attr.__bindgen_anon_2 };
    elem.map_fd = map.as_raw_fd() as u32;
    elem.key = std::ptr::from_ref(key) as u64;
    elem.__bindgen_anon_1.value = value as u64;
    // SAFETY: the attr is initialised; key points at a whole `K` and value (when not null) at room for
    // one value of the map's value size, both outliving the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
