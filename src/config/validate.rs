//! Raw config -> runtime types.
use super::{Config, ConfigError, raw::RawConfig};
use std::path::Path;

pub fn validate(_path: &Path, _text: &str, _raw: RawConfig) -> Result<Config, ConfigError> {
    todo!()
}
