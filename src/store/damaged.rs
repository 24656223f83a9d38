//! What can still be read of a record that cannot be decoded: its `name`
//! and `version`, from the top level of a JSON object that may be cut short
//! (a truncated file), of a newer format, or of a shape this build refuses.
//!
//! The store uses it to say which instance an unreadable record may belong
//! to (so that no second VMM is started for it) and whether a newer hypeman
//! wrote it (so that this one never rewrites it). Pure: bytes in, remains
//! out.

/// The top-level members of a damaged record that could be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Remains {
    pub name: Option<String>,
    pub version: Option<u64>,
}

/// Reads `name` and `version` from the top level of `bytes`: from the whole
/// document when it parses, else from the longest prefix that does. A member
/// cut short (a string without its closing quote, a number at the very end)
/// is not taken: `"version": 1` cut from `12` must not read as 1.
pub(crate) fn remains(bytes: &[u8]) -> Remains {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
        return Remains {
            name: value.get("name").and_then(|v| v.as_str()).map(str::to_string),
            version: value.get("version").and_then(serde_json::Value::as_u64),
        };
    }
    scan_prefix(&String::from_utf8_lossy(bytes))
}

/// Where the scanner is in the top-level object.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// A key (after `{` or `,`).
    Key,
    /// The `:` and then a value of this key.
    Value(String),
    /// Anything until the next top-level `,`.
    Skip,
}

fn scan_prefix(text: &str) -> Remains {
    let mut out = Remains::default();
    let mut chars = text.chars().peekable();
    let mut depth = 0usize;
    let mut expect = Expect::Skip;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let Some(s) = read_string(&mut chars) else { break };
                if depth != 1 {
                    continue;
                }
                expect = match expect {
                    Expect::Key => Expect::Value(s),
                    Expect::Value(key) => {
                        if key == "name" && out.name.is_none() {
                            out.name = Some(s);
                        }
                        Expect::Skip
                    }
                    Expect::Skip => Expect::Skip,
                };
            }
            '{' | '[' => {
                depth += 1;
                expect = if depth == 1 && c == '{' { Expect::Key } else if depth == 1 { break } else { expect_inside(expect) };
            }
            '}' | ']' => {
                if depth <= 1 {
                    break;
                }
                depth -= 1;
            }
            ',' if depth == 1 => expect = Expect::Key,
            '0'..='9' if depth == 1 => {
                let mut digits = String::from(c);
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                // A number at the very end may be cut short.
                let complete = chars.peek().is_some();
                if let (Expect::Value(key), true) = (&expect, complete) {
                    if key == "version" && out.version.is_none() {
                        out.version = digits.parse().ok();
                    }
                }
                expect = Expect::Skip;
            }
            _ => {}
        }
    }
    out
}

/// A nested value began: the key it belongs to is done with.
fn expect_inside(expect: Expect) -> Expect {
    match expect {
        Expect::Value(_) | Expect::Skip | Expect::Key => Expect::Skip,
    }
}

/// The rest of a JSON string after its opening quote, unescaped; `None`
/// when the text ends first.
fn read_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<String> {
    let mut s = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(s),
            '\\' => match chars.next()? {
                'n' => s.push('\n'),
                't' => s.push('\t'),
                'r' => s.push('\r'),
                'b' => s.push('\u{8}'),
                'f' => s.push('\u{c}'),
                'u' => {
                    let hex: String = (0..4).map(|_| chars.next()).collect::<Option<String>>()?;
                    s.push(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32).unwrap_or('\u{fffd}'));
                }
                other => s.push(other),
            },
            other => s.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = r#"{
  "version": 2,
  "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
  "name": "web",
  "created_at": "2026-01-15T09:30:00.123Z",
  "hypervisor": "qemu",
  "vmm": { "pid": 4242, "socket": "/g/qmp.sock", "name": "not this one" },
  "applied": { "name": "nor this", "version": 9 }
}
"#;

    #[test]
    fn a_whole_document_gives_its_top_level_members() {
        assert_eq!(remains(RECORD.as_bytes()), Remains { name: Some("web".into()), version: Some(2) });
        let newer = br#"{"version": 9, "name": "api", "shiny": {"name": "x"}}"#;
        assert_eq!(remains(newer), Remains { name: Some("api".into()), version: Some(9) });
    }

    #[test]
    fn every_truncation_reads_what_it_still_holds_and_nothing_else() {
        let name_end = RECORD.find("\"web\"").unwrap() + "\"web\"".len();
        for cut in 0..RECORD.len() {
            let got = remains(&RECORD.as_bytes()[..cut]);
            // The version is complete once a character follows its digit.
            let version_seen = cut > RECORD.find("2,").unwrap() + 1;
            assert_eq!(got.version, version_seen.then_some(2), "cut at {cut}");
            let name_seen = cut >= name_end;
            assert_eq!(got.name, name_seen.then(|| "web".to_string()), "cut at {cut}: {got:?}");
        }
    }

    #[test]
    fn a_number_cut_at_the_end_is_not_taken() {
        assert_eq!(remains(br#"{"version": 1"#).version, None, "it may have been 12");
        assert_eq!(remains(br#"{"version": 12,"#).version, Some(12));
    }

    #[test]
    fn escapes_and_nested_keys_do_not_confuse_it() {
        let text = br#"{"vmm": {"name": "inner"}, "note": "a \"name\": \"x\"", "name": "w\u0065b", "cut"#;
        assert_eq!(remains(text).name.as_deref(), Some("web"));
        assert_eq!(remains(b"").name, None);
        assert_eq!(remains(b"garbage").name, None);
        assert_eq!(remains(br#"["name", "web"]"#).name, None, "not an object");
    }
}
