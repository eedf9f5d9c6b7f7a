pub mod cni;
pub mod ctr;
pub mod image;
