//! `path:line:column: message` problem reports for TOML files, shared by
//! instance declarations and the settings file. Owns the conversion of byte
//! spans into 1-based line and column numbers; knows nothing of what the
//! files mean.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one file, located where an editor can jump to it.
///
/// `line` and `column` are 1-based; `column` counts characters (not bytes),
/// as editors and compilers do, so a non-ASCII value before the problem
/// does not shift the reported column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl Diagnostic {
    /// A problem with the file as a whole (its name, reading it): reported at
    /// its first character so tools that expect a position still get one.
    pub fn whole_file(path: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            message: message.into(),
        }
    }

    /// A problem starting at byte `offset` of `text`.
    pub fn at(path: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = line_column(text, offset);
        Diagnostic {
            path: path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    /// A TOML syntax or shape error (wrong type, unknown key, ...). toml gives
    /// the span of the offending token when it knows one.
    pub fn from_toml(path: &Path, text: &str, err: &toml::de::Error) -> Self {
        let offset = err.span().map_or(0, |s| s.start);
        // toml's own messages sometimes end in a newline meant for its
        // multi-line rendering; ours is one line.
        let mut message = err.message().trim().replace('\n', " ");
        // toml does not name the duplicated key, but its span covers it.
        if message == "duplicate key" {
            if let Some(key) = err
                .span()
                .and_then(|s| text.get(s))
                .filter(|k| !k.is_empty())
            {
                message = format!("duplicate key `{key}`");
            }
        }
        Diagnostic::at(path, text, offset, message)
    }
}

/// 1-based (line, column) of byte `offset`, clamped into `text` and moved back
/// to a character boundary so a bad offset can never panic.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Collects every problem found while validating one file, so a user fixes
/// them in one round instead of one per run.
pub(crate) struct Problems<'a> {
    path: &'a Path,
    text: &'a str,
    list: Vec<Diagnostic>,
}

impl<'a> Problems<'a> {
    pub(crate) fn new(path: &'a Path, text: &'a str) -> Self {
        Problems {
            path,
            text,
            list: Vec::new(),
        }
    }

    /// Report at the start of `span` (a `toml::Spanned` span).
    pub(crate) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.list
            .push(Diagnostic::at(self.path, self.text, span.start, message));
    }

    /// Report a problem with no location of its own (a missing key, a default
    /// that does not fit a limit).
    pub(crate) fn file(&mut self, message: impl Into<String>) {
        self.list.push(Diagnostic::whole_file(self.path, message));
    }

    /// Report a bad value as `key = <value as written>: message`, so the
    /// user sees exactly what was read (quotes, escapes and all).
    pub(crate) fn value(&mut self, key: &str, span: Range<usize>, message: impl fmt::Display) {
        let written = self.text.get(span.clone()).unwrap_or("").trim();
        // Long or multi-line values would bury the message; the position
        // already points at the value.
        let shown = match written.char_indices().nth(60) {
            _ if written.contains('\n') => format!("{}…", written.lines().next().unwrap_or("")),
            Some((cut, _)) => format!("{}…", &written[..cut]),
            None => written.to_string(),
        };
        self.at(span, format!("{key} = {shown}: {message}"));
    }

    pub(crate) fn push(&mut self, diagnostic: Diagnostic) {
        self.list.push(diagnostic);
    }

    /// `Ok(value)` when nothing was reported, else every problem in file order.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, Vec<Diagnostic>> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.into_sorted())
        }
    }

    /// Every problem reported, in file order.
    pub(crate) fn into_sorted(mut self) -> Vec<Diagnostic> {
        // Stable sort: problems at one position keep the order they were found.
        self.list.sort_by_key(|d| (d.line, d.column));
        self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // 'é' is two bytes but one column.
        let eq = text.rfind('=').unwrap();
        assert_eq!(line_column(text, eq), (2, 4));
    }

    #[test]
    fn out_of_range_and_mid_character_offsets_do_not_panic() {
        let text = "é";
        assert_eq!(line_column(text, 1), (1, 1));
        assert_eq!(line_column(text, 99), (1, 2));
        assert_eq!(line_column("", 5), (1, 1));
    }

    #[test]
    fn renders_path_line_column_message() {
        let d = Diagnostic::at(Path::new("instances/web.toml"), "x\ny = 1", 2, "bad");
        assert_eq!(d.to_string(), "instances/web.toml:2:1: bad");
    }
}
