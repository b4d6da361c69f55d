//! One shutdown signal for every binary.

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM. Where SIGTERM cannot
/// be listened for (not Unix, or the handler cannot be installed), on
/// SIGINT alone.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
