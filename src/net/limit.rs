//! A cap on things in use at once that a reload can move: open client
//! connections (`limits.max_connections`). (Requests in flight upstream
//! have a fair allocator of their own, `fair.rs`.)
//!
//! One [`ResizableLimit`] lives for the proxy's life, so what was taken
//! before a reload and after it counts against one cap. Growing adds
//! permits at once (a waiter proceeds at once). Shrinking takes back the
//! free permits at once and records the rest as a debt that permits pay
//! when they are released, instead of returning to the pool: the cap is
//! exact as soon as enough holders finish, and a later growth cancels the
//! debt first, so the two never fight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct ResizableLimit {
    inner: Arc<Inner>,
}

struct Inner {
    semaphore: Arc<Semaphore>,
    /// The cap as configured. Changed only under the lock, by `resize`.
    size: Mutex<usize>,
    /// Permits still to be taken back from holders, after a shrink.
    debt: AtomicUsize,
}

/// One unit of the limit, held until dropped. A permit released while the
/// limit owes some is kept back instead (the shrink takes effect).
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    inner: Arc<Inner>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let paid = self
            .inner
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if let (true, Some(p)) = (paid, self.permit.take()) {
            p.forget();
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl ResizableLimit {
    pub fn new(size: usize) -> ResizableLimit {
        ResizableLimit {
            inner: Arc::new(Inner {
                semaphore: Arc::new(Semaphore::new(size)),
                size: Mutex::new(size),
                debt: AtomicUsize::new(0),
            }),
        }
    }

    /// The cap as configured.
    #[cfg(test)]
    pub fn size(&self) -> usize {
        *self.inner.size.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Free units now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.inner.semaphore.available_permits()
    }

    /// Moves the cap to `to`.
    pub fn resize(&self, to: usize) {
        let mut size = self.inner.size.lock().unwrap_or_else(|p| p.into_inner());
        let from = *size;
        *size = to;
        if to > from {
            // Growth first cancels what shrinking still owed.
            let mut grow = to - from;
            let cancelled = self
                .inner
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    Some(d.saturating_sub(grow))
                })
                .map_or(0, |d| d.min(grow));
            grow -= cancelled;
            self.inner.semaphore.add_permits(grow);
        } else if to < from {
            let excess = from - to;
            let taken = self.inner.semaphore.forget_permits(excess);
            self.inner.debt.fetch_add(excess - taken, Ordering::AcqRel);
        }
    }

    /// A unit now, if one is free.
    #[cfg(test)]
    pub fn try_acquire(&self) -> Option<Permit> {
        let permit = self.inner.semaphore.clone().try_acquire_owned().ok()?;
        Some(self.wrap(permit))
    }

    /// A unit, waiting for one to be free. `None` only if the limit was
    /// closed, which it never is.
    pub async fn acquire(&self) -> Option<Permit> {
        let permit = self.inner.semaphore.clone().acquire_owned().await.ok()?;
        Some(self.wrap(permit))
    }

    fn wrap(&self, permit: OwnedSemaphorePermit) -> Permit {
        Permit {
            permit: Some(permit),
            inner: self.inner.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_is_at_once_and_shrinking_takes_free_units_at_once() {
        let l = ResizableLimit::new(2);
        let a = l.try_acquire().unwrap();
        l.resize(4);
        assert_eq!(l.available(), 3);
        l.resize(1);
        // The three free units went at once; the held one is the one left.
        assert_eq!(l.available(), 0);
        assert!(l.try_acquire().is_none());
        drop(a);
        assert_eq!(l.available(), 1);
        assert_eq!(l.size(), 1);
    }

    #[test]
    fn a_smaller_cap_holds_once_the_busy_units_are_released() {
        // Issue 11, defect 3: 3 busy, shrink to 1.
        let l = ResizableLimit::new(3);
        let held: Vec<Permit> = (0..3).map(|_| l.try_acquire().unwrap()).collect();
        l.resize(1);
        drop(held);
        // One unit, not three.
        let one = l.try_acquire().expect("one unit");
        assert!(l.try_acquire().is_none(), "the cap is 1");
        drop(one);
        assert_eq!(l.available(), 1);
    }

    #[test]
    fn growing_after_a_shrink_cancels_the_debt_first() {
        let l = ResizableLimit::new(3);
        let held: Vec<Permit> = (0..3).map(|_| l.try_acquire().unwrap()).collect();
        l.resize(1); // owes 2
        l.resize(3); // owes nothing
        assert_eq!(l.available(), 0);
        drop(held);
        assert_eq!(l.available(), 3);
        l.resize(2);
        assert_eq!(l.available(), 2);
    }

    #[tokio::test]
    async fn a_waiter_proceeds_as_soon_as_the_cap_grows() {
        let l = ResizableLimit::new(1);
        let _busy = l.try_acquire().unwrap();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        l.resize(2);
        assert!(waiter.await.unwrap());
    }
}
