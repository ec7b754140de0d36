//! Command-line entry points other than `serve`: each parses nothing itself (clap did) and calls the library.

pub mod bench;
pub mod cases;
pub mod complete;
pub mod eval;
pub mod patches;
mod peer;
pub mod repair;
pub mod replay;
