//! `ferry` builds migration sessions (post-copy, pre-copy, hybrid, back-and-forth, fault-tolerant
//! primary/backup) from the transport, fault handler and pre-pager crates. The sessions land with
//! the post-copy engine (issue 3); until then this crate re-exports the transport.

pub use ferry_transport as transport;
