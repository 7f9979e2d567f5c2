//! Masking of secret values in text that leaves a build: its log (the file and the live
//! stream) and the notifications about it.
//!
//! A [`Masker`] holds every form in which a value is likely to be printed: the value itself,
//! its base64 (standard and URL-safe alphabets, the whole encoding and, for a value printed
//! inside a longer encoded text, the characters that depend on the value alone at each of the
//! three alignments; padding never matters, since the unpadded form is a prefix of the padded
//! one), lower- and upper-case hex, its percent-encodings (RFC 3986 with upper- or lower-case
//! hex, forms with `+` for a space, and JavaScript's `encodeURIComponent`), its JSON string
//! escape, and, for a value of several lines, each line of eight characters or more. Every
//! byte that lies inside any occurrence of any form is hidden, overlapping and adjacent
//! occurrences together becoming one [`MASK`].
//!
//! [`MaskStream`] masks a stream that arrives in pieces of any size. It runs one Aho-Corasick
//! automaton over each byte once, keeping its state between pieces, and holds back only the
//! bytes that could still turn out to be part of a form: those after the last point where no
//! form was under way, and never more than the longest form less one byte. The work is linear
//! in the bytes pushed, whatever they are, and the memory is the automaton plus that tail.
//!
//! What masking cannot hide is said in README.md: a value printed transformed in any other
//! way (reversed, split over lines, encrypted, one character at a time with other text
//! between) is shown as printed.

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{Anchored, MatchKind};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What a hidden run of bytes becomes.
pub const MASK: &str = "***";

/// Shortest form that is masked: shorter ones (a short line of a multi-line value) would hide
/// ordinary text.
const MIN_FORM: usize = crate::secrets::MIN_VALUE_CHARS;

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 without padding. With `whole`, a last partial group is written as an encoder ends
/// a text (its free bits zero); without, only the characters fixed by these bytes alone are
/// written, as they appear when more bytes follow the value.
pub fn base64(bytes: &[u8], alphabet: &[u8; 64], whole: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        for shift in [18, 12, 6, 0] {
            out.push(alphabet[((n >> shift) & 63) as usize]);
        }
    }
    match *chunks.remainder() {
        [a] => {
            out.push(alphabet[usize::from(a >> 2)]);
            if whole {
                out.push(alphabet[usize::from((a & 3) << 4)]);
            }
        }
        [a, b] => {
            out.push(alphabet[usize::from(a >> 2)]);
            out.push(alphabet[usize::from(((a & 3) << 4) | (b >> 4))]);
            if whole {
                out.push(alphabet[usize::from((b & 15) << 2)]);
            }
        }
        _ => {}
    }
    out
}

/// Hex digits of the bytes.
pub fn hex(bytes: &[u8], upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(digits[usize::from(b >> 4)]);
        out.push(digits[usize::from(b & 15)]);
    }
    out
}

/// Percent-encoding: bytes other than letters, digits and those in `keep` become `%XX`;
/// a space becomes `+` when `plus`.
pub fn percent(bytes: &[u8], keep: &[u8], upper: bool, plus: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b);
        } else if plus && b == b' ' {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[
                b'%',
                digits[usize::from(b >> 4)],
                digits[usize::from(b & 15)],
            ]);
        }
    }
    out
}

/// Every form of `value` that is masked (see the module's documentation), without repeats.
pub fn forms(value: &str) -> Vec<Vec<u8>> {
    let raw = value.as_bytes();
    let mut out: Vec<Vec<u8>> = vec![raw.to_vec()];
    for alphabet in [B64_STD, B64_URL] {
        out.push(base64(raw, alphabet, true));
        for skip in 0..3 {
            out.push(base64(raw.get(skip..).unwrap_or_default(), alphabet, false));
        }
    }
    out.push(hex(raw, false));
    out.push(hex(raw, true));
    out.push(percent(raw, b"-._~", true, false));
    out.push(percent(raw, b"-._~", false, false));
    out.push(percent(raw, b"-._~", true, true));
    out.push(percent(raw, b"-._~!'()*", true, false));
    if let Ok(json) = serde_json::to_string(value) {
        out.push(json.as_bytes()[1..json.len() - 1].to_vec());
    }
    if value.contains('\n') {
        for line in value.lines() {
            out.push(line.trim_end_matches('\r').as_bytes().to_vec());
        }
    }
    out.retain(|f| f.len() >= MIN_FORM);
    out.sort();
    out.dedup();
    out
}

/// The automaton of every form of some secret values. Shared by the streams that use it.
#[derive(Debug)]
pub struct Masker {
    nfa: NFA,
    start: StateID,
    /// The longest form.
    longest: usize,
    /// How many values it masks.
    values: usize,
}

impl Masker {
    /// A masker of these values; `None` when there is nothing to mask.
    pub fn new<S: AsRef<str>>(values: &[S]) -> Result<Option<Arc<Masker>>, String> {
        let mut all: Vec<Vec<u8>> = values.iter().flat_map(|v| forms(v.as_ref())).collect();
        all.sort();
        all.dedup();
        if all.is_empty() {
            return Ok(None);
        }
        let nfa = NFA::builder()
            .match_kind(MatchKind::Standard)
            .prefilter(false)
            .build(&all)
            .map_err(|e| format!("cannot build the secret masker: {e}"))?;
        let start = nfa
            .start_state(Anchored::No)
            .map_err(|e| format!("cannot build the secret masker: {e}"))?;
        Ok(Some(Arc::new(Masker {
            longest: nfa.max_pattern_len(),
            nfa,
            start,
            values: values.len(),
        })))
    }

    /// How many values this masks.
    pub fn values(&self) -> usize {
        self.values
    }

    /// Bytes the automaton takes.
    pub fn memory_usage(&self) -> usize {
        self.nfa.memory_usage()
    }

    /// Masks a whole text at once.
    pub fn mask(self: &Arc<Self>, text: &[u8]) -> Vec<u8> {
        let mut s = MaskStream::new(self.clone());
        let mut out = Vec::with_capacity(text.len());
        s.push(text, &mut out);
        s.flush(&mut out);
        out
    }

    /// Masks a whole string at once. A form is whole characters of the text wherever it
    /// occurs, so the result is still UTF-8.
    pub fn mask_str(self: &Arc<Self>, text: &str) -> String {
        match String::from_utf8(self.mask(text.as_bytes())) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// Masks a stream that arrives in pieces: see the module's documentation.
#[derive(Debug)]
pub struct MaskStream {
    m: Arc<Masker>,
    sid: StateID,
    /// Bytes pushed and not yet given out; `held[0]` is byte `base` of the stream. A ring, so
    /// that giving out its front never moves the rest.
    held: VecDeque<u8>,
    base: u64,
    /// Bytes pushed so far.
    pos: u64,
    /// No form can begin before this byte any more: the automaton was in its start state
    /// here (nothing under way).
    quiet: u64,
    /// Hidden runs within `held`, as [start, end) stream offsets: ordered, apart.
    runs: Vec<(u64, u64)>,
    /// The longest form ending at each match state met so far.
    longest_at: HashMap<StateID, usize>,
    /// Where the last mask given out ends: a run given out in parts starts there again.
    masked_to: Option<u64>,
}

impl MaskStream {
    pub fn new(m: Arc<Masker>) -> Self {
        MaskStream {
            sid: m.start,
            m,
            held: VecDeque::new(),
            base: 0,
            pos: 0,
            quiet: 0,
            runs: Vec::new(),
            longest_at: HashMap::new(),
            masked_to: None,
        }
    }

    /// The masker this stream uses.
    pub fn masker(&self) -> &Arc<Masker> {
        &self.m
    }

    /// Bytes held back, waiting to be known not to be part of a form.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn longest_match(&mut self, sid: StateID) -> usize {
        let nfa = &self.m.nfa;
        *self.longest_at.entry(sid).or_insert_with(|| {
            (0..nfa.match_len(sid))
                .map(|i| nfa.pattern_len(nfa.match_pattern(sid, i)))
                .max()
                .unwrap_or(0)
        })
    }

    fn hide(&mut self, start: u64, end: u64) {
        let mut start = start;
        while let Some(&(s, e)) = self.runs.last() {
            if e < start {
                break;
            }
            start = start.min(s);
            self.runs.pop();
        }
        self.runs.push((start, end));
    }

    /// Takes `data` and appends to `out` what is now known: everything up to the bytes that
    /// could still be part of a form, with the forms hidden.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        crate::work::add(data.len());
        self.held.extend(data);
        for &b in data {
            self.sid = self.m.nfa.next_state(Anchored::No, self.sid, b);
            self.pos += 1;
            if self.m.nfa.is_match(self.sid) {
                let len = self.longest_match(self.sid) as u64;
                self.hide(self.pos - len, self.pos);
            } else if self.sid == self.m.start {
                self.quiet = self.pos;
            }
        }
        // A form not yet complete began at `quiet` or later, and within the longest form's
        // reach of the end: everything before is known.
        let reach = (self.pos + 1).saturating_sub(self.m.longest as u64);
        let known = reach.max(self.quiet).max(self.base);
        self.emit(known, out);
    }

    /// Gives out everything held (a line of the host's own comes next, or the stream ends):
    /// what follows is masked as a new stream.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        self.emit(self.pos, out);
        self.sid = self.m.start;
        self.quiet = self.pos;
        self.masked_to = None;
    }

    /// Appends bytes `base..upto` to `out`, with the runs in them hidden. A run that goes on
    /// past `upto` keeps its rest, which adds no second mask when it is given out: one run,
    /// one mask, however the stream was cut.
    fn emit(&mut self, upto: u64, out: &mut Vec<u8>) {
        if upto <= self.base {
            return;
        }
        let base = self.base;
        let held = &self.held;
        let copy = |from: u64, to: u64, out: &mut Vec<u8>| {
            crate::work::add((to - from) as usize);
            out.extend(held.range((from - base) as usize..(to - base) as usize));
        };
        let mut at = base;
        let mut done = 0;
        for run in self.runs.iter_mut() {
            let (s, e) = *run;
            if s >= upto {
                break;
            }
            copy(at, s, out);
            if self.masked_to != Some(s) {
                out.extend_from_slice(MASK.as_bytes());
            }
            at = e.min(upto);
            self.masked_to = Some(at);
            if e > upto {
                *run = (upto, e);
                break;
            }
            done += 1;
        }
        copy(at, upto, out);
        self.runs.drain(..done);
        self.held.drain(..(upto - base) as usize);
        self.base = upto;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(values: &[&str]) -> Arc<Masker> {
        Masker::new(values).unwrap().unwrap()
    }

    /// What masking the whole text at once must give: every byte inside an occurrence of a
    /// form hidden, touching runs merged. Quadratic, for small tests only.
    fn naive(values: &[&str], text: &[u8]) -> Vec<u8> {
        let all: Vec<Vec<u8>> = values.iter().flat_map(|v| forms(v)).collect();
        let mut hidden = vec![false; text.len()];
        for f in &all {
            for i in 0..text.len() {
                if text[i..].starts_with(f) {
                    hidden[i..i + f.len()].iter_mut().for_each(|h| *h = true);
                }
            }
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            if hidden[i] {
                while i < text.len() && hidden[i] {
                    i += 1;
                }
                out.extend_from_slice(MASK.as_bytes());
            } else {
                out.push(text[i]);
                i += 1;
            }
        }
        out
    }

    fn streamed(m: &Arc<Masker>, pieces: &[&[u8]]) -> Vec<u8> {
        let mut s = MaskStream::new(m.clone());
        let mut out = Vec::new();
        for p in pieces {
            s.push(p, &mut out);
        }
        s.flush(&mut out);
        out
    }

    #[test]
    fn encodings_match_the_standard_vectors() {
        // RFC 4648's test vectors.
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes(), B64_STD, true), enc.as_bytes());
        }
        assert_eq!(base64(&[0xfb, 0xff], B64_STD, true), b"+/8");
        assert_eq!(base64(&[0xfb, 0xff], B64_URL, true), b"-_8");
        assert_eq!(base64(b"fo", B64_STD, false), b"Zm");
        assert_eq!(hex(b"\x01\xab", false), b"01ab");
        assert_eq!(hex(b"\x01\xab", true), b"01AB");
        assert_eq!(percent(b"a b/~", b"-._~", true, false), b"a%20b%2F~");
        assert_eq!(percent(b"a b", b"-._~", true, true), b"a+b");
    }

    #[test]
    fn every_form_is_hidden() {
        let secret = "s3cr3t/V+lue with spaces&\"quotes\"";
        let m = masker(&[secret]);
        let b = secret.as_bytes();
        let printed = [
            secret.to_string(),
            String::from_utf8(base64(b, B64_STD, true)).unwrap() + "==",
            String::from_utf8(base64(b, B64_URL, true)).unwrap(),
            String::from_utf8(hex(b, false)).unwrap(),
            String::from_utf8(hex(b, true)).unwrap(),
            String::from_utf8(percent(b, b"-._~", true, false)).unwrap(),
            String::from_utf8(percent(b, b"-._~", false, false)).unwrap(),
            String::from_utf8(percent(b, b"-._~", true, true)).unwrap(),
            serde_json::to_string(secret).unwrap(),
        ];
        for p in printed {
            let text = format!("before {p} after");
            let out = m.mask_str(&text);
            assert!(
                out.starts_with("before ") && out.ends_with(" after"),
                "{out}"
            );
            assert!(!out.contains(&p[1..p.len() - 1]), "{p} -> {out}");
        }
    }

    #[test]
    fn base64_inside_a_longer_text_is_hidden_at_every_alignment() {
        let secret = "hunter2hunter2";
        let m = masker(&[secret]);
        for prefix in ["", "u", "us", "user:"] {
            let text = format!("{prefix}{secret}@example");
            for alphabet in [B64_STD, B64_URL] {
                let enc = String::from_utf8(base64(text.as_bytes(), alphabet, true)).unwrap();
                let out = m.mask_str(&enc);
                assert!(out.contains(MASK), "{prefix}: {enc} -> {out}");
                // Only the characters that mix in other bytes stay: at most two at each end
                // of the value's part.
                let hidden = enc.len() + MASK.len() - out.len();
                assert!(
                    hidden + 4 >= secret.len() * 4 / 3,
                    "{prefix}: {enc} -> {out}"
                );
            }
        }
    }

    #[test]
    fn a_value_split_at_every_position_is_hidden() {
        let secret = "correct-horse-battery";
        let m = masker(&[secret, "another secret value"]);
        let text = format!("a {secret} b {secret}{secret} c another secret value d");
        let want = naive(&[secret, "another secret value"], text.as_bytes());
        assert_eq!(String::from_utf8_lossy(&want), "a *** b *** c *** d");
        let bytes = text.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let got = streamed(&m, &[&bytes[..i], &bytes[i..j], &bytes[j..]]);
                assert_eq!(got, want, "cut at {i} and {j}");
            }
        }
        // One byte at a time.
        let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(streamed(&m, &pieces), want);
    }

    #[test]
    fn overlapping_and_nested_values_hide_their_union() {
        let (a, b, c) = ("abcdefgh12", "fgh12XYZWV", "cdefgh12");
        let m = masker(&[a, b, c]);
        for text in [
            "..abcdefgh12XYZWV..",
            "..abcdefgh12..",
            "..cdefgh12..",
            "..fgh12XYZWV..",
            "abcdefgh12fgh12XYZWV",
            "xabcdefgh1",
        ] {
            let want = naive(&[a, b, c], text.as_bytes());
            assert_eq!(m.mask(text.as_bytes()), want, "{text}");
            let bytes = text.as_bytes();
            for i in 0..=bytes.len() {
                assert_eq!(
                    streamed(&m, &[&bytes[..i], &bytes[i..]]),
                    want,
                    "{text} at {i}"
                );
            }
        }
        assert_eq!(m.mask(b"..abcdefgh12XYZWV.."), b"..***..");
        assert_eq!(m.mask(b"xabcdefgh1"), b"xabcdefgh1", "a prefix alone stays");
    }

    #[test]
    fn random_texts_agree_with_the_naive_masker() {
        use proptest::prelude::*;
        let values = ["abab-abab", "babaabab", "ab\nabababab\nxy"];
        let m = masker(&values);
        // Texts made of the values, their pieces and their encodings, cut anywhere.
        let mut atoms: Vec<Vec<u8>> = b"ab-\nxyZ".iter().map(|&c| vec![c]).collect();
        for v in values {
            for f in forms(v) {
                atoms.push(f[..f.len() / 2].to_vec());
                atoms.push(f[f.len() / 2..].to_vec());
                atoms.push(f);
            }
        }
        proptest!(crate::work::cases(512), |(
            parts in prop::collection::vec(prop::sample::select(atoms.clone()), 0..12),
            cuts in prop::collection::vec(0usize..200, 0..6),
        )| {
            let text = parts.concat();
            let want = naive(&values, &text);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts {
                pieces.push(&text[at..c]);
                at = c;
            }
            pieces.push(&text[at..]);
            prop_assert_eq!(streamed(&m, &pieces), want);
        });
    }

    #[test]
    fn multi_line_values_hide_each_long_line() {
        let key = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEA\nshort\n-----END KEY-----";
        let m = masker(&[key]);
        let out = m.mask_str("> MIIEowIBAAKCAQEA <");
        assert_eq!(out, "> *** <");
        assert_eq!(
            m.mask_str("short"),
            "short",
            "lines under 8 characters stay"
        );
        assert_eq!(m.mask_str(key), "***");
    }

    #[test]
    fn text_without_secrets_flows_through_with_little_held_back() {
        let m = masker(&["zq9-TOKEN-value"]);
        let mut s = MaskStream::new(m.clone());
        let mut out = Vec::new();
        s.push(b"compiling crate foo v1.2.3\nrunning 12 tests\n", &mut out);
        assert_eq!(out, b"compiling crate foo v1.2.3\nrunning 12 tests\n");
        assert_eq!(s.held(), 0);
        // The beginning of the value is held until it is known not to be the value.
        s.push(b"zq9-TOK", &mut out);
        assert_eq!(s.held(), 7);
        s.push(b"EN-valuX\n", &mut out);
        assert_eq!(s.held(), 0);
        assert!(out.ends_with(b"zq9-TOKEN-valuX\n"));
    }

    #[test]
    fn the_work_is_linear_whatever_the_text() {
        // The worst texts for a masker: long runs that almost match, many values sharing long
        // prefixes, small pieces. The automaton takes one step per byte (amortized, the
        // Aho-Corasick guarantee); what this code does besides (holding back, copying out)
        // is counted, and stays within a constant times the bytes pushed.
        let values: Vec<String> = (0..64)
            .map(|i| format!("{}{i:02}", "a".repeat(2000)))
            .collect();
        let m = Masker::new(&values).unwrap().unwrap();
        for (text, piece) in [
            (vec![b'a'; 1 << 20], 61),
            (vec![b'a'; 1 << 20], 1),
            (
                b"a".repeat(1999)
                    .into_iter()
                    .chain(*b"0")
                    .cycle()
                    .take(1 << 20)
                    .collect(),
                7,
            ),
            (
                [b"a".repeat(2000), b"01".to_vec()].concat().repeat(300),
                4096,
            ),
        ] {
            let ((), work) = crate::work::count(|| {
                let mut s = MaskStream::new(m.clone());
                let mut out = Vec::new();
                for c in text.chunks(piece) {
                    s.push(c, &mut out);
                    assert!(
                        s.held() < m.longest,
                        "held back at most the longest form less one"
                    );
                    out.clear();
                }
                s.flush(&mut out);
            });
            assert!(
                work <= 2 * text.len() as u64,
                "{work} units for {} bytes in pieces of {piece}",
                text.len()
            );
        }
    }

    #[test]
    fn the_largest_values_build_a_bounded_masker() {
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut value = String::new();
        while value.len() < crate::secrets::MAX_VALUE_BYTES {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            value.push(char::from(b' ' + (rng % 95) as u8));
        }
        // The most a project may hold, in values of the largest size: about 16 MiB of
        // automaton for each 64 KiB of printable value (its percent-encodings are long).
        let n = crate::secrets::MAX_PROJECT_BYTES / crate::secrets::MAX_VALUE_BYTES;
        let values: Vec<String> = (0..n).map(|i| format!("{i}{}", &value[1..])).collect();
        let m = Masker::new(&values).unwrap().unwrap();
        let bytes = m.memory_usage();
        assert!(
            bytes < 48 << 20,
            "{} MiB for {n} values of 64 KiB",
            bytes >> 20
        );
    }
}
