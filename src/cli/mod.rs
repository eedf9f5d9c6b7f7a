pub mod cni;
pub mod cri;
pub mod ctr;
pub mod image;
pub mod pod;
pub mod proxy;
pub mod scheduler;
pub mod server;
