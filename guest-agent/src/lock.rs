//! Locking the agent's shared state: the one way the agent treats a
//! poisoned lock.
//!
//! A `Mutex` is poisoned when a thread panicked while holding it. The agent
//! is PID 1: failing every later request that touches a poisoned lock would
//! wedge the guest for good. So the agent carries on with the value inside
//! ([`PoisonError::into_inner`]) — which is sound because no critical
//! section in the agent can leave its data half-changed: each one reads, or
//! makes one insert, remove, take or assignment of a whole value (the
//! reaper's bounded queue at worst keeps one exit longer than it should). A
//! critical section that makes several dependent changes must not use this.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`] that recovers the value of a poisoned lock.
pub trait LockExt<T> {
    /// Locks, carrying on with the value if a panic poisoned the lock (see
    /// the module documentation for why that is sound here).
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_value() {
        let m = std::sync::Arc::new(Mutex::new(7));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _guard = m2.lock().unwrap();
            panic!("poisoning the lock on purpose");
        })
        .join();
        assert!(m.is_poisoned());
        *m.lock_or_recover() += 1;
        assert_eq!(*m.lock_or_recover(), 8);
    }
}
