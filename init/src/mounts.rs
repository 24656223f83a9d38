//! Thin, error-reporting wrappers over `mount(2)` and friends, plus the one
//! filesystem probe init needs (is the overlay disk formatted?). Which
//! filesystems go where is decided in `boot`, not here.

use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::InitError;

fn c_path(path: &Path) -> Result<CString, InitError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| InitError::Nul {
        what: path.display().to_string(),
    })
}

fn c_str(text: &str) -> Result<CString, InitError> {
    CString::new(text).map_err(|_| InitError::Nul {
        what: text.to_owned(),
    })
}

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), InitError> {
    let c_source = c_str(source)?;
    let c_target = c_path(target)?;
    let c_fstype = c_str(fstype)?;
    let c_data = data.map(c_str).transpose()?;
    let data_ptr = c_data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: every pointer is a live NUL-terminated string or null for data.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            flags,
            data_ptr,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(InitError::Mount {
            what: source.to_owned(),
            fstype: fstype.to_owned(),
            target: target.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Tries each filesystem type in turn; returns the one that mounted. The
/// error, if all fail, is the last one's (the types are ordered by preference,
/// so the last is the fallback the user most likely meant).
pub fn mount_any(
    source: &str,
    target: &Path,
    fstypes: &[&'static str],
    flags: libc::c_ulong,
) -> Result<&'static str, InitError> {
    let mut last = None;
    for fstype in fstypes {
        match mount(source, target, fstype, flags, None) {
            Ok(()) => return Ok(fstype),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(InitError::Nul {
        what: "empty filesystem list".to_owned(),
    }))
}

/// Moves an existing mount (`MS_MOVE`), e.g. `/proc` into the new root.
pub fn move_mount(from: &Path, to: &Path) -> Result<(), InitError> {
    let c_from = c_path(from)?;
    let c_to = c_path(to)?;
    // SAFETY: valid NUL-terminated paths; no fstype or data for MS_MOVE.
    let rc = unsafe {
        libc::mount(
            c_from.as_ptr(),
            c_to.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(InitError::Mount {
            what: from.display().to_string(),
            fstype: "move".to_owned(),
            target: to.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Makes `new_root` the root directory. The initramfs root cannot be
/// `pivot_root`ed away, so this is the classic `switch_root`: move the new
/// root's mount over `/` and chroot into it.
pub fn switch_root(new_root: &Path) -> Result<(), InitError> {
    std::env::set_current_dir(new_root).map_err(|e| InitError::io("enter", new_root, e))?;
    move_mount(Path::new("."), Path::new("/"))?;
    let dot = c_str(".")?;
    // SAFETY: NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(InitError::last_os("chroot into the new root"));
    }
    std::env::set_current_dir("/").map_err(|e| InitError::io("enter", "/", e))
}

/// Offset and value of the ext2/3/4 superblock magic (`0xEF53`, little endian).
const EXT_MAGIC_OFFSET: u64 = 1024 + 0x38;
const EXT_MAGIC: [u8; 2] = [0x53, 0xEF];

/// Whether the block device (or image file) carries an ext2/3/4 superblock.
pub fn has_ext_filesystem(device: &Path) -> Result<bool, InitError> {
    let mut file = std::fs::File::open(device).map_err(|e| InitError::io("open", device, e))?;
    file.seek(SeekFrom::Start(EXT_MAGIC_OFFSET))
        .map_err(|e| InitError::io("seek", device, e))?;
    let mut magic = [0u8; 2];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == EXT_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(InitError::io("read", device, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_ext_superblock_magic() {
        let dir = std::env::temp_dir().join(format!("hypeman-init-magic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let blank = dir.join("blank.raw");
        std::fs::write(&blank, vec![0u8; 4096]).expect("write");
        assert!(!has_ext_filesystem(&blank).expect("probe"));
        let tiny = dir.join("tiny.raw");
        std::fs::write(&tiny, b"short").expect("write");
        assert!(!has_ext_filesystem(&tiny).expect("probe"));
        let mut image = vec![0u8; 4096];
        image[1080] = 0x53;
        image[1081] = 0xEF;
        let formatted = dir.join("ext.raw");
        std::fs::write(&formatted, &image).expect("write");
        assert!(has_ext_filesystem(&formatted).expect("probe"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
