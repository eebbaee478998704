//! Raw config -> runtime types.
use super::{raw::RawConfig, Config, ConfigError};
use std::path::Path;

pub fn validate(_path: &Path, _text: &str, _raw: RawConfig) -> Result<Config, ConfigError> { todo!() }
