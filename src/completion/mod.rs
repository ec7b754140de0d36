//! The completion core: documents, prompts, and the engine that runs the model for them.

pub mod crossfile;
pub mod document;
pub mod engine;
pub mod prompt;

pub use crossfile::{Chunk, CrossFile, Layout};
pub use document::{Document, PositionError};
pub use engine::{
    Completion, CompletionRequest, Engine, EngineConfig, EngineError, EngineEvent, EngineStats,
};
pub use prompt::{fim_prompt, prompt_with, ContextLimits};
