//! Whether the writers commit asynchronously right now. Writers commit synchronously, and
//! every synchronous commit flushes the WAL written before it, so on its own a crash loses
//! only the last few milliseconds of transaction ids. Before a PostgreSQL crash the fault
//! turns on `synchronous_commit = off` for every writer for a few seconds: with
//! `wal_writer_delay = 10s`, the transaction ids of those seconds are then lost in the
//! crash and handed out again after recovery, which is the situation a relay that keeps an
//! old snapshot across the crash gets wrong. The Rust writers read the flag; the Python
//! writer looks for the flag file before each transaction.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The switch, shared by the fault that flips it and the writers that read it.
#[derive(Debug, Clone)]
pub struct CommitMode {
    asynchronous: Arc<AtomicBool>,
    /// Exists while commits are asynchronous (for the Python writer).
    file: PathBuf,
}

impl CommitMode {
    /// Synchronous commits; `file` is the flag file for other processes.
    pub fn new(file: PathBuf) -> Self {
        let _ = std::fs::remove_file(&file);
        CommitMode {
            asynchronous: Arc::new(AtomicBool::new(false)),
            file,
        }
    }

    /// The flag file's path.
    pub fn file(&self) -> &PathBuf {
        &self.file
    }

    /// True while writers should commit with `synchronous_commit = off`.
    pub fn asynchronous(&self) -> bool {
        self.asynchronous.load(Ordering::Relaxed)
    }

    /// Switches asynchronous commits on or off.
    pub fn set_asynchronous(&self, on: bool) {
        self.asynchronous.store(on, Ordering::Relaxed);
        if on {
            let _ = std::fs::write(&self.file, b"");
        } else {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}
