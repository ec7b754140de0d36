//! star-ls: code completion from a local language model that repairs itself from the developer's
//! corrections. See ARCHITECTURE.md for the map.

pub mod application;
pub mod capture;
pub mod completion;
pub mod env;
pub mod eval;
pub mod learn;
pub mod lsp;
pub mod model;
pub mod repair;
pub mod store;

/// File name of the default model in `$STAR_LS_CACHE_DIR/models/` (what scripts/fetch-model writes).
pub const DEFAULT_MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
