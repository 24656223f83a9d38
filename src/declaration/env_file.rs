//! Environment files: `env_files = ["/run/secrets/web.env"]` in a
//! declaration names files of `NAME=value` lines whose variables the app
//! gets, so that a secret (managed by agenix or sops-nix, say) never has to
//! be written into the declaration, the Nix store, the guest's record or a
//! log.
//!
//! This module owns the file format, the checks on the file itself and the
//! digest that lets the planner see a changed file without keeping its
//! values. It reads files but never says what is in them: no message it
//! makes holds a value (nor a line that did not parse, which may be one).
//! Who reads the files when is the caller's: the provisioner at every cold
//! boot ([`read_all`] + [`merged`]), the declaration loader for the digest.
//!
//! The format, one variable per line (a subset of systemd's
//! `EnvironmentFile=` and of the usual `.env` files):
//!
//! ```text
//! # a comment: a line whose first non-blank character is `#`; blank lines are skipped
//! NAME=value              # unquoted: the rest of the line, blanks at both ends trimmed;
//!                         #   no escapes, and `#`, quotes and `\` are kept as they are
//! export NAME=value       # a leading `export ` is ignored
//! NAME = value            # blanks around the name and after `=` are ignored
//! NAME="a \"b\"\n"        # double quotes: escapes \\ \" \n \t, nothing else
//! NAME='$literal\n'       # single quotes: taken as written, no escapes
//! NAME="x"   # comment    # after a closing quote only blanks and a comment may follow
//! ```
//!
//! Names are `[A-Za-z_][A-Za-z0-9_]*`. A value is one line (a quoted value
//! cannot span lines; write `\n` in double quotes). The file is UTF-8
//! without NUL; a `\r` before a line's end is dropped (CRLF files read as
//! LF ones). A name given twice: the later line wins. There is no variable
//! expansion (`$OTHER` is kept as written).

use super::limits::{EXEC_STRING_MAX, EXEC_STRING_OVERHEAD};
use crate::config_file::ByteSize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why an env file cannot be used. Never holds a value from the file.
#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    #[error("env file {} cannot be read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("env file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("env file {} is {size} bytes, over limits.max_exec_size ({limit}): it cannot all reach the app", path.display())]
    TooLarge { path: PathBuf, size: u64, limit: ByteSize },
    /// Another user could have put the variables there.
    #[error("env file {} {problem}; it is not read", path.display())]
    Unsafe { path: PathBuf, problem: String },
    #[error("{}:{line}: {problem}", path.display())]
    Malformed { path: PathBuf, line: usize, problem: String },
    #[error(
        "entrypoint, cmd, env and env_files pass limits.max_exec_size ({limit}, {} bytes): {total} bytes in all, \
         counting each string's NUL and 8-byte pointer as the guest kernel does",
        limit.0
    )]
    ExecTooLarge { total: u64, limit: ByteSize },
}

impl EnvFileError {
    /// Whether the file is simply not there (yet): a secret manager may
    /// write it after the daemon starts, so it is worth waiting for.
    pub fn is_missing(&self) -> bool {
        matches!(self, EnvFileError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// One variable of an env file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    pub name: String,
    pub value: String,
    /// 1-based, for messages.
    pub line: usize,
}

/// An env file as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFile {
    pub path: PathBuf,
    /// In file order; a name may come twice (the later wins).
    pub entries: Vec<EnvEntry>,
    /// Other users may read it: worth a warning, since the secret is
    /// exposed on the host whatever hypeman does.
    pub world_readable: bool,
}

/// Whether `name` may name an environment variable (the rule of `[env]`).
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The variables of `text`, the content of the env file `path` (named in
/// errors only).
pub fn parse(path: &Path, text: &str) -> Result<Vec<EnvEntry>, EnvFileError> {
    let mut entries = Vec::new();
    for (index, raw_line) in text.split('\n').enumerate() {
        let line = index + 1;
        let bad = |problem: &str| EnvFileError::Malformed { path: path.to_path_buf(), line, problem: problem.to_string() };
        let content = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        if content.contains('\0') {
            return Err(bad("contains a NUL character, which no environment variable can hold"));
        }
        let content = content.trim_start_matches([' ', '\t']);
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let content = match content.strip_prefix("export") {
            Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start_matches([' ', '\t']),
            _ => content,
        };
        // The line is not shown: what did not parse may be a secret.
        let Some((name, value)) = content.split_once('=') else {
            return Err(bad("expected NAME=value (the line is not shown, it may hold a secret)"));
        };
        let name = name.trim_end_matches([' ', '\t']);
        if !is_env_name(name) {
            return Err(bad(
                "the text before `=` is not a variable name (letters, digits and `_`, not starting with a digit)",
            ));
        }
        let value = value_of(value.trim_start_matches([' ', '\t'])).map_err(|problem| bad(&format!("{name}: {problem}")))?;
        let size = (name.len() + 1 + value.len()) as u64;
        if size > EXEC_STRING_MAX {
            return Err(bad(&format!(
                "{name}=… is {size} bytes; the guest kernel passes at most {EXEC_STRING_MAX} bytes per environment string (MAX_ARG_STRLEN)"
            )));
        }
        entries.push(EnvEntry { name: name.to_string(), value, line });
    }
    Ok(entries)
}

/// The value after `=` (leading blanks gone), unquoted or quoted.
fn value_of(raw: &str) -> Result<String, &'static str> {
    let (value, rest) = if let Some(body) = raw.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    Some('t') => value.push('\t'),
                    Some(_) => return Err("an unknown escape in a double-quoted value (known: \\\\ \\\" \\n \\t)"),
                    None => return Err("a double-quoted value is not closed on its line"),
                },
                c => value.push(c),
            }
        }
        let Some(end) = end else {
            return Err("a double-quoted value is not closed on its line");
        };
        (value, &body[end..])
    } else if let Some(body) = raw.strip_prefix('\'') {
        let Some(end) = body.find('\'') else {
            return Err("a single-quoted value is not closed on its line");
        };
        (body[..end].to_string(), &body[end + 1..])
    } else {
        return Ok(raw.trim_end_matches([' ', '\t']).to_string());
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    if rest.is_empty() || rest.starts_with('#') {
        Ok(value)
    } else {
        Err("only blanks or a `#` comment may follow a closing quote")
    }
}

/// Why a file with this owner and mode may not be trusted by a daemon
/// running as `euid`; `None` when it may. Pure, for tests.
///
/// The file must belong to root or to the daemon's own user, and no one
/// else may write it: otherwise another local user could set the app's
/// environment (its credentials, `LD_PRELOAD`…). A file others may read is
/// used (see [`EnvFile::world_readable`]): refusing it would not make the
/// secret safe again.
pub fn trust_problem(owner: u32, mode: u32, euid: u32) -> Option<String> {
    if owner != 0 && owner != euid {
        let who = if euid == 0 { "root".to_string() } else { format!("root or uid {euid} (the daemon's user)") };
        return Some(format!("belongs to uid {owner}, not to {who}: chown it"));
    }
    if mode & 0o022 != 0 {
        return Some(format!("can be written by other users (mode {:04o}): chmod go-w it", mode & 0o7777));
    }
    None
}

/// Reads and parses the env file `path`, refusing one over `max_bytes`
/// (the most the app's environment may take, so a bigger file cannot be
/// used anyway) before reading it, or one that another user could have
/// written (see [`trust_problem`]). Follows symlinks (agenix's and
/// sops-nix's secrets are links). Opened non-blocking, so a FIFO put in
/// its place cannot hang the caller.
pub fn read(path: &Path, max_bytes: u64) -> Result<EnvFile, EnvFileError> {
    let read_err = |source| EnvFileError::Read { path: path.to_path_buf(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(EnvFileError::NotAFile { path: path.to_path_buf() });
    }
    if let Some(problem) = trust_problem(meta.uid(), meta.mode(), nix::unistd::geteuid().as_raw()) {
        return Err(EnvFileError::Unsafe { path: path.to_path_buf(), problem });
    }
    let too_large = |size| EnvFileError::TooLarge { path: path.to_path_buf(), size, limit: ByteSize(max_bytes) };
    if meta.len() > max_bytes {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        EnvFileError::Malformed {
            path: path.to_path_buf(),
            line: 1 + valid.iter().filter(|b| **b == b'\n').count(),
            problem: "is not UTF-8 text".to_string(),
        }
    })?;
    Ok(EnvFile { path: path.to_path_buf(), entries: parse(path, &text)?, world_readable: meta.mode() & 0o004 != 0 })
}

/// [`read`] for each of `paths`, in order; the first failure ends it.
pub fn read_all(paths: &[PathBuf], max_bytes: u64) -> Result<Vec<EnvFile>, EnvFileError> {
    paths.iter().map(|p| read(p, max_bytes)).collect()
}

/// The variables of `files` together: a later file's name wins over an
/// earlier one's, as a later line wins within a file.
pub fn merged(files: &[EnvFile]) -> BTreeMap<String, String> {
    files.iter().flat_map(|f| &f.entries).map(|e| (e.name.clone(), e.value.clone())).collect()
}

/// A digest of what `files` give the app: their paths and variables in
/// order, so a value edited, added or removed changes it and a comment or
/// blank line does not. Kept in the guest's record instead of the values.
/// It is a plain SHA-256, so a short secret could be guessed from it by
/// trial: the record holding it is as private as the config disk that holds
/// the value itself (0600 in the 0700 guest directory).
pub fn digest(files: &[EnvFile]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"hypeman env_files 1\0");
    for file in files {
        let path = file.path.as_os_str().as_encoded_bytes();
        hash.update((path.len() as u64).to_le_bytes());
        hash.update(path);
        hash.update((file.entries.len() as u64).to_le_bytes());
        for e in &file.entries {
            for part in [e.name.as_bytes(), e.value.as_bytes()] {
                hash.update((part.len() as u64).to_le_bytes());
                hash.update(part);
            }
        }
    }
    format!("sha256:{:x}", hash.finalize())
}

/// The digest of `paths` as they are now, or `None` when there are none or
/// one cannot be used (missing, unreadable to this user, malformed): then
/// nothing can be said about a change, and the boot reports the problem.
pub fn digest_of(paths: &[PathBuf], max_bytes: u64) -> Option<String> {
    if paths.is_empty() {
        return None;
    }
    read_all(paths, max_bytes).ok().map(|files| digest(&files))
}

/// The strings the app's `execve` gets from the declaration (entrypoint,
/// cmd, and `env` merged over the env files), against `limit`, counted as
/// the kernel counts them. Checked at boot, once the files are read:
/// validation counted the declaration's own strings only.
pub fn check_exec_size(
    entrypoint: Option<&[String]>,
    cmd: Option<&[String]>,
    env: &BTreeMap<String, String>,
    limit: ByteSize,
) -> Result<(), EnvFileError> {
    let cost = |len: usize| (len as u64).saturating_add(EXEC_STRING_OVERHEAD);
    let args = entrypoint.into_iter().chain(cmd).flatten().map(|a| cost(a.len()));
    let vars = env.iter().map(|(k, v)| cost(k.len() + 1 + v.len()));
    let total = args.chain(vars).fold(0u64, u64::saturating_add);
    if total > limit.0 {
        return Err(EnvFileError::ExecTooLarge { total, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/run/secrets/web.env";

    fn ok(text: &str) -> Vec<(String, String)> {
        parse(Path::new(P), text).expect("parses").into_iter().map(|e| (e.name, e.value)).collect()
    }

    fn err(text: &str) -> String {
        parse(Path::new(P), text).expect_err("refused").to_string()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_accepted_forms() {
        let text = "# comment\n\n   # indented comment\nA=1\nexport B=two words  \n  C = spaced\t\nD=\"q \\\"x\\\" \\\\ \\n\\t\"  # c\nE='$lit \\n'\nF=\nG=a#b 'c' \"d\"\nexportH=1\nI=x\r\nJ==eq\n";
        assert_eq!(
            ok(text),
            pairs(&[
                ("A", "1"),
                ("B", "two words"),
                ("C", "spaced"),
                ("D", "q \"x\" \\ \n\t"),
                ("E", "$lit \\n"),
                ("F", ""),
                ("G", "a#b 'c' \"d\""),
                ("exportH", "1"),
                ("I", "x"),
                ("J", "=eq"),
            ])
        );
        assert_eq!(ok(""), pairs(&[]));
        // Line numbers count every line, skipped ones too.
        let lines: Vec<usize> = parse(Path::new(P), "\n# c\nA=1\n\nB=2").unwrap().iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 5]);
    }

    #[test]
    fn a_later_name_wins_within_and_across_files() {
        let file = |path: &str, text: &str| EnvFile {
            path: path.into(),
            entries: parse(Path::new(path), text).unwrap(),
            world_readable: false,
        };
        let env = merged(&[file("/a", "X=1\nY=1\nX=2\n"), file("/b", "Y=b\nZ=b\n")]);
        assert_eq!(env.into_iter().collect::<Vec<_>>(), pairs(&[("X", "2"), ("Y", "b"), ("Z", "b")]));
    }

    /// No message repeats what is on the line: it may be a secret.
    #[test]
    fn malformed_lines_are_named_by_file_and_line_and_never_shown() {
        let secret = "hunter2";
        let cases = [
            (format!("A=1\n{secret}\n"), "/run/secrets/web.env:2: expected NAME=value (the line is not shown, it may hold a secret)"),
            (format!("{secret} x=1\n"), "/run/secrets/web.env:1: the text before `=` is not a variable name (letters, digits and `_`, not starting with a digit)"),
            (format!("1A={secret}\n"), "/run/secrets/web.env:1: the text before `=` is not a variable name (letters, digits and `_`, not starting with a digit)"),
            (format!("A=\"{secret}\n"), "/run/secrets/web.env:1: A: a double-quoted value is not closed on its line"),
            (format!("A=\"{secret}\\\"\n"), "/run/secrets/web.env:1: A: a double-quoted value is not closed on its line"),
            (format!("A='{secret}\n"), "/run/secrets/web.env:1: A: a single-quoted value is not closed on its line"),
            (format!("A=\"{secret}\\q\"\n"), "/run/secrets/web.env:1: A: an unknown escape in a double-quoted value (known: \\\\ \\\" \\n \\t)"),
            (format!("A=\"{secret}\" {secret}\n"), "/run/secrets/web.env:1: A: only blanks or a `#` comment may follow a closing quote"),
            (format!("\n\nA={secret}\0\n"), "/run/secrets/web.env:3: contains a NUL character, which no environment variable can hold"),
        ];
        for (text, want) in cases {
            let got = err(&text);
            assert_eq!(got, want, "{text:?}");
            assert!(!got.contains(secret), "{got}");
        }
    }

    #[test]
    fn one_string_over_the_kernels_limit_is_refused_by_its_name() {
        let at_limit = format!("AB={}\n", "v".repeat(EXEC_STRING_MAX as usize - 3));
        assert_eq!(ok(&at_limit).len(), 1);
        let over = format!("AB={}\n", "v".repeat(EXEC_STRING_MAX as usize - 2));
        assert_eq!(
            err(&over),
            "/run/secrets/web.env:1: AB=… is 131072 bytes; the guest kernel passes at most 131071 bytes per environment string (MAX_ARG_STRLEN)"
        );
    }

    #[test]
    fn who_may_own_and_write_an_env_file() {
        // The daemon as root: only root's files, writable by root alone.
        assert_eq!(trust_problem(0, 0o100400, 0), None);
        assert_eq!(trust_problem(0, 0o100644, 0), None);
        assert_eq!(trust_problem(0, 0o100440, 0), None);
        assert_eq!(trust_problem(1000, 0o100600, 0).unwrap(), "belongs to uid 1000, not to root: chown it");
        assert_eq!(trust_problem(0, 0o100666, 0).unwrap(), "can be written by other users (mode 0666): chmod go-w it");
        assert_eq!(trust_problem(0, 0o100620, 0).unwrap(), "can be written by other users (mode 0620): chmod go-w it");
        // The daemon as another user: root's files or its own.
        assert_eq!(trust_problem(990, 0o100400, 990), None);
        assert_eq!(trust_problem(0, 0o100440, 990), None);
        assert_eq!(
            trust_problem(1000, 0o100400, 990).unwrap(),
            "belongs to uid 1000, not to root or uid 990 (the daemon's user): chown it"
        );
    }

    #[test]
    fn reading_refuses_what_cannot_be_used_and_names_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("web.env");
        std::fs::write(&file, "A=1\nB='two'\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let read_ok = read(&file, 1 << 20).unwrap();
        assert_eq!(merged(std::slice::from_ref(&read_ok)).get("B").map(String::as_str), Some("two"));
        assert!(!read_ok.world_readable);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&file, 1 << 20).unwrap().world_readable);

        let e = read(&file, 4).unwrap_err();
        assert_eq!(e.to_string(), format!("env file {} is 12 bytes, over limits.max_exec_size (4B): it cannot all reach the app", file.display()));

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o646)).unwrap();
        let e = read(&file, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), format!("env file {} can be written by other users (mode 0646): chmod go-w it; it is not read", file.display()));

        let missing = tmp.path().join("nope.env");
        let e = read(&missing, 1 << 20).unwrap_err();
        assert!(e.is_missing());
        assert_eq!(e.to_string(), format!("env file {} cannot be read", missing.display()));

        let e = read(tmp.path(), 1 << 20).unwrap_err();
        assert!(matches!(e, EnvFileError::NotAFile { .. }) && !e.is_missing(), "{e}");

        // A FIFO does not hang the reader.
        let fifo = tmp.path().join("fifo.env");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(read(&fifo, 1 << 20).unwrap_err(), EnvFileError::NotAFile { .. }));

        let bad_utf8 = tmp.path().join("latin1.env");
        std::fs::write(&bad_utf8, b"A=1\nB=caf\xe9\n").unwrap();
        std::fs::set_permissions(&bad_utf8, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&bad_utf8, 1 << 20).unwrap_err().to_string(), format!("{}:2: is not UTF-8 text", bad_utf8.display()));

        // Someone else's file, when the daemon runs as root.
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = read(&file, 1 << 20).unwrap_err();
            assert_eq!(e.to_string(), format!("env file {} belongs to uid 65534, not to root: chown it; it is not read", file.display()));
        }
    }

    #[test]
    fn the_digest_follows_the_variables_not_the_layout() {
        let file = |text: &str| EnvFile { path: P.into(), entries: parse(Path::new(P), text).unwrap(), world_readable: false };
        let base = digest(&[file("A=1\nB=2\n")]);
        assert_eq!(base, digest(&[file("# c\nA=1\n\nB = \"2\"\n")]), "comments, blanks and quoting do not count");
        assert_ne!(base, digest(&[file("A=1\nB=3\n")]), "a value does");
        assert_ne!(base, digest(&[file("A=1\n")]), "a removed variable does");
        assert_ne!(base, digest(&[file("B=2\nA=1\n")]), "the order does: the later line wins");
        let elsewhere = EnvFile { path: "/elsewhere".into(), ..file("A=1\nB=2\n") };
        assert_ne!(base, digest(&[elsewhere]), "so does the file it came from");
        // Names and values cannot be shifted into each other.
        assert_ne!(digest(&[file("A=BC\n")]), digest(&[file("AB=C\n")]));
        assert!(base.starts_with("sha256:") && base.len() == "sha256:".len() + 64, "{base}");
        assert_eq!(digest_of(&[], 1 << 20), None);
        assert_eq!(digest_of(&["/nonexistent/web.env".into()], 1 << 20), None);
    }

    #[test]
    fn the_apps_strings_are_counted_with_the_files() {
        let env: BTreeMap<String, String> = [("A".to_string(), "x".repeat(100))].into();
        let cmd = vec!["sh".to_string()];
        // "sh" 2 + 9, "A=" + 100 = 102 + 9: 122 bytes.
        assert!(check_exec_size(None, Some(&cmd), &env, ByteSize(122)).is_ok());
        let e = check_exec_size(None, Some(&cmd), &env, ByteSize(121)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "entrypoint, cmd, env and env_files pass limits.max_exec_size (121B, 121 bytes): 122 bytes in all, \
             counting each string's NUL and 8-byte pointer as the guest kernel does"
        );
    }
}
