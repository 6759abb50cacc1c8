//! The partition workers' PostgreSQL sessions: a bounded pool, so an instance uses at most
//! `pool_size` worker connections whatever the number of partitions it owns (plus one each
//! for the wake-up poller, the lease task and the mapping cleanup).
//!
//! A worker takes a session only for a statement or two: a claim, a batch read, a batch
//! retirement, a move to `dead_letter`, a release. It gives it back while Kafka acknowledges
//! a batch and while it waits for work, so a pool much smaller than the partitions keeps them
//! all moving. Waiting is first come, first served (tokio's semaphore is fair).
//!
//! Why not a general pool crate: a session here carries more than a connection: the batch
//! statements prepared on it, and the database incarnation it talks to, which a worker must
//! compare with its reader's before trusting any window (see `session::Incarnation`). A pool
//! of plain connections would make every checkout ask for the incarnation again.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Statement};

use crate::error::{Error, Result};
use crate::pipeline::store::ReadStatements;
use crate::session::Incarnation;
use crate::sql::{SESSION_SETUP, Statements};

/// A worker session: its connection, the statements every batch runs prepared, and the
/// incarnation of the database it talks to.
pub struct Session {
    /// The connection.
    pub client: Client,
    /// The batch reads.
    pub read: ReadStatements,
    /// `Statements::retire`.
    pub retire: Statement,
    /// The database incarnation this connection talks to.
    pub incarnation: Incarnation,
}

/// The pool; see the module docs.
pub struct SessionPool {
    database: crate::connect::Database,
    /// `SET application_name ...`: `outboxd worker <schema>`, so operators (and tests) can
    /// tell the workers of one schema's relays apart.
    name: String,
    sql: Statements,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Arc<Session>>>,
}

impl SessionPool {
    /// A pool of at most `size` sessions (at least one) for the relay of `schema`.
    pub fn new(
        database: crate::connect::Database,
        sql: Statements,
        schema: &outbox::Schema,
        size: usize,
    ) -> Self {
        SessionPool {
            database,
            name: format!("SET application_name = 'outboxd worker {}';", schema.name()),
            sql,
            permits: Arc::new(Semaphore::new(size.max(1))),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Session>>> {
        match self.idle.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes a session, waiting for one to be free, opening a new one when none is idle.
    pub async fn checkout(self: &Arc<Self>) -> Result<Checkout> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::PoolClosed)?;
        let reused = loop {
            let Some(s) = self.idle().pop() else {
                break None;
            };
            if !s.client.is_closed() {
                break Some(s);
            }
        };
        let session = match reused {
            Some(s) => s,
            None => Arc::new(self.open().await?),
        };
        Ok(Checkout {
            session,
            keep: true,
            pool: Arc::clone(self),
            _permit: permit,
        })
    }

    async fn open(&self) -> Result<Session> {
        let client = crate::session::connect(
            &self.database,
            &format!("{SESSION_SETUP} {}", self.name),
            "partition worker",
        )
        .await?;
        // Prepared once per connection: parsed and planned once, one round trip per call.
        let read = ReadStatements {
            batch: client
                .prepare(&self.sql.read_batch)
                .await
                .map_err(Error::pg("preparing the batch read"))?,
            late: client
                .prepare(&self.sql.read_late)
                .await
                .map_err(Error::pg("preparing the late-row read"))?,
        };
        let retire = client
            .prepare(&self.sql.retire)
            .await
            .map_err(Error::pg("preparing the retirement"))?;
        let incarnation = crate::session::incarnation(&client, &self.sql).await?;
        Ok(Session {
            client,
            read,
            retire,
            incarnation,
        })
    }
}

/// A session taken from the pool; dropping it gives it back (unless it was discarded).
pub struct Checkout {
    session: Arc<Session>,
    keep: bool,
    pool: Arc<SessionPool>,
    _permit: OwnedSemaphorePermit,
}

impl Checkout {
    /// Closes the session instead of giving it back (a statement failed on it: its state is
    /// unknown).
    pub fn discard(mut self) {
        self.keep = false;
    }
}

impl std::ops::Deref for Checkout {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.keep && !self.session.client.is_closed() {
            self.pool.idle().push(Arc::clone(&self.session));
        }
    }
}
