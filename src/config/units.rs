//! Durations ("250ms", "5m") and rates ("10/s", "N/250ms").
use super::Rate;
use std::time::Duration;

pub fn parse_duration(_s: &str) -> Result<Duration, String> {
    todo!()
}
pub fn parse_rate(_s: &str) -> Result<Rate, String> {
    todo!()
}
