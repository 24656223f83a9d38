//! The module import graph of `src/`, checked: layers point one way.
//!
//! Every `crate::…`, `super::…` and `self::…` path in the library's sources
//! (including `use` groups such as `use crate::{a::B, c}`) is resolved to the
//! module it names. Two rules follow from the resolved paths:
//!
//! - **No cycles among siblings.** Within any module (the crate root
//!   included), an edge runs from child `a` to child `b` when code under `a`
//!   names something under `b`. That graph must be acyclic. A child naming
//!   its parent (`super::Item`) or a parent naming its children is not a
//!   sibling edge: a parent's items are shared by all of its children.
//! - **No forbidden edges** ([`FORBIDDEN`]): lower layers never name the
//!   ones above them, e.g. a hypervisor backend knows nothing of
//!   declarations or settings.
//!
//! Edges that are known to be wrong but live in code not yet reworked are
//! listed in [`KNOWN_EXCEPTIONS`], each with why; an exception that no
//! longer occurs fails the test, so the list only shrinks.
//!
//! Resolution is textual and deliberately simple: an item re-exported by a
//! parent (`crate::store::Metadata`) counts as the parent's, and paths that
//! start from an imported name (`use crate::a; a::b::C`) count only through
//! their `use`. Run with `--nocapture` to see the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges no code may add: `(from, to)` module path prefixes. A reference
/// from a module at or under `from` to one at or under `to` is a violation.
const FORBIDDEN: &[(&str, &str)] = &[
    // Backends get their own config types; they do not read config files.
    ("hypervisor", "declaration"),
    ("hypervisor", "settings"),
    // The executor drives backends, never the other way around.
    ("hypervisor", "instances"),
    ("hypervisor", "reconcile"),
    // The store persists hypervisor facts, not declarations.
    ("store", "declaration"),
    // The command line talks to the reconciler's interface, not its owners.
    ("cli", "reconcile::owner"),
    // The executor carries out steps; it does not plan or own instances.
    ("instances", "reconcile"),
    // The config-file toolkit is below both config files.
    ("config_file", "declaration"),
    ("config_file", "settings"),
    // Settings may build on declarations, not the reverse.
    ("declaration", "settings"),
    // The image store is told its options; it does not read settings.
    ("images", "settings"),
];

/// Edges that break a rule today, in files whose rework is still pending:
/// `(from module, to module)` exactly as the graph prints them.
const KNOWN_EXCEPTIONS: &[(&str, &str)] = &[
];

/// One module of the crate, by path (`""` is the crate root).
type Module = String;

#[test]
fn layers_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = source_files(&src);
    let mut modules: BTreeSet<Module> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut refs: BTreeSet<(Module, Vec<String>)> = BTreeSet::new();
    let mut test_modules: BTreeSet<Module> = BTreeSet::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).expect("read a source file");
        let tokens = tokenize(&text);
        for (inner, target) in references(module, &tokens, &mut test_modules) {
            modules.insert(inner.clone());
            refs.insert((inner, target));
        }
    }
    // Every reference, as (from module, to module): the longest known
    // module prefix of the path is what it names.
    let mut edges: BTreeSet<(Module, Module)> = BTreeSet::new();
    for (from, path) in &refs {
        let to = (0..=path.len())
            .rev()
            .map(|n| path[..n].join("::"))
            .find(|m| modules.contains(m))
            .expect("the crate root is a module");
        if &to != from {
            edges.insert((from.clone(), to));
        }
    }

    let excused: BTreeSet<(Module, Module)> = KNOWN_EXCEPTIONS
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let mut problems = Vec::new();

    for (from, to) in &edges {
        for (bad_from, bad_to) in FORBIDDEN {
            if under(from, bad_from) && under(to, bad_to) && !excused.contains(&(from.clone(), to.clone())) {
                problems.push(format!("forbidden edge {from} -> {to} (rule {bad_from} -> {bad_to})"));
            }
        }
    }

    // Sibling graphs, keyed by their parent. Test code is left out: a test
    // may build fixtures from a sibling without making the code depend on
    // it (it is still held to FORBIDDEN above). `shown` has every edge of
    // the code; `levels`, checked for cycles, lacks the known exceptions.
    let test_only = |m: &str| test_modules.iter().any(|t| under(m, t));
    let mut levels: BTreeMap<Module, BTreeSet<(Module, Module)>> = BTreeMap::new();
    let mut shown: BTreeMap<Module, BTreeSet<(Module, Module)>> = BTreeMap::new();
    let mut excused_sibling: BTreeSet<(Module, Module)> = BTreeSet::new();
    for (from, to) in &edges {
        if test_only(from) {
            continue;
        }
        let Some((parent, a, b)) = siblings(from, to) else { continue };
        shown.entry(parent.clone()).or_default().insert((a.clone(), b.clone()));
        if excused.contains(&(from.clone(), to.clone())) {
            excused_sibling.insert((a, b));
        } else {
            levels.entry(parent).or_default().insert((a, b));
        }
    }
    // A sibling edge is only an exception if every reference behind it is.
    for level in levels.values() {
        for edge in level {
            excused_sibling.remove(edge);
        }
    }
    let mark = |edge: &(Module, Module)| if excused_sibling.contains(edge) { " (known exception)" } else { "" };
    for exception in &excused {
        if !edges.contains(exception) {
            problems.push(format!(
                "known exception {} -> {} no longer occurs: remove it from KNOWN_EXCEPTIONS",
                exception.0, exception.1
            ));
        }
    }

    println!("top-level imports (from -> to), test code left out:");
    let top = shown.get("").cloned().unwrap_or_default();
    let mut by_source: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for edge in &top {
        by_source.entry(&edge.0).or_default().push(format!("{}{}", edge.1, mark(edge)));
    }
    for (a, bs) in &by_source {
        println!("  {a} -> {}", bs.join(", "));
    }
    println!("sibling imports inside modules:");
    for (parent, level) in &shown {
        if parent.is_empty() {
            continue;
        }
        let list: Vec<String> =
            level.iter().map(|edge| format!("{} -> {}{}", leaf(&edge.0), leaf(&edge.1), mark(edge))).collect();
        println!("  {parent}: {}", list.join(", "));
    }
    for (parent, level) in &levels {
        for cycle in cycles(level) {
            let inside = if parent.is_empty() { "the crate root".to_owned() } else { parent.clone() };
            problems.push(format!("import cycle inside {inside}: {}", cycle.join(" <-> ")));
        }
    }
    if !excused.is_empty() {
        println!("known exceptions:");
        for (a, b) in &excused {
            println!("  {a} -> {b}");
        }
    }
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    assert!(problems.is_empty(), "{} layering problem(s):\n{}", problems.len(), problems.join("\n"));
}

/// The daemon links only the host↔guest contract, not the guest's PID 1,
/// and the contract links nothing the static init does not already link.
#[test]
fn the_daemon_links_the_contract_not_init() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = |rel: &str| std::fs::read_to_string(root.join(rel)).expect("read a Cargo.toml");
    let daemon = dependencies(&manifest("Cargo.toml"));
    assert!(daemon.contains("hypeman-contract"), "{daemon:?}");
    assert!(!daemon.contains("hypeman-init"), "hypeman must not depend on hypeman-init: {daemon:?}");
    let init = dependencies(&manifest("init/Cargo.toml"));
    assert!(init.contains("hypeman-contract"), "{init:?}");
    let contract = dependencies(&manifest("contract/Cargo.toml"));
    let extra: Vec<&String> = contract.iter().filter(|d| !init.contains(*d)).collect();
    assert!(extra.is_empty(), "the contract links what init does not: {extra:?}");
}

/// The names in every `[*dependencies]` table of a manifest.
fn dependencies(manifest: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line.trim_matches(|c| c == '[' || c == ']').ends_with("dependencies");
        } else if in_deps && !line.starts_with('#') {
            if let Some((name, _)) = line.split_once('=') {
                out.insert(name.trim().to_owned());
            }
        }
    }
    out
}

/// `module` is `prefix` or inside it.
fn under(module: &str, prefix: &str) -> bool {
    module == prefix || module.starts_with(&format!("{prefix}::"))
}

fn leaf(module: &str) -> &str {
    module.rsplit("::").next().unwrap_or(module)
}

/// For an edge between two modules, the parent whose children it joins:
/// the nearest common ancestor and the child of it on each side. `None`
/// when one module contains the other.
fn siblings(from: &str, to: &str) -> Option<(Module, Module, Module)> {
    let a: Vec<&str> = if from.is_empty() { vec![] } else { from.split("::").collect() };
    let b: Vec<&str> = if to.is_empty() { vec![] } else { to.split("::").collect() };
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == a.len() || common == b.len() {
        return None;
    }
    Some((a[..common].join("::"), a[..=common].join("::"), b[..=common].join("::")))
}

/// The strongly connected components of more than one node, each sorted.
fn cycles(edges: &BTreeSet<(Module, Module)>) -> Vec<Vec<Module>> {
    let nodes: BTreeSet<&Module> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let reach = |start: &Module| {
        let mut seen: BTreeSet<&Module> = BTreeSet::new();
        let mut todo = vec![start];
        while let Some(n) = todo.pop() {
            for (a, b) in edges {
                if a == n && seen.insert(b) {
                    todo.push(b);
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&Module, BTreeSet<&Module>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut out: BTreeSet<Vec<Module>> = BTreeSet::new();
    for n in &nodes {
        if !reachable[n].contains(n) {
            continue;
        }
        let component: Vec<Module> = nodes
            .iter()
            .filter(|m| reachable[n].contains(*m) && reachable[*m].contains(n))
            .map(|m| m.to_string())
            .collect();
        out.insert(component);
    }
    out.into_iter().collect()
}

/// Every `.rs` file of the library (not the binary's `main.rs`) with its
/// module path.
fn source_files(src: &Path) -> Vec<(Module, PathBuf)> {
    let mut out = Vec::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                todo.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            let file = parts.pop().expect("a file name");
            match file.as_str() {
                "main.rs" if parts.is_empty() => continue,
                "lib.rs" if parts.is_empty() => {}
                "mod.rs" => {}
                other => parts.push(other.trim_end_matches(".rs").to_owned()),
            }
            out.push((parts.join("::"), path));
        }
    }
    out.sort();
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

/// Identifiers and the punctuation paths are made of; comments, string
/// and char literals and lifetimes are dropped.
fn tokenize(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(&c, i);
        } else if ch == '\'' {
            i = skip_char_or_lifetime(&c, i);
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let next = c.get(i).copied();
            let raw_string = next == Some('"') || (next == Some('#') && c[i..].iter().find(|&&x| x != '#') == Some(&'"'));
            if (word == "r" || word == "br") && raw_string {
                i = skip_raw_string(&c, i);
            } else if word == "b" && next == Some('"') {
                i = skip_string(&c, i);
            } else if word == "b" && next == Some('\'') {
                i = skip_char_or_lifetime(&c, i);
            } else {
                out.push(Token::Ident(word));
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Token::Other);
        } else {
            i += 1;
            out.push(match ch {
                ':' if c.get(i) == Some(&':') => {
                    i += 1;
                    Token::PathSep
                }
                '{' => Token::Open,
                '}' => Token::Close,
                ',' => Token::Comma,
                ';' => Token::Semi,
                '*' => Token::Star,
                _ => Token::Other,
            });
        }
    }
    out
}

/// From the opening quote to past the closing one.
fn skip_string(c: &[char], mut i: usize) -> usize {
    i += 1;
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// From the `#`s or quote after `r` to past the closing quote and `#`s.
fn skip_raw_string(c: &[char], mut i: usize) -> usize {
    let mut hashes = 0;
    while c.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    i += 1;
    while i < c.len() {
        if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

/// A char literal (`'a'`, `'\n'`, `'\u{1F600}'`) or a lifetime (`'a`).
fn skip_char_or_lifetime(c: &[char], i: usize) -> usize {
    if c.get(i + 1) == Some(&'\\') {
        // Past the backslash and the escaped character, which may be a quote.
        let mut j = i + 3;
        while j < c.len() && c[j] != '\'' {
            j += 1;
        }
        return j + 1;
    }
    if c.get(i + 2) == Some(&'\'') {
        return i + 3;
    }
    i + 1
}

/// Every crate-internal path in a file's tokens, as (module the code is in,
/// absolute path segments). Inline `mod name { … }` blocks are followed,
/// so `super::` inside a file's `mod tests` names the file's own module.
/// Modules declared under `#[cfg(test)]` (inline or from a file) are added
/// to `test_modules`.
fn references(file_module: &str, tokens: &[Token], test_modules: &mut BTreeSet<Module>) -> Vec<(Module, Vec<String>)> {
    let mut out = Vec::new();
    // The inline modules open around the current token, with the brace
    // depth at which each closes.
    let mut stack: Vec<(Module, usize)> = vec![(file_module.to_owned(), 0)];
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Open => depth += 1,
            Token::Close => {
                depth = depth.saturating_sub(1);
                if stack.len() > 1 && stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                }
            }
            Token::Ident(word) if word == "mod" => {
                let here = &stack.last().expect("the file's module").0;
                let name = match tokens.get(i + 1) {
                    Some(Token::Ident(name)) => name.clone(),
                    _ => String::new(),
                };
                let inner = if here.is_empty() { name.clone() } else { format!("{here}::{name}") };
                if !name.is_empty() && cfg_test_before(tokens, i) {
                    test_modules.insert(inner.clone());
                }
                if !name.is_empty() && tokens.get(i + 2) == Some(&Token::Open) {
                    stack.push((inner, depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Token::Ident(word)
                if matches!(word.as_str(), "crate" | "super" | "self")
                    && tokens.get(i + 1) == Some(&Token::PathSep)
                    && !(i > 0 && tokens[i - 1] == Token::PathSep) =>
            {
                let here = stack.last().expect("the file's module").0.clone();
                let base: Vec<String> = if here.is_empty() {
                    vec![]
                } else {
                    here.split("::").map(str::to_owned).collect()
                };
                let mut paths = Vec::new();
                i = parse_path(tokens, i, &base, Vec::new(), true, &mut paths);
                for p in paths {
                    out.push((here.clone(), p));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Whether the item whose `mod` keyword is at `tokens[at]` carries
/// `#[cfg(test)]`: looking back over its attributes and visibility, up to
/// the end of the item before it.
fn cfg_test_before(tokens: &[Token], at: usize) -> bool {
    let item_start = tokens[..at]
        .iter()
        .rposition(|t| matches!(t, Token::Semi | Token::Open | Token::Close))
        .map_or(0, |p| p + 1);
    let attrs = &tokens[item_start..at];
    attrs.windows(3).any(|w| {
        w[0] == Token::Ident("cfg".into()) && w[1] == Token::Other && w[2] == Token::Ident("test".into())
    })
}

/// Parses one path (with `{…}` groups) starting at `tokens[i]`, pushing
/// every full path it expands to onto `out`; returns the index after it.
/// `prefix` is what the enclosing group already resolved to; `first` is
/// whether the path starts here (where `crate`, `self` and `super` are
/// roots rather than group members).
fn parse_path(
    tokens: &[Token],
    mut i: usize,
    base: &[String],
    prefix: Vec<String>,
    mut first: bool,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    loop {
        match tokens.get(i) {
            Some(Token::Ident(word)) => {
                match (first, word.as_str()) {
                    (true, "crate") => path.clear(),
                    (true, "self") => path = base.to_vec(),
                    (true, "super") => {
                        path = base.to_vec();
                        path.pop();
                    }
                    (false, "super") => {
                        path.pop();
                    }
                    // `use a::{self, b}`: `self` is the group's module.
                    (false, "self") => {}
                    _ => path.push(word.clone()),
                }
                first = false;
                i += 1;
            }
            Some(Token::Open) => {
                i += 1;
                loop {
                    match tokens.get(i) {
                        Some(Token::Close) => {
                            i += 1;
                            break;
                        }
                        Some(Token::Comma) => i += 1,
                        Some(Token::Star) => {
                            out.push(path.clone());
                            i += 1;
                        }
                        Some(Token::Ident(_)) | Some(Token::Open) => {
                            let before = i;
                            i = parse_path(tokens, i, base, path.clone(), false, out);
                            if i == before {
                                i += 1;
                            }
                        }
                        // `as name` renames, and anything unexpected.
                        Some(_) => i += 1,
                        None => return i,
                    }
                }
                return i;
            }
            Some(Token::Star) => {
                out.push(path);
                return i + 1;
            }
            _ => {
                out.push(path);
                return i;
            }
        }
        if tokens.get(i) == Some(&Token::PathSep) {
            i += 1;
        } else {
            // `as` and what follows is a rename; the path ends here.
            out.push(path);
            if let Some(Token::Ident(word)) = tokens.get(i) {
                if word == "as" {
                    i += 2;
                }
            }
            return i;
        }
    }
}

#[test]
fn the_scanner_resolves_groups_super_and_inline_modules() {
    let text = r#"
        // use crate::nothing::here;
        use crate::{a::{b::C, self}, d};
        use super::sibling::X as Y;
        const S: &str = "crate::not::a::path";
        fn f<'a>(x: &'a str) -> char { let _ = crate::e::f(); 'c' }
        #[cfg(test)]
        mod tests {
            use super::*;
            use super::super::up;
        }
    "#;
    let mut test_modules = BTreeSet::new();
    let refs = references("top::mid", &tokenize(text), &mut test_modules);
    assert_eq!(test_modules, BTreeSet::from(["top::mid::tests".to_owned()]));
    let got: Vec<(String, String)> = refs.into_iter().map(|(m, p)| (m, p.join("::"))).collect();
    let want: Vec<(String, String)> = [
        ("top::mid", "a::b::C"),
        ("top::mid", "a"),
        ("top::mid", "d"),
        ("top::mid", "top::sibling::X"),
        ("top::mid", "e::f"),
        ("top::mid::tests", "top::mid"),
        ("top::mid::tests", "top::up"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn cycles_are_found_and_a_dag_has_none() {
    let edges = |list: &[(&str, &str)]| -> BTreeSet<(Module, Module)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    };
    assert_eq!(
        cycles(&edges(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])),
        [vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]
    );
    assert!(cycles(&edges(&[("a", "b"), ("a", "c"), ("b", "c")])).is_empty());
    assert_eq!(siblings("cli::image", "cli::progress"), Some(("cli".into(), "cli::image".into(), "cli::progress".into())));
    assert_eq!(siblings("cli::image", "cli"), None);
    assert_eq!(siblings("hypervisor::qemu", "instances"), Some(("".into(), "hypervisor".into(), "instances".into())));
}
