//! The signal that ends the shim's serve mode: set once (Shutdown RPC,
//! SIGTERM), seen by every waiter, present and future.

use std::sync::Arc;

use tokio::sync::watch;

/// A shutdown flag any number of tasks can wait for.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Default for Shutdown {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Shutdown {
    /// Asks the shim to end.
    pub fn signal(&self) {
        self.0.send_replace(true);
    }

    /// Waits until the shim is asked to end.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|set| *set).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_waiters_see_the_signal() {
        let s = Shutdown::default();
        let early = {
            let s = s.clone();
            tokio::spawn(async move { s.wait().await })
        };
        s.signal();
        early.await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), s.wait())
            .await
            .unwrap();
    }
}
