//! keel-cluster: the store trait with its redb and etcd backends, the Kubernetes-compatible API
//! server, the scheduler and the controllers.
//!
//! Today it holds the store ([`store`]), the API server ([`api`]) and the scheduler
//! ([`scheduler`]); the controllers follow in the standalone cluster issue. Each module has its own error enum, gathered
//! here into [`Error`].

pub mod api;
pub mod client;
pub mod controllers;
pub mod join;
pub mod scheduler;
pub mod store;

pub use store::{
    Deleted, EtcdStore, GetResult, KeyValue, ListOptions, ListPage, RedbOptions, RedbStore, Store,
    StoreConfig, StoreError, WatchEvent, WatchOptions, WatchStream,
};

/// Every error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] api::ServerError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(transparent)]
    Scheduler(#[from] scheduler::SchedulerError),
    #[error(transparent)]
    Join(#[from] join::JoinError),
}
