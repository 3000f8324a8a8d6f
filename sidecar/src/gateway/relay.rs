//! Threads with an event loop each, for a gateway's connections: a connection's reads,
//! checks and writes then never wait for another thread to wake up. On a busy machine that
//! hand-off (the I/O driver on one worker, the connection's task on another, a futex wake-up
//! between them) costs more CPU and latency than the relaying itself.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Relay threads; work is spread over them in turn.
#[derive(Debug)]
pub struct Relays {
    handles: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
}

impl Relays {
    /// Starts `n` threads (at least one) named `agentgate-<name>-<i>`.
    pub fn start(name: &str, n: usize) -> io::Result<Self> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            // Built on its own thread: a runtime must never be dropped inside another one
            // (as it would be here if the thread could not start).
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("agentgate-{name}-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => {
                            let _ = tx.send(Ok(runtime.handle().clone()));
                            // Runs for the life of the process.
                            runtime.block_on(std::future::pending::<()>());
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })?;
            let handle = rx.recv().map_err(|_| {
                io::Error::other(format!(
                    "relay thread agentgate-{name}-{i} stopped at start"
                ))
            })??;
            handles.push(handle);
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// The thread to give the next piece of work to.
    pub fn next(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}
