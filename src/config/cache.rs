//! `[upstream.cache]`: the response cache of an upstream, validated.
//!
//! Sizes are written as `"64MiB"`, `"1MB"` or a plain number of bytes, and
//! parsed by `bytesize` while deserializing, so that a bad one is reported
//! at its own line and column.

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use super::ConfigError;
use super::error::Cx;

/// `[upstream.cache]` as written; `enabled` defaults to true once the table is there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: bool,
    pub max_size: Spanned<Size>,
    pub max_object: Spanned<Size>,
    pub coalesce: bool,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_size: Spanned::new(0..0, Size(64 << 20)),
            max_object: Spanned::new(0..0, Size(1 << 20)),
            coalesce: true,
        }
    }
}

/// `[upstream.cache]`, enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cache {
    /// Bytes of stored answers (heads and bodies); the least valuable go first.
    pub max_size: u64,
    /// Larger answers are passed through, not stored; at most `max_size`.
    pub max_object: u64,
    /// Identical GETs in flight share one upstream attempt.
    pub coalesce: bool,
}

/// The cache an upstream asks for, if any.
pub fn cache(cx: &Cx<'_>, raw: Option<RawCache>) -> Result<Option<Cache>, ConfigError> {
    let Some(raw) = raw.filter(|raw| raw.enabled) else { return Ok(None) };
    let (max_size, max_object) = (raw.max_size.get_ref().0, raw.max_object.get_ref().0);
    if max_size == 0 {
        return Err(cx.err(raw.max_size.span(), "max_size must be more than 0 bytes"));
    }
    if max_object == 0 {
        return Err(cx.err(raw.max_object.span(), "max_object must be more than 0 bytes"));
    }
    if max_object > max_size {
        let span = if raw.max_object.span().is_empty() { raw.max_size.span() } else { raw.max_object.span() };
        return Err(cx.err(
            span,
            format!("max_object ({max_object} bytes) must not exceed max_size ({max_size} bytes)"),
        ));
    }
    // The store weighs each entry in u32 bytes.
    if max_object >= u64::from(u32::MAX) {
        return Err(cx.err(raw.max_object.span(), "max_object must be below 4GiB"));
    }
    Ok(Some(Cache { max_size, max_object, coalesce: raw.coalesce }))
}

/// A size in bytes: `"64MiB"`, `"1.5MB"`, `"512KiB"` or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = Size;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size like \"64MiB\", \"512KiB\" or a number of bytes")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                let parsed = s.trim().parse::<bytesize::ByteSize>();
                parsed.map(|size| Size(size.as_u64())).map_err(|_| {
                    E::custom(format!(
                        "invalid size {s:?}: expected a number and a unit like \"64MiB\" or \"1MB\""
                    ))
                })
            }

            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<Size, E> {
                Ok(Size(bytes))
            }

            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<Size, E> {
                u64::try_from(bytes).map(Size).map_err(|_| E::custom("a size cannot be negative"))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}
