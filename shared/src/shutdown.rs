//! Turns SIGTERM or Ctrl-C into a cancelled token, the one shutdown signal both services
//! watch.

use tokio_util::sync::CancellationToken;

/// Waits for SIGTERM or Ctrl-C, then cancels `token`.
pub async fn on_signal(token: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
    token.cancel();
}
