//! The upstream's slots (`upstream.max_in_flight`), shared fairly between
//! API clients.
//!
//! A rate limits how fast a client's requests start, not how many stay in
//! flight: a client whose requests are slow (or made slow) could otherwise
//! hold every slot, and everyone else would queue behind it, first come
//! first served. Here each client holds at most its own `max_in_flight`
//! (half the slots unless configured), and when requests wait, the next
//! free slot goes to the waiting client that holds the fewest (first come
//! first served within a client, and between clients holding as many). So
//! a client that holds little is served before one that holds much,
//! whoever came first, and as long as one other client is not at its own
//! cap, a slot is free for a newcomer at once.
//!
//! One allocator lives for the proxy's life (a reload resizes it, as
//! `limit::ResizableLimit` does for the listener), so requests from before
//! and after a reload count against one cap. Requests without a client
//! (no `[[client]]` tables) are one client with no cap of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};

/// Who holds a slot: an API client's name, or `None` for requests without
/// a client.
pub type Holder = Option<Arc<str>>;

#[derive(Clone)]
pub struct FairSlots {
    inner: Arc<Mutex<State>>,
}

struct State {
    capacity: usize,
    in_use: usize,
    clients: HashMap<Holder, Client>,
    next_seq: u64,
}

#[derive(Default)]
struct Client {
    in_flight: usize,
    /// Its own cap, as its latest request said.
    cap: usize,
    waiting: VecDeque<Waiter>,
}

struct Waiter {
    seq: u64,
    grant: oneshot::Sender<Slot>,
}

/// One slot, held until dropped.
pub struct Slot {
    inner: Arc<Mutex<State>>,
    holder: Holder,
    /// False for a slot that never reached its waiter (nothing to give
    /// back).
    armed: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            release(&self.inner, &self.holder);
        }
    }
}

/// Why no slot came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The deadline passed with every slot (or the client's own share)
    /// taken.
    TimedOut,
}

impl FairSlots {
    pub fn new(capacity: usize) -> FairSlots {
        FairSlots {
            inner: Arc::new(Mutex::new(State {
                capacity,
                in_use: 0,
                clients: HashMap::new(),
                next_seq: 0,
            })),
        }
    }

    /// Moves the cap: a larger one serves waiters at once, a smaller one
    /// holds as the slots in use are released.
    pub fn resize(&self, capacity: usize) {
        let mut st = lock(&self.inner);
        st.capacity = capacity;
        let granted = grant(&self.inner, &mut st);
        drop(st);
        drop(granted);
    }

    /// A slot for `holder` (whose own cap is `cap`) now, if one is free to
    /// it and nobody it must let go first is waiting.
    pub fn try_acquire(&self, holder: &Holder, cap: usize) -> Option<Slot> {
        let mut st = lock(&self.inner);
        take_now(&self.inner, &mut st, holder, cap)
    }

    /// A slot for `holder`, waiting for one until `deadline`.
    pub async fn acquire(
        &self,
        holder: &Holder,
        cap: usize,
        deadline: Instant,
    ) -> Result<Slot, Waited> {
        let (seq, rx) = {
            let mut st = lock(&self.inner);
            if let Some(slot) = take_now(&self.inner, &mut st, holder, cap) {
                return Ok(slot);
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let (tx, rx) = oneshot::channel();
            let client = st.clients.entry(holder.clone()).or_default();
            client.cap = cap;
            client.waiting.push_back(Waiter { seq, grant: tx });
            (seq, rx)
        };
        let mut queued = Queued {
            inner: &self.inner,
            holder,
            seq,
            done: false,
        };
        let got = timeout_at(deadline, rx).await;
        queued.done = true;
        match got {
            Ok(Ok(slot)) => Ok(slot),
            // The sender is only dropped unsent by `Queued` (not yet), or
            // with the whole allocator.
            Ok(Err(_)) | Err(_) => {
                queued.done = false;
                Err(Waited::TimedOut)
            }
        }
    }

    /// Slots in use now, by everyone and by `holder`.
    #[cfg(test)]
    fn in_use(&self, holder: &Holder) -> (usize, usize) {
        let st = lock(&self.inner);
        let mine = st.clients.get(holder).map_or(0, |c| c.in_flight);
        (st.in_use, mine)
    }
}

fn lock(inner: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every change leaves the counts consistent.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// A slot at once if one is free, the holder is under its cap, and no
/// client is waiting (a free slot with waiters means each is at its cap).
fn take_now(
    inner: &Arc<Mutex<State>>,
    st: &mut State,
    holder: &Holder,
    cap: usize,
) -> Option<Slot> {
    if st.in_use >= st.capacity {
        return None;
    }
    let client = st.clients.entry(holder.clone()).or_default();
    client.cap = cap;
    if client.in_flight >= cap || !client.waiting.is_empty() {
        return None;
    }
    client.in_flight += 1;
    st.in_use += 1;
    Some(Slot {
        inner: inner.clone(),
        holder: holder.clone(),
        armed: true,
    })
}

fn release(inner: &Arc<Mutex<State>>, holder: &Holder) {
    let mut st = lock(inner);
    st.in_use -= 1;
    if let Some(client) = st.clients.get_mut(holder) {
        client.in_flight -= 1;
        if client.in_flight == 0 && client.waiting.is_empty() {
            st.clients.remove(holder);
        }
    }
    let granted = grant(inner, &mut st);
    drop(st);
    // Slots whose waiter had gone are dropped here, unarmed, outside the
    // lock.
    drop(granted);
}

/// Hands free slots to waiters: each to the waiting client (under its cap)
/// that holds the fewest, the longest waiting first among equals. Returns
/// the slots whose waiter had just gone (unarmed: never counted).
fn grant(inner: &Arc<Mutex<State>>, st: &mut State) -> Vec<Slot> {
    let mut gone = Vec::new();
    while st.in_use < st.capacity {
        let next = st
            .clients
            .iter()
            .filter(|(_, c)| c.in_flight < c.cap)
            .filter_map(|(h, c)| c.waiting.front().map(|w| (c.in_flight, w.seq, h)))
            .min_by_key(|(held, seq, _)| (*held, *seq))
            .map(|(_, _, h)| h.clone());
        let Some(holder) = next else { break };
        let Some(client) = st.clients.get_mut(&holder) else {
            break;
        };
        let Some(waiter) = client.waiting.pop_front() else {
            break;
        };
        let slot = Slot {
            inner: inner.clone(),
            holder: holder.clone(),
            armed: true,
        };
        match waiter.grant.send(slot) {
            Ok(()) => {
                client.in_flight += 1;
                st.in_use += 1;
            }
            Err(mut slot) => {
                slot.armed = false;
                gone.push(slot);
            }
        }
    }
    gone
}

/// A waiter that stops waiting (its deadline, or its request went away)
/// leaves its client's queue.
struct Queued<'a> {
    inner: &'a Arc<Mutex<State>>,
    holder: &'a Holder,
    seq: u64,
    done: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = lock(self.inner);
        if let Some(client) = st.clients.get_mut(self.holder) {
            client.waiting.retain(|w| w.seq != self.seq);
            if client.in_flight == 0 && client.waiting.is_empty() {
                st.clients.remove(self.holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn who(name: &str) -> Holder {
        Some(Arc::from(name))
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// A client holds at most its own cap; the rest stays free for others.
    #[tokio::test]
    async fn a_client_holds_no_more_than_its_cap() {
        let slots = FairSlots::new(8);
        let greedy = who("greedy");
        let held: Vec<_> = (0..4)
            .map(|_| slots.try_acquire(&greedy, 4).unwrap())
            .collect();
        assert!(slots.try_acquire(&greedy, 4).is_none());
        assert!(slots.try_acquire(&who("polite"), 4).is_some());
        drop(held);
        assert_eq!(slots.in_use(&greedy), (0, 0));
    }

    /// When slots are scarce, the next free one goes to the waiting client
    /// holding the fewest, though the greedy one queued first.
    #[tokio::test]
    async fn a_free_slot_goes_to_the_client_holding_the_fewest() {
        let slots = FairSlots::new(4);
        let (greedy, polite) = (who("greedy"), who("polite"));
        let mut held: Vec<_> = (0..4)
            .map(|_| slots.try_acquire(&greedy, 8).unwrap())
            .collect();
        let greedy_waits = tokio::spawn({
            let (s, g) = (slots.clone(), greedy.clone());
            async move { s.acquire(&g, 8, soon()).await }
        });
        // Let the greedy waiter queue first.
        while lock(&slots.inner).clients[&greedy].waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        let polite_waits = tokio::spawn({
            let (s, p) = (slots.clone(), polite.clone());
            async move { s.acquire(&p, 8, soon()).await }
        });
        while !lock(&slots.inner).clients.contains_key(&polite) {
            tokio::task::yield_now().await;
        }
        held.pop();
        let polite_slot = polite_waits.await.unwrap().unwrap();
        assert!(!greedy_waits.is_finished());
        assert_eq!(slots.in_use(&polite), (4, 1));
        held.pop();
        let greedy_slot = greedy_waits.await.unwrap().unwrap();
        drop((polite_slot, greedy_slot, held));
        assert_eq!(slots.in_use(&greedy), (0, 0));
    }

    /// A waiter whose deadline passes leaves the queue and is never
    /// counted; one whose request went away neither.
    #[tokio::test]
    async fn waiters_that_give_up_leave_no_trace() {
        let slots = FairSlots::new(1);
        let a = who("a");
        let held = slots.try_acquire(&a, 1).unwrap();
        let late = Instant::now() + Duration::from_millis(10);
        assert_eq!(
            slots.acquire(&who("b"), 1, late).await.unwrap_err(),
            Waited::TimedOut
        );
        let gone = tokio::spawn({
            let s = slots.clone();
            async move { s.acquire(&who("c"), 1, soon()).await }
        });
        while !lock(&slots.inner).clients.contains_key(&who("c")) {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(held);
        assert_eq!(slots.in_use(&a), (0, 0));
        assert!(lock(&slots.inner).clients.is_empty());
        assert!(slots.try_acquire(&who("d"), 1).is_some());
    }

    /// A smaller cap holds once slots are released; a larger one serves
    /// waiters at once.
    #[tokio::test]
    async fn a_resize_moves_the_cap() {
        let slots = FairSlots::new(2);
        let a = who("a");
        let first = slots.try_acquire(&a, 9).unwrap();
        let _second = slots.try_acquire(&a, 9).unwrap();
        slots.resize(1);
        drop(first);
        assert!(slots.try_acquire(&a, 9).is_none(), "still 1 in use, cap 1");
        let waiting = tokio::spawn({
            let (s, a) = (slots.clone(), a.clone());
            async move { s.acquire(&a, 9, soon()).await }
        });
        while lock(&slots.inner).clients[&a].waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        slots.resize(3);
        assert!(waiting.await.unwrap().is_ok());
    }
}
