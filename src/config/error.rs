//! Config errors that point at `file:line:col`.
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A config problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{col}: {message}", path.display())]
pub struct ConfigError {
    /// The file at fault, as given to the loader.
    pub path: PathBuf,
    /// 1-based line of the offending value.
    pub line: usize,
    /// 1-based column, counted in characters, of the offending value.
    pub col: usize,
    /// One line saying what is wrong.
    pub message: String,
}

impl ConfigError {
    /// The file could not be read at all.
    pub fn io(path: &Path, err: &std::io::Error) -> Self {
        Self { path: path.to_path_buf(), line: 1, col: 1, message: format!("cannot read config: {err}") }
    }

    /// A problem with the value found at byte range `span` of `text`.
    pub fn at(path: &Path, text: &str, span: Range<usize>, message: impl Into<String>) -> Self {
        Self::located(path, Location::of(text, span), message)
    }

    /// A problem found after loading, with a value written at `location`.
    pub fn located(path: &Path, location: Location, message: impl Into<String>) -> Self {
        Self { path: path.to_path_buf(), line: location.line, col: location.col, message: message.into() }
    }
}

/// Where a value is written in the file, kept past loading for the checks
/// that only later steps can make (a CA that will not load). A default value,
/// not written at all, is at 1:1, as is an unreadable file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
}

impl Location {
    pub const START: Self = Self { line: 1, col: 1 };

    /// The location of byte range `span` of `text`.
    pub fn of(text: &str, span: Range<usize>) -> Self {
        let (line, col) = line_col(text, span.start);
        Self { line, col }
    }
}

/// What errors need: the file's name and text. Validation hands it to every
/// check, including those between upstreams in `claims`.
pub struct Cx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl<'a> Cx<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        Self { path, text }
    }

    pub fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.path, self.text, span, message)
    }

    /// A path the file names: a relative one is taken from the config file's
    /// directory, so the file means the same from any working directory.
    pub fn beside(&self, path: PathBuf) -> PathBuf {
        self.path.parent().map_or(path.clone(), |dir| dir.join(&path))
    }

    /// 1-based line of a span's start, to name the other half of a conflict.
    pub fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    /// Where the value at `span` is written.
    pub fn location(&self, span: Range<usize>) -> Location {
        Location::of(self.text, span)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
///
/// An offset past the end or inside a character is clamped to the nearest
/// earlier character boundary, so a bad span never panics.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(line_col(text, 12), (2, 6));
        assert_eq!(line_col(text, 999), (3, 1));
        assert_eq!(line_col(text, 8), (2, 2));
    }

    #[test]
    fn display_is_path_line_col_message() {
        let err = ConfigError::at(Path::new("p.toml"), "x\ny", 2..3, "bad");
        assert_eq!(err.to_string(), "p.toml:2:1: bad");
    }
}
