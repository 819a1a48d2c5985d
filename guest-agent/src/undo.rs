//! Undoing what a function made when it fails half-way: a drop guard.

/// Runs its undo when dropped, unless [`Undo::disarm`]ed first. A function
/// that makes something (a mount, a directory, a socket file, a reserved
/// name) registers the undo right after making it and disarms it once
/// nothing can fail any more, so every early return undoes through one
/// path instead of a cleanup branch each.
pub struct Undo<F: FnOnce()> {
    undo: Option<F>,
}

impl<F: FnOnce()> Undo<F> {
    /// A guard that runs `undo` on drop.
    pub fn new(undo: F) -> Self {
        Self { undo: Some(undo) }
    }

    /// Keeps what was made: the undo will not run.
    pub fn disarm(mut self) {
        self.undo = None;
    }
}

impl<F: FnOnce()> Drop for Undo<F> {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            undo();
        }
    }
}

impl<F: FnOnce()> std::fmt::Debug for Undo<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Undo")
            .field("armed", &self.undo.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn undoes_on_drop_unless_disarmed() {
        let undone = Cell::new(0);
        {
            let _undo = Undo::new(|| undone.set(undone.get() + 1));
        }
        assert_eq!(undone.get(), 1);
        Undo::new(|| undone.set(undone.get() + 1)).disarm();
        assert_eq!(undone.get(), 1);
    }

    #[test]
    fn undoes_on_an_early_return() {
        let undone = Cell::new(false);
        let make = |fail: bool| -> Result<(), ()> {
            let undo = Undo::new(|| undone.set(true));
            if fail {
                return Err(());
            }
            undo.disarm();
            Ok(())
        };
        assert!(make(false).is_ok());
        assert!(!undone.get());
        assert!(make(true).is_err());
        assert!(undone.get());
    }
}
