//! The path of a message through the relay, in the order it travels: the wake-up poller
//! finds new windows (`wakeup`), a partition's reader cuts them into batches (`reader`),
//! reading through the statements of a worker's session (`store`),
//! delivery publishes each batch and applies the failure policies (`delivery`), the
//! in-flight queue keeps several batches on their way while their acknowledgements come back
//! in order (`in_flight`), acknowledged messages are deleted for all partitions together
//! (`retire`), and the worker runs one partition's lifecycle around them (`worker`).

pub(crate) mod delivery;
pub(crate) mod in_flight;
pub mod reader;
pub(crate) mod retire;
pub(crate) mod store;
pub(crate) mod wakeup;
pub(crate) mod worker;
