//! [`SharedOpens`]: the IPC opens of one process, shared by every mapping of the same handle on
//! the same device and closed with the last of them.
//!
//! HIP allows one open of a handle per device and process and documents that the same handle need
//! not map to the same address twice (unlike CUDA); CUDA counts repeated opens in the driver. Both
//! backends count here, so every mapping of one handle on one device gets one address, on both.

use crate::Result;
use parking_lot::Mutex;
use std::collections::BTreeMap;

/// (our device ordinal, the runtime's 64 handle bytes).
type OpenKey = (usize, [u8; 64]);

/// Open IPC handles: key → (address, users). Opening, counting and closing all happen under the
/// lock, so a close never races a re-open of the same handle.
pub(crate) struct SharedOpens(Mutex<BTreeMap<OpenKey, (u64, usize)>>);

impl SharedOpens {
    /// An empty table (for a `static`).
    pub(crate) const fn new() -> Self {
        SharedOpens(parking_lot::const_mutex(BTreeMap::new()))
    }

    /// The address of `handle` on device `ordinal`: the open this process already has (one more
    /// user), or a new one made by `open`.
    pub(crate) fn open(&self, ordinal: usize, handle: &[u8; 64], open: impl FnOnce() -> Result<u64>) -> Result<u64> {
        let mut opened = self.0.lock();
        let key = (ordinal, *handle);
        if let Some((ptr, users)) = opened.get_mut(&key) {
            *users += 1;
            return Ok(*ptr);
        }
        let ptr = open()?;
        opened.insert(key, (ptr, 1));
        Ok(ptr)
    }

    /// Drops one user of the open of `handle` on device `ordinal`; the last one calls `close` with
    /// its address. A handle that is not open is no error (nothing to close).
    pub(crate) fn close(&self, ordinal: usize, handle: &[u8; 64], close: impl FnOnce(u64) -> Result<()>) -> Result<()> {
        let mut opened = self.0.lock();
        let key = (ordinal, *handle);
        let Some((ptr, users)) = opened.get_mut(&key) else { return Ok(()) };
        *users -= 1;
        if *users > 0 {
            return Ok(());
        }
        let ptr = *ptr;
        opened.remove(&key);
        close(ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::SharedOpens;
    use std::cell::Cell;

    #[test]
    fn one_open_per_handle_and_device_closed_by_its_last_user() {
        let table = SharedOpens::new();
        let (opens, closes) = (Cell::new(0), Cell::new(Vec::new()));
        let open = |ptr: u64| {
            let opens = &opens;
            move || {
                opens.set(opens.get() + 1);
                Ok(ptr)
            }
        };
        let close = |ptr: u64| {
            let mut closed = closes.take();
            closed.push(ptr);
            closes.set(closed);
            Ok(())
        };
        let (a, b) = ([1u8; 64], [2u8; 64]);
        assert_eq!(table.open(0, &a, open(0x1000)).ok(), Some(0x1000));
        assert_eq!(table.open(0, &a, open(0x9999)).ok(), Some(0x1000), "the second mapping shares the open");
        assert_eq!(table.open(1, &a, open(0x2000)).ok(), Some(0x2000), "another device opens its own");
        assert_eq!(table.open(0, &b, open(0x3000)).ok(), Some(0x3000));
        assert_eq!(opens.get(), 3);
        assert!(table.close(0, &a, close).is_ok());
        assert_eq!(closes.take(), Vec::<u64>::new(), "a user is left");
        assert!(table.close(0, &a, close).is_ok());
        assert!(table.close(0, &a, close).is_ok(), "closing what is not open is no error");
        assert!(table.close(1, &a, close).is_ok());
        assert_eq!(closes.take(), vec![0x1000, 0x2000]);
        let failing = table.open(0, &a, || Err(crate::Error::InvalidHandle("refused".into())));
        assert!(failing.is_err());
        assert_eq!(table.open(0, &a, open(0x4000)).ok(), Some(0x4000), "a failed open leaves nothing behind");
    }
}
