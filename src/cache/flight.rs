//! Single-flight: concurrent callers with the same key share one execution and its result.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

pub struct Flights<K, V> {
    map: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    pub fn new() -> Self {
        Flights { map: Mutex::new(HashMap::new()) }
    }

    /// Runs `f` unless a call with `key` is in flight, in which case calls `on_join` and
    /// waits for that one. If the running caller is cancelled, a waiting one takes over.
    /// The key is free again once the call completes.
    pub async fn run<F, Fut>(&self, key: K, on_join: impl FnOnce(), f: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let (cell, joined) = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&key) {
                Some(c) => (c.clone(), true),
                None => {
                    let c = Arc::new(OnceCell::new());
                    map.insert(key.clone(), c.clone());
                    (c, false)
                }
            }
        };
        if joined {
            on_join();
        }
        let v = cell.get_or_init(f).await.clone();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&key);
        }
        v
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_calls_share_one_execution() {
        let flights: Arc<Flights<&str, u32>> = Arc::new(Flights::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let joins = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (flights, runs, gate, joins) = (flights.clone(), runs.clone(), gate.clone(), joins.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(
                        "k",
                        || {
                            joins.fetch_add(1, Ordering::SeqCst);
                        },
                        || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await;
                            7
                        },
                    )
                    .await
            }));
        }
        // Wait until the one execution has started, then release it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no execution started");
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.expect("task"), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joins.load(Ordering::SeqCst), 7);
    }
}
