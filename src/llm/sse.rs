//! Reading the usage of a streamed answer as its bytes pass by.
//!
//! [`UsageScanner`] is fed each body chunk after (or while) it is
//! forwarded; it only looks, so it can never delay or change a frame. It
//! splits server-sent events at any chunk boundary (LF, CRLF or CR line
//! ends, `data:` lines of one event joined) and reads the events that carry
//! usage:
//! - OpenAI chat and completions: the final chunk sent with
//!   `stream_options.include_usage` (`"choices": []`, `"usage": {…}`);
//!   earlier chunks carry `"usage": null`.
//! - OpenAI Responses: `response.completed` / `.incomplete` / `.failed`,
//!   usage in `response.usage`.
//! - Anthropic: `message_start` (input, cache tokens, a first output
//!   count) then `message_delta`, whose usage is cumulative: the last one wins.
//!
//! Memory is bounded per event: the data of an event past [`MAX_EVENT_BYTES`]
//! keeps only its first [`HEAD_BYTES`] (where the event's `type` is) and its
//! last [`MAX_EVENT_BYTES`] (where a Responses event puts `usage`, after the
//! whole output). Such an event is read by finding its last `"usage":` key,
//! which raw JSON text can only hold as a key (a quote inside a string is
//! escaped), and parsing the object that follows.

use serde_json::{Map, Value};

use super::usage::{Usage, from_usage};

/// Bytes of one event's data kept whole.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Bytes of the start of an overlong event kept to learn its type.
pub const HEAD_BYTES: usize = 1024;

/// Watches a server-sent event stream for the usage it reports.
#[derive(Debug, Default)]
pub struct UsageScanner {
    /// The line being read, up to [`MAX_EVENT_BYTES`].
    line: Vec<u8>,
    /// What becomes of the rest of a line that outgrew `line`.
    long_line: Option<LongLine>,
    /// The previous chunk ended in CR: an LF starting this one ends no line.
    after_cr: bool,
    /// The current event's data.
    data: EventData,
    usage: Option<Usage>,
    /// Anthropic's usage fields as reported so far: `message_start`'s,
    /// updated by each `message_delta` field that holds a number.
    reported: Map<String, Value>,
    /// A usage that ends the stream was seen (not only `message_start`).
    complete: bool,
}

/// A line longer than [`MAX_EVENT_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LongLine {
    /// A `data:` line: the rest streams into the event's data.
    Data,
    /// Any other line: the rest is skipped.
    Skip,
}

/// An event's data: whole, or head and tail once it outgrew the bound.
#[derive(Debug)]
struct EventData {
    head: Vec<u8>,
    /// The data after `head`; only its last [`MAX_EVENT_BYTES`] matter.
    tail: Vec<u8>,
    truncated: bool,
    /// No `data:` line yet.
    empty: bool,
}

impl UsageScanner {
    pub fn new() -> UsageScanner {
        UsageScanner::default()
    }

    /// Reads the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if self.after_cr && rest.first() == Some(&b'\n') {
            rest = &rest[1..];
        }
        self.after_cr = false;
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.take(&rest[..end]);
            self.end_line();
            if rest[end] == b'\r' {
                match rest.get(end + 1) {
                    Some(b'\n') => rest = &rest[end + 2..],
                    Some(_) => rest = &rest[end + 1..],
                    None => {
                        self.after_cr = true;
                        rest = &[];
                    }
                }
            } else {
                rest = &rest[end + 1..];
            }
        }
        self.take(rest);
    }

    /// The body ended: an event not closed by a blank line still counts.
    pub fn finish(&mut self) {
        if !self.line.is_empty() || self.long_line.is_some() {
            self.end_line();
        }
        self.dispatch();
    }

    /// The usage reported so far (after `message_start`, input and a partial output).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the usage seen is final: an OpenAI usage chunk, a finished
    /// Responses event or an Anthropic `message_delta`.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Appends part of a line.
    fn take(&mut self, bytes: &[u8]) {
        match self.long_line {
            Some(LongLine::Data) => return self.data.push(bytes),
            Some(LongLine::Skip) => return,
            None => {}
        }
        self.line.extend_from_slice(bytes);
        if self.line.len() > MAX_EVENT_BYTES {
            let line = std::mem::take(&mut self.line);
            // Only a data line is worth keeping; any other long line is skipped.
            self.long_line = Some(match field_value(&line, b"data") {
                Some(value) => {
                    self.data.start_line();
                    self.data.push(value);
                    LongLine::Data
                }
                None => LongLine::Skip,
            });
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if self.long_line.take().is_some() {
            return;
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if let Some(value) = field_value(&line, b"data") {
            self.data.start_line();
            self.data.push(value);
        }
    }

    fn dispatch(&mut self) {
        let data = std::mem::take(&mut self.data);
        if data.empty {
            return;
        }
        let found =
            if data.truncated { read_truncated(&data) } else { read_whole(&data.head, &mut self.reported) };
        if let Some((usage, complete)) = found {
            self.usage = Some(usage);
            self.complete |= complete;
        }
    }
}

impl EventData {
    /// A new `data:` line: joined to the previous one by LF.
    fn start_line(&mut self) {
        if self.empty {
            self.empty = false;
        } else {
            self.push(b"\n");
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.empty = false;
        if !self.truncated {
            self.head.extend_from_slice(bytes);
            if self.head.len() <= MAX_EVENT_BYTES {
                return;
            }
            self.truncated = true;
            self.tail = self.head.split_off(HEAD_BYTES);
        } else {
            self.tail.extend_from_slice(bytes);
        }
        // Trim in halves so the copying stays linear in the bytes seen.
        if self.tail.len() > 2 * MAX_EVENT_BYTES {
            self.tail.drain(..self.tail.len() - MAX_EVENT_BYTES);
        }
    }
}

impl Default for EventData {
    fn default() -> Self {
        EventData { head: Vec::new(), tail: Vec::new(), truncated: false, empty: true }
    }
}

/// The value of a `name:` field line (one leading space dropped), if it is one.
fn field_value<'l>(line: &'l [u8], name: &[u8]) -> Option<&'l [u8]> {
    let value = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// An event kept whole: its usage, and whether that usage is final.
/// `reported` holds Anthropic's usage fields so far, which `message_start`
/// sets and a `message_delta` updates.
fn read_whole(data: &[u8], reported: &mut Map<String, Value>) -> Option<(Usage, bool)> {
    let event: Value = serde_json::from_slice(data).ok()?;
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
    let (usage, complete) = match kind {
        "message_start" => {
            let usage = event.get("message")?.get("usage")?;
            *reported = usage.as_object()?.clone();
            (usage, false)
        }
        "message_delta" => return Some((message_delta(event.get("usage")?, reported)?, true)),
        "response.completed" | "response.incomplete" | "response.failed" => {
            (event.get("response")?.get("usage")?, true)
        }
        // OpenAI chat and completion chunks have no `type`.
        _ => (event.get("usage").filter(|u| u.is_object())?, true),
    };
    Some((from_usage(usage)?, complete))
}

/// Anthropic's `message_delta` usage: a cumulative output count, and input
/// and cache counts only when it restates them. Each field that holds a
/// number replaces the one reported before; one left out, or `null` (the
/// API declares them nullable), stands.
fn message_delta(delta: &Value, reported: &mut Map<String, Value>) -> Option<Usage> {
    for (name, value) in delta.as_object()? {
        if value.is_number() {
            reported.insert(name.clone(), value.clone());
        }
    }
    from_usage(&Value::Object(reported.clone()))
}

/// An overlong event: a finished Responses event (its type is usually in
/// the head, the last key in the tail), its usage from the tail.
fn read_truncated(data: &EventData) -> Option<(Usage, bool)> {
    const FINAL: [&[u8]; 3] = [b"\"response.completed\"", b"\"response.incomplete\"", b"\"response.failed\""];
    let has = |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    if !FINAL.iter().any(|kind| has(&data.head, kind) || has(&data.tail, kind)) {
        return None;
    }
    let key = b"\"usage\":";
    let at = data.tail.windows(key.len()).rposition(|w| w == key)?;
    let object = data.tail[at + key.len()..].trim_ascii_start();
    let usage = serde_json::Deserializer::from_slice(object).into_iter::<Value>().next()?.ok()?;
    Some((from_usage(&usage)?, true))
}

#[cfg(test)]
mod tests;
