//! How `hypeman image pull` shows a pull on stderr.
//!
//! [`PullView`] turns [`PullEvent`]s into text and does no IO: on a
//! terminal one live line is redrawn in place (`\r`, erase to end of line)
//! and replaced by a final line when a layer is verified or a phase ends;
//! elsewhere each event that matters is one plain line, and download
//! chunks print nothing. [`StderrProgress`] writes that text as events
//! arrive. Stdout is not touched: `pull` prints only the digest there.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::images::{Progress, PullEvent};

/// How often a live download line is redrawn at most.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// Erases the current terminal line and returns the cursor to its start.
const CLEAR_LINE: &str = "\r\x1b[K";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// stderr is a terminal: redraw in place.
    Terminal,
    /// stderr is a file or pipe: one line per event, no control characters.
    Plain,
}

/// The pull as shown so far.
#[derive(Debug)]
pub struct PullView {
    style: Style,
    /// A live (unterminated) line is on the terminal.
    live: bool,
    last_draw: Option<Instant>,
    /// When the current blob or phase began.
    started: Option<Instant>,
}

impl PullView {
    pub fn new(style: Style) -> PullView {
        PullView {
            style,
            live: false,
            last_draw: None,
            started: None,
        }
    }

    /// The text to write for `event`, which arrived at `now`; often empty.
    pub fn render(&mut self, event: &PullEvent<'_>, now: Instant) -> String {
        match *event {
            PullEvent::Resolved {
                digest,
                layers,
                bytes,
            } => self.line(format!(
                "resolved {}: {layers} layer{}, {}",
                short(digest),
                plural(layers as u64),
                human(bytes)
            )),
            PullEvent::LayerCached { digest, size } => {
                self.line(format!("  {}  {:>10}  cached", short(digest), human(size)))
            }
            PullEvent::Cached { digest } => self.line(format!("cached {}", short(digest))),
            PullEvent::BlobStarted { digest, size } => {
                self.started = Some(now);
                self.last_draw = Some(now);
                match self.style {
                    Style::Terminal => self.live_line(format!(
                        "  {}  {:>10} / {}",
                        short(digest),
                        human(0),
                        human(size)
                    )),
                    Style::Plain => {
                        self.line(format!("  {}  {:>10}  fetching", short(digest), human(size)))
                    }
                }
            }
            PullEvent::BlobProgress { digest, done, size } => {
                let due = self
                    .last_draw
                    .is_none_or(|t| now.saturating_duration_since(t) >= REDRAW_EVERY);
                if self.style == Style::Plain || !due {
                    return String::new();
                }
                self.last_draw = Some(now);
                let percent = (done * 100).checked_div(size).unwrap_or(100);
                self.live_line(format!(
                    "  {}  {:>10} / {}  {percent:>3}%",
                    short(digest),
                    human(done),
                    human(size)
                ))
            }
            PullEvent::BlobVerified { digest, size } => {
                let took = self.elapsed(now);
                self.line(format!(
                    "  {}  {:>10}  verified{took}",
                    short(digest),
                    human(size)
                ))
            }
            PullEvent::Unpacking { index, count } => {
                if index <= 1 {
                    self.started = Some(now);
                }
                self.phase(format!("  unpacking layer {index}/{count}"))
            }
            PullEvent::Unpacked {
                layers,
                entries,
                bytes,
            } => {
                let took = self.elapsed(now);
                self.line(format!(
                    "  unpacked {layers} layer{}: {entries} entries, {}{took}",
                    plural(layers),
                    human(bytes)
                ))
            }
            PullEvent::Building { format } => {
                self.started = Some(now);
                self.phase(format!("  building the {} disk", format.as_str()))
            }
            PullEvent::Built { format, size_bytes } => {
                let took = self.elapsed(now);
                self.line(format!(
                    "  built the {} disk: {}{took}",
                    format.as_str(),
                    human(size_bytes)
                ))
            }
        }
    }

    /// Erases a live line left on the terminal, so what is written next
    /// (the summary, or an error) starts on a clean line.
    pub fn finish(&mut self) -> String {
        if std::mem::take(&mut self.live) {
            CLEAR_LINE.to_string()
        } else {
            String::new()
        }
    }

    /// A line that stays.
    fn line(&mut self, text: String) -> String {
        format!("{}{text}\n", self.finish())
    }

    /// A line the next one replaces (terminal only).
    fn live_line(&mut self, text: String) -> String {
        self.live = true;
        format!("{CLEAR_LINE}{text}")
    }

    /// The start of a phase: live on a terminal, a line elsewhere.
    fn phase(&mut self, text: String) -> String {
        match self.style {
            Style::Terminal => self.live_line(text),
            Style::Plain => self.line(text),
        }
    }

    fn elapsed(&mut self, now: Instant) -> String {
        match self.started.take() {
            Some(t) => format!(" in {:.2}s", now.saturating_duration_since(t).as_secs_f64()),
            None => String::new(),
        }
    }
}

/// The first 12 hex digits of a digest, as `docker pull` shows layers.
fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    &hex[..hex.len().min(12)]
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Draws a pull on `out` (stderr) as events arrive.
pub struct StderrProgress<W> {
    inner: Mutex<(PullView, W)>,
}

impl<W: Write + Send> StderrProgress<W> {
    pub fn new(style: Style, out: W) -> StderrProgress<W> {
        StderrProgress {
            inner: Mutex::new((PullView::new(style), out)),
        }
    }

    /// Writes a line of its own, after erasing a live line.
    pub fn say(&self, line: &str) {
        self.draw(|view| format!("{}{line}\n", view.finish()));
    }

    /// Erases a live line; see [`PullView::finish`].
    pub fn finish(&self) {
        self.draw(PullView::finish);
    }

    /// Writes what `render` makes of the view. Progress is a courtesy: a
    /// closed stderr must not fail the pull, so write errors are dropped.
    fn draw(&self, render: impl FnOnce(&mut PullView) -> String) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (view, out) = &mut *guard;
        let text = render(view);
        if !text.is_empty() {
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        }
    }
}

impl<W: Write + Send> Progress for StderrProgress<W> {
    fn event(&self, event: &PullEvent<'_>) {
        self.draw(|view| view.render(event, Instant::now()));
    }
}

/// A byte count as the pull lines and the `image` listings show it.
pub(super) use crate::config_file::units::human_bytes as human;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::RootfsFormat;

    const LAYER: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const IMAGE: &str = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    /// A whole two-layer pull; each event `ms` milliseconds after the start.
    fn pull() -> Vec<(u64, PullEvent<'static>)> {
        let mib = 1 << 20;
        vec![
            (0, PullEvent::Resolved { digest: IMAGE, layers: 2, bytes: 3 * mib }),
            (0, PullEvent::BlobStarted { digest: LAYER, size: 2 * mib }),
            (50, PullEvent::BlobProgress { digest: LAYER, done: mib / 2, size: 2 * mib }),
            (120, PullEvent::BlobProgress { digest: LAYER, done: mib, size: 2 * mib }),
            (150, PullEvent::BlobProgress { digest: LAYER, done: 2 * mib, size: 2 * mib }),
            (250, PullEvent::BlobVerified { digest: LAYER, size: 2 * mib }),
            (250, PullEvent::BlobStarted { digest: IMAGE, size: mib }),
            (300, PullEvent::BlobVerified { digest: IMAGE, size: mib }),
            (300, PullEvent::Unpacking { index: 1, count: 2 }),
            (400, PullEvent::Unpacking { index: 2, count: 2 }),
            (800, PullEvent::Unpacked { layers: 2, entries: 10_004, bytes: 5 * mib }),
            (800, PullEvent::Building { format: RootfsFormat::Erofs }),
            (1300, PullEvent::Built { format: RootfsFormat::Erofs, size_bytes: 4 * mib }),
        ]
    }

    fn render_all(style: Style, events: &[(u64, PullEvent<'_>)]) -> String {
        let t0 = Instant::now();
        let mut view = PullView::new(style);
        let mut text: String = events
            .iter()
            .map(|(ms, e)| view.render(e, t0 + Duration::from_millis(*ms)))
            .collect();
        text.push_str(&view.finish());
        text
    }

    #[test]
    fn plain_output_is_one_line_per_event_without_chunks() {
        assert_eq!(
            render_all(Style::Plain, &pull()),
            "resolved fedcba987654: 2 layers, 3.0 MiB\n\
             \x20 0123456789ab     2.0 MiB  fetching\n\
             \x20 0123456789ab     2.0 MiB  verified in 0.25s\n\
             \x20 fedcba987654     1.0 MiB  fetching\n\
             \x20 fedcba987654     1.0 MiB  verified in 0.05s\n\
             \x20 unpacking layer 1/2\n\
             \x20 unpacking layer 2/2\n\
             \x20 unpacked 2 layers: 10004 entries, 5.0 MiB in 0.50s\n\
             \x20 building the erofs disk\n\
             \x20 built the erofs disk: 4.0 MiB in 0.50s\n"
        );
    }

    #[test]
    fn terminal_output_redraws_one_live_line_at_most_every_100ms() {
        let text = render_all(Style::Terminal, &pull());
        // What the terminal keeps: every \r returns to the start of the
        // line and \x1b[K erases it, so only the last draw of a line stays.
        let kept: Vec<&str> = text
            .split('\n')
            .map(|l| l.rsplit(CLEAR_LINE).next().unwrap_or(l))
            .collect();
        assert_eq!(
            kept,
            [
                "resolved fedcba987654: 2 layers, 3.0 MiB",
                "  0123456789ab     2.0 MiB  verified in 0.25s",
                "  fedcba987654     1.0 MiB  verified in 0.05s",
                "  unpacked 2 layers: 10004 entries, 5.0 MiB in 0.50s",
                "  built the erofs disk: 4.0 MiB in 0.50s",
                "",
            ]
        );
        // The draws themselves: the start, then the chunk at 120 ms; the
        // ones at 50 ms and 150 ms came too soon after the previous draw.
        let draws = |line: usize| text.split('\n').nth(line).unwrap().split(CLEAR_LINE).skip(1).collect::<Vec<_>>();
        assert_eq!(
            draws(1),
            [
                "  0123456789ab         0 B / 2.0 MiB",
                "  0123456789ab     1.0 MiB / 2.0 MiB   50%",
                "  0123456789ab     2.0 MiB  verified in 0.25s",
            ]
        );
        assert_eq!(
            draws(3),
            ["  unpacking layer 1/2", "  unpacking layer 2/2", "  unpacked 2 layers: 10004 entries, 5.0 MiB in 0.50s"]
        );
    }

    #[test]
    fn plain_output_has_no_control_characters() {
        let text = render_all(Style::Plain, &pull());
        assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");
    }

    #[test]
    fn a_cache_hit_lists_the_layers_it_did_not_fetch() {
        let events = [
            (0, PullEvent::Resolved { digest: IMAGE, layers: 1, bytes: 2048 }),
            (0, PullEvent::LayerCached { digest: LAYER, size: 2048 }),
            (0, PullEvent::Cached { digest: IMAGE }),
        ];
        let expected = "resolved fedcba987654: 1 layer, 2.0 KiB\n\
                        \x20 0123456789ab     2.0 KiB  cached\n\
                        cached fedcba987654\n";
        assert_eq!(render_all(Style::Terminal, &events), expected);
        assert_eq!(render_all(Style::Plain, &events), expected);
    }

    #[test]
    fn finish_erases_a_live_line_only_on_a_terminal() {
        let start = [(0, PullEvent::BlobStarted { digest: LAYER, size: 10 })];
        assert!(render_all(Style::Terminal, &start).ends_with(CLEAR_LINE));
        assert!(render_all(Style::Plain, &start).ends_with("fetching\n"));
        let mut view = PullView::new(Style::Terminal);
        assert_eq!(view.finish(), "");
    }

    #[test]
    fn writer_receives_the_rendered_text() {
        let mut written = Vec::new();
        {
            let progress = StderrProgress::new(Style::Terminal, &mut written);
            progress.say("pulling x");
            progress.event(&PullEvent::BlobStarted { digest: LAYER, size: 1024 });
            progress.finish();
            progress.event(&PullEvent::Cached { digest: IMAGE });
        }
        assert_eq!(
            String::from_utf8(written).unwrap(),
            "pulling x\n\r\x1b[K  0123456789ab         0 B / 1.0 KiB\r\x1b[Kcached fedcba987654\n"
        );
    }
}
