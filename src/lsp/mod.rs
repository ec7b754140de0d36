//! The LSP surface: the only module that knows JSON-RPC. It translates protocol messages into calls on
//! the application's `Host` and back (`proto`), and never waits on the model itself.

mod commands;
mod events;
mod proto;
mod server;
mod settings;
mod transport;

pub use server::Server;
pub use settings::Settings;

use tower_lsp_server::{LspService, Server as Transport};

/// Serves LSP on stdin/stdout until the client exits.
pub fn serve() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (service, socket) = LspService::build(Server::new)
            .custom_method("textDocument/inlineCompletion", Server::inline_completion)
            .custom_method("star/didAccept", Server::did_accept)
            .custom_method("star/didReject", Server::did_reject)
            .custom_method("star/didCorrect", Server::did_correct)
            .finish();
        Transport::new(
            transport::checked_frames(tokio::io::stdin()),
            tokio::io::stdout(),
            socket,
        )
        .serve(service)
        .await;
    });
    // Reading stdin blocks a thread that returns only when the client closes the pipe, which it need
    // not do after `exit`: do not wait for it.
    runtime.shutdown_background();
    Ok(())
}
