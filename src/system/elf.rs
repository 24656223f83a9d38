//! Whether the guest's PID 1 is statically linked, read from its ELF
//! header and program headers.
//!
//! The initrd holds `/init` and kernel modules, nothing else: no dynamic
//! loader, no libc. A dynamically linked `hypeman-init` (what a plain
//! `cargo build` makes) is found by the kernel, fails to exec, and the guest
//! panics with "No working init found", which reads like a VMM problem. So
//! `validate` and the provisioner look at the binary first.
//!
//! Dynamic means: a `PT_INTERP` program header (the kernel would load that
//! interpreter, which the initrd lacks), or a `PT_DYNAMIC` segment with a
//! `DT_NEEDED` entry (shared libraries to load). A static-pie binary, which
//! `+crt-static` produces, has `PT_DYNAMIC` for its own relocations but
//! needs nothing, so it is static.
//!
//! Pure parsing over bytes ([`linkage`]); the one read is [`init_linkage`].

use std::path::{Path, PathBuf};

/// How the init binary is to be built so that the initrd can run it.
pub const STATIC_INIT_BUILD: &str =
    "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p hypeman-init --target x86_64-unknown-linux-gnu";

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

/// How an ELF executable is linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    Static,
    /// Needs the named interpreter and/or shared libraries at run time
    /// (`DT_NEEDED` entries are counted, not named: their names live in a
    /// string table this does not need to read).
    Dynamic { interpreter: Option<String>, needed: usize },
}

/// Why bytes are not an ELF executable this can judge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("is not an ELF executable (it does not start with \\x7fELF)")]
    NotElf,
    #[error("is a truncated or malformed ELF file ({0})")]
    Malformed(&'static str),
}

/// The problem with the init binary at `path`, as `validate` and the
/// provisioner report it.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("the guest init {} cannot be read (set [guest] init in hypeman.toml, or put hypeman-init next to hypeman)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest init {} {problem}; build a static one with `{STATIC_INIT_BUILD}`", path.display())]
    NotElf { path: PathBuf, problem: ElfError },
    #[error(
        "the guest init {} is dynamically linked ({}): the initrd has no shared libraries, so every guest would panic with \
         \"No working init found\"; build a static one with `{STATIC_INIT_BUILD}`",
        path.display(),
        describe(interpreter.as_deref(), *needed)
    )]
    Dynamic { path: PathBuf, interpreter: Option<String>, needed: usize },
}

fn describe(interpreter: Option<&str>, needed: usize) -> String {
    let libs = match needed {
        0 => None,
        1 => Some("needs 1 shared library".to_string()),
        n => Some(format!("needs {n} shared libraries")),
    };
    match (interpreter, libs) {
        (Some(i), Some(l)) => format!("interpreter {i}, {l}"),
        (Some(i), None) => format!("interpreter {i}"),
        (None, Some(l)) => l,
        (None, None) => "dynamic".to_string(),
    }
}

/// Reads the init binary at `path` and refuses it unless it is a
/// statically linked ELF executable.
pub fn check_init(path: &Path) -> Result<(), InitError> {
    let bytes = std::fs::read(path).map_err(|source| InitError::Read { path: path.to_path_buf(), source })?;
    match linkage(&bytes) {
        Ok(Linkage::Static) => Ok(()),
        Ok(Linkage::Dynamic { interpreter, needed }) => Err(InitError::Dynamic { path: path.to_path_buf(), interpreter, needed }),
        Err(problem) => Err(InitError::NotElf { path: path.to_path_buf(), problem }),
    }
}

/// Little- or big-endian fields of a 32- or 64-bit ELF file.
struct Reader<'a> {
    bytes: &'a [u8],
    wide: bool,
    little: bool,
}

impl Reader<'_> {
    fn uint(&self, at: usize, len: usize) -> Result<u64, ElfError> {
        let field = at
            .checked_add(len)
            .and_then(|end| self.bytes.get(at..end))
            .ok_or(ElfError::Malformed("a header runs past the end of the file"))?;
        let fold = |acc: u64, b: &u8| (acc << 8) | u64::from(*b);
        Ok(if self.little { field.iter().rev().fold(0, fold) } else { field.iter().fold(0, fold) })
    }

    /// A word that is 4 bytes in ELF32 and 8 in ELF64 (addresses, offsets).
    fn word(&self, at: usize) -> Result<u64, ElfError> {
        self.uint(at, if self.wide { 8 } else { 4 })
    }

    fn index(value: u64) -> Result<usize, ElfError> {
        usize::try_from(value).map_err(|_| ElfError::Malformed("an offset does not fit in memory"))
    }
}

/// How the ELF executable in `bytes` is linked.
pub fn linkage(bytes: &[u8]) -> Result<Linkage, ElfError> {
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotElf);
    }
    let wide = match bytes.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(ElfError::Malformed("unknown ELF class")),
    };
    let little = match bytes.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err(ElfError::Malformed("unknown byte order")),
    };
    let r = Reader { bytes, wide, little };
    // e_phoff, e_phentsize and e_phnum sit after e_entry, whose width is
    // the class's.
    let (phoff, phentsize, phnum) = if wide {
        (r.word(0x20)?, r.uint(0x36, 2)?, r.uint(0x38, 2)?)
    } else {
        (r.word(0x1c)?, r.uint(0x2a, 2)?, r.uint(0x2c, 2)?)
    };
    let min_entsize = if wide { 56 } else { 32 };
    if phnum > 0 && phentsize < min_entsize {
        return Err(ElfError::Malformed("program header entries are too small"));
    }
    let (phoff, phentsize) = (Reader::index(phoff)?, Reader::index(phentsize)?);
    let mut interpreter = None;
    let mut needed = 0;
    for i in 0..Reader::index(phnum)? {
        let ph = phentsize
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(ElfError::Malformed("program headers run past the end of the file"))?;
        let p_type = r.uint(ph, 4)?;
        // p_offset and p_filesz: ELF64 puts p_flags after p_type.
        let (offset, filesz) = if wide { (r.word(ph + 8)?, r.word(ph + 32)?) } else { (r.word(ph + 4)?, r.word(ph + 16)?) };
        let segment = Reader::index(offset)?
            .checked_add(Reader::index(filesz)?)
            .and_then(|end| bytes.get(Reader::index(offset).ok()?..end))
            .ok_or(ElfError::Malformed("a segment runs past the end of the file"))?;
        match u32::try_from(p_type) {
            Ok(PT_INTERP) => {
                let name = segment.split(|&b| b == 0).next().unwrap_or_default();
                interpreter = Some(String::from_utf8_lossy(name).into_owned());
            }
            Ok(PT_DYNAMIC) => needed += needed_entries(&Reader { bytes: segment, wide, little })?,
            Ok(_) | Err(_) => {}
        }
    }
    if interpreter.is_none() && needed == 0 {
        Ok(Linkage::Static)
    } else {
        Ok(Linkage::Dynamic { interpreter, needed })
    }
}

/// The `DT_NEEDED` entries of a dynamic segment, up to its `DT_NULL`.
fn needed_entries(dynamic: &Reader<'_>) -> Result<usize, ElfError> {
    let entry = if dynamic.wide { 16 } else { 8 };
    let mut needed = 0;
    for at in (0..dynamic.bytes.len() / entry).map(|i| i * entry) {
        match dynamic.word(at)? {
            DT_NULL => break,
            DT_NEEDED => needed += 1,
            _ => {}
        }
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian ELF64 executable with these program headers, each
    /// (type, segment contents).
    fn elf64(segments: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let phoff = 64usize;
        let data_start = phoff + 56 * segments.len();
        let mut out = vec![0u8; data_start];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (p_type, data)) in segments.iter().enumerate() {
            let ph = phoff + 56 * i;
            let offset = out.len() as u64;
            out[ph..ph + 4].copy_from_slice(&p_type.to_le_bytes());
            out[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
            out[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    fn dynamic(tags: &[u64]) -> Vec<u8> {
        tags.iter().flat_map(|t| [t.to_le_bytes(), 0u64.to_le_bytes()].concat()).collect()
    }

    #[test]
    fn static_static_pie_and_dynamic_binaries_are_told_apart() {
        assert_eq!(linkage(&elf64(&[(1, vec![0; 8])])), Ok(Linkage::Static));
        // static-pie: a dynamic segment for its own relocations only.
        let relocations_only = dynamic(&[7, 8, 0x6fff_fffb, DT_NULL, DT_NEEDED]);
        assert_eq!(linkage(&elf64(&[(PT_DYNAMIC, relocations_only)])), Ok(Linkage::Static));
        let glibc = elf64(&[
            (PT_INTERP, b"/lib64/ld-linux-x86-64.so.2\0".to_vec()),
            (PT_DYNAMIC, dynamic(&[DT_NEEDED, DT_NEEDED, 12, DT_NULL])),
        ]);
        assert_eq!(
            linkage(&glibc),
            Ok(Linkage::Dynamic { interpreter: Some("/lib64/ld-linux-x86-64.so.2".into()), needed: 2 })
        );
        let no_interp = elf64(&[(PT_DYNAMIC, dynamic(&[DT_NEEDED, DT_NULL]))]);
        assert_eq!(linkage(&no_interp), Ok(Linkage::Dynamic { interpreter: None, needed: 1 }));
    }

    #[test]
    fn what_is_not_an_elf_executable_is_refused_not_misread() {
        assert_eq!(linkage(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        assert_eq!(linkage(b""), Err(ElfError::NotElf));
        let mut header_only = elf64(&[(PT_INTERP, b"/lib/ld.so\0".to_vec())]);
        header_only.truncate(80);
        assert!(matches!(linkage(&header_only), Err(ElfError::Malformed(_))));
        let mut wrong_class = elf64(&[]);
        wrong_class[4] = 9;
        assert!(matches!(linkage(&wrong_class), Err(ElfError::Malformed(_))));
    }

    /// The binaries of this build, where they exist: the host's own test
    /// executable is dynamic, a `+crt-static` hypeman-init is static.
    #[test]
    fn real_binaries() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(matches!(linkage(&me), Ok(Linkage::Dynamic { needed: 1.., .. })), "{:?}", linkage(&me));
        let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/x86_64-unknown-linux-gnu/release/hypeman-init");
        if let Ok(bytes) = std::fs::read(&init) {
            assert_eq!(linkage(&bytes), Ok(Linkage::Static), "{}", init.display());
        }
    }

    #[test]
    fn the_message_names_the_file_and_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("hypeman-init");
        std::fs::write(&path, elf64(&[(PT_INTERP, b"/lib64/ld-linux-x86-64.so.2\0".to_vec()), (PT_DYNAMIC, dynamic(&[DT_NEEDED]))]))
            .unwrap();
        assert_eq!(
            check_init(&path).unwrap_err().to_string(),
            format!(
                "the guest init {} is dynamically linked (interpreter /lib64/ld-linux-x86-64.so.2, needs 1 shared library): \
                 the initrd has no shared libraries, so every guest would panic with \"No working init found\"; \
                 build a static one with `{STATIC_INIT_BUILD}`",
                path.display()
            )
        );
        std::fs::write(&path, elf64(&[])).unwrap();
        check_init(&path).unwrap();
    }
}
