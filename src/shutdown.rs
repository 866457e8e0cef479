//! The one way a server tells its tasks to stop (as mini-redis's `Shutdown`): the owner holds a
//! [`Stopper`], every task it starts gets a [`Shutdown`] from it and returns once it fires, so
//! that stopping is one call and no task is cut off in the middle of its work.

use tokio::sync::watch;

/// The owner's end: [`Stopper::stop`] fires every [`Shutdown`] handed out. Dropping it fires
/// them too, so that a task never outlives the server that started it.
#[derive(Debug)]
pub struct Stopper(watch::Sender<bool>);

impl Stopper {
    pub fn new() -> Self {
        Self(watch::Sender::new(false))
    }

    /// A task's end of this stopper.
    pub fn signal(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }

    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl Default for Stopper {
    fn default() -> Self {
        Self::new()
    }
}

/// A task's end: [`Shutdown::recv`] completes once its [`Stopper`] stops or goes away.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Completes once the server stops; at once if it already has. Cancel-safe, so that a task
    /// can `select!` on it in a loop.
    pub async fn recv(&mut self) {
        // An error means the stopper is gone, which is a stop too.
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    /// Whether the server has stopped (or its stopper is gone), without waiting.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_signal_fires_on_stop_and_on_drop() {
        let stopper = Stopper::new();
        let (mut first, mut second) = (stopper.signal(), stopper.signal());
        stopper.stop();
        first.recv().await;
        second.recv().await;
        // Already stopped: at once again.
        first.recv().await;

        let stopper = Stopper::new();
        let mut signal = stopper.signal();
        drop(stopper);
        signal.recv().await;
    }

    #[tokio::test]
    async fn a_signal_waits_while_the_stopper_runs() {
        let stopper = Stopper::new();
        let mut signal = stopper.signal();
        tokio::select! {
            biased;
            () = signal.recv() => panic!("fired before the stopper stopped"),
            () = std::future::ready(()) => {}
        }
        stopper.stop();
        signal.recv().await;
    }
}
