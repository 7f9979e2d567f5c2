//! The in-container stage protocol.
//!
//! One container runs a whole build. Its main process is a small POSIX shell driver, written by
//! [`driver_script`], that runs each stage's script in a fresh `sh` with stderr joined to stdout,
//! forwards SIGTERM to the running stage, and prints a marker line before and after each stage:
//! `\n\x1eAMS-{nonce} begin {i}` and `\n\x1eAMS-{nonce} end {i} {exit code}`. The nonce is random
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

/// The driver run as the container's command, given the in-container directory of the stage
/// scripts, the nonce and the number of stages.
pub fn driver_script(script_dir: &str, nonce: &str, stages: usize) -> String {
    let mut s = String::from(
        "# AMS-Build stage driver (generated)\n\
         term=0\nchild=\n\
         trap 'term=1; if [ -n \"$child\" ]; then kill -TERM \"$child\" 2>/dev/null; fi' TERM INT\n\
         run_stage() {\n",
    );
    s.push_str(&format!(
        "  printf '\\n\\036AMS-%s begin %s\\n' {n} \"$1\"\n  \
         sh {dir}/stage-\"$1\".sh </dev/null 2>&1 &\n  \
         child=$!\n  \
         while :; do wait \"$child\"; rc=$?; kill -0 \"$child\" 2>/dev/null || break; done\n  \
         child=\n  \
         printf '\\n\\036AMS-%s end %s %s\\n' {n} \"$1\" \"$rc\"\n}}\n",
        n = shell_quote(nonce),
        dir = shell_quote(script_dir),
    ));
    for i in 0..stages {
        s.push_str(&format!(
            "if [ \"$term\" = 1 ]; then exit 143; fi\nrun_stage {i}\n"
        ));
    }
    s.push_str("if [ \"$term\" = 1 ]; then exit 143; fi\nexit 0\n");
    s
}

/// The script of one stage: stop at the first failing command, echo each command first.
pub fn stage_script(commands: &[String]) -> String {
    let mut s = String::from("set -e\n");
    for c in commands {
        s.push_str(&format!("printf '+ %s\\n' {}\n", shell_quote(c)));
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
#[derive(Debug)]
pub struct Splitter {
    prefix: Vec<u8>,
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
            line: Vec::new(),
            partial: false,
            held_blank: false,
            last_line: Vec::new(),
        }
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
            match data.iter().position(|b| *b == b'\n') {
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
            let room = MAX_LINE - self.line.len();
            let take = room.min(bytes.len());
            self.line.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.line.len() >= MAX_LINE {
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
    fn exit_line_rules() {
        assert!(stage_passed(0, "", None));
        assert!(!stage_passed(1, "0", None));
        assert!(stage_passed(1, "0", Some("0")));
        assert!(!stage_passed(0, "done", Some("0")));
    }

    #[test]
    fn quoting_is_safe() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
        let s = stage_script(&["echo '$(x)'".to_string()]);
        assert!(s.contains("printf '+ %s\\n' 'echo '\\''$(x)'\\'''"));
    }
}
