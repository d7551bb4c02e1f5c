//! [`Parked`]: the first error of a call that cannot return one (a `Drop`), kept on its device
//! until the next check (`check_err`, a stream synchronisation) reports it.

use crate::{Error, Result};
use parking_lot::Mutex;

/// At most one parked error: the first since the last [`Parked::take`].
#[derive(Default)]
pub(crate) struct Parked(Mutex<Option<Error>>);

impl Parked {
    /// Keeps `res`'s error unless an earlier one is waiting.
    pub(crate) fn record(&self, res: Result<()>) {
        if let Err(err) = res {
            self.0.lock().get_or_insert(err);
        }
    }

    /// Returns (and clears) the parked error.
    pub(crate) fn take(&self) -> Result<()> {
        match self.0.lock().take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_is_kept_and_reported_once() {
        let parked = Parked::default();
        assert!(parked.take().is_ok());
        parked.record(Ok(()));
        parked.record(Err(Error::InvalidHandle("first".into())));
        parked.record(Err(Error::InvalidHandle("second".into())));
        assert!(matches!(parked.take(), Err(Error::InvalidHandle(why)) if why == "first"));
        assert!(parked.take().is_ok());
    }
}
