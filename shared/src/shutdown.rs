//! One shutdown for every task of a process, as mini-redis's `shutdown.rs` has it: a
//! [`Shutdown`] is cloned into each task that must stop, and each waits on
//! [`Shutdown::triggered`] beside its work. SIGTERM or SIGINT triggers the process's
//! ([`Shutdown::on_signals`]); a test triggers its own. A task that must stop alone gets a
//! [`Shutdown::child`]: it stops with its parent, not the other way round.

use tokio_util::sync::CancellationToken;

/// The process's (or a part of it's) shutdown, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// Not triggered yet; [`Shutdown::trigger`] does it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Triggered by SIGTERM or SIGINT.
    pub fn on_signals() -> Self {
        let me = Self::new();
        let trigger = me.clone();
        tokio::spawn(async move {
            signal().await;
            tracing::info!("shutdown signal received: finishing the work in hand");
            trigger.trigger();
        });
        me
    }

    /// Stops every task holding it (or a child of it).
    pub fn trigger(&self) {
        self.0.cancel();
    }

    /// Whether it was triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once it is triggered.
    pub async fn triggered(&self) {
        self.0.cancelled().await;
    }

    /// [`Shutdown::triggered`], owning its handle (a `'static` future, e.g. for axum's
    /// graceful shutdown).
    pub fn triggered_owned(self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.0.cancelled_owned()
    }

    /// A shutdown triggered with this one, or on its own.
    pub fn child(&self) -> Shutdown {
        Shutdown(self.0.child_token())
    }
}

/// SIGTERM or SIGINT.
async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
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
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_stops_with_its_parent_and_alone() {
        let parent = Shutdown::new();
        let alone = parent.child();
        let with = parent.child();
        alone.trigger();
        alone.triggered().await;
        assert!(!parent.is_triggered() && !with.is_triggered());
        parent.trigger();
        with.triggered().await;
        assert!(with.is_triggered());
    }
}
