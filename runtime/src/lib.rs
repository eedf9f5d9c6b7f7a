//! keel-runtime: everything a node needs to run containers, without any RPC surface.
//!
//! Today it owns the image store (`image`): registry pulls, the content-addressed blob store,
//! layer snapshots, image metadata, imports and garbage collection. Pods and containers join it
//! in the runtime issue. It must not know about CRI or Kubernetes types: keel-cri and keel-agent
//! translate to and from it.

pub mod container;
pub mod fsutil;
pub mod image;
pub mod pod;

pub use image::{ImageError, ImageStore};
