//! serde structs mirroring the TOML file.
use super::ConfigError;
use std::path::Path;

pub struct RawConfig;
pub fn from_str(_path: &Path, _text: &str) -> Result<RawConfig, ConfigError> {
    todo!()
}
