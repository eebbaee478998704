//! Tokens an image in a prompt costs, by the providers' published formulas.
//!
//! - OpenAI (GPT-4o-class tile formula): `detail: "low"` costs 85; otherwise
//!   the image is fitted into 2048×2048, its short side scaled down to 768,
//!   and each 512-pixel tile costs 170 on top of the 85 base.
//! - Anthropic: about `width × height / 750`, the image first scaled so its
//!   long edge is at most 1568 pixels, and at most [`ANTHROPIC_MAX`].
//!
//! Both need the pixel size. It is read from the header of an inline image
//! (base64, PNG, GIF or JPEG, from at most [`SNIFF_BASE64`] characters);
//! an image given by URL or file id, or of another format, costs the
//! documented default: [`OPENAI_DEFAULT`] (OpenAI's own 1024×1024 example)
//! or [`ANTHROPIC_MAX`]. Settling to the reported usage corrects either.

use base64::Engine;

/// OpenAI, `detail: "low"`, and the base of every high-detail image.
pub const OPENAI_BASE: u64 = 85;
/// OpenAI, per 512-pixel tile at high detail.
pub const OPENAI_TILE: u64 = 170;
/// OpenAI, an image of unknown size: 1024×1024 at high detail (4 tiles).
pub const OPENAI_DEFAULT: u64 = OPENAI_BASE + 4 * OPENAI_TILE;
/// Anthropic's largest image, and the cost of one of unknown size.
pub const ANTHROPIC_MAX: u64 = 1600;
/// Base64 characters decoded to find an inline image's size (48 KiB of image).
pub const SNIFF_BASE64: usize = 64 * 1024;

/// How the provider bills images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
}

/// Tokens for one image, and whether they follow from the image itself
/// (`false`: the default for an image of unknown size); `data` is its
/// base64 payload or data URL when inline, `low` is OpenAI's `detail: "low"`.
pub fn tokens(provider: Provider, data: Option<&str>, low: bool) -> (u64, bool) {
    if provider == Provider::OpenAi && low {
        return (OPENAI_BASE, true);
    }
    let Some((w, h)) = data.and_then(base64_payload).and_then(dimensions) else {
        let default = if provider == Provider::OpenAi { OPENAI_DEFAULT } else { ANTHROPIC_MAX };
        return (default, false);
    };
    match provider {
        Provider::OpenAi => (openai_tiles(w, h), true),
        Provider::Anthropic => (anthropic(w, h), true),
    }
}

/// OpenAI's high-detail tile formula.
fn openai_tiles(w: u32, h: u32) -> u64 {
    let (mut w, mut h) = (f64::from(w.max(1)), f64::from(h.max(1)));
    let fit = (2048.0 / w.max(h)).min(1.0);
    (w, h) = (w * fit, h * fit);
    let short = (768.0 / w.min(h)).min(1.0);
    (w, h) = (w * short, h * short);
    let tiles = (w / 512.0).ceil() as u64 * (h / 512.0).ceil() as u64;
    OPENAI_BASE + OPENAI_TILE * tiles
}

/// Anthropic's pixels / 750 after the long-edge resize, capped.
fn anthropic(w: u32, h: u32) -> u64 {
    let (w, h) = (f64::from(w.max(1)), f64::from(h.max(1)));
    let scale = (1568.0 / w.max(h)).min(1.0);
    let tokens = ((w * scale) * (h * scale) / 750.0).ceil() as u64;
    tokens.clamp(1, ANTHROPIC_MAX)
}

/// The base64 text of a data URL (`data:image/png;base64,…`) or a bare payload.
fn base64_payload(data: &str) -> Option<&str> {
    match data.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map(|(_, payload)| payload),
        None if data.contains("://") => None,
        None => Some(data),
    }
}

/// Width and height from the start of a PNG, GIF or JPEG in base64.
fn dimensions(payload: &str) -> Option<(u32, u32)> {
    let mut end = payload.len().min(SNIFF_BASE64);
    end -= end % 4;
    let head = payload.get(..end)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(head).ok()?;
    png(&bytes).or_else(|| gif(&bytes)).or_else(|| jpeg(&bytes))
}

fn png(b: &[u8]) -> Option<(u32, u32)> {
    if !b.starts_with(b"\x89PNG\r\n\x1a\n") || b.get(12..16)? != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(b.get(16..20)?.try_into().ok()?);
    let h = u32::from_be_bytes(b.get(20..24)?.try_into().ok()?);
    Some((w, h))
}

fn gif(b: &[u8]) -> Option<(u32, u32)> {
    if !b.starts_with(b"GIF8") {
        return None;
    }
    let w = u16::from_le_bytes(b.get(6..8)?.try_into().ok()?);
    let h = u16::from_le_bytes(b.get(8..10)?.try_into().ok()?);
    Some((u32::from(w), u32::from(h)))
}

/// Walks the JPEG markers to the first start-of-frame.
fn jpeg(b: &[u8]) -> Option<(u32, u32)> {
    if !b.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut at = 2;
    loop {
        if *b.get(at)? != 0xFF {
            return None;
        }
        let marker = *b.get(at + 1)?;
        // Fill bytes and markers without a length.
        if marker == 0xFF || marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            at += if marker == 0xFF { 1 } else { 2 };
            continue;
        }
        let len = usize::from(u16::from_be_bytes(b.get(at + 2..at + 4)?.try_into().ok()?));
        let is_sof = (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker);
        if is_sof {
            let h = u16::from_be_bytes(b.get(at + 5..at + 7)?.try_into().ok()?);
            let w = u16::from_be_bytes(b.get(at + 7..at + 9)?.try_into().ok()?);
            return Some((u32::from(w), u32::from(h)));
        }
        at += 2 + len;
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    fn png_of(w: u32, h: u32) -> String {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend(w.to_be_bytes());
        b.extend(h.to_be_bytes());
        b.extend([8, 6, 0, 0, 0]);
        format!("data:image/png;base64,{}", STANDARD.encode(b))
    }

    fn jpeg_of(w: u16, h: u16) -> String {
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0];
        b.extend([0xFF, 0xC0, 0, 11, 8]);
        b.extend(h.to_be_bytes());
        b.extend(w.to_be_bytes());
        b.extend([1, 1, 0x11, 0]);
        STANDARD.encode(b)
    }

    #[test]
    fn openai_tile_formula() {
        // OpenAI's published examples.
        assert_eq!(tokens(Provider::OpenAi, Some(&png_of(1024, 1024)), false), (765, true));
        assert_eq!(tokens(Provider::OpenAi, Some(&png_of(2048, 4096)), false).0, 1105);
        assert_eq!(tokens(Provider::OpenAi, Some(&png_of(4096, 8192)), true).0, 85);
        assert_eq!(tokens(Provider::OpenAi, Some(&png_of(100, 100)), false).0, 255);
    }

    #[test]
    fn anthropic_formula() {
        assert_eq!(tokens(Provider::Anthropic, Some(&jpeg_of(1000, 1000)), false).0, 1334.min(ANTHROPIC_MAX));
        assert_eq!(tokens(Provider::Anthropic, Some(&jpeg_of(200, 200)), false).0, 54);
        assert_eq!(tokens(Provider::Anthropic, Some(&png_of(8000, 8000)), false).0, ANTHROPIC_MAX);
    }

    #[test]
    fn unknown_sizes_cost_the_default() {
        assert_eq!(tokens(Provider::OpenAi, Some("https://example.com/cat.png"), false).0, OPENAI_DEFAULT);
        assert_eq!(tokens(Provider::OpenAi, None, false), (OPENAI_DEFAULT, false));
        assert_eq!(
            tokens(Provider::OpenAi, Some("data:image/png;base64,!!!!"), false),
            (OPENAI_DEFAULT, false)
        );
        assert_eq!(tokens(Provider::Anthropic, Some("aGVsbG8="), false).0, ANTHROPIC_MAX);
        let gif = STANDARD.encode(b"GIF89a\x40\x01\xc8\x00");
        assert_eq!(dimensions(&gif), Some((320, 200)));
    }

    #[test]
    fn truncated_headers_are_unknown() {
        let jpeg = STANDARD.encode([0xFF, 0xD8, 0xFF, 0xC0, 0, 11]);
        assert_eq!(dimensions(&jpeg), None);
        let endless = STANDARD.encode([0xFF, 0xD8, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(dimensions(&endless), None);
    }
}
