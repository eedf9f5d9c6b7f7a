pub mod cni;
pub mod cri;
pub mod ctr;
pub mod image;
