//! The initrd's kernel module list: where it lives and its format, one
//! absolute path per line in load order, `#` comments allowed. The host
//! resolves the order from `modules.dep` when it builds the initrd; init
//! loads the list as written and resolves nothing itself.

use std::path::PathBuf;

/// Path of the initrd's module list, one absolute path per line, in load order.
pub const MODULE_LOAD_ORDER: &str = "/lib/modules/load-order";

/// The first line of every list the host writes.
const HEADER: &str = "# module load order, resolved from modules.dep by hypeman\n";

/// The list's text for `paths` (absolute, in load order), as the initrd
/// builder writes it.
pub fn format_load_order<'a>(paths: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = String::from(HEADER);
    for path in paths {
        text.push_str(path);
        text.push('\n');
    }
    text
}

/// Paths listed in a load-order file: one per line, blank lines and `#`
/// comments ignored, surrounding whitespace trimmed.
pub fn parse_load_order(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_load_order_skipping_blanks_and_comments() {
        let text = "# built by hypeman\n/lib/modules/6.1/kernel/a.ko\n\n  /lib/modules/6.1/kernel/b.ko  \n";
        assert_eq!(
            parse_load_order(text),
            [
                PathBuf::from("/lib/modules/6.1/kernel/a.ko"),
                PathBuf::from("/lib/modules/6.1/kernel/b.ko")
            ]
        );
        assert!(parse_load_order("").is_empty());
    }

    #[test]
    fn what_the_host_writes_init_reads_back_in_order() {
        let paths = ["/lib/modules/6.1/kernel/b.ko", "/lib/modules/6.1/kernel/a.ko"];
        let text = format_load_order(paths);
        assert_eq!(
            text,
            "# module load order, resolved from modules.dep by hypeman\n\
             /lib/modules/6.1/kernel/b.ko\n/lib/modules/6.1/kernel/a.ko\n"
        );
        assert_eq!(parse_load_order(&text), paths.map(PathBuf::from));
        assert!(parse_load_order(&format_load_order([])).is_empty());
    }
}
