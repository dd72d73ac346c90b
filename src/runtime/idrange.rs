//! PLACEHOLDER until the defs branch lands.
use serde::{Deserialize, Serialize};
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange { pub base: u32, pub size: u32 }
#[derive(Debug, thiserror::Error)]
#[error("id range")]
pub struct IdRangeError;
