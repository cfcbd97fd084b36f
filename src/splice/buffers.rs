//! The splice's copy buffers: a small pool per worker thread.
//!
//! Why: a direction takes a buffer only once its source is readable and
//! gives it back as soon as the bytes are written, so an idle connection
//! holds none (docs/operations.md#sizing). Taking and giving back happen
//! once per message; a per-thread pool makes that a `Vec` push and pop
//! instead of an allocation of [`BUF_SIZE`], with no lock, since a buffer
//! never leaves the poll that took it on that thread.

use std::cell::RefCell;

/// Size of a pooled copy buffer; held only while data is in flight.
///
/// 32 KiB, not more: on loopback (a sidecar's upstream leg) a write runs
/// the receiver's TCP processing in the writer's context, so larger writes
/// cost more CPU per byte although they take fewer calls (16, 32 and
/// 64 KiB measured side by side: docs/benchmarks.md).
const BUF_SIZE: usize = 32 * 1024;
/// Buffers kept per worker thread for reuse.
const POOL_PER_THREAD: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with [`BUF_SIZE`] capacity, from this thread's pool if
/// it has one.
pub(crate) fn take_buffer() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

/// Gives `buf` back to this thread's pool (or frees it when the pool is
/// full, or when it is not a pool-sized buffer).
pub(crate) fn return_buffer(mut buf: Vec<u8>) {
    if buf.capacity() != BUF_SIZE {
        return; // a leftover-bytes buffer of another size: let it go
    }
    buf.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_PER_THREAD {
            p.push(buf);
        }
    });
}
