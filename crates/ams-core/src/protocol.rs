//! The in-container stage protocol.
//!
//! One container runs a whole build. Its main process is a small POSIX shell driver, written by
//! [`driver_script`], that runs each stage's script in a fresh shell (bash where the image has
//! it, else `sh`, chosen once per build) with stderr joined to stdout,
//! forwards SIGTERM to the running stage, and prints a marker line before and after each stage:
//! `\n\x1eAMS-{nonce} begin {i}` and `\n\x1eAMS-{nonce} end {i} {exit code}`; each stage script
//! traces its commands as `\n\x1eAMS-{nonce} trace + {command}`. The nonce is random
//! per build, so output cannot forge a marker by accident. [`Splitter`] turns the raw output
//! stream back into log output and stage events, keeping memory bounded whatever is printed.

/// Longest piece of a line held in memory; longer lines are passed on in pieces.
pub const MAX_LINE: usize = 64 * 1024;

/// Longest last line of a stage kept for `exit-line`, in bytes; the rest of a longer line is
/// not compared.
pub const MAX_LAST_LINE: usize = 4096;

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// What the driver does after a stage ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterStage {
    /// Go on to the next stage whatever happened.
    #[default]
    GoOn,
    /// Stop the build when the stage's exit code is not 0 (`fail-fast`).
    StopOnFailure,
    /// Wait for the host's verdict (`fail-fast` with `exit-line`: only the host knows the
    /// stage's last line): the host writes `verdict-{i}` holding `go` or `stop` into the
    /// read-only script folder.
    AskHost,
}

/// The driver run as the container's command, given the in-container directory of the stage
/// scripts, the nonce and what to do after each stage.
pub fn driver_script(script_dir: &str, nonce: &str, stages: &[AfterStage]) -> String {
    let dir = shell_quote(script_dir);
    let n = shell_quote(nonce);
    let mut s = String::from(
        "# AMS-Build stage driver (generated)\n\
         term=0\nchild=\n\
         trap 'term=1; if [ -n \"$child\" ]; then kill -TERM \"$child\" 2>/dev/null; fi' TERM INT\n",
    );
    // The stages' shell, chosen once per build: bash where the image has it (the described
    // system ran its commands with bash), else sh. Said in the log as a trace line.
    s.push_str(&format!(
        "if command -v bash >/dev/null 2>&1; then ams_sh=bash; else ams_sh=sh; fi\n\
         printf '\\n\\036AMS-%s trace %s\\n' {n} \"stages run in $ams_sh (set -e)\"\n\
         run_stage() {{\n"
    ));
    s.push_str(&format!(
        "  printf '\\n\\036AMS-%s begin %s\\n' {n} \"$1\"\n  \
         \"$ams_sh\" {dir}/stage-\"$1\".sh </dev/null 2>&1 &\n  \
         child=$!\n  \
         while :; do wait \"$child\"; rc=$?; kill -0 \"$child\" 2>/dev/null || break; done\n  \
         child=\n  \
         printf '\\n\\036AMS-%s end %s %s\\n' {n} \"$1\" \"$rc\"\n}}\n",
    ));
    if stages.contains(&AfterStage::AskHost) {
        s.push_str(&format!(
            "verdict() {{\n  \
             while [ ! -e {dir}/verdict-\"$1\" ]; do\n    \
             if [ \"$term\" = 1 ]; then exit 143; fi\n    \
             sleep 0.01 2>/dev/null || sleep 1 2>/dev/null || :\n  \
             done\n  \
             read v < {dir}/verdict-\"$1\"\n  \
             [ \"$v\" = go ]\n}}\n"
        ));
    }
    for (i, after) in stages.iter().enumerate() {
        s.push_str(&format!(
            "if [ \"$term\" = 1 ]; then exit 143; fi\nrun_stage {i}\n"
        ));
        match after {
            AfterStage::GoOn => {}
            AfterStage::StopOnFailure => s.push_str("if [ \"$rc\" != 0 ]; then exit 0; fi\n"),
            AfterStage::AskHost => s.push_str(&format!("verdict {i} || exit 0\n")),
        }
    }
    s.push_str("if [ \"$term\" = 1 ]; then exit 143; fi\nexit 0\n");
    s
}

/// Longest piece of a command echoed in a trace line; longer lines are cut with `…`.
pub const MAX_TRACE: usize = 1024;

/// The script of one stage: stop at the first failing command, trace each command first. The
/// trace goes out as markers (`trace {text}`), so the host logs it as `+ command` but never
/// takes it for the stage's last output line (`exit-line`).
pub fn stage_script(commands: &[String], nonce: &str) -> String {
    let n = shell_quote(nonce);
    let mut s = String::from("set -e\n");
    for c in commands {
        for (j, line) in c.split('\n').enumerate() {
            let mut text = if j == 0 {
                format!("+ {line}")
            } else {
                line.to_string()
            };
            if text.len() > MAX_TRACE {
                let mut cut = MAX_TRACE;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            s.push_str(&format!(
                "printf '\\n\\036AMS-%s trace %s\\n' {n} {}\n",
                shell_quote(&text)
            ));
        }
        s.push_str(c);
        s.push('\n');
    }
    s
}

/// What the splitter found in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Log bytes: whole lines with their newline, or pieces of a long line.
    Output(Vec<u8>),
    /// Stage i began.
    Begin(usize),
    /// Stage i ended with this exit code, and this was its last complete output line.
    End {
        stage: usize,
        code: i32,
        last_line: String,
    },
}

/// Splits the container's output stream into log output and stage markers.
///
/// Total and linear whatever the container prints: each byte is scanned for a newline once,
/// copied once and checked once more when its line ends; at most [`MAX_LINE`] bytes of a line
/// and [`MAX_LAST_LINE`] of the last one are held. The events do not depend on how the stream
/// is cut into chunks.
#[derive(Debug)]
pub struct Splitter {
    prefix: Vec<u8>,
    /// [`MAX_LINE`], smaller in tests.
    max_line: usize,
    line: Vec<u8>,
    partial: bool,
    held_blank: bool,
    last_line: Vec<u8>,
}

impl Splitter {
    pub fn new(nonce: &str) -> Self {
        let mut prefix = vec![0x1e];
        prefix.extend_from_slice(format!("AMS-{nonce} ").as_bytes());
        Splitter {
            prefix,
            max_line: MAX_LINE,
            line: Vec::new(),
            partial: false,
            held_blank: false,
            last_line: Vec::new(),
        }
    }

    /// A splitter that cuts lines at `max_line` bytes, so tests reach long lines cheaply.
    #[cfg(test)]
    fn with_max_line(nonce: &str, max_line: usize) -> Self {
        Splitter {
            max_line,
            ..Splitter::new(nonce)
        }
    }

    /// Bytes held between calls.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.line.len() + self.last_line.len()
    }

    fn emit_held(&mut self, out: &mut Vec<Event>) {
        if self.held_blank {
            self.held_blank = false;
            out.push(Event::Output(b"\n".to_vec()));
            self.last_line.clear();
        }
    }

    fn marker(&self, line: &[u8]) -> Option<Event> {
        let rest = line.strip_prefix(self.prefix.as_slice())?;
        let text = std::str::from_utf8(rest).ok()?;
        let mut parts = text.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            // A trace line is log output that never counts as the stage's last line.
            (Some("trace"), ..) => {
                let mut out = text["trace".len()..].strip_prefix(' ')?.as_bytes().to_vec();
                out.push(b'\n');
                Some(Event::Output(out))
            }
            (Some("begin"), Some(i), None, None) => Some(Event::Begin(i.parse().ok()?)),
            (Some("end"), Some(i), Some(code), None) => Some(Event::End {
                stage: i.parse().ok()?,
                code: code.parse().ok()?,
                last_line: String::from_utf8_lossy(&self.last_line).trim().to_string(),
            }),
            _ => None,
        }
    }

    fn complete_line(&mut self, out: &mut Vec<Event>) {
        let line = std::mem::take(&mut self.line);
        crate::work::add(line.len());
        if !self.partial {
            if let Some(ev) = self.marker(&line) {
                self.held_blank = false;
                if matches!(ev, Event::Begin(_)) {
                    self.last_line.clear();
                }
                out.push(ev);
                return;
            }
            if line.is_empty() {
                self.emit_held(out);
                self.held_blank = true;
                return;
            }
        }
        self.emit_held(out);
        if self.partial {
            self.last_line.clear();
        } else if !line.iter().all(|b| b.is_ascii_whitespace()) {
            self.last_line.clear();
            self.last_line
                .extend_from_slice(&line[..line.len().min(MAX_LAST_LINE)]);
        }
        let mut bytes = line;
        bytes.push(b'\n');
        out.push(Event::Output(bytes));
        self.partial = false;
    }

    /// Feeds a chunk of the stream; events are appended to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<Event>) {
        while !data.is_empty() {
            let newline = data.iter().position(|b| *b == b'\n');
            crate::work::add(newline.map_or(data.len(), |p| p + 1));
            match newline {
                Some(pos) => {
                    self.push_bytes(&data[..pos], out);
                    self.complete_line(out);
                    data = &data[pos + 1..];
                }
                None => {
                    self.push_bytes(data, out);
                    data = &[];
                }
            }
        }
    }

    fn push_bytes(&mut self, mut bytes: &[u8], out: &mut Vec<Event>) {
        while !bytes.is_empty() {
            let room = self.max_line - self.line.len();
            let take = room.min(bytes.len());
            crate::work::add(take);
            self.line.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.line.len() >= self.max_line {
                self.emit_held(out);
                out.push(Event::Output(std::mem::take(&mut self.line)));
                self.partial = true;
            }
        }
    }

    /// Flushes what is left at the end of the stream.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        self.emit_held(out);
        if !self.line.is_empty() {
            out.push(Event::Output(std::mem::take(&mut self.line)));
        }
    }
}

/// Whether a stage passed: by exit code, or by its last line when exit-line is a string.
pub fn stage_passed(code: i32, last_line: &str, exit_line: Option<&str>) -> bool {
    match exit_line {
        None => code == 0,
        Some(want) => last_line.trim() == want.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(nonce: &str, chunks: &[&[u8]]) -> Vec<Event> {
        let mut s = Splitter::new(nonce);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    fn text(events: &[Event]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Output(b) => Some(String::from_utf8_lossy(b).to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn markers_split_stages_and_injected_newlines_vanish() {
        let stream = b"\n\x1eAMS-n1 begin 0\nhello\nworld\n\n\x1eAMS-n1 end 0 0\n\n\x1eAMS-n1 begin 1\nno newline\n\x1eAMS-n1 end 1 3\n";
        let ev = run("n1", &[stream]);
        assert_eq!(ev[0], Event::Begin(0));
        assert!(ev.contains(&Event::End {
            stage: 0,
            code: 0,
            last_line: "world".into()
        }));
        assert!(ev.contains(&Event::End {
            stage: 1,
            code: 3,
            last_line: "no newline".into()
        }));
        assert_eq!(text(&ev), "hello\nworld\nno newline\n");
    }

    #[test]
    fn markers_survive_any_chunking() {
        let stream: &[u8] = b"\n\x1eAMS-x begin 0\na\n\nb\n\n\x1eAMS-x end 0 1\n";
        let whole = run("x", &[stream]);
        for cut in 1..stream.len() {
            let parts = run("x", &[&stream[..cut], &stream[cut..]]);
            assert_eq!(parts, whole, "cut at {cut}");
        }
        assert_eq!(text(&whole), "a\n\nb\n");
    }

    #[test]
    fn wrong_nonce_is_plain_output() {
        let ev = run("real", &[b"\x1eAMS-fake end 0 0\n"]);
        assert_eq!(ev.len(), 1);
        assert!(matches!(ev[0], Event::Output(_)));
    }

    #[test]
    fn long_line_is_bounded() {
        let big = vec![b'x'; MAX_LINE * 3 + 10];
        let ev = run("n", &[&big, b"\n"]);
        let total: usize = ev
            .iter()
            .map(|e| match e {
                Event::Output(b) => {
                    assert!(b.len() <= MAX_LINE + 1);
                    b.len()
                }
                _ => 0,
            })
            .sum();
        assert_eq!(total, big.len() + 1);
    }

    #[test]
    fn trace_lines_are_logged_but_never_the_last_line() {
        let stream = b"\n\x1eAMS-n begin 0\n\n\x1eAMS-n trace + echo exit code 0\nexit code 0\n\n\x1eAMS-n trace + touch x\n\n\x1eAMS-n trace + printf part\npart\n\x1eAMS-n end 0 0\n";
        let ev = run("n", &[stream]);
        assert_eq!(
            ev,
            vec![
                Event::Begin(0),
                Event::Output(b"+ echo exit code 0\n".to_vec()),
                Event::Output(b"exit code 0\n".to_vec()),
                Event::Output(b"+ touch x\n".to_vec()),
                Event::Output(b"+ printf part\n".to_vec()),
                Event::Output(b"part\n".to_vec()),
                Event::End {
                    stage: 0,
                    code: 0,
                    last_line: "part".into()
                },
            ]
        );
        // Only traces after the output: the output is still the last line.
        let ev = run(
            "n",
            &[b"\n\x1eAMS-n begin 0\nexit code 0\n\n\x1eAMS-n trace + touch x\n\n\x1eAMS-n end 0 0\n"],
        );
        assert!(
            matches!(ev.last(), Some(Event::End { last_line, .. }) if last_line == "exit code 0"),
            "{ev:?}"
        );
    }

    #[test]
    fn fail_fast_drivers_stop_or_ask() {
        let d = driver_script(
            "/ci",
            "n",
            &[
                AfterStage::GoOn,
                AfterStage::StopOnFailure,
                AfterStage::AskHost,
            ],
        );
        assert!(
            d.contains("run_stage 1\nif [ \"$rc\" != 0 ]; then exit 0; fi\n"),
            "{d}"
        );
        assert!(d.contains("run_stage 2\nverdict 2 || exit 0\n"), "{d}");
        assert!(d.contains("run_stage 0\nif [ \"$term\""), "{d}");
        assert!(!driver_script("/ci", "n", &[AfterStage::GoOn]).contains("verdict"));
    }

    #[test]
    fn exit_line_rules() {
        assert!(stage_passed(0, "", None));
        assert!(!stage_passed(1, "0", None));
        assert!(stage_passed(1, "0", Some("0")));
        assert!(!stage_passed(0, "done", Some("0")));
    }

    #[test]
    fn quoting_is_safe() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
        let s = stage_script(&["echo '$(x)'".to_string()], "n'1");
        assert!(
            s.contains("printf '\\n\\036AMS-%s trace %s\\n' 'n'\\''1' '+ echo '\\''$(x)'\\'''"),
            "{s}"
        );
    }

    #[test]
    fn many_tiny_chunks_and_huge_lines_take_linear_work() {
        // 2 MiB in one-byte chunks: lines just under, at and over MAX_LINE, a huge line, and
        // markers. Re-scanning the held line on each chunk would count about 10^11 units.
        let mut stream = Vec::new();
        for len in [MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, 10 * MAX_LINE] {
            stream.extend(std::iter::repeat_n(b'x', len));
            stream.extend_from_slice(b"\n\n\x1eAMS-n begin 0\n");
        }
        while stream.len() < 2 << 20 {
            stream.extend_from_slice(b"\n\x1eAMS-n end 0 0\nab\n");
        }
        let mut s = Splitter::new("n");
        let mut out = Vec::new();
        let ((), work) = crate::work::count(|| {
            for b in stream.chunks(1) {
                s.feed(b, &mut out);
                assert!(s.held_bytes() <= MAX_LINE + MAX_LAST_LINE);
            }
            s.finish(&mut out);
        });
        assert!(
            work <= 3 * stream.len() as u64,
            "{work} units for {} bytes",
            stream.len()
        );
        assert_eq!(out, run("n", &[&stream]));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const NONCE: &str = "n0nce";

        /// What the model says one marker line is.
        #[derive(Debug, Clone, PartialEq, Eq)]
        enum Mark {
            Begin(usize),
            End(usize, i32, String),
        }

        /// Pieces of a container's output: the driver's markers, near misses of them (another
        /// nonce, a prefix of it, extra or missing fields, mid-line), blank and white lines,
        /// invalid UTF-8, lines around the cut length, and any bytes.
        fn piece() -> impl Strategy<Value = Vec<u8>> {
            let marker = (0usize..4, -2i32..300).prop_map(|(i, c)| {
                [
                    format!("\n\x1eAMS-{NONCE} begin {i}\n"),
                    format!("\n\x1eAMS-{NONCE} end {i} {c}\n"),
                ]
            });
            prop_oneof![
                3 => (marker, any::<bool>()).prop_map(|(m, b)| m[usize::from(b)].clone().into_bytes()),
                2 => prop::sample::select(vec![
                    "\x1eAMS-other begin 0\n", "\x1eAMS-n0nc begin 0\n", "\x1eAMS-n0nce0 end 0 0\n",
                    "AMS-n0nce begin 0\n", "\x1eAMS-n0nce begin\n", "\x1eAMS-n0nce end 0\n",
                    "\x1eAMS-n0nce end 0 0 0\n", "\x1eAMS-n0nce begin x\n", "\x1eAMS-n0nce end 0 99999999999\n",
                    "x\x1eAMS-n0nce begin 0\n", " \x1eAMS-n0nce begin 0\n", "\x1eAMS-n0nce  begin 0\n",
                    "\x1eAMS-n0nce begin 0\r\n", "\x1eAMS-n0nce ", "\n", "\n\n", " \n", "\t \n", "0\n",
                    "done\n", "last line",
                ]).prop_map(|s| s.as_bytes().to_vec()),
                1 => Just(b"\x1eAMS-n0nce end 1 \xff\n".to_vec()),
                1 => Just(b"\xff\xfe\xc3\n".to_vec()),
                2 => (20usize..80, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
                2 => prop::collection::vec(any::<u8>(), 0..24),
            ]
        }

        fn stream() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(piece(), 0..24).prop_map(|v| v.concat())
        }

        /// The stream cut at these places.
        fn chunks<'a>(stream: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.sort_unstable();
            let mut out = Vec::new();
            let mut from = 0;
            for a in at {
                out.push(&stream[from..a]);
                from = a;
            }
            out.push(&stream[from..]);
            out
        }

        fn split(max_line: usize, chunks: &[&[u8]]) -> (Vec<Event>, u64, usize) {
            let mut s = Splitter::with_max_line(NONCE, max_line);
            let mut out = Vec::new();
            let mut most_held = 0;
            let ((), work) = crate::work::count(|| {
                for c in chunks {
                    s.feed(c, &mut out);
                    most_held = most_held.max(s.held_bytes());
                }
                s.finish(&mut out);
            });
            (out, work, most_held)
        }

        /// The stream read as whole lines, by the documented rules: a marker is a whole line
        /// shorter than the cut length that is the prefix and `begin I` or `end I CODE`; a blank
        /// line just before a marker is the driver's and vanishes; a stage's last line is the
        /// last line with more than white space since it began (a blank line printed, or a line
        /// too long to hold, clears it), cut at MAX_LAST_LINE bytes and trimmed.
        fn model(stream: &[u8], max_line: usize) -> (Vec<u8>, Vec<Mark>) {
            let prefix = format!("\x1eAMS-{NONCE} ");
            let marker = |l: &[u8]| -> Option<(bool, usize, i32)> {
                let rest = std::str::from_utf8(l.strip_prefix(prefix.as_bytes())?).ok()?;
                let f: Vec<&str> = rest.split(' ').collect();
                match f.as_slice() {
                    ["begin", i] => Some((true, i.parse().ok()?, 0)),
                    ["end", i, c] => Some((false, i.parse().ok()?, c.parse().ok()?)),
                    _ => None,
                }
            };
            let (mut out, mut marks) = (Vec::new(), Vec::new());
            let (mut held, mut last): (bool, Vec<u8>) = (false, Vec::new());
            let mut lines: Vec<&[u8]> = stream.split(|b| *b == b'\n').collect();
            let tail = lines.pop().unwrap_or_default();
            for l in lines {
                let m = if l.len() < max_line { marker(l) } else { None };
                if let Some((begin, i, code)) = m {
                    held = false;
                    if begin {
                        last.clear();
                        marks.push(Mark::Begin(i));
                    } else {
                        let text = String::from_utf8_lossy(&last).trim().to_string();
                        marks.push(Mark::End(i, code, text));
                    }
                    continue;
                }
                if l.is_empty() {
                    if held {
                        out.push(b'\n');
                        last.clear();
                    }
                    held = true;
                    continue;
                }
                if held {
                    out.push(b'\n');
                    last.clear();
                    held = false;
                }
                if l.len() >= max_line {
                    last.clear();
                } else if !l.iter().all(u8::is_ascii_whitespace) {
                    last = l[..l.len().min(MAX_LAST_LINE)].to_vec();
                }
                out.extend_from_slice(l);
                out.push(b'\n');
            }
            if held {
                out.push(b'\n');
            }
            out.extend_from_slice(tail);
            (out, marks)
        }

        proptest! {
            #![proptest_config(crate::work::cases(256))]

            /// However the stream is cut into chunks (one byte each included), the events are
            /// those of the whole stream at once.
            #[test]
            fn chunking_does_not_change_events(st in stream(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16), max_line in prop::sample::select(vec![32usize, 41, 64, MAX_LINE])) {
                let (whole, _, _) = split(max_line, &[&st]);
                let (cut, _, _) = split(max_line, &chunks(&st, &cuts));
                prop_assert_eq!(&cut, &whole);
                let bytes: Vec<&[u8]> = st.chunks(1).collect();
                let (tiny, _, _) = split(max_line, &bytes);
                prop_assert_eq!(&tiny, &whole);
            }

            /// The events agree with the line model: the same log bytes, the same markers with
            /// the same last lines; every output piece and everything held stays bounded; and
            /// the work is at most three units a byte.
            #[test]
            fn events_follow_the_line_model(st in stream(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16), max_line in prop::sample::select(vec![32usize, 41, 64, MAX_LINE])) {
                let (events, work, most_held) = split(max_line, &chunks(&st, &cuts));
                let (want_out, want_marks) = model(&st, max_line);
                let mut got_out = Vec::new();
                let mut got_marks = Vec::new();
                for e in events {
                    match e {
                        Event::Output(b) => {
                            prop_assert!(!b.is_empty() && b.len() <= max_line + 1, "{} bytes", b.len());
                            got_out.extend_from_slice(&b);
                        }
                        Event::Begin(i) => got_marks.push(Mark::Begin(i)),
                        Event::End { stage, code, last_line } => got_marks.push(Mark::End(stage, code, last_line)),
                    }
                }
                prop_assert_eq!(String::from_utf8_lossy(&got_out), String::from_utf8_lossy(&want_out));
                prop_assert_eq!(got_marks, want_marks);
                prop_assert!(most_held <= max_line + MAX_LAST_LINE);
                prop_assert!(work <= 3 * st.len() as u64, "{} units for {} bytes", work, st.len());
            }

            /// Output from a container that does not know the nonce is all log, never a stage
            /// event, and reaches the log whole: lines with other nonces, shell text, any bytes.
            #[test]
            fn without_the_nonce_everything_is_output(st in prop::collection::vec(prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                Just(b"\n\x1eAMS-other begin 0\n\x1eAMS-n0nc end 0 0\n".to_vec()),
            ], 0..16).prop_map(|v| v.concat()), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
                prop_assume!(!st.windows(11).any(|w| w == b"\x1eAMS-n0nce "));
                let (events, _, _) = split(MAX_LINE, &chunks(&st, &cuts));
                let mut got = Vec::new();
                for e in events {
                    match e {
                        Event::Output(b) => got.extend_from_slice(&b),
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                prop_assert_eq!(got, st);
            }
        }
    }
}
