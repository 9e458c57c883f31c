//! bpf::sys: the operations aya 0.14 does not offer, as raw `bpf(2)` calls: taking, setting and
//! deleting map entries through a shared reference, counting the keys of a map whose key type is only
//! known by its size, asking which programs are attached to a cgroup, and swapping the program of a
//! pinned link in place.

use std::{
    ffi::CStr,
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info};

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

/// Sets `key` to `value` (`BPF_MAP_UPDATE_ELEM`, whether or not it is there).
pub fn update<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    // The kernel only reads the value of an update.
    map_elem_call(
        bpf_cmd::BPF_MAP_UPDATE_ELEM,
        map,
        key,
        std::ptr::from_ref(value).cast_mut().cast(),
    )
}

fn map_elem_call<K>(cmd: bpf_cmd, map: BorrowedFd<'_>, key: &K, value: *mut u8) -> io::Result<()> {
    // SAFETY: bpf_attr is a plain C union for which all-zero is the documented "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The union's anonymous map-element member is the one these commands read.
    let elem = unsafe { &mut attr.__bindgen_anon_2 };
    elem.map_fd = map.as_raw_fd() as u32;
    elem.key = std::ptr::from_ref(key) as u64;
    elem.__bindgen_anon_1.value = value as u64;
    // SAFETY: key points at a whole `K` and value (when not null) at room for one value of the map's
    // value size, both outliving the call.
    unsafe { bpf(cmd, &mut attr) }
}

/// How many keys `map` holds, its keys being `key_size` bytes (`BPF_MAP_GET_NEXT_KEY`), counting at
/// most `max_entries`: a key deleted during the walk restarts it, so a busy map could otherwise be
/// walked forever. Entries added or removed meanwhile may or may not be counted.
pub fn count_keys(map: BorrowedFd<'_>, key_size: usize, max_entries: u32) -> io::Result<u32> {
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut count = 0;
    while count < max_entries {
        // SAFETY: bpf_attr is a plain C union for which all-zero is the documented "unset" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        let elem = unsafe { &mut attr.__bindgen_anon_2 };
        elem.map_fd = map.as_raw_fd() as u32;
        // A null key asks for the first one.
        elem.key = if count == 0 { 0 } else { key.as_ptr() as u64 };
        elem.__bindgen_anon_1.next_key = next.as_mut_ptr() as u64;
        // SAFETY: key and next hold key_size bytes each, the map's key size, and outlive the call.
        match unsafe { bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(()) => count += 1,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => break,
            Err(err) => return Err(err),
        }
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}

/// Ids of the programs attached to `cgroup` itself (not inherited from its ancestors) at
/// `attach_type` (`BPF_PROG_QUERY`).
pub fn attached_programs(cgroup: BorrowedFd<'_>, attach_type: bpf_attach_type) -> io::Result<Vec<u32>> {
    // The kernel allows 64 programs per cgroup and attach type.
    let mut ids = [0u32; 64];
    // SAFETY: bpf_attr is a plain C union for which all-zero is the documented "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The union's `query` member is the one BPF_PROG_QUERY reads and writes.
    attr.query.__bindgen_anon_1.target_fd = cgroup.as_raw_fd() as u32;
    attr.query.attach_type = attach_type as u32;
    attr.query.prog_ids = ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    // SAFETY: prog_ids points at `ids`, which outlives the call and holds prog_cnt entries.
    unsafe { bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) }?;
    // SAFETY: the kernel wrote the count back into the same union member.
    let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}

/// Opens the object pinned at `path` in bpffs (`BPF_OBJ_GET`).
pub fn obj_get(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: bpf_attr is a plain C union for which all-zero is the documented "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: a reference to a member of a zeroed plain C union: the object member, the one BPF_OBJ_GET
    // reads.
    let obj = unsafe { &mut attr.__bindgen_anon_4 };
    obj.pathname = path.as_ptr() as u64;
    // SAFETY: pathname points at a NUL-terminated string that outlives the call.
    let fd = unsafe { bpf_fd(bpf_cmd::BPF_OBJ_GET, &mut attr) }?;
    Ok(fd)
}

/// Makes `link` run `program` instead of the program it runs now (`BPF_LINK_UPDATE`, Linux 5.7+ for
/// cgroup links): the kernel swaps them in one step, so no connect sees neither program, or both.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: bpf_attr is a plain C union for which all-zero is the documented "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The union's link_update member is the one BPF_LINK_UPDATE reads; no flags and no old program:
    // the link's program is replaced whatever it is.
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = program.as_raw_fd() as u32;
    // SAFETY: the attr holds only descriptors, valid for the call.
    unsafe { bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr) }
}

/// The id of the cgroup a cgroup link is attached to (`BPF_OBJ_GET_INFO_BY_FD`).
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: bpf_link_info is a plain C struct for which all-zero is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above, for bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = link.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: info points at a whole bpf_link_info, which outlives the call; info_len says its size.
    unsafe { bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    // SAFETY: the kernel filled the cgroup member for a cgroup link; for another kind it is some
    // other integer, never a pointer.
    Ok(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
}

/// `bpf(cmd, attr)` for a command that returns a new descriptor.
///
/// # Safety
/// As for [`bpf`].
unsafe fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: the caller vouches for attr; its size is passed with it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpf(cmd, attr)`.
///
/// # Safety
/// `attr` must be initialised for `cmd`, and every pointer in it valid for what `cmd` reads or writes
/// through it for the duration of the call.
unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: the caller vouches for attr; its size is passed with it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
