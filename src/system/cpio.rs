//! A writer for the cpio "newc" format, the only one the kernel unpacks
//! into its initramfs: per entry a 110-byte ASCII header, the NUL-terminated
//! name padded to 4 bytes, the data padded to 4 bytes; `TRAILER!!!` last.
//! Entries are written with mtime 0 and uid/gid 0, so equal inputs give
//! byte-identical archives.

use std::io::Write;

use super::SystemError;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// Streams entries into `out`. Parent directories must be added before the
/// files in them: the kernel's unpacker does not create them.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// A directory; `name` is relative (`lib/modules`), without a leading `/`.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), SystemError> {
        self.entry(name, libc::S_IFDIR | (perm & 0o7777), 2, &[])
    }

    /// A regular file with `data` as its contents.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), SystemError> {
        self.entry(name, libc::S_IFREG | (perm & 0o7777), 1, data)
    }

    /// Writes the trailer and hands back the writer.
    pub fn finish(mut self) -> Result<W, SystemError> {
        self.next_ino = 0;
        self.entry(TRAILER, 0, 1, &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<(), SystemError> {
        let too_large = || SystemError::TooLarge {
            name: name.to_owned(),
        };
        let size = u32::try_from(data.len()).map_err(|_| too_large())?;
        // The name size counts the terminating NUL.
        let name_size = u32::try_from(name.len() + 1).map_err(|_| too_large())?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let header = format!(
            "{MAGIC}{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
             {dev_major:08X}{dev_minor:08X}{rdev_major:08X}{rdev_minor:08X}{name_size:08X}{check:08X}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dev_major = 0,
            dev_minor = 0,
            rdev_major = 0,
            rdev_minor = 0,
            check = 0,
        );
        debug_assert_eq!(header.len(), 110);
        self.put(header.as_bytes(), name)?;
        self.put(name.as_bytes(), name)?;
        self.put(&[0], name)?;
        self.pad(name)?;
        self.put(data, name)?;
        self.pad(name)
    }

    fn put(&mut self, bytes: &[u8], name: &str) -> Result<(), SystemError> {
        self.out
            .write_all(bytes)
            .map_err(|e| SystemError::io("write cpio entry", name, e))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, name: &str) -> Result<(), SystemError> {
        let fill = (4 - (self.offset % 4) as usize) % 4;
        self.put(&[0; 3][..fill], name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed entry: name, mode, data.
    pub(crate) type Entry = (String, u32, Vec<u8>);

    /// A strict newc reader for tests: checks magic, padding and the trailer.
    pub(crate) fn parse(archive: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut pos = 0usize;
        let align = |p: usize| (p + 3) & !3;
        loop {
            let header = std::str::from_utf8(&archive[pos..pos + 110]).expect("ascii header");
            assert_eq!(&header[..6], MAGIC, "magic at {pos}");
            let field = |i: usize| {
                u32::from_str_radix(&header[6 + i * 8..14 + i * 8], 16).expect("hex field")
            };
            let (mode, size, name_size) = (field(1), field(6) as usize, field(11) as usize);
            let name_start = pos + 110;
            let name = std::str::from_utf8(&archive[name_start..name_start + name_size - 1])
                .expect("utf-8 name")
                .to_owned();
            assert_eq!(archive[name_start + name_size - 1], 0, "NUL after {name}");
            let data_start = align(name_start + name_size);
            assert!(archive[name_start + name_size..data_start]
                .iter()
                .all(|b| *b == 0));
            let data = archive[data_start..data_start + size].to_vec();
            pos = align(data_start + size);
            if name == TRAILER {
                assert_eq!(pos, archive.len(), "nothing after the trailer");
                return entries;
            }
            entries.push((name, mode, data));
        }
    }

    #[test]
    fn round_trips_dirs_and_files_with_every_padding() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("lib", 0o755).expect("dir");
        for (i, name) in ["a", "ab", "abc", "abcd"].iter().enumerate() {
            w.file(&format!("lib/{name}"), 0o644, &vec![b'x'; i])
                .expect("file");
        }
        w.file("init", 0o755, b"\x7fELF").expect("file");
        let bytes = w.finish().expect("finish");
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["lib", "lib/a", "lib/ab", "lib/abc", "lib/abcd", "init"]
        );
        assert_eq!(entries[0].1, libc::S_IFDIR | 0o755);
        assert_eq!(entries[3].2, b"xx");
        assert_eq!(
            entries[5],
            (
                "init".to_owned(),
                libc::S_IFREG | 0o755,
                b"\x7fELF".to_vec()
            )
        );
    }

    #[test]
    fn the_system_cpio_reads_our_archives() {
        if !crate::test_gate::tools(&["cpio"]) {
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("lib", 0o755).expect("dir");
        w.file("lib/load-order", 0o644, b"/lib/x.ko\n")
            .expect("file");
        w.file("init", 0o755, b"#!/bin/sh\n").expect("file");
        let bytes = w.finish().expect("finish");
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, &bytes).expect("write");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -t -v --quiet < {}", archive.display()))
            .output()
            .expect("run cpio");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" lib"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("-rw-r--r--") && lines[1].ends_with(" lib/load-order"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"),
            "{listing}"
        );
    }
}
