//! Hand the start-up code of the executable and its libraries back once the server has
//! settled.
//!
//! The kernel maps a file's pages in 64 KiB windows around each page fault ("fault-around").
//! Start-up (arguments, config, migrations, workflow loading, recovery) runs code spread over
//! the whole binary, so the ~150 code pages it touched kept about 9.5 MiB of the executable
//! mapped into an idle server for the rest of its life. Those pages are clean and stay in the
//! page cache: unmapping them costs a minor fault when a request next runs that code, and the
//! idle server's resident set then shows what it actually uses.

/// How long after the server listens its start-up counts as over: the background tasks (cron,
/// heartbeat, checkpointer) have run their first rounds by then.
pub const AFTER_LISTEN: std::time::Duration = std::time::Duration::from_secs(1);

/// Unmaps the read-only segments of the executable and its libraries; returns how many bytes
/// were released.
///
/// Only segments the program never writes are touched (code, read-only data, unwind tables):
/// they are byte for byte the file, so the next access maps the same bytes back. A binary with
/// text relocations (patched code) is left alone.
#[cfg(target_os = "linux")]
pub fn release() -> std::io::Result<usize> {
    // SAFETY: `sysconf` reads a constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .map_err(|_| std::io::Error::other("no page size"))?;
    let mut released = 0;
    for (start, len) in read_only_segments() {
        let Some((start, len)) = whole_pages(start, len, page) else {
            continue;
        };
        // SAFETY: the range lies inside a read-only `PT_LOAD` segment of our own executable,
        // mapped privately from the file and never written; MADV_DONTNEED drops its page-table
        // entries only, and the next access maps the same bytes back from the file.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released += len;
    }
    Ok(released)
}

/// Elsewhere there is nothing to release.
#[cfg(not(target_os = "linux"))]
pub fn release() -> std::io::Result<usize> {
    Ok(0)
}

/// `(address, length)` of each `PT_LOAD` segment without write permission of the executable
/// and the shared libraries it loaded (libc's start-up code is spread the same way), leaving
/// out the kernel's vDSO and any object with text relocations.
#[cfg(target_os = "linux")]
fn read_only_segments() -> Vec<(usize, usize)> {
    /// `DT_TEXTREL`, and `DF_TEXTREL` in `DT_FLAGS`: code patched at load time.
    const DT_TEXTREL: isize = 22;
    const DT_FLAGS: isize = 30;
    const DF_TEXTREL: usize = 0x4;

    /// `Elf64_Dyn` (`Elf32_Dyn` on 32-bit targets: both are two words).
    #[repr(C)]
    struct Dyn {
        tag: isize,
        val: usize,
    }

    unsafe extern "C" fn each_object(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        out: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid `dl_phdr_info` whose `dlpi_phdr` points at
        // `dlpi_phnum` program headers, and `out` is the vector handed to `dl_iterate_phdr`.
        let (info, out) = unsafe { (&*info, &mut *out.cast::<Vec<(usize, usize)>>()) };
        let phdrs = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let base = info.dlpi_addr as usize;
        // SAFETY: `getauxval` reads the auxiliary vector.
        let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
        let named_vdso = !info.dlpi_name.is_null()
            // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader.
            && unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }
                .to_bytes()
                .windows(4)
                .any(|w| w == b"vdso");
        if named_vdso || (base != 0 && base == vdso) {
            return 0; // the kernel's own mapping
        }
        let textrel = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_DYNAMIC)
            .any(|p| {
                let mut d = (base + p.p_vaddr as usize) as *const Dyn;
                loop {
                    // SAFETY: the dynamic section is mapped and ends with a `DT_NULL` entry.
                    let e = unsafe { &*d };
                    match e.tag {
                        0 => return false,
                        DT_TEXTREL => return true,
                        DT_FLAGS if e.val & DF_TEXTREL != 0 => return true,
                        // SAFETY: not yet at `DT_NULL`, so the next entry exists.
                        _ => d = unsafe { d.add(1) },
                    }
                }
            });
        if !textrel {
            out.extend(
                phdrs
                    .iter()
                    .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_W == 0)
                    .map(|p| (base + p.p_vaddr as usize, p.p_memsz as usize)),
            );
        }
        0 // on to the next object
    }

    let mut out: Vec<(usize, usize)> = Vec::new();
    // SAFETY: the callback only reads what the loader hands it and writes to `out`.
    unsafe { libc::dl_iterate_phdr(Some(each_object), (&raw mut out).cast()) };
    out
}

/// The whole pages inside `[start, start + len)`: a page shared with a writable neighbour is
/// left mapped.
fn whole_pages(start: usize, len: usize, page: usize) -> Option<(usize, usize)> {
    let first = start.checked_add(page - 1)? / page * page;
    let end = start.checked_add(len)? / page * page;
    (end > first).then(|| (first, end - first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_pages_inside_a_segment_are_released() {
        assert_eq!(whole_pages(0x1000, 0x3000, 0x1000), Some((0x1000, 0x3000)));
        // partial pages at both ends stay
        assert_eq!(whole_pages(0x1840, 0x3000, 0x1000), Some((0x2000, 0x2000)));
        assert_eq!(whole_pages(0x1840, 0x100, 0x1000), None);
        assert_eq!(whole_pages(usize::MAX - 10, 100, 0x1000), None);
    }

    #[test]
    fn the_executables_code_and_read_only_data_are_found() {
        let segments = read_only_segments();
        let here = whole_pages as *const () as usize;
        assert!(
            segments
                .iter()
                .any(|&(start, len)| (start..start + len).contains(&here)),
            "a read-only segment holds this function: {segments:x?}"
        );
    }

    /// What `release` does to a running server is checked end to end by the CLI's
    /// `a_settled_server_hands_its_start_up_code_back`; here, that it runs and finds work.
    #[test]
    fn release_covers_the_read_only_segments() {
        let total: usize = read_only_segments().iter().map(|s| s.1).sum();
        let released = release().unwrap();
        assert!(
            released > 0 && released <= total,
            "{released} of {total} bytes"
        );
    }
}
