//! This process's claims kept alive: a thread refreshes every held key's heartbeat, so other
//! engine processes can tell a live owner from a dead one.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache::{Cache, ClaimOwner};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// Refreshes this process's claims every few seconds, so other processes can tell a live
/// owner from a dead one.
/// Stopped when dropped, so an early return cannot leave its thread (and its handle on the
/// cache) running.
pub struct Heartbeat {
    held: Arc<Mutex<HashSet<String>>>,
    stop_tx: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(cache: Arc<Cache>, owner: ClaimOwner) -> Self {
        let held: Arc<Mutex<HashSet<String>>> = Arc::default();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = {
            let held = held.clone();
            std::thread::spawn(move || loop {
                match stop_rx.recv_timeout(HEARTBEAT_EVERY) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let keys: Vec<String> = held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned()
                    .collect();
                if !keys.is_empty() {
                    if let Err(e) = cache.heartbeat(&keys, &owner) {
                        tracing::warn!("claim heartbeat failed: {e}");
                    }
                }
            })
        };
        Self {
            held,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn hold(&self, key: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
    }

    pub fn drop_key(&self, key: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop_tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
